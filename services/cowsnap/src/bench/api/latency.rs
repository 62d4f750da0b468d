//! The CreateSnapshot latency sample: snapshots of volumes that were just
//! written to with FUA through their NBD export (on whichever worker holds
//! each), timed one by one.

use anyhow::Context;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::super::soak::nbd_client::NbdClient;
use super::ApiArgs;
use super::baseline;
use super::calls::{self, Snapshots, Volumes};

/// p50 and p99 (seconds) of CreateSnapshot, each on a volume that was
/// just written to with FUA through its NBD export.
pub(super) async fn create_snapshot_latency(
    args: &ApiArgs,
    ch: &Channel,
    bytes: u64,
) -> anyhow::Result<(f64, f64)> {
    let mut vols = Volumes::new(ch.clone());
    let mut snaps = Snapshots::new(ch.clone());
    let block = 16 * 1024.min(bytes as usize);
    let block = block.min(bytes as usize);
    let data: Vec<u8> = (0..block).map(|i| (i * 7 + 1) as u8).collect();
    let mut lat = Vec::with_capacity(args.latency_samples);
    let mut client: Option<NbdClient> = None;
    for i in 0..args.latency_samples {
        let vol = format!("lat-{}", i / 10);
        if i % 10 == 0 {
            if let Some(c) = client.take() {
                c.close().await;
            }
            let v = vols
                .create_volume(calls::create_volume_request(&vol, bytes))
                .await
                .with_context(|| format!("creating volumes/{vol}"))?
                .into_inner();
            let (addr, export) = nbd_target(&v.nbd_uri)?;
            let mut c = NbdClient::connect(addr, export)
                .await
                .map_err(|e| anyhow::anyhow!("NBD connect to {}: {e:?}", v.nbd_uri))?;
            // Some data everywhere first.
            for off in (0..bytes).step_by(block) {
                c.write(off, &data[..block.min((bytes - off) as usize)], true)
                    .await
                    .map_err(|e| anyhow::anyhow!("NBD write: {e:?}"))?;
            }
            client = Some(c);
        }
        let c = client.as_mut().expect("connected");
        let off = (i as u64 * block as u64) % (bytes - bytes % block as u64).max(block as u64);
        c.write(off, &data, true)
            .await
            .map_err(|e| anyhow::anyhow!("NBD write: {e:?}"))?;
        let t = Instant::now();
        snaps
            .create_snapshot(calls::create_snapshot_request(
                &format!("volumes/{vol}"),
                &format!("s{i}"),
            ))
            .await
            .with_context(|| format!("snapshot {i} of volumes/{vol}"))?;
        lat.push(t.elapsed().as_secs_f64());
    }
    if let Some(c) = client.take() {
        c.close().await;
    }
    Ok((
        baseline::percentile(&mut lat, 0.5),
        baseline::percentile(&mut lat, 0.99),
    ))
}

/// The TCP address and export name of an `nbd://HOST:PORT/EXPORT` URI.
fn nbd_target(uri: &str) -> anyhow::Result<(&str, &str)> {
    uri.strip_prefix("nbd://")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(addr, export)| !addr.is_empty() && !export.is_empty())
        .ok_or_else(|| anyhow::anyhow!("{uri:?} is no nbd://HOST:PORT/EXPORT URI"))
}

#[cfg(test)]
mod tests {
    use super::nbd_target;

    #[test]
    fn nbd_target_splits_address_and_export_and_refuses_other_uris() {
        assert_eq!(
            nbd_target("nbd://127.0.0.1:10809/volumes/lat-0").unwrap(),
            ("127.0.0.1:10809", "volumes/lat-0")
        );
        for bad in [
            "nbd+unix:///volumes/v?socket=/run/nbd.sock",
            "nbd://127.0.0.1:10809",
            "nbd://127.0.0.1:10809/",
            "",
        ] {
            assert!(nbd_target(bad).is_err(), "{bad}");
        }
    }
}

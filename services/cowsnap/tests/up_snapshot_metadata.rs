//! Issue 10 point 5, end to end on a real `cowsnap up --csi-endpoint`:
//! chunks written over NBD with qemu-io between three snapshots of a
//! volume; the CSI SnapshotMetadata service (GetMetadataDelta,
//! GetMetadataAllocated over the CSI socket) and `cowsnap snapshot delta`
//! (the `cowsnap.v1` API, also through grpcurl) are compared with a model of what was written,
//! with paging (`max_results`, `starting_offset`), a writable snapshot's
//! own writes, and the bad requests (an overflowed snapshot included);
//! then, with the process stopped, `cowsnap cow delta` on the same device
//! files must give the same ranges.
//!
//! The model: a snapshot holds an exception for exactly the chunks written
//! in the volume after it was taken; a delta between two snapshots is the
//! union of both sets (`cowsnap_store::delta`), which covers every chunk
//! written between the two.

mod up_common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use cowsnap_proto::cowsnap::v1 as pb;
use cowsnap_proto::csi::v1 as csi;
use tonic::Code;
use tonic::transport::Channel;
use up_common::*;

/// The volume's chunk size (the default, 32 sectors).
const CHUNK: u64 = 16 * 1024;
const SIZE: u64 = 4 * MIB;

async fn csi_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://csi.test")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

fn qemu_write(uri: &str, off: u64, len: u64, pattern: u8) {
    let cmd = format!("write -P {pattern} {off} {len}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", uri, "-c", &cmd])
        .output()
        .expect("qemu-io (apt install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmd}: {text}"
    );
}

/// `cowsnap ARGS`; returns (exit code, stdout, stderr).
fn cowsnap(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sorted chunks as merged byte ranges `(offset, length)`.
fn ranges(chunks: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        match out.last_mut() {
            Some((o, l)) if *o + *l == c * CHUNK => *l += CHUNK,
            _ => out.push((c * CHUNK, CHUNK)),
        }
    }
    out
}

/// The chunks a byte range touches.
fn chunks_of(off: u64, len: u64) -> impl Iterator<Item = u64> {
    off / CHUNK..(off + len).div_ceil(CHUNK)
}

/// `(offset, length)` pairs of a JSON `ranges` array (`cowsnap.v1` or
/// `cowsnap cow delta` output).
fn json_ranges(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v["ranges"]
        .as_array()
        .unwrap_or_else(|| panic!("no ranges in {v}"))
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect()
}

/// Every message of a GetMetadataDelta stream.
async fn delta_messages(
    ch: &Channel,
    base: &str,
    target: &str,
    start: i64,
    max: i32,
) -> Result<Vec<csi::GetMetadataDeltaResponse>, tonic::Status> {
    let mut c = csi::snapshot_metadata_client::SnapshotMetadataClient::new(ch.clone());
    let mut s = c
        .get_metadata_delta(csi::GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset: start,
            max_results: max,
            secrets: Default::default(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

/// The tuples of a delta stream, checked against the spec's rules for a
/// stream: one style (VARIABLE_LENGTH) and capacity throughout, at most
/// `max` tuples a message, strictly increasing and apart, none ending at
/// or before `start`.
async fn delta(ch: &Channel, base: &str, target: &str, start: i64, max: i32) -> Vec<(u64, u64)> {
    let msgs = delta_messages(ch, base, target, start, max)
        .await
        .unwrap_or_else(|e| panic!("GetMetadataDelta {base} -> {target}: {e}"));
    assert!(!msgs.is_empty(), "a stream carries at least one message");
    let mut out = Vec::new();
    for m in &msgs {
        assert_eq!(
            m.block_metadata_type(),
            csi::BlockMetadataType::VariableLength
        );
        assert_eq!(m.volume_capacity_bytes, SIZE as i64);
        if max > 0 {
            assert!(m.block_metadata.len() <= max as usize, "{m:?}");
        }
        out.extend(
            m.block_metadata
                .iter()
                .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
        );
    }
    check_tuples(&out, start as u64);
    out
}

fn check_tuples(t: &[(u64, u64)], start: u64) {
    for w in t.windows(2) {
        assert!(w[0].0 + w[0].1 < w[1].0, "apart and increasing: {t:?}");
    }
    for &(o, l) in t {
        assert!(l > 0 && o + l <= SIZE, "{t:?}");
    }
    if let Some(&(o, l)) = t.first() {
        assert!(start < o + l, "nothing ends at or before {start}: {t:?}");
    }
}

async fn allocated(ch: &Channel, snap: &str, start: i64, max: i32) -> Vec<(u64, u64)> {
    let mut c = csi::snapshot_metadata_client::SnapshotMetadataClient::new(ch.clone());
    let mut s = c
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: snap.into(),
            starting_offset: start,
            max_results: max,
            secrets: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        assert_eq!(
            m.block_metadata_type(),
            csi::BlockMetadataType::VariableLength
        );
        assert_eq!(m.volume_capacity_bytes, SIZE as i64);
        out.extend(
            m.block_metadata
                .iter()
                .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
        );
    }
    check_tuples(&out, start as u64);
    out
}

/// The gRPC code of a failed delta call (it may fail the call or the
/// stream's first message).
async fn delta_error(ch: &Channel, base: &str, target: &str, start: i64) -> Code {
    match delta_messages(ch, base, target, start, 0).await {
        Ok(m) => panic!("{base} -> {target} at {start} succeeded: {m:?}"),
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_and_allocated_maps_match_what_was_written_and_the_offline_tool() {
    let tmp = scratch();
    let sock = tmp.path().join("csi").join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let data = tmp.path().join("data");
    let mut up = Up::start_with_env(
        &data,
        &[
            ("COWSNAP_CSI_ENDPOINT", endpoint.as_str()),
            ("COWSNAP_CSI_ADVERTISE_SNAPSHOT_METADATA", "true"),
        ],
    );
    up.ready().await;
    let mut api = up.clients().await;
    for v in ["v", "w"] {
        api.create_volume(v, SIZE).await;
    }
    let uri = format!("nbd://{}/volumes/v", up.nbd());
    let snap = async |api: &mut Api, vol: &str, id: &str| {
        api.create_snapshot(vol, id).await.unwrap();
    };
    // Byte ranges written after each snapshot: whole chunks, runs, a write
    // inside one chunk, one across a chunk boundary, the last chunk.
    let rounds: [&[(u64, u64)]; 4] = [
        &[(0, 4 * CHUNK)],
        &[
            (3 * CHUNK, CHUNK),
            (10 * CHUNK, 3 * CHUNK),
            (40 * CHUNK + 512, 512),
            (100 * CHUNK - 4096, 8192),
        ],
        &[
            (11 * CHUNK, CHUNK),
            (50 * CHUNK, 2 * CHUNK),
            (200 * CHUNK + 4096, 4096),
        ],
        &[
            (5 * CHUNK, CHUNK),
            (12 * CHUNK, CHUNK),
            (SIZE - CHUNK, CHUNK),
        ],
    ];
    // written[i]: the chunks written after snapshot s{i} (i = 1..3).
    let mut written: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 4];
    for (round, writes) in rounds.iter().enumerate() {
        if round > 0 {
            snap(&mut api, "v", &format!("s{round}")).await;
        }
        for (k, &(off, len)) in writes.iter().enumerate() {
            qemu_write(&uri, off, len, (round * 16 + k + 1) as u8);
            for c in chunks_of(off, len) {
                for w in written.iter_mut().take(round + 1).skip(1) {
                    w.insert(c);
                }
            }
        }
    }
    snap(&mut api, "w", "other").await;
    // A writable snapshot taken last: its own exceptions are the chunks
    // written into it (the volume is not written after it).
    api.snapshots
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/v".into(),
            snapshot_id: "s4".into(),
            snapshot: Some(pb::Snapshot {
                writable: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let s4_uri = format!("nbd://{}/volumes/v/snapshots/s4", up.nbd());
    qemu_write(&s4_uri, 77 * CHUNK + 1024, 1024, 0x77);
    qemu_write(&s4_uri, 90 * CHUNK, 2 * CHUNK, 0x78);
    written.push([77, 90, 91].into_iter().collect());
    let exceptions = |i: usize| written[i].clone();
    let union = |a: usize, b: usize| -> BTreeSet<u64> {
        exceptions(a).union(&exceptions(b)).copied().collect()
    };
    let ch = csi_channel(&sock).await;

    // Identity advertises the service on this (controller) endpoint, as
    // asked.
    let caps = csi::identity_client::IdentityClient::new(ch.clone())
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert!(
        caps.iter().any(|c| matches!(
            &c.r#type,
            Some(csi::plugin_capability::Type::Service(s))
                if s.r#type() == csi::plugin_capability::service::Type::SnapshotMetadataService
        )),
        "{caps:?}"
    );

    // Deltas between each pair: the union of both exception sets, which
    // covers every chunk written between the two.
    for (base, target) in [(1, 2), (2, 3), (1, 3), (3, 1), (3, 4), (1, 4)] {
        let got = delta(&ch, &format!("v/s{base}"), &format!("v/s{target}"), 0, 0).await;
        assert_eq!(got, ranges(&union(base, target)), "s{base} -> s{target}");
        let (lo, hi) = (base.min(target), base.max(target));
        let between: BTreeSet<u64> = exceptions(lo)
            .difference(&exceptions(hi))
            .copied()
            .collect();
        for c in between {
            assert!(
                got.iter()
                    .any(|&(o, l)| o <= c * CHUNK && c * CHUNK < o + l),
                "chunk {c}, written between s{lo} and s{hi}, is in their delta"
            );
        }
    }
    // Paging: at most 2 tuples a message, several messages, the same whole.
    let whole = delta(&ch, "v/s1", "v/s2", 0, 0).await;
    assert!(whole.len() > 4, "{whole:?}");
    let msgs = delta_messages(&ch, "v/s1", "v/s2", 0, 2).await.unwrap();
    assert_eq!(msgs.len(), whole.len().div_ceil(2));
    assert_eq!(delta(&ch, "v/s1", "v/s2", 0, 2).await, whole);
    // starting_offset: inside a run of chunks 10..=12 (chunk 11 plus a
    // little): the run starts at chunk 11; at a range's end: the next one.
    let inside = (11 * CHUNK + 100) as i64;
    let from = delta(&ch, "v/s1", "v/s2", inside, 1).await;
    let run = whole
        .iter()
        .position(|&(o, l)| o <= 11 * CHUNK && 11 * CHUNK < o + l)
        .unwrap();
    let (ro, rl) = whole[run];
    assert_eq!(from[0], (11 * CHUNK, ro + rl - 11 * CHUNK));
    assert_eq!(&from[1..], &whole[run + 1..]);
    let after = delta(&ch, "v/s1", "v/s2", (ro + rl) as i64, 3).await;
    assert_eq!(after, whole[run + 1..].to_vec());
    assert_eq!(delta(&ch, "v/s1", "v/s2", SIZE as i64, 0).await, vec![]);

    // Allocated: the whole volume (fully provisioned), cut at the offset.
    assert_eq!(allocated(&ch, "v/s2", 0, 0).await, vec![(0, SIZE)]);
    assert_eq!(
        allocated(&ch, "v/s2", (MIB + 7) as i64, 1).await,
        vec![(MIB, SIZE - MIB)]
    );

    // Bad requests.
    assert_eq!(delta_error(&ch, "v/s1", "v/nope", 0).await, Code::NotFound);
    assert_eq!(delta_error(&ch, "v/nope", "v/s2", 0).await, Code::NotFound);
    assert_eq!(
        delta_error(&ch, "w/other", "v/s2", 0).await,
        Code::InvalidArgument
    );
    assert_eq!(
        delta_error(&ch, "v/s1", "v/s2", SIZE as i64 + 1).await,
        Code::OutOfRange
    );
    assert_eq!(delta_error(&ch, "v/s1", "v/s2", -1).await, Code::OutOfRange);
    assert_eq!(delta_error(&ch, "", "v/s2", 0).await, Code::InvalidArgument);
    assert_eq!(
        delta_error(&ch, "v/s1", "not an id", 0).await,
        Code::InvalidArgument
    );
    let mut c = csi::snapshot_metadata_client::SnapshotMetadataClient::new(ch.clone());
    let e = c
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: "v/nope".into(),
            ..Default::default()
        })
        .await
        .map(drop)
        .expect_err("an unknown snapshot");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = c
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: "v/s1".into(),
            starting_offset: SIZE as i64 + 4096,
            ..Default::default()
        })
        .await
        .map(drop)
        .expect_err("an offset past the end");
    assert_eq!(e.code(), Code::OutOfRange, "{e}");

    // A snapshot that overflowed (COW room for one data chunk, three
    // chunks written over it) has lost its content: FAILED_PRECONDITION.
    api.snapshots
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/w".into(),
            snapshot_id: "tiny".into(),
            snapshot: Some(pb::Snapshot {
                cow_size_bytes: 3 * CHUNK,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    qemu_write(&format!("nbd://{}/volumes/w", up.nbd()), 0, 3 * CHUNK, 0x55);
    assert_eq!(
        delta_error(&ch, "w/other", "w/tiny", 0).await,
        Code::FailedPrecondition
    );
    let e = c
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: "w/tiny".into(),
            ..Default::default()
        })
        .await
        .map(drop)
        .expect_err("an invalid snapshot");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // The admin CLI over cowsnap.v1 says the same.
    let server = up.api();
    let (code, out, err) = cowsnap(&[
        "snapshot", "delta", "v/s2", "--base", "v/s1", "--json", "--server", &server,
    ]);
    assert_eq!(code, 0, "{err}");
    let cli_json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json_ranges(&cli_json), whole);
    assert_eq!(cli_json["volume_size_bytes"].as_u64(), Some(SIZE));
    // Without a base: against the volume now, the snapshot's own
    // exceptions.
    let (code, out, err) = cowsnap(&["snapshot", "delta", "v/s2", "--json", "--server", &server]);
    assert_eq!(code, 0, "{err}");
    let s2_alone = json_ranges(&serde_json::from_str(&out).unwrap());
    assert_eq!(s2_alone, ranges(&exceptions(2)));
    let (code, out, err) = cowsnap(&["snapshot", "delta", "v/s3", "--server", &server]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
    let want: Vec<String> = ranges(&exceptions(3))
        .iter()
        .map(|(o, l)| format!("{o} {l}"))
        .collect();
    assert_eq!(lines, want, "{out}");
    let (code, _, err) = cowsnap(&[
        "snapshot", "delta", "v/s2", "--base", "w/other", "--server", &server,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("not a snapshot of volumes/v"), "{err}");

    // grpcurl finds the call through server reflection and gets the same.
    let (code, out, err) = sh(
        &format!(
            "grpcurl -plaintext -d '{{\"name\":\"volumes/v/snapshots/s2\",\"base_snapshot\":\"volumes/v/snapshots/s1\",\"page_size\":2}}' {server} cowsnap.v1.SnapshotService/GetSnapshotDelta"
        ),
        &[],
    );
    assert_eq!(code, 0, "grpcurl (installed by .ci/run): {err}");
    let page: serde_json::Value = serde_json::from_str(&out).unwrap();
    let num = |v: &serde_json::Value| v.as_str().map_or(0, |s| s.parse::<u64>().unwrap());
    let first: Vec<(u64, u64)> = page["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (num(&r["offset"]), num(&r["length"])))
        .collect();
    assert_eq!(first, whole[..2].to_vec(), "{out}");
    assert_eq!(num(&page["nextOffset"]), whole[1].0 + whole[1].1, "{out}");

    // The offline tool on the same device files, with the process stopped.
    assert!(up.terminate().success());
    let dev = |f: &str| {
        data.join("worker")
            .join("devices")
            .join(f)
            .display()
            .to_string()
    };
    let (code, out, err) = cowsnap(&[
        "cow",
        "delta",
        "--json",
        "--origin",
        &dev("v.vol"),
        &dev("v.s2.cow"),
        &dev("v.s1.cow"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_ranges(&serde_json::from_str(&out).unwrap()), whole);
    let (code, out, err) = cowsnap(&[
        "cow",
        "delta",
        "--json",
        "--origin",
        &dev("v.vol"),
        &dev("v.s2.cow"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_ranges(&serde_json::from_str(&out).unwrap()), s2_alone);
}

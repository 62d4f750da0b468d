//! Growing the catalog: volumes, each with its snapshots, created from
//! many clients at once until a count or a time budget is reached, and
//! what each stretch of growth cost.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::ApiArgs;
use super::calls::{self, Snapshots, Volumes};

/// How big the catalog was at a measuring point.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Size {
    pub(super) volumes: u64,
    pub(super) snapshots: u64,
}

/// One stretch of growth.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Growth {
    pub(super) volumes_created: u64,
    pub(super) snapshots_created: u64,
    pub(super) errors: u64,
    pub(super) secs: f64,
    /// Mean latency of one CreateVolume / CreateSnapshot, in ms.
    pub(super) create_volume_ms: f64,
    pub(super) create_snapshot_ms: f64,
}

impl Growth {
    pub(super) fn creates_per_sec(&self) -> f64 {
        (self.volumes_created + self.snapshots_created) as f64 / self.secs.max(1e-9)
    }
}

pub(super) fn size(names: &Mutex<(Vec<String>, Vec<String>)>) -> Size {
    let n = names.lock().expect("names");
    Size {
        volumes: n.0.len() as u64,
        snapshots: n.1.len() as u64,
    }
}

/// Grows the catalog to `to` volumes (each with its snapshots), from
/// `--grow-clients` clients, until `budget`.
pub(super) async fn grow(
    args: &ApiArgs,
    channels: &[Channel],
    next: &Arc<AtomicUsize>,
    to: usize,
    budget: Instant,
    names: &Arc<Mutex<(Vec<String>, Vec<String>)>>,
    bytes: u64,
) -> Growth {
    let start = Instant::now();
    let vol_ns = Arc::new(AtomicU64::new(0));
    let snap_ns = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..args.grow_clients {
        let ch = channels[c % channels.len()].clone();
        let (next, names, vol_ns, snap_ns, errors) = (
            next.clone(),
            names.clone(),
            vol_ns.clone(),
            snap_ns.clone(),
            errors.clone(),
        );
        let per = args.snapshots_per_volume;
        tasks.push(tokio::spawn(async move {
            let mut vols = Volumes::new(ch.clone());
            let mut snaps = Snapshots::new(ch);
            let (mut nv, mut ns) = (0u64, 0u64);
            while Instant::now() < budget {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    next.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
                let t = Instant::now();
                let v = match vols
                    .create_volume(calls::create_volume_request(&format!("g{i:06}"), bytes))
                    .await
                {
                    Ok(v) => v.into_inner().name,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                vol_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                nv += 1;
                let mut made = Vec::with_capacity(per);
                for k in 0..per {
                    let t = Instant::now();
                    match snaps
                        .create_snapshot(calls::create_snapshot_request(&v, &format!("s{k}")))
                        .await
                    {
                        Ok(s) => {
                            snap_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            ns += 1;
                            made.push(s.into_inner().name);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                let mut n = names.lock().expect("names");
                n.0.push(v);
                n.1.extend(made);
            }
            (nv, ns)
        }));
    }
    let (mut nv, mut ns) = (0, 0);
    for t in tasks {
        if let Ok((v, s)) = t.await {
            nv += v;
            ns += s;
        }
    }
    let ms = |total: &AtomicU64, n: u64| {
        if n == 0 {
            0.0
        } else {
            total.load(Ordering::Relaxed) as f64 / n as f64 / 1e6
        }
    };
    Growth {
        volumes_created: nv,
        snapshots_created: ns,
        errors: errors.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
        create_volume_ms: ms(&vol_ns, nv),
        create_snapshot_ms: ms(&snap_ns, ns),
    }
}

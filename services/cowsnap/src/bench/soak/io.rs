//! The soak's NBD clients. Each owns one volume and a model of it: per
//! 4 KiB block, the version that must be on disk (written with FUA, or
//! flushed after), the version its connection last wrote (what a read must
//! see), and a version whose fate a kill left open (sent but not
//! acknowledged, or acknowledged but not yet flushed). Every block's
//! sectors carry (client, block, sector, version), so a read tells exactly
//! which write it came from.
//!
//! After every broken connection (a kill) the client reads its whole
//! volume back: each sector must hold the durable version or the open
//! one, never anything else (a lost write); then each of its snapshots,
//! which must hold exactly the durable content of the volume when it was
//! taken (a snapshot mismatch).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use cowsnap_proto::cowsnap::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::Env;
use super::api::{Outcome, call};
use super::nbd_client::{NbdClient, NbdError, connect_retrying};

const BLOCK: u64 = 4096;
const SECTOR: usize = 512;
/// Bytes read at once when checking a whole volume.
const READ_SPAN: u64 = 64 << 10;
/// Snapshots a client keeps; taking one more deletes the oldest.
const KEEP_SNAPSHOTS: usize = 2;
/// How long after the end a client may still wait for the worker.
const GRACE: Duration = Duration::from_secs(120);

pub fn volume_id(i: usize) -> String {
    format!("soak-io-{i}")
}

/// The content of one sector of `block` at `version` (0: never written,
/// zeros).
fn sector(client: usize, block: u64, s: usize, version: u64) -> [u8; SECTOR] {
    let mut b = [0u8; SECTOR];
    if version == 0 {
        return b;
    }
    let mut head = [0u8; 32];
    head[..8].copy_from_slice(&(client as u64).to_le_bytes());
    head[8..16].copy_from_slice(&block.to_le_bytes());
    head[16..24].copy_from_slice(&(s as u64).to_le_bytes());
    head[24..].copy_from_slice(&version.to_le_bytes());
    for c in b.chunks_exact_mut(32) {
        c.copy_from_slice(&head);
    }
    b
}

fn block(client: usize, block: u64, version: u64) -> Vec<u8> {
    (0..BLOCK as usize / SECTOR)
        .flat_map(|s| sector(client, block, s, version))
        .collect()
}

struct Snap {
    name: String,
    /// The durable version of every block when it was taken.
    content: Vec<u64>,
}

struct Client {
    env: std::sync::Arc<Env>,
    me: usize,
    name: String,
    rng: StdRng,
    durable: Vec<u64>,
    current: Vec<u64>,
    open: Vec<Option<u64>>,
    next_version: u64,
    snaps: Vec<Snap>,
    /// Snapshots whose deletion has not been confirmed yet.
    doomed: Vec<String>,
    snapshots: pb::snapshot_service_client::SnapshotServiceClient<tonic::transport::Channel>,
    taken: u64,
}

/// Runs NBD client `me` until the end of the soak.
pub async fn client(env: std::sync::Arc<Env>, me: usize, seed: u64) {
    let blocks = (env.volume_bytes / BLOCK) as usize;
    let snapshots = match env.channel().await {
        Ok(ch) => pb::snapshot_service_client::SnapshotServiceClient::new(ch),
        Err(e) => {
            env.tally
                .error("nbd client setup", "no channel", false, &e.to_string());
            return;
        }
    };
    let mut c = Client {
        name: format!("volumes/{}", volume_id(me)),
        env,
        me,
        rng: StdRng::seed_from_u64(seed ^ ((me as u64 + 1) * 0x9e37_79b9)),
        durable: vec![0; blocks],
        current: vec![0; blocks],
        open: vec![None; blocks],
        next_version: 1,
        snaps: Vec::new(),
        doomed: Vec::new(),
        snapshots,
        taken: 0,
    };
    c.run().await;
}

impl Client {
    fn nbd_error(&self, what: &str, e: &NbdError) {
        match e {
            NbdError::Connection(m) => self.env.tally.error(what, "connection lost", true, m),
            NbdError::Refused(m) => self.env.tally.error(what, "refused", false, m),
        }
    }

    async fn run(&mut self) {
        let final_deadline = self.env.stop + GRACE;
        loop {
            let conn = connect_retrying(&self.env.nbd, &self.name, final_deadline).await;
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    self.nbd_error("nbd connect", &e);
                    return;
                }
            };
            if !self.check_all(&mut conn).await {
                continue;
            }
            if self.env.done() {
                conn.close().await;
                return;
            }
            self.work(&mut conn).await;
        }
    }

    /// Reads the volume and every snapshot back against the model; false
    /// when the connection broke on the way.
    async fn check_all(&mut self, conn: &mut NbdClient) -> bool {
        if !self.check_volume(conn).await {
            return false;
        }
        let mut i = 0;
        while i < self.snaps.len() {
            let deadline = Instant::now() + GRACE;
            let name = self.snaps[i].name.clone();
            match connect_retrying(&self.env.nbd, &name, deadline).await {
                Ok(mut s) => {
                    let ok = self.check_snapshot(&mut s, i).await;
                    s.close().await;
                    if !ok {
                        return false;
                    }
                }
                Err(e @ NbdError::Refused(_)) => {
                    self.env.tally.snapshot_mismatches.fetch_add(1, Relaxed);
                    self.env.tally.finding(format!("{name}: export gone: {e}"));
                    self.snaps.remove(i);
                    continue;
                }
                Err(e) => {
                    self.nbd_error("nbd connect snapshot", &e);
                    return false;
                }
            }
            i += 1;
        }
        true
    }

    async fn check_volume(&mut self, conn: &mut NbdClient) -> bool {
        let mut torn = Vec::new();
        let mut off = 0;
        while off < self.env.volume_bytes {
            let len = READ_SPAN.min(self.env.volume_bytes - off);
            let data = match conn.read(off, len as u32).await {
                Ok(d) => d,
                Err(e) => {
                    self.nbd_error("nbd read (check)", &e);
                    return false;
                }
            };
            for (i, blk) in data.chunks_exact(BLOCK as usize).enumerate() {
                let b = off / BLOCK + i as u64;
                let bi = b as usize;
                let (durable, open) = (self.durable[bi], self.open[bi]);
                let mut from_open = 0;
                for (s, got) in blk.chunks_exact(SECTOR).enumerate() {
                    if got == sector(self.me, b, s, durable) {
                        continue;
                    }
                    if open.is_some_and(|v| got == sector(self.me, b, s, v)) {
                        from_open += 1;
                        continue;
                    }
                    self.env.tally.lost_writes.fetch_add(1, Relaxed);
                    self.env.tally.finding(format!(
                        "{}: block {b} sector {s} holds neither durable version {durable} nor open {open:?} ({})",
                        self.name,
                        describe(got)
                    ));
                    torn.push(b);
                    break;
                }
                let sectors = BLOCK as usize / SECTOR;
                match (open, from_open) {
                    (Some(v), n) if n == sectors => self.durable[bi] = v,
                    (Some(_), 0) | (None, _) => {}
                    // Part old, part new: a write nobody was told about
                    // was torn, which is allowed. Write the block whole.
                    (Some(_), _) => torn.push(b),
                }
                self.open[bi] = None;
                self.current[bi] = self.durable[bi];
            }
            off += len;
        }
        self.env.tally.volume_checks.fetch_add(1, Relaxed);
        for b in torn {
            if !self.write(conn, b, true).await {
                return false;
            }
        }
        true
    }

    async fn check_snapshot(&mut self, conn: &mut NbdClient, i: usize) -> bool {
        let mut off = 0;
        let mut bad = None;
        while off < self.env.volume_bytes {
            let len = READ_SPAN.min(self.env.volume_bytes - off);
            let data = match conn.read(off, len as u32).await {
                Ok(d) => d,
                Err(e) => {
                    self.nbd_error("nbd read (snapshot check)", &e);
                    return false;
                }
            };
            for (k, blk) in data.chunks_exact(BLOCK as usize).enumerate() {
                let b = off / BLOCK + k as u64;
                let want = self.snaps[i].content[b as usize];
                if bad.is_none() && blk != block(self.me, b, want) {
                    bad = Some((b, want, describe(&blk[..SECTOR])));
                }
            }
            off += len;
        }
        self.env.tally.snapshots_checked.fetch_add(1, Relaxed);
        if let Some((b, want, got)) = bad {
            self.env.tally.snapshot_mismatches.fetch_add(1, Relaxed);
            self.env.tally.finding(format!(
                "{}: block {b} should hold version {want}, holds {got}",
                self.snaps[i].name
            ));
            // Reported once; it is not checked again.
            self.snaps.remove(i);
        }
        true
    }

    /// Writes a new version of block `b`; false when the connection broke.
    async fn write(&mut self, conn: &mut NbdClient, b: u64, fua: bool) -> bool {
        let bi = b as usize;
        if self.open[bi].is_some() && !self.flush(conn).await {
            return false;
        }
        let v = self.next_version;
        self.next_version += 1;
        self.open[bi] = Some(v);
        match conn.write(b * BLOCK, &block(self.me, b, v), fua).await {
            Ok(()) => {
                self.env.tally.ok.fetch_add(1, Relaxed);
                self.current[bi] = v;
                if fua {
                    self.durable[bi] = v;
                    self.open[bi] = None;
                    self.env.tally.acked_writes.fetch_add(1, Relaxed);
                }
                true
            }
            Err(e) => {
                self.nbd_error("nbd write", &e);
                false
            }
        }
    }

    async fn flush(&mut self, conn: &mut NbdClient) -> bool {
        match conn.flush().await {
            Ok(()) => {
                self.env.tally.ok.fetch_add(1, Relaxed);
                for bi in 0..self.open.len() {
                    if let Some(v) = self.open[bi].take() {
                        self.durable[bi] = v;
                        self.env.tally.acked_writes.fetch_add(1, Relaxed);
                    }
                }
                true
            }
            Err(e) => {
                self.nbd_error("nbd flush", &e);
                false
            }
        }
    }

    /// Random I/O until the connection breaks or the soak ends.
    async fn work(&mut self, conn: &mut NbdClient) {
        let blocks = self.durable.len() as u64;
        let mut last_snapshot = Instant::now();
        while !self.env.done() {
            let b = self.rng.random_range(0..blocks);
            let ok = match self.rng.random_range(0..100) {
                0..60 => {
                    let fua = self.rng.random_bool(0.5);
                    self.write(conn, b, fua).await
                }
                60..75 => self.flush(conn).await,
                75..97 => match conn.read(b * BLOCK, BLOCK as u32).await {
                    Ok(got) => {
                        self.env.tally.ok.fetch_add(1, Relaxed);
                        let want = self.current[b as usize];
                        if got != block(self.me, b, want) {
                            self.env.tally.read_mismatches.fetch_add(1, Relaxed);
                            self.env.tally.finding(format!(
                                "{}: block {b} read {} after version {want} was acknowledged",
                                self.name,
                                describe(&got[..SECTOR])
                            ));
                            self.current[b as usize] = 0;
                        }
                        true
                    }
                    Err(e) => {
                        self.nbd_error("nbd read", &e);
                        false
                    }
                },
                _ if last_snapshot.elapsed() > Duration::from_secs(1) => {
                    last_snapshot = Instant::now();
                    self.snapshot(conn).await
                }
                _ => true,
            };
            if !ok {
                return;
            }
        }
    }

    /// Takes a snapshot of the volume through the API (after a flush, so
    /// the durable model is the content), and deletes the oldest beyond
    /// [`KEEP_SNAPSHOTS`].
    async fn snapshot(&mut self, conn: &mut NbdClient) -> bool {
        if !self.flush(conn).await {
            return false;
        }
        self.taken += 1;
        let id = format!("s{}", self.taken);
        let name = format!("{}/snapshots/{id}", self.name);
        let deadline = self.env.stop + GRACE;
        let tally = &self.env.tally;
        let mut client = self.snapshots.clone();
        let created = loop {
            let r = client
                .create_snapshot(pb::CreateSnapshotRequest {
                    parent: self.name.clone(),
                    snapshot_id: id.clone(),
                    snapshot: Some(pb::Snapshot::default()),
                })
                .await;
            match call(tally, "create snapshot (nbd client)", r) {
                Outcome::Ok(_) => break true,
                Outcome::Exists => break ready(&mut client, &name, deadline).await,
                Outcome::Retry if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break false,
            }
        };
        if !created {
            self.doomed.push(name);
            return true;
        }
        tally.snapshots_taken.fetch_add(1, Relaxed);
        self.snaps.push(Snap {
            name,
            content: self.durable.clone(),
        });
        if self.snaps.len() > KEEP_SNAPSHOTS {
            let old = self.snaps.remove(0);
            self.doomed.push(old.name);
        }
        let mut kept = Vec::new();
        for name in std::mem::take(&mut self.doomed) {
            if !delete(&mut client, tally, &name).await {
                kept.push(name);
            }
        }
        self.doomed = kept;
        true
    }
}

/// Whether a snapshot whose creation's outcome was unknown ended up READY
/// (waiting while it is being created).
async fn ready(
    client: &mut pb::snapshot_service_client::SnapshotServiceClient<tonic::transport::Channel>,
    name: &str,
    deadline: Instant,
) -> bool {
    while Instant::now() < deadline {
        if let Ok(s) = client
            .get_snapshot(pb::GetSnapshotRequest { name: name.into() })
            .await
        {
            match pb::State::try_from(s.into_inner().state) {
                Ok(pb::State::Ready) => return true,
                Ok(pb::State::Creating) => {}
                _ => return false,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Deletes a snapshot; true once it is gone.
async fn delete(
    client: &mut pb::snapshot_service_client::SnapshotServiceClient<tonic::transport::Channel>,
    tally: &super::Tally,
    name: &str,
) -> bool {
    let r = client
        .delete_snapshot(pb::DeleteSnapshotRequest { name: name.into() })
        .await;
    matches!(
        call(tally, "delete snapshot (nbd client)", r),
        Outcome::Ok(_) | Outcome::Gone
    )
}

/// What a sector holds, in words: a version of some block, zeros, or
/// something else.
fn describe(got: &[u8]) -> String {
    let le = |r: std::ops::Range<usize>| u64::from_le_bytes(got[r].try_into().expect("8 bytes"));
    if got.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    format!(
        "client {} block {} sector {} version {}",
        le(0..8),
        le(8..16),
        le(16..24),
        le(24..32)
    )
}

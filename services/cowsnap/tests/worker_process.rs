//! The `cowsnap worker` process under real failure: `kill -9` during write
//! storms driven by real NBD clients (qemu-io, with FUA writes and with
//! plain writes followed by flushes), a `kill -9` in the middle of a merge,
//! and a clean SIGTERM. After each restart: no acknowledged durable write is
//! lost, every snapshot has exactly its content, an interrupted merge
//! resumes by itself.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cowsnap_proto::worker::v1 as pb;

type Client = pb::worker_service_client::WorkerServiceClient<tonic::transport::Channel>;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `cowsnap worker` child process on fixed ports.
struct WorkerProc {
    child: Option<Child>,
    data: PathBuf,
    grpc_port: u16,
    nbd_port: u16,
    log: PathBuf,
}

impl WorkerProc {
    fn start(data: &Path, grpc_port: u16, nbd_port: u16, log: &Path) -> WorkerProc {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
            .args(["worker", "--data-dir", data.to_str().unwrap()])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--nbd-listen", &format!("127.0.0.1:{nbd_port}")])
            .env("COWSNAP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        WorkerProc {
            child: Some(child),
            data: data.to_path_buf(),
            grpc_port,
            nbd_port,
            log: log.to_path_buf(),
        }
    }

    /// A client, once the worker answers (it may be loading its state).
    async fn client(&mut self) -> Client {
        for _ in 0..600 {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "worker exited with {st}: {}",
                    std::fs::read_to_string(&self.log).unwrap()
                );
            }
            if let Ok(c) = Client::connect(format!("http://127.0.0.1:{}", self.grpc_port)).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "worker did not come up: {}",
            std::fs::read_to_string(&self.log).unwrap()
        );
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        *self = WorkerProc::start(
            &self.data.clone(),
            self.grpc_port,
            self.nbd_port,
            &self.log.clone(),
        );
    }

    /// SIGTERM; returns the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on our child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (install qemu-utils)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The whole export, read with qemu-img.
fn image(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("image.raw");
    let _ = std::fs::remove_file(&out);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// Byte written at block `b` by storm round `r` (never 0, never the fill).
fn mark(r: u64, b: u64) -> u8 {
    (((r * 131 + b * 7) % 250) + 2) as u8
}

/// What one qemu-io writer of a storm did: blocks written in order, whether
/// with FUA, and which writes it saw acknowledged (its "wrote" lines), and
/// which flushes.
struct Storm {
    child: Child,
    blocks: Vec<u64>,
    fua: bool,
}

impl Storm {
    /// Starts qemu-io writing `blocks` (4 KiB each) of round `r`: FUA writes,
    /// or plain writes with a flush after every 8.
    fn start(uri: &str, r: u64, blocks: Vec<u64>, fua: bool) -> Storm {
        let mut args: Vec<String> = vec![
            "-f".into(),
            "raw".into(),
            "-t".into(),
            "none".into(),
            uri.into(),
        ];
        for (i, &b) in blocks.iter().enumerate() {
            let f = if fua { "-f " } else { "" };
            args.push("-c".into());
            args.push(format!("write {f}-P {} {} 4k", mark(r, b), b * BLOCK));
            if !fua && i % 8 == 7 {
                args.push("-c".into());
                args.push("flush".into());
            }
        }
        let child = Command::new("qemu-io")
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io (qemu-utils)");
        Storm { child, blocks, fua }
    }

    /// Waits for qemu-io (it fails once the worker is gone) and returns the
    /// blocks whose write is known durable: each FUA write acknowledged, or
    /// each plain write followed by an acknowledged flush.
    fn durable(mut self) -> (Vec<u64>, usize) {
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let finished = self.child.wait().is_ok_and(|s| s.success());
        let acked = out.lines().filter(|l| l.starts_with("wrote ")).count();
        let durable = if self.fua || finished {
            // Every FUA write acknowledged; or every command ran, the last
            // one a flush (the block count is a multiple of 8).
            acked
        } else {
            // qemu-io runs its commands in order and stops at the first
            // failure, and prints nothing for a flush: the flush after
            // write 8k+7 is known done when write 8k+8 was acknowledged.
            acked.saturating_sub(1) / 8 * 8
        };
        (self.blocks[..durable].to_vec(), acked)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_write_storms_loses_no_acknowledged_durable_write() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut w = WorkerProc::start(
        &data,
        free_port(),
        free_port(),
        &dir.path().join("worker.log"),
    );
    let mut c = w.client().await;
    let size = 16 * MIB;
    let nblocks = size / BLOCK;
    c.create_volume(pb::CreateVolumeRequest {
        volume_id: "v1".into(),
        size_bytes: size,
        chunk_sectors: 8,
        device: String::new(),
    })
    .await
    .unwrap();
    let vol = w.uri("volumes/v1");
    run("qemu-io", &["-f", "raw", &vol, "-c", "write -P 0x01 0 16m"]);
    c.create_snapshot(pb::CreateSnapshotRequest {
        parent: "volumes/v1".into(),
        snapshot_id: "s1".into(),
        cow_size_bytes: 2 * size,
        ..Default::default()
    })
    .await
    .unwrap();
    drop(c);

    // What each block may hold: its last durable write and anything later.
    let mut allowed: Vec<Vec<u8>> = vec![vec![0x01]; nblocks as usize];
    let (mut kills, mut checked_durable, mut acked_total) = (0u64, 0usize, 0usize);
    for round in 1..=6u64 {
        // Four writers on interleaved blocks, two with FUA, two with flushes.
        let mut storms = Vec::new();
        for k in 0..4u64 {
            let blocks: Vec<u64> = (0..nblocks).filter(|b| b % 4 == k).take(600).collect();
            for &b in &blocks {
                allowed[b as usize].push(mark(round, b));
            }
            storms.push(Storm::start(&vol, round, blocks, k % 2 == 0));
        }
        tokio::time::sleep(Duration::from_millis(150 + 90 * round)).await;
        w.kill9();
        kills += 1;
        for s in storms {
            let (durable, acked) = s.durable();
            acked_total += acked;
            for b in durable {
                // A durable write: nothing older is allowed any more.
                allowed[b as usize] = vec![mark(round, b)];
                checked_durable += 1;
            }
        }
        w.restart();
        let mut c = w.client().await;
        let img = image(&vol, dir.path());
        for b in 0..nblocks as usize {
            let blk = &img[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            assert!(
                blk.iter().all(|&x| x == blk[0]),
                "round {round}: block {b} is torn"
            );
            assert!(
                allowed[b].contains(&blk[0]),
                "round {round}: block {b} holds {:#x}; allowed {:?}",
                blk[0],
                allowed[b]
            );
            // What is there now is the new baseline.
            allowed[b] = vec![blk[0]];
        }
        let snap = image(&w.uri("volumes/v1/snapshots/s1"), dir.path());
        assert!(
            snap.iter().all(|&x| x == 0x01),
            "round {round}: the snapshot lost its content"
        );
        let s = c
            .get_snapshot(pb::GetSnapshotRequest {
                name: "volumes/v1/snapshots/s1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.state, pb::State::Ready as i32);
    }
    eprintln!(
        "kill -9 storms: {kills} kills, {acked_total} writes acknowledged, {checked_durable} durable writes checked"
    );
    assert!(
        checked_durable > 0,
        "some writes were durable before the kills"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_interrupted_by_kill_9_resumes_by_itself() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut w = WorkerProc::start(
        &data,
        free_port(),
        free_port(),
        &dir.path().join("worker.log"),
    );
    let mut c = w.client().await;
    let size = 16 * MIB;
    c.create_volume(pb::CreateVolumeRequest {
        volume_id: "v1".into(),
        size_bytes: size,
        chunk_sectors: 8,
        device: String::new(),
    })
    .await
    .unwrap();
    let vol = w.uri("volumes/v1");
    run("qemu-io", &["-f", "raw", &vol, "-c", "write -P 0x5a 0 16m"]);
    c.create_snapshot(pb::CreateSnapshotRequest {
        parent: "volumes/v1".into(),
        snapshot_id: "s1".into(),
        cow_size_bytes: 2 * size,
        ..Default::default()
    })
    .await
    .unwrap();
    // Rewrite every block in a scattered order: thousands of exceptions
    // with no two consecutive, so the merge takes many steps.
    let mut args = vec!["-f".to_string(), "raw".into(), vol.clone()];
    let n = size / BLOCK;
    for i in 0..n {
        let b = (i * 2053) % n;
        args.push("-c".into());
        args.push(format!("write -P 0xa5 {} 4k", b * BLOCK));
    }
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    assert!(out.status.success());
    let task = c
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Kill it part-way.
    let mut seen = 0.0;
    for _ in 0..2000 {
        let t = c
            .get_task(pb::GetTaskRequest {
                name: task.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        seen = t.percent;
        if t.done || t.percent >= 5.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    w.kill9();
    assert!(
        seen < 100.0,
        "the merge finished before the kill; make it longer"
    );
    w.restart();
    let mut c = w.client().await;
    let tasks = c
        .list_tasks(pb::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let resumed = tasks
        .iter()
        .find(|t| t.name == task.name)
        .expect("the merge task survives the restart");
    let done = loop {
        let t = c
            .wait_task(pb::WaitTaskRequest {
                name: resumed.name.clone(),
                timeout_ms: 60_000,
            })
            .await
            .unwrap()
            .into_inner();
        if t.done {
            break t;
        }
    };
    assert!(
        done.error.is_empty(),
        "resumed merge failed: {}",
        done.error
    );
    let img = image(&vol, dir.path());
    assert!(
        img.iter().all(|&x| x == 0x5a),
        "after the resumed merge the volume is the snapshot's content"
    );
    let e = c
        .get_snapshot(pb::GetSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    eprintln!("merge killed at {seen:.1}% and resumed to the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_exits_zero() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut w = WorkerProc::start(
        &data,
        free_port(),
        free_port(),
        &dir.path().join("worker.log"),
    );
    let mut c = w.client().await;
    c.create_volume(pb::CreateVolumeRequest {
        volume_id: "v1".into(),
        size_bytes: 4 * MIB,
        chunk_sectors: 8,
        device: String::new(),
    })
    .await
    .unwrap();
    // Plain writes, no flush: the clean shutdown must flush them.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &w.uri("volumes/v1"),
            "-c",
            "write -P 0x77 0 4m",
        ],
    );
    drop(c);
    let st = w.terminate();
    assert!(st.success(), "worker exit status on SIGTERM: {st}");
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert!(
        log.contains("engines flushed"),
        "the worker logs its flush: {log}"
    );
    let file = std::fs::read(data.join("devices/v1.vol")).unwrap();
    assert!(
        file.iter().all(|&b| b == 0x77),
        "the written data is in the volume's file"
    );
}

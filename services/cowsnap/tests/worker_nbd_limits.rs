//! The `cowsnap worker` process under NBD clients that try to take it all
//! (issue 13, point 2): clients that pipeline large reads and never take the
//! replies, and more idle connections than the process has file descriptors
//! for. Its memory stays within the NBD buffer budget (read from the
//! process's `VmRSS`), connections over the limit are told why, and its gRPC
//! API keeps answering throughout.
//!
//! The limits are set through the environment (`COWSNAP_NBD_*`), as an
//! operator would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cowsnap_proto::worker::v1 as pb;

type Client = pb::worker_service_client::WorkerServiceClient<tonic::transport::Channel>;

const MIB: u64 = 1 << 20;
const VOLUME: &str = "volumes/v1";

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

/// A `cowsnap worker` child process.
struct WorkerProc {
    child: Child,
    grpc_port: u16,
    nbd: SocketAddr,
    log: PathBuf,
}

impl WorkerProc {
    /// Starts it with `env` set and, with `nofile`, that file descriptor
    /// limit (soft and hard).
    fn start(dir: &Path, env: &[(&str, &str)], nofile: Option<u64>) -> WorkerProc {
        let grpc_port = free_port();
        let nbd: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join("worker.log");
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cowsnap"));
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit(2) is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["worker", "--data-dir", dir.join("data").to_str().unwrap()])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--nbd-listen", &nbd.to_string()])
            .env("COWSNAP_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        WorkerProc {
            child,
            grpc_port,
            nbd,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A new API client (a new connection), once the worker answers.
    async fn client(&mut self) -> Client {
        for _ in 0..600 {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("worker exited with {st}: {}", self.log_text());
            }
            if let Ok(c) = Client::connect(format!("http://127.0.0.1:{}", self.grpc_port)).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("worker did not come up: {}", self.log_text());
    }

    /// Asserts that the API answers GetWorkerInfo and the health check, on
    /// a fresh connection (which needs a file descriptor in the worker).
    async fn assert_api_answers(&mut self, when: &str) {
        let answer = async {
            let ch = tonic::transport::Endpoint::from_shared(format!(
                "http://127.0.0.1:{}",
                self.grpc_port
            ))
            .unwrap()
            .connect()
            .await?;
            let info = Client::new(ch.clone())
                .get_worker_info(pb::GetWorkerInfoRequest {})
                .await?
                .into_inner();
            let health = tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            Ok::<_, Box<dyn std::error::Error>>((info, health))
        };
        // A safety net against a hung worker, not a timing assertion.
        let (info, health) = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .unwrap_or_else(|_| panic!("{when}: the API did not answer within 30 s"))
            .unwrap_or_else(|e| panic!("{when}: the API failed: {e}"));
        assert!(!info.nbd_uri.is_empty(), "{when}: {info:?}");
        assert_eq!(
            health.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{when}"
        );
    }

    /// The worker's resident memory.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .map(|v| v.trim().parse().unwrap())
            .expect("VmRSS in /proc/PID/status");
        kb * 1024
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// A few words of NBD, enough to get into transmission and send reads
// (constants from the protocol spec).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const CMD_READ: u16 = 0;

/// How a handshake ended.
#[derive(Debug)]
enum Handshake {
    /// In transmission.
    Admitted(TcpStream),
    /// Refused: the option error's type and message.
    Refused(u32, String),
    /// Anything else: no greeting, a closed connection, a timeout.
    Failed(String),
}

/// Connects and asks for `export` with `NBD_OPT_GO`.
fn handshake(addr: SocketAddr, export: &str) -> Handshake {
    let attempt = || -> std::io::Result<Handshake> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        // A safety net against a hung server, not a timing assertion.
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)?;
        assert_eq!(
            u64::from_be_bytes(greeting[0..8].try_into().unwrap()),
            NBDMAGIC
        );
        assert_eq!(
            u64::from_be_bytes(greeting[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        let mut out = Vec::new();
        out.extend_from_slice(&3u32.to_be_bytes()); // fixed newstyle, no zeroes
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        out.extend_from_slice(&(export.len() as u32).to_be_bytes());
        out.extend_from_slice(export.as_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&out)?;
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head)?;
            assert_eq!(
                u64::from_be_bytes(head[0..8].try_into().unwrap()),
                OPT_REPLY_MAGIC
            );
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match kind {
                REP_ACK => return Ok(Handshake::Admitted(s)),
                REP_INFO => continue,
                k => return Ok(Handshake::Refused(k, String::from_utf8_lossy(&data).into())),
            }
        }
    };
    attempt().unwrap_or_else(|e| Handshake::Failed(e.to_string()))
}

/// Sends `n` reads of `len` bytes, spread over the first `span` bytes.
fn pipeline_reads(s: &mut TcpStream, n: u64, len: u32, span: u64) {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&CMD_READ.to_be_bytes());
        out.extend_from_slice(&i.to_be_bytes());
        out.extend_from_slice(&((i * u64::from(len)) % span).to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
    s.write_all(&out).unwrap();
}

async fn create_volume(c: &mut Client, size: u64) {
    c.create_volume(pb::CreateVolumeRequest {
        volume_id: "v1".into(),
        size_bytes: size,
        chunk_sectors: 8,
        device: String::new(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_hold_bounded_memory() {
    const BUDGET: u64 = 128 * MIB;
    // Above the budget: the worker's own baseline is measured, this covers
    // the buffer pool, sockets' user-space buffers and the allocator's slack.
    const MARGIN: u64 = 64 * MIB;
    let dir = scratch();
    let mut w = WorkerProc::start(dir.path(), &[("COWSNAP_NBD_BUFFER_BUDGET", "128m")], None);
    let mut c = w.client().await;
    let size = 64 * MIB;
    create_volume(&mut c, size).await;
    // Real data to read (not holes).
    let uri = format!("nbd://{}/{VOLUME}", w.nbd);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x5a 0 64m"])
        .output()
        .expect("qemu-io (qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let baseline = w.rss();

    // Eight clients each pipeline sixteen 32 MiB reads (8 GiB in all), and
    // never read a reply.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let Handshake::Admitted(mut s) = handshake(w.nbd, VOLUME) else {
            panic!("a client was not admitted");
        };
        pipeline_reads(&mut s, 16, 32 << 20, size);
        stalled.push(s);
    }
    // The worker takes what the budget allows (this shows the load is real)...
    let mut peak = baseline;
    for _ in 0..600 {
        peak = peak.max(w.rss());
        if peak >= baseline + BUDGET / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        peak >= baseline + BUDGET / 2,
        "the stalled reads never took memory: RSS {} MiB, baseline {} MiB",
        peak >> 20,
        baseline >> 20
    );
    // ... and no more, however long the clients stall.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(w.rss());
    }
    w.assert_api_answers("while 8 clients stall").await;
    peak = peak.max(w.rss());
    eprintln!(
        "8 stalled readers: worker RSS {} MiB at peak, {} MiB before (budget {} MiB)",
        peak >> 20,
        baseline >> 20,
        BUDGET >> 20
    );
    assert!(
        peak <= baseline + BUDGET + MARGIN,
        "worker RSS reached {} MiB with 8 stalled readers: more than its baseline {} MiB \
         + budget {} MiB + margin {} MiB",
        peak >> 20,
        baseline >> 20,
        BUDGET >> 20,
        MARGIN >> 20
    );

    // The clients go away: their buffers are freed.
    drop(stalled);
    let mut now = w.rss();
    for _ in 0..600 {
        if now <= baseline + MARGIN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = w.rss();
    }
    eprintln!("after the clients left: worker RSS {} MiB", now >> 20);
    assert!(
        now <= baseline + MARGIN,
        "worker RSS stayed at {} MiB after the stalled clients left (baseline {} MiB)",
        now >> 20,
        baseline >> 20
    );
    w.assert_api_answers("after the stall").await;
    // And NBD serves again.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read -P 0x5a 0 64m"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_idle_connections_leave_the_api_answering() {
    let dir = scratch();
    // 256 file descriptors, and the default limit of 256 connections: the
    // worker must lower it to fit.
    let mut w = WorkerProc::start(dir.path(), &[], Some(256));
    let mut c = w.client().await;
    create_volume(&mut c, 16 * MIB).await;
    drop(c);

    // 300 clients go idle after the handshake (or are turned away).
    let addr = w.nbd;
    let outcomes = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for _ in 0..300 {
            let h = handshake(addr, VOLUME);
            let failed = matches!(h, Handshake::Failed(_));
            out.push(h);
            if failed {
                break;
            }
        }
        out
    })
    .await
    .unwrap();
    let admitted = outcomes
        .iter()
        .filter(|h| matches!(h, Handshake::Admitted(_)))
        .count();
    let refused: Vec<&String> = outcomes
        .iter()
        .filter_map(|h| match h {
            Handshake::Refused(_, m) => Some(m),
            _ => None,
        })
        .collect();
    let failed: Vec<&String> = outcomes
        .iter()
        .filter_map(|h| match h {
            Handshake::Failed(why) => Some(why),
            _ => None,
        })
        .collect();
    eprintln!(
        "300 clients: {admitted} admitted, {} refused, {} failed",
        refused.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "after {admitted} admitted and {} refused, a client got no answer: {:?}",
        refused.len(),
        failed
    );
    assert!((1..256).contains(&admitted), "{admitted} admitted");
    assert_eq!(admitted + refused.len(), 300);
    let told = format!("too many connections (limit {admitted})");
    for m in &refused {
        assert!(
            m.contains(&told),
            "refusal message {m:?}, expected {told:?}"
        );
    }
    for h in &outcomes {
        if let Handshake::Refused(kind, _) = h {
            assert_eq!(*kind, REP_ERR_POLICY);
        }
    }
    let log = w.log_text();
    assert!(
        log.contains("RLIMIT_NOFILE 256") && log.contains(&format!("serving at most {admitted}")),
        "no warning about the file descriptor limit in the log:\n{log}"
    );
    assert!(
        log.contains("too many connections"),
        "no refusal warning:\n{log}"
    );

    // With all of them still open, the API answers on new connections.
    for i in 0..5 {
        w.assert_api_answers(&format!("with {admitted} idle NBD connections ({i})"))
            .await;
    }
    // An admitted connection still serves.
    let Some(Handshake::Admitted(s)) = outcomes.into_iter().next() else {
        panic!("the first client was admitted");
    };
    let mut s = s;
    pipeline_reads(&mut s, 1, 4096, 16 * MIB);
    let mut reply = vec![0u8; 16 + 4096];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &0u32.to_be_bytes(), "read error");
}

/// The worker's address space (`VmSize`).
fn vm_size(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .expect("VmSize in /proc/PID/status");
    kb * 1024
}

/// One simple reply: its error and, for a read without error, `len` bytes.
fn simple_reply(s: &mut TcpStream, len: usize) -> (u32, u64, Vec<u8>) {
    let mut head = [0u8; 16];
    s.read_exact(&mut head)
        .unwrap_or_else(|e| panic!("no reply (did the worker die?): {e}"));
    let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
    let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
    let mut data = Vec::new();
    if error == 0 && len > 0 {
        data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
    }
    (error, handle, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_failures_are_enomem_not_aborts() {
    const ENOMEM: u32 = 12;
    let dir = scratch();
    // One malloc arena and fixed thresholds: glibc then has no address
    // space reserved in advance to fall back on, so a refused mapping is a
    // refused allocation (with several arenas, a 32 MiB buffer may still fit
    // in one's reservation).
    let mut w = WorkerProc::start(
        dir.path(),
        &[
            ("MALLOC_ARENA_MAX", "1"),
            ("MALLOC_MMAP_THRESHOLD_", "131072"),
            ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ],
        None,
    );
    let mut c = w.client().await;
    create_volume(&mut c, 64 * MIB).await;
    let uri = format!("nbd://{}/{VOLUME}", w.nbd);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x5a 0 64m"])
        .output()
        .expect("qemu-io (qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Handshake::Admitted(mut s) = handshake(w.nbd, VOLUME) else {
        panic!("not admitted");
    };

    // An address space limit with room for small buffers, not for 32 MiB,
    // once the buffers of qemu-io's writes are freed (the size settles).
    let pid = w.child.id();
    let (mut last, mut same) = (vm_size(pid), 0);
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = vm_size(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same == 5 {
            break;
        }
    }
    let cap = last + 16 * MIB;
    let lim = libc::rlimit {
        rlim_cur: cap,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit(2) on our own child, with a struct we own.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_AS, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    // A 32 MiB read and a 32 MiB write: ENOMEM, and the worker lives on.
    pipeline_reads(&mut s, 1, 32 << 20, 64 * MIB);
    let (error, _, _) = simple_reply(&mut s, 32 << 20);
    assert_eq!(error, ENOMEM, "32 MiB read under a 16 MiB headroom");
    let mut write = Vec::new();
    write.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    write.extend_from_slice(&0u16.to_be_bytes());
    write.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    write.extend_from_slice(&7u64.to_be_bytes());
    write.extend_from_slice(&0u64.to_be_bytes());
    write.extend_from_slice(&(32u32 << 20).to_be_bytes());
    write.resize(write.len() + (32 << 20), 0xee);
    s.write_all(&write).unwrap();
    let (error, handle, _) = simple_reply(&mut s, 0);
    assert_eq!(
        (error, handle),
        (ENOMEM, 7),
        "32 MiB write under a 16 MiB headroom"
    );
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "the worker died: {}",
        w.log_text()
    );

    // Small requests on the same connection still work, and nothing was
    // written.
    pipeline_reads(&mut s, 1, 4096, 64 * MIB);
    let (error, _, data) = simple_reply(&mut s, 4096);
    assert_eq!(error, 0);
    assert!(data.iter().all(|&b| b == 0x5a));
    w.assert_api_answers("after allocation failures").await;

    // With the limit lifted, the same read succeeds.
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_AS, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
    pipeline_reads(&mut s, 1, 32 << 20, 64 * MIB);
    let (error, _, data) = simple_reply(&mut s, 32 << 20);
    assert_eq!(error, 0);
    assert!(data.iter().all(|&b| b == 0x5a));
}

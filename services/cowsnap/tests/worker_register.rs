//! Workers that register themselves (`cowsnap worker --register-with`),
//! as real processes over real sockets: a `cowsnap control` with an API
//! token and no static worker list, workers that announce their address
//! with the token. A registered worker is listed HEALTHY and serves a
//! volume over NBD (qemu-io); a second one joins; a control service killed
//! with `kill -9` and started again on an empty catalog gets the worker
//! back by itself; a worker back at a new address is moved there with its
//! volume; an address another worker still holds is refused until that
//! one moves; a worker with a wrong token logs the refusal, keeps serving
//! and keeps trying, and joins once its token file is right.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cowsnap_proto::cowsnap::v1 as pb;
use tonic::transport::{Channel, Endpoint};

const MIB: u64 = 1 << 20;
const TOKEN: &str = "register-test-token";
/// Polls (50 ms apart) before a test gives up: generous, not a timing claim.
const POLLS: usize = 1200;

fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `cowsnap` child process, killed when dropped; stderr into `log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: &[String], log: &Path) -> Proc {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
            .args(args)
            .env("COWSNAP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("exited with {st}:\n{}", self.log_text());
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cowsnap control` on `port` over `data`, requiring the token in `dir`.
fn control(dir: &Path, data: &str, port: u16) -> Proc {
    let token = dir.join("control-token");
    std::fs::write(&token, TOKEN).unwrap();
    Proc::spawn(
        &[
            "control".into(),
            "--data-dir".into(),
            dir.join(data).to_str().unwrap().into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--auth-token-file".into(),
            token.to_str().unwrap().into(),
            "--health-interval".into(),
            "1s".into(),
        ],
        &dir.join(format!("{data}.log")),
    )
}

/// A worker of node `node` registering with the control service on
/// `control_port` with the token in `token_file`.
struct WorkerProc {
    proc: Proc,
    grpc: String,
    nbd_port: u16,
}

fn worker(dir: &Path, node: &str, control_port: u16, token_file: &Path) -> WorkerProc {
    worker_at(dir, node, control_port, token_file, free_port())
}

/// As [`worker`], its gRPC API on `grpc_port`.
fn worker_at(
    dir: &Path,
    node: &str,
    control_port: u16,
    token_file: &Path,
    grpc_port: u16,
) -> WorkerProc {
    let grpc = format!("127.0.0.1:{grpc_port}");
    let nbd_port = free_port();
    let proc = Proc::spawn(
        &[
            "worker".into(),
            "--data-dir".into(),
            dir.join(node).to_str().unwrap().into(),
            "--grpc-listen".into(),
            grpc.clone(),
            "--nbd-listen".into(),
            format!("127.0.0.1:{nbd_port}"),
            "--node".into(),
            node.into(),
            "--register-with".into(),
            format!("127.0.0.1:{control_port}"),
            "--register-token-file".into(),
            token_file.to_str().unwrap().into(),
            "--register-interval".into(),
            "1s".into(),
        ],
        &dir.join(format!("{node}.log")),
    );
    WorkerProc {
        proc,
        grpc,
        nbd_port,
    }
}

type Api<S> = tonic::service::interceptor::InterceptedService<Channel, S>;

fn bearer(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    Ok(r)
}

type Interceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

async fn channel(port: u16) -> Channel {
    for _ in 0..POLLS {
        if let Ok(ch) = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the control service on {port} did not come up");
}

async fn workers_api(
    port: u16,
) -> pb::worker_service_client::WorkerServiceClient<Api<Interceptor>> {
    pb::worker_service_client::WorkerServiceClient::with_interceptor(
        channel(port).await,
        bearer as Interceptor,
    )
}

async fn list(port: u16) -> Vec<pb::Worker> {
    match workers_api(port)
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
    {
        Ok(r) => r.into_inner().workers,
        Err(_) => Vec::new(),
    }
}

/// Waits until `workers/{id}` is listed HEALTHY at `address`.
async fn wait_registered(port: u16, id: &str, address: &str, logs: &[&Proc]) -> pb::Worker {
    for _ in 0..POLLS {
        if let Some(w) = list(port).await.into_iter().find(|w| {
            w.name == format!("workers/{id}")
                && w.address == address
                && w.health() == pb::WorkerHealth::Healthy
        }) {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs: Vec<String> = logs.iter().map(|p| p.log_text()).collect();
    panic!(
        "workers/{id} at {address} was not registered: {:?}\n{}",
        list(port).await,
        logs.join("\n----\n")
    );
}

fn qemu_io(uri: &str, cmd: &str) -> String {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, uri])
        .output()
        .expect("qemu-io runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io {cmd} on {uri}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_registers_itself_serves_a_volume_and_a_second_joins() {
    let dir = scratch();
    let d = dir.path();
    let port = free_port();
    let c = control(d, "control", port);
    let token = d.join("worker-token");
    std::fs::write(&token, TOKEN).unwrap();

    let a = worker(d, "node-a", port, &token);
    let wa = wait_registered(port, "node-a", &a.grpc, &[&c, &a.proc]).await;
    assert_eq!(wa.node, "node-a");
    assert_eq!(wa.nbd_uri, format!("nbd://127.0.0.1:{}", a.nbd_port));

    // The control service places a volume on it; it serves it over NBD.
    let ch = channel(port).await;
    let mut volumes =
        pb::volume_service_client::VolumeServiceClient::with_interceptor(ch, bearer as Interceptor);
    let v = volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v1".into(),
            volume: Some(pb::Volume {
                size_bytes: 4 * MIB,
                ..Default::default()
            }),
        })
        .await
        .expect("a volume on the registered worker")
        .into_inner();
    assert_eq!(v.worker, "workers/node-a");
    assert_eq!(v.state(), pb::State::Ready);
    qemu_io(&v.nbd_uri, "write -P 0x5a 1M 64k");
    let out = qemu_io(&v.nbd_uri, "read -P 0x5a 1M 64k");
    assert!(out.contains("read 65536/65536"), "{out}");

    // A second worker joins; the first stays, with its volume.
    let b = worker(d, "node-b", port, &token);
    wait_registered(port, "node-b", &b.grpc, &[&c, &b.proc]).await;
    let all = list(port).await;
    let names: Vec<_> = all.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{all:?}");
    let wa = all.iter().find(|w| w.name == "workers/node-a").unwrap();
    assert_eq!(wa.volume_count, 1, "{wa:?}");
    assert_eq!(wa.health(), pb::WorkerHealth::Healthy, "{wa:?}");
    // Registering again every second moved nothing and logged the
    // registration once.
    let log = a.proc.log_text();
    assert_eq!(
        log.matches("registered with the control service").count(),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_control_service_is_killed_the_worker_registers_again() {
    let dir = scratch();
    let d = dir.path();
    let port = free_port();
    let mut c = control(d, "control", port);
    let token = d.join("worker-token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut a = worker(d, "node-a", port, &token);
    wait_registered(port, "node-a", &a.grpc, &[&c, &a.proc]).await;

    // kill -9, and a control service on the same port with an empty
    // catalog: nothing but the worker itself can make it known there.
    c.kill9();
    let c2 = control(d, "control-new", port);
    let w = wait_registered(port, "node-a", &a.grpc, &[&c2, &a.proc]).await;
    assert_eq!(w.node, "node-a");
    a.proc.assert_running();
    // The new control service recorded a registration (it has no static
    // worker list).
    let log = c2.log_text();
    assert!(log.contains("worker registered"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_wrong_token_logs_it_keeps_serving_and_keeps_trying() {
    let dir = scratch();
    let d = dir.path();
    let port = free_port();
    let c = control(d, "control", port);
    let token = d.join("worker-token");
    std::fs::write(&token, "not-the-token").unwrap();
    let mut a = worker(d, "node-a", port, &token);

    // Refused at least twice: it retried; the log says why, with the code.
    let mut refusals = 0;
    for _ in 0..POLLS {
        refusals = a
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("cannot register") && l.contains("UNAUTHENTICATED"))
            .count();
        if refusals >= 2 {
            break;
        }
        a.proc.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refusals >= 2, "{}", a.proc.log_text());
    assert!(list(port).await.is_empty());

    // Its data path serves meanwhile.
    let mut wc = cowsnap_proto::worker::v1::worker_service_client::WorkerServiceClient::connect(
        format!("http://{}", a.grpc),
    )
    .await
    .expect("the worker's API answers");
    let info = wc
        .get_worker_info(cowsnap_proto::worker::v1::GetWorkerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node, "node-a");
    a.proc.assert_running();

    // The token file is read at each attempt: fixed, the worker joins.
    std::fs::write(&token, TOKEN).unwrap();
    wait_registered(port, "node-a", &a.grpc, &[&c, &a.proc]).await;
}

/// A worker whose pod is replaced comes back at another address: it
/// re-registers there under the same id, and the control service moves it,
/// its volume staying its own and served at the new address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_at_a_new_address_moves_and_keeps_its_volume() {
    let dir = scratch();
    let d = dir.path();
    let port = free_port();
    let c = control(d, "control", port);
    let token = d.join("worker-token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut a = worker(d, "node-a", port, &token);
    wait_registered(port, "node-a", &a.grpc, &[&c, &a.proc]).await;
    let ch = channel(port).await;
    let mut volumes =
        pb::volume_service_client::VolumeServiceClient::with_interceptor(ch, bearer as Interceptor);
    let v = volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v1".into(),
            volume: Some(pb::Volume {
                size_bytes: 4 * MIB,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    qemu_io(&v.nbd_uri, "write -P 0x3c 0 128k");

    // The same node's worker (same data dir), on new ports.
    a.proc.kill9();
    let old = a.grpc.clone();
    let moved = worker(d, "node-a", port, &token);
    assert_ne!(moved.grpc, old);
    let w = wait_registered(port, "node-a", &moved.grpc, &[&c, &moved.proc]).await;
    assert_eq!(w.volume_count, 1, "{w:?}");
    assert_eq!(w.nbd_uri, format!("nbd://127.0.0.1:{}", moved.nbd_port));
    let all = list(port).await;
    assert_eq!(all.len(), 1, "one worker, moved, not a second: {all:?}");

    let v = volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.worker, "workers/node-a");
    assert!(
        v.nbd_uri.contains(&format!(":{}/", moved.nbd_port)),
        "{}",
        v.nbd_uri
    );
    let out = qemu_io(&v.nbd_uri, "read -P 0x3c 0 128k");
    assert!(out.contains("read 131072/131072"), "{out}");
    let log = c.log_text();
    assert!(log.contains("worker moved"), "{log}");
}

/// A pod address reused by another node's worker while the catalog still
/// holds it for the first: the newcomer is refused (ALREADY_EXISTS, in its
/// log) and the first worker's record and volume stay; once the first
/// worker re-registers at its new address, the newcomer's next attempt
/// takes the freed address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_still_held_by_another_worker_is_refused_until_it_moves() {
    let dir = scratch();
    let d = dir.path();
    let port = free_port();
    let c = control(d, "control", port);
    let token = d.join("worker-token");
    std::fs::write(&token, TOKEN).unwrap();
    let shared_port = free_port();
    let mut a = worker_at(d, "node-a", port, &token, shared_port);
    wait_registered(port, "node-a", &a.grpc, &[&c, &a.proc]).await;
    let ch = channel(port).await;
    let mut volumes =
        pb::volume_service_client::VolumeServiceClient::with_interceptor(ch, bearer as Interceptor);
    volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v1".into(),
            volume: Some(pb::Volume {
                size_bytes: 4 * MIB,
                ..Default::default()
            }),
        })
        .await
        .unwrap();

    // node-a's worker goes; node-b's comes up at the same address.
    a.proc.kill9();
    let mut b = worker_at(d, "node-b", port, &token, shared_port);
    let mut refused = false;
    for _ in 0..POLLS {
        refused = b
            .proc
            .log_text()
            .lines()
            .any(|l| l.contains("cannot register") && l.contains("ALREADY_EXISTS"));
        if refused {
            break;
        }
        b.proc.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "{}", b.proc.log_text());
    let all = list(port).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].name, "workers/node-a");
    assert_eq!(all[0].address, b.grpc);
    assert_eq!(all[0].volume_count, 1);
    // Its health checks find another node's worker there: not healthy, and
    // nothing of node-b's taken for node-a's.
    let mut stale = None;
    for _ in 0..POLLS {
        let all = list(port).await;
        if all[0].health() == pb::WorkerHealth::Unhealthy && all[0].last_error.contains("node-b") {
            stale = Some(all[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(stale) = stale else {
        panic!("{:?}\n{}", list(port).await, c.log_text());
    };
    assert_eq!(stale.node, "node-a");
    assert!(stale.last_error.contains("node-a"), "{stale:?}");

    // node-a's worker back elsewhere: it moves, and node-b gets the address.
    let a2 = worker(d, "node-a", port, &token);
    wait_registered(port, "node-a", &a2.grpc, &[&c, &a2.proc]).await;
    wait_registered(port, "node-b", &b.grpc, &[&c, &b.proc]).await;
    let v = volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.worker, "workers/node-a");
}

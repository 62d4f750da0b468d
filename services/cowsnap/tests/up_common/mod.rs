//! Harness for the tests that run `cowsnap up` as a real process: start it
//! on free ports over a data dir on disk, `kill -9` or SIGTERM it, start it
//! again on the same dir; clients of its public API and of its worker's own
//! API (through the worker's unix socket in the data dir); and the
//! consistency check every such test ends with.

#![allow(dead_code)]

pub mod certs;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cowsnap_proto::cowsnap::v1 as pb;
use cowsnap_proto::worker::v1 as wpb;
use tonic::Status;
use tonic::transport::Channel;

pub const MIB: u64 = 1 << 20;

/// A scratch directory under the target dir (on disk: `O_DIRECT` does not
/// work on tmpfs), removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a program runs at all (`PROGRAM --version`).
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
        || Command::new(program)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
}

/// A `cowsnap up` child process over one data dir, on fixed ports that
/// stay the same across restarts.
pub struct Up {
    child: Option<Child>,
    pub dir: PathBuf,
    pub api_port: u16,
    pub nbd_port: u16,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    /// The umask it runs with (the test's own when unset).
    umask: Option<u32>,
}

/// `cowsnap up` started on a new scratch data dir, and serving; the dir
/// goes when the first is dropped.
pub async fn up_in_scratch() -> (tempfile::TempDir, Up) {
    let tmp = scratch();
    let mut up = Up::start(&tmp.path().join("data"));
    up.ready().await;
    (tmp, up)
}

impl Up {
    pub fn start(dir: &Path) -> Up {
        Up::start_with_env(dir, &[])
    }

    /// Starts it with these environment variables set.
    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Up {
        Up::start_with(dir, env, None)
    }

    /// Starts it with these environment variables set, under `umask`.
    pub fn start_with(dir: &Path, env: &[(&str, &str)], umask: Option<u32>) -> Up {
        let mut up = Up {
            child: None,
            dir: dir.to_path_buf(),
            api_port: free_port(),
            nbd_port: free_port(),
            log: dir.with_extension("log"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            umask,
        };
        up.spawn();
        up
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cowsnap"));
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask(2) is async-signal-safe and cannot fail.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("up")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.api()])
            .args(["--nbd-listen", &self.nbd()])
            .env("COWSNAP_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// `127.0.0.1:PORT` of the public API.
    pub fn api(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }

    /// `127.0.0.1:PORT` of the NBD server.
    pub fn nbd(&self) -> String {
        format!("127.0.0.1:{}", self.nbd_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the API answers health checks as SERVING (after the
    /// start-up reconciliation), failing if the process exits.
    pub async fn ready(&mut self) {
        for _ in 0..1200 {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cowsnap up exited with {st}:\n{}", self.log_text());
            }
            if let Ok(ch) =
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.api()))
                    .unwrap()
                    .connect()
                    .await
            {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                if let Ok(r) = h
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: "cowsnap.v1.VolumeService".into(),
                    })
                    .await
                    && r.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cowsnap up did not come up:\n{}", self.log_text());
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Waits for it to exit by itself (e.g. killed by its
    /// `COWSNAP_TEST_KILL_AT` hook); returns its exit status.
    pub fn exited(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().unwrap()
    }

    /// The environment of its next starts, in place of the one it had.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// SIGTERM; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// Starts it again on the same data dir and ports, and waits until it
    /// serves.
    pub async fn restart(&mut self) {
        self.spawn();
        self.ready().await;
    }

    /// Starts it again (after a kill) with its `COWSNAP_TEST_KILL_AT` hook
    /// set to `point`, or unset.
    pub async fn restart_armed(&mut self, point: Option<&str>) {
        match point {
            Some(p) => self.set_env(&[("COWSNAP_TEST_KILL_AT", p)]),
            None => self.set_env(&[]),
        }
        self.restart().await;
    }

    pub async fn clients(&self) -> Api {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.api()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Api::new(ch)
    }

    /// A client of the worker's own API, through its socket in the data dir.
    pub async fn worker(&self) -> wpb::worker_service_client::WorkerServiceClient<Channel> {
        let path = self.dir.join("worker.sock");
        let ch = tonic::transport::Endpoint::from_static("http://worker.test")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        wpb::worker_service_client::WorkerServiceClient::new(ch)
    }

    /// Volume and snapshot names the worker holds, sorted.
    pub async fn worker_inventory(&self) -> Vec<String> {
        let vols = self
            .worker()
            .await
            .list_volumes(wpb::ListVolumesRequest {})
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let mut names = Vec::new();
        for v in vols {
            names.push(v.name.clone());
            names.extend(v.snapshots.into_iter().map(|s| s.name));
        }
        names.sort();
        names
    }

    /// The device files under the worker's data dir, as resource names
    /// (`v1.vol` → `volumes/v1`, `v1.s1.cow` → `volumes/v1/snapshots/s1`),
    /// sorted. Anything else there fails the test.
    pub fn device_files(&self) -> Vec<String> {
        let dir = self.dir.join("worker").join("devices");
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let f = e.unwrap().file_name().into_string().unwrap();
            if let Some(v) = f.strip_suffix(".vol") {
                names.push(format!("volumes/{v}"));
            } else if let Some(vs) = f.strip_suffix(".cow") {
                let (v, s) = vs.split_once('.').unwrap();
                names.push(format!("volumes/{v}/snapshots/{s}"));
            } else {
                panic!("unexpected file {f} in {}", dir.display());
            }
        }
        names.sort();
        names
    }

    /// Waits (bounded) until no operation is left undone: merges, restores
    /// and clones interrupted by a kill resume on their own after a start.
    pub async fn settle(&self) {
        let mut api = self.clients().await;
        for _ in 0..600 {
            let open = api
                .operations
                .list_operations(pb::ListOperationsRequest {
                    filter: "done=false".into(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .operations;
            if open.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("operations still running after 60 s:\n{}", self.log_text());
    }

    /// The invariant after any crash and restart: nothing stuck in CREATING
    /// or DELETING, the catalog lists exactly what the worker holds, and the
    /// worker's device files are exactly those (no leaked device). Returns
    /// the catalog's names.
    pub async fn assert_consistent(&self) -> Vec<String> {
        self.settle().await;
        let mut api = self.clients().await;
        let states = api.states().await;
        for (name, state) in &states {
            assert!(
                !matches!(state, pb::State::Creating | pb::State::Deleting),
                "{name} is stuck in {state:?}"
            );
        }
        let mut catalog: Vec<String> = states.iter().map(|(n, _)| n.clone()).collect();
        catalog.sort();
        let worker = self.worker_inventory().await;
        if catalog != worker {
            let only_catalog: Vec<_> = states.iter().filter(|(n, _)| !worker.contains(n)).collect();
            let only_worker: Vec<_> = worker.iter().filter(|n| !catalog.contains(n)).collect();
            let mut ops = Vec::new();
            for name in only_catalog
                .iter()
                .map(|(n, _)| n)
                .chain(only_worker.iter().copied())
            {
                let vol = name.split("/snapshots/").next().unwrap();
                for target in [name.as_str(), vol] {
                    ops.extend(
                        api.operations
                            .list_operations(pb::ListOperationsRequest {
                                filter: format!("target={target}"),
                                page_size: 1000,
                                ..Default::default()
                            })
                            .await
                            .unwrap()
                            .into_inner()
                            .operations,
                    );
                }
            }
            panic!(
                "catalog vs worker: only in the catalog {only_catalog:?}, only on the worker {only_worker:?}\noperations: {ops:#?}\nlog:\n{}",
                self.log_text()
            );
        }
        assert_eq!(self.device_files(), worker, "device files vs worker");
        catalog
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Clients of the public API.
pub struct Api {
    pub volumes: pb::volume_service_client::VolumeServiceClient<Channel>,
    pub snapshots: pb::snapshot_service_client::SnapshotServiceClient<Channel>,
    pub operations: pb::operation_service_client::OperationServiceClient<Channel>,
}

impl Api {
    pub fn new(ch: Channel) -> Api {
        Api {
            volumes: pb::volume_service_client::VolumeServiceClient::new(ch.clone()),
            snapshots: pb::snapshot_service_client::SnapshotServiceClient::new(ch.clone()),
            operations: pb::operation_service_client::OperationServiceClient::new(ch),
        }
    }

    /// Creates volume `id` of `size_bytes`; panics if that fails.
    pub async fn create_volume(&mut self, id: &str, size_bytes: u64) -> pb::Volume {
        self.volumes
            .create_volume(pb::CreateVolumeRequest {
                volume_id: id.into(),
                volume: Some(pb::Volume {
                    size_bytes,
                    ..Default::default()
                }),
            })
            .await
            .unwrap_or_else(|e| panic!("create volumes/{id}: {e}"))
            .into_inner()
    }

    /// Creates snapshot `id` of volume id `vol`.
    pub async fn create_snapshot(&mut self, vol: &str, id: &str) -> Result<pb::Snapshot, Status> {
        self.snapshots
            .create_snapshot(pb::CreateSnapshotRequest {
                parent: format!("volumes/{vol}"),
                snapshot_id: id.into(),
                snapshot: Some(pb::Snapshot::default()),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get_snapshot(&mut self, name: &str) -> Result<pb::Snapshot, Status> {
        self.snapshots
            .get_snapshot(pb::GetSnapshotRequest { name: name.into() })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn delete_snapshot(&mut self, name: &str) -> Result<(), Status> {
        self.snapshots
            .delete_snapshot(pb::DeleteSnapshotRequest { name: name.into() })
            .await
            .map(drop)
    }

    /// Every volume and snapshot listed, with its state.
    pub async fn states(&mut self) -> Vec<(String, pb::State)> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .volumes
                .list_volumes(pb::ListVolumesRequest {
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for v in r.volumes {
                let st = v.state();
                out.push((v.name, st));
            }
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        let mut token = String::new();
        loop {
            let r = self
                .snapshots
                .list_snapshots(pb::ListSnapshotsRequest {
                    parent: "volumes/-".into(),
                    page_size: 1000,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            for s in r.snapshots {
                let st = s.state();
                out.push((s.name, st));
            }
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        out
    }
}

/// `cowsnap ARGS --server API` against `up`; returns (exit code, stdout,
/// stderr).
pub fn cowsnap_cli(up: &Up, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(args)
        .args(["--server", &up.api()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs qemu-io on the NBD `uri` with one command (opened read-only for a
/// `read`): whether it exited 0, and what it printed.
pub fn qemu_io(uri: &str, cmd: &str) -> (bool, String) {
    let mut args = vec!["-f", "raw", uri, "-c", cmd];
    if cmd.starts_with("read") {
        args.insert(0, "-r");
    }
    let out = Command::new("qemu-io")
        .args(args)
        .output()
        .expect("qemu-io (apt install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs one shell command line; returns (exit code, stdout, stderr).
pub fn sh(line: &str, envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new("bash")
        .args(["-c", line])
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fenced shell block of README.md between `<!-- NAME:start -->` and
/// `<!-- NAME:end -->`, as its command lines (comments and blank lines
/// dropped).
pub fn readme_block(name: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = format!("<!-- {name}:start -->");
    let end = format!("<!-- {name}:end -->");
    let body = readme
        .split_once(&start)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(b, _)| b)
        .unwrap_or_else(|| panic!("README.md has no {start} ... {end} block"));
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("```"))
        .map(str::to_string)
        .collect()
}

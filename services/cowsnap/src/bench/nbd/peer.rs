//! The peer `bench nbd` compares with: `qemu-nbd` serving a fresh qcow2
//! overlay of the volume's file each round, started as a child process on
//! a free port for each run, its CPU read from `/proc`, stopped after it.

use std::fs::File;
use std::io::Read as _;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{EXPORT, Tools};

/// How qemu-nbd runs: its programs and its `--aio`, which falls back once
/// from io_uring to native when `auto` chose io_uring and qemu-nbd refuses
/// it.
pub(super) struct Peer {
    qemu_nbd: PathBuf,
    qemu_img: PathBuf,
    /// `--qemu-aio auto`.
    auto: bool,
    pub(super) aio: String,
}

impl Peer {
    /// `asked` is `--qemu-aio`: auto means io_uring when our `backend` is
    /// io_uring, native otherwise.
    pub(super) fn new(tools: &Tools, asked: &str, backend: &str) -> Peer {
        let aio = match asked {
            "auto" if backend == "io_uring" => "io_uring",
            "auto" => "native",
            other => other,
        };
        Peer {
            qemu_nbd: tools.qemu_nbd.clone(),
            qemu_img: tools.qemu_img.clone(),
            auto: asked == "auto",
            aio: aio.to_string(),
        }
    }

    /// qemu-nbd's arguments to serve `overlay` (the port comes after).
    fn args(&self, overlay: &Path) -> Vec<String> {
        vec![
            "--format=qcow2".into(),
            "--cache=none".into(),
            format!("--aio={}", self.aio),
            "--persistent".into(),
            "--bind=127.0.0.1".into(),
            format!("--export-name={EXPORT}"),
            overlay.display().to_string(),
        ]
    }

    /// The command line, as the report shows it.
    pub(super) fn command(&self) -> String {
        format!(
            "qemu-nbd {} --port=PORT",
            self.args(Path::new("OVERLAY")).join(" ")
        )
    }

    /// Creates `overlay`, a qcow2 file of `size` bytes over the raw file
    /// `base`, with clusters of `cluster` bytes.
    pub(super) fn create_overlay(
        &self,
        base: &Path,
        overlay: &Path,
        cluster: u64,
        size: u64,
    ) -> anyhow::Result<()> {
        let out = Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(base)
            .args(["-F", "raw", "-o"])
            .arg(format!("cluster_size={cluster}"))
            .arg(overlay)
            .arg(size.to_string())
            .output()
            .context("running qemu-img create")?;
        if !out.status.success() {
            bail!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts qemu-nbd on `overlay`, its stderr in the file `stderr`.
    pub(super) fn start(
        &mut self,
        overlay: &Path,
        stderr: PathBuf,
        say: &dyn Fn(&str),
    ) -> anyhow::Result<QemuNbd> {
        match QemuNbd::start(&self.qemu_nbd, &self.args(overlay), stderr.clone()) {
            Ok(q) => Ok(q),
            Err(e) if self.auto && self.aio == "io_uring" => {
                say(&format!(
                    "qemu-nbd --aio=io_uring failed ({e:#}); using native"
                ));
                self.aio = "native".into();
                QemuNbd::start(&self.qemu_nbd, &self.args(overlay), stderr)
            }
            Err(e) => Err(e),
        }
    }
}

/// qemu-nbd serving one overlay, stopped (SIGTERM, then SIGKILL) on drop.
pub(super) struct QemuNbd {
    child: Child,
    pub(super) port: u16,
    stderr: PathBuf,
}

impl QemuNbd {
    fn start(qemu_nbd: &Path, args: &[String], stderr: PathBuf) -> anyhow::Result<QemuNbd> {
        let port = free_port()?;
        let err =
            File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let child = Command::new(qemu_nbd)
            .args(args)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", qemu_nbd.display()))?;
        let mut q = QemuNbd {
            child,
            port,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = q.child.try_wait()? {
                let mut msg = String::new();
                let _ = File::open(&q.stderr).and_then(|mut f| f.read_to_string(&mut msg));
                bail!("qemu-nbd {} exited ({st}): {}", args.join(" "), msg.trim());
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(q);
            }
            if Instant::now() > deadline {
                bail!("qemu-nbd did not listen on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU seconds (user + system) it used so far.
    pub(super) fn cpu_secs(&self) -> Option<f64> {
        proc_cpu_secs(self.child.id())
    }

    pub(super) fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free TCP port")?;
    Ok(l.local_addr()?.port())
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
pub(super) fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

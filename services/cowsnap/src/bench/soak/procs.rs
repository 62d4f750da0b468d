//! The soak's child processes: `cowsnap worker` and `cowsnap control`, each
//! on fixed ports that stay across restarts, logging to a file; `kill -9`,
//! restart, and what `/proc` says of their memory and open files.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One child process of this executable.
pub struct Proc {
    name: &'static str,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Ports that answer once it serves.
    ports: Vec<u16>,
}

impl Proc {
    pub fn new(name: &'static str, args: Vec<String>, log: &Path, ports: Vec<u16>) -> Proc {
        Proc {
            name,
            args,
            log: log.to_path_buf(),
            child: None,
            ports,
        }
    }

    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let exe = std::env::current_exe().context("finding the cowsnap executable")?;
        let child = Command::new(exe)
            .args(&self.args)
            .env(
                "COWSNAP_LOG",
                std::env::var("COWSNAP_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting cowsnap {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until every port accepts connections (at most `limit`).
    pub async fn ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        for &port in &self.ports {
            loop {
                if let Some(c) = self.child.as_mut()
                    && let Some(st) = c.try_wait()?
                {
                    bail!(
                        "cowsnap {} exited with {st} (log: {})",
                        self.name,
                        self.log.display()
                    );
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "cowsnap {} did not listen on port {port} in {limit:?}",
                        self.name
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, and waits for it to exit (`kill -9` after `grace`).
    pub async fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory (KiB) and open file descriptors, from `/proc`.
    pub fn usage(&self) -> Option<(u64, u64)> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
        Some((rss, fds))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

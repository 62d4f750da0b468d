//! How much of the process the NBD server may take, so that no number of
//! clients can run it out of memory or file descriptors (and take the gRPC
//! API in the same process down with it):
//!
//! - a connection limit: a client over it is told so during the handshake
//!   ([`refusal`](super::refusal)) and closed; at most [`REFUSING_AT_ONCE`]
//!   refusals run at a time, each for at most [`REFUSAL_TIMEOUT`], and a
//!   connection beyond those is closed at once;
//! - an idle timeout: a connection with no request in flight and none
//!   received for that long is closed, and so is one that leaves a reply
//!   untaken for that long;
//! - a byte budget for request and reply buffers, shared by every
//!   connection: a read or write takes its length from it before its buffer
//!   is allocated and gives it back once its reply is written out. A
//!   connection waiting for budget stops reading requests, so a client that
//!   pipelines reads and never takes the replies holds at most its share
//!   ([`Quotas::per_connection_bytes`]) and then only its own socket.
//!
//! [`NbdLimits`] is the setting, [`Quotas`] the process-wide state behind
//! it: every listener of a process is given the same one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{MAX_IN_FLIGHT_BYTES, MAX_PAYLOAD};

/// Refusals of connections over the limit that may run at once; a
/// connection beyond these is closed without a word.
pub const REFUSING_AT_ONCE: usize = 16;

/// How long a refusal may take (greeting, the client's options, the error
/// replies) before the connection is closed anyway.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// At most one warning about refused connections per this long.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Unit of the buffer budget (its semaphore counts these).
const BUDGET_UNIT: u64 = 4096;

/// The NBD server's limits (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdLimits {
    /// Connections served at once; one more is refused.
    pub max_connections: usize,
    /// How long a connection may go without a request in flight (or leave
    /// a reply untaken) before it is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Bytes of request and reply buffers all connections together hold at
    /// most; at least [`MAX_PAYLOAD`].
    pub buffer_budget_bytes: u64,
}

impl Default for NbdLimits {
    fn default() -> NbdLimits {
        NbdLimits {
            max_connections: 256,
            // Off: block devices attached through NBD (the CSI node's
            // nbdfuse, kernel nbd-client, VMs) hold a connection that may
            // go without a request for days and do not reconnect.
            idle_timeout: None,
            buffer_budget_bytes: 512 << 20,
        }
    }
}

impl NbdLimits {
    /// Whether these limits can work; the message names the setting.
    pub fn check(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("the NBD connection limit must be at least 1".into());
        }
        if self.buffer_budget_bytes < u64::from(MAX_PAYLOAD) {
            return Err(format!(
                "the NBD buffer budget of {} bytes is smaller than the largest request \
                 ({MAX_PAYLOAD} bytes, 32m): at least that much is needed",
                self.buffer_budget_bytes
            ));
        }
        Ok(())
    }

    /// Fits the connection limit to the process's file descriptor limit
    /// (`RLIMIT_NOFILE`): NBD may use at most half of it, connections and
    /// refusals together, the rest is for the gRPC API, the devices and the
    /// runtime. Raises the soft limit toward the hard one when that is
    /// enough; otherwise lowers the connection limit, with a warning.
    pub fn fit_to_fd_limit(&mut self) {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            tracing::warn!(
                "NBD: cannot read the file descriptor limit ({}); keeping {} connections",
                std::io::Error::last_os_error(),
                self.max_connections
            );
            return;
        }
        let needed = 2 * (self.max_connections as u64 + REFUSING_AT_ONCE as u64);
        if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < needed {
            let raised = if lim.rlim_max == libc::RLIM_INFINITY {
                needed
            } else {
                needed.min(lim.rlim_max)
            };
            if raised > lim.rlim_cur {
                let new = libc::rlimit {
                    rlim_cur: raised,
                    rlim_max: lim.rlim_max,
                };
                // SAFETY: setrlimit reads the struct we own.
                if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
                    tracing::info!(
                        "raised the file descriptor limit from {} to {raised} for {} NBD connections",
                        lim.rlim_cur,
                        self.max_connections
                    );
                    lim.rlim_cur = raised;
                }
            }
        }
        if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < needed {
            let fits = (lim.rlim_cur / 2).saturating_sub(REFUSING_AT_ONCE as u64);
            let lowered = (fits as usize).max(1);
            tracing::warn!(
                nofile = lim.rlim_cur,
                "NBD: the file descriptor limit (RLIMIT_NOFILE {}) is too small for {} \
                 connections; serving at most {lowered} (raise `ulimit -n` to {needed} \
                 for {})",
                lim.rlim_cur,
                self.max_connections,
                self.max_connections
            );
            self.max_connections = lowered;
        }
    }
}

/// The process-wide state behind [`NbdLimits`]: connection slots, refusal
/// slots and the buffer budget.
pub struct Quotas {
    limits: NbdLimits,
    connections: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    /// The buffer budget in [`BUDGET_UNIT`]s.
    buffers: Arc<Semaphore>,
    budget_units: u64,
    /// Refusals since the last warning, and when that was.
    refused: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

/// A slot of the connection limit, or of the refusals; freed on drop.
pub type Slot = OwnedSemaphorePermit;

impl Quotas {
    pub fn new(limits: NbdLimits) -> Arc<Quotas> {
        let budget_units =
            (limits.buffer_budget_bytes / BUDGET_UNIT).min(Semaphore::MAX_PERMITS as u64);
        Arc::new(Quotas {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            refusing: Arc::new(Semaphore::new(REFUSING_AT_ONCE)),
            buffers: Arc::new(Semaphore::new(budget_units as usize)),
            budget_units,
            refused: AtomicU64::new(0),
            last_warning: Mutex::new(None),
            limits,
        })
    }

    pub fn limits(&self) -> &NbdLimits {
        &self.limits
    }

    /// A connection slot, when one is free.
    pub fn admit(&self) -> Option<Slot> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Notes a connection turned away; warns at most once every ten
    /// seconds, with the count since the last warning. Returns a refusal
    /// slot when one is free (otherwise the connection is closed at once).
    pub fn refuse(&self, peer: &str) -> Option<Slot> {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_warning.lock().expect("refusal warning state");
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= REFUSAL_WARNING_EVERY) {
            *last = Some(now);
            let n = self.refused.swap(0, Ordering::Relaxed);
            let limit = self.limits.max_connections;
            tracing::warn!(
                %peer,
                refused = n,
                limit,
                "NBD: too many connections (limit {limit}): refused {n} since the last \
                 warning, the latest from {peer}"
            );
        }
        drop(last);
        self.refusing.clone().try_acquire_owned().ok()
    }

    /// What a refused client is told.
    pub fn refusal_message(&self) -> String {
        format!(
            "too many connections (limit {}); try again later",
            self.limits.max_connections
        )
    }

    /// Most buffer bytes one connection holds at once: a quarter of the
    /// budget, at least one request of the largest size, at most
    /// [`MAX_IN_FLIGHT_BYTES`].
    pub fn per_connection_bytes(&self) -> usize {
        let quarter =
            (self.limits.buffer_budget_bytes / 4).min(MAX_IN_FLIGHT_BYTES as u64) as usize;
        quarter.max(MAX_PAYLOAD as usize)
    }

    /// Takes `bytes` from the buffer budget, waiting until they are free.
    /// `None`: more than the whole budget, which can never be granted.
    pub async fn reserve(&self, bytes: usize) -> Option<Budget> {
        let units = (bytes as u64).div_ceil(BUDGET_UNIT);
        if units > self.budget_units || units > u64::from(u32::MAX) {
            return None;
        }
        let permit = self
            .buffers
            .clone()
            .acquire_many_owned(units as u32)
            .await
            .expect("the budget semaphore is never closed");
        Some(Budget { _permit: permit })
    }

    /// Bytes of the budget held by requests right now.
    pub fn buffer_bytes_in_use(&self) -> u64 {
        (self.budget_units - self.buffers.available_permits() as u64) * BUDGET_UNIT
    }

    /// Connections being served right now.
    pub fn connections(&self) -> usize {
        self.limits.max_connections - self.connections.available_permits()
    }
}

/// Bytes of the buffer budget held by one request; given back on drop.
pub struct Budget {
    _permit: OwnedSemaphorePermit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked() {
        assert_eq!(NbdLimits::default().check(), Ok(()));
        let none = NbdLimits {
            max_connections: 0,
            ..NbdLimits::default()
        };
        assert!(none.check().unwrap_err().contains("at least 1"));
        let small = NbdLimits {
            buffer_budget_bytes: 1 << 20,
            ..NbdLimits::default()
        };
        assert!(small.check().unwrap_err().contains("largest request"));
    }

    #[test]
    fn shares_of_the_budget() {
        let q = Quotas::new(NbdLimits::default());
        assert_eq!(q.per_connection_bytes(), 128 << 20);
        let q = Quotas::new(NbdLimits {
            buffer_budget_bytes: 32 << 20,
            ..NbdLimits::default()
        });
        assert_eq!(q.per_connection_bytes(), 32 << 20);
        let q = Quotas::new(NbdLimits {
            buffer_budget_bytes: 64 << 30,
            ..NbdLimits::default()
        });
        assert_eq!(q.per_connection_bytes(), MAX_IN_FLIGHT_BYTES);
    }

    #[tokio::test]
    async fn the_budget_is_taken_and_given_back() {
        let q = Quotas::new(NbdLimits {
            buffer_budget_bytes: 64 << 20,
            ..NbdLimits::default()
        });
        let a = q.reserve(32 << 20).await.unwrap();
        let b = q.reserve(1).await.unwrap();
        assert_eq!(q.buffer_bytes_in_use(), (32 << 20) + BUDGET_UNIT);
        assert!(q.reserve(65 << 20).await.is_none(), "more than the budget");
        drop((a, b));
        assert_eq!(q.buffer_bytes_in_use(), 0);
    }

    #[test]
    fn connection_slots_run_out_and_come_back() {
        let q = Quotas::new(NbdLimits {
            max_connections: 2,
            ..NbdLimits::default()
        });
        let a = q.admit().unwrap();
        let _b = q.admit().unwrap();
        assert!(q.admit().is_none());
        assert_eq!(q.connections(), 2);
        drop(a);
        assert!(q.admit().is_some());
        assert!(
            q.refusal_message()
                .contains("too many connections (limit 2)")
        );
    }
}

//! The NBD server: exports the worker's volumes and snapshots to block
//! clients (`qemu-img`, `qemu-io`, `nbdcopy`, the kernel's `nbd-client`).
//!
//! - [`listener`]: where the server listens (TCP or a unix socket), the
//!   accept loop, one task per connection, clean shutdown;
//! - [`handshake`]: the fixed newstyle handshake and option haggling
//!   (`NBD_OPT_GO`, `INFO`, `LIST`, `EXPORT_NAME`, `STRUCTURED_REPLY`,
//!   `STARTTLS`);
//! - [`tls`]: TLS (off, optional or required; client certificates from a
//!   CA): its settings and the acceptor a connection upgrades with;
//! - [`transmission`]: the request loop: requests run concurrently, replies
//!   go out through one writer, in any order;
//! - [`limits`]: the connection limit, the idle timeout and the buffer
//!   budget every connection of the process draws from;
//! - [`refusal`]: what a client over the connection limit is told;
//! - [`proto`]: the wire format.
//!
//! Export names are resource names (`volumes/VOL`,
//! `volumes/VOL/snapshots/SNAP`), looked up in [`Exports`](crate::exports::Exports)
//! at each handshake; there is no default export.
//!
//! Limits a client sees: the minimum block size is the engine's alignment
//! (requests not aligned to it fail with `EINVAL`), the preferred one the
//! export's chunk size, the maximum [`MAX_PAYLOAD`] for reads and writes
//! (trim and write-zeroes may be longer).

pub mod handshake;
pub mod limits;
pub mod listener;
pub mod proto;
pub mod refusal;
pub mod tls;
pub mod transmission;

use std::io;

pub use limits::{NbdLimits, Quotas};
pub use listener::{Listen, LocalAddr, NbdServer, serve};
pub use tls::{NbdTls, NbdTlsConfig, TlsMode};

/// Largest read or write one request may carry (advertised as the maximum
/// block size). Clients commonly split at 32 MiB anyway.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Requests one connection runs at once; further requests wait on the socket.
pub const MAX_IN_FLIGHT: usize = 64;

/// Bytes of read and write buffers one connection holds at most (beside the
/// request count limit): 64 requests of 32 MiB would be 2 GiB. The process's
/// buffer budget may make a connection's share smaller
/// ([`Quotas::per_connection_bytes`]).
pub const MAX_IN_FLIGHT_BYTES: usize = 256 << 20;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the connection is dropped.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (no client
    /// certificate, one from another CA, a client that rejected ours).
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

impl ConnError {
    /// The client went away (or reset the connection): not worth a warning.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ConnError::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        ))
    }
}

//! The kernel's NBD client, driven the way `nbd-client` drives it over
//! generic netlink: this process connects to the export and does the
//! handshake (`NBD_OPT_GO`), then hands the connected socket to the kernel
//! (`NBD_CMD_CONNECT`), which serves `/dev/nbdN` from it with no process
//! left in between. Each device carries a backend identifier (the
//! attachment's directory), shown in `/sys/block/nbdN/backend`, so a
//! restarted plugin finds its devices again.
//!
//! A device is connected with a dead-connection timeout: when the server
//! goes away (the worker restarts; the node plugin shares its process),
//! the kernel holds I/O for that long and a new socket handed over with
//! `NBD_CMD_RECONFIGURE` takes over, mounts and all ([`reconnect`]).
//!
//! Needs the `nbd` module (its generic netlink family) and CAP_SYS_ADMIN.
//! TLS is not offered: the kernel's client speaks plain NBD only.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cowsnap_worker::nbd::LocalAddr;
use cowsnap_worker::nbd::proto;

/// How long the kernel holds I/O for a server that went away before it
/// fails it: long enough for a worker to restart and its node plugin to
/// reconnect the device.
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);

/// How long connecting and the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server said of the export in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// The transmission flags (`NBD_FLAG_*`), handed to the kernel as is.
    pub flags: u16,
}

/// A device the kernel's NBD client serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub index: u32,
    /// The backend identifier it was connected with ("" if none).
    pub backend: String,
    /// Its size in bytes (0 once disconnected).
    pub size: u64,
    /// Whether the kernel holds a connection configuration for it (a
    /// device whose server went away stays connected until reconnected,
    /// disconnected or the dead-connection timeout).
    pub connected: bool,
}

impl Device {
    pub fn path(&self) -> PathBuf {
        path(self.index)
    }
}

/// `/dev/nbdN`.
pub fn path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The index of a `/dev/nbdN` path.
pub fn index_of(dev: &Path) -> Option<u32> {
    dev.file_name()?.to_str()?.strip_prefix("nbd")?.parse().ok()
}

/// Whether the kernel's NBD client can be used here: its netlink family
/// answers (the `nbd` module is loaded).
pub fn available() -> bool {
    Netlink::open().and_then(|mut n| n.family_id()).is_ok()
}

/// Connects `export` of the server at `addr` to a free `/dev/nbdN` (the
/// kernel picks it, making a new one if all are taken) labelled
/// `backend`. Returns the device.
pub fn attach(addr: &LocalAddr, export: &str, backend: &str) -> anyhow::Result<Device> {
    let (sock, info) = open_export(addr, export)?;
    let mut nl = Netlink::open()?;
    let family = nl.family_id()?;
    let mut m = Msg::new(family, NBD_CMD_CONNECT);
    m.u64(NBD_ATTR_SIZE_BYTES, info.size);
    m.u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size(info.size));
    m.u64(NBD_ATTR_SERVER_FLAGS, u64::from(info.flags));
    m.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, DEAD_CONN_TIMEOUT.as_secs());
    m.sockets(sock.as_raw_fd());
    m.string(NBD_ATTR_BACKEND_IDENTIFIER, backend);
    let reply = nl
        .request(m)
        .map_err(|e| anyhow::anyhow!("kernel NBD connect of {export}: {e}"))?;
    let index = reply
        .and_then(|r| attr_u32(&r, NBD_ATTR_INDEX))
        .ok_or_else(|| {
            anyhow::anyhow!("kernel NBD connect of {export}: no device index in the reply")
        })?;
    // The kernel holds its own reference to the socket now.
    drop(sock);
    Ok(Device {
        index,
        backend: backend.to_string(),
        size: info.size,
        connected: true,
    })
}

/// Hands `/dev/nbd{index}` a new connection to `export` (its server went
/// away and came back): I/O the kernel held resumes, mounts stay. The
/// device must still be connected, labelled `backend`; the export's size
/// is taken as the device's new size (it may have grown).
pub fn reconnect(index: u32, addr: &LocalAddr, export: &str, backend: &str) -> anyhow::Result<()> {
    let dev = device(index).ok_or_else(|| anyhow::anyhow!("/dev/nbd{index}: no such device"))?;
    if !dev.connected || dev.backend != backend {
        anyhow::bail!(
            "/dev/nbd{index} is not ours to reconnect (connected: {}, backend {:?})",
            dev.connected,
            dev.backend
        );
    }
    let (sock, info) = open_export(addr, export)?;
    let mut nl = Netlink::open()?;
    let family = nl.family_id()?;
    let mut m = Msg::new(family, NBD_CMD_RECONFIGURE);
    m.u32(NBD_ATTR_INDEX, index);
    if info.size != dev.size {
        m.u64(NBD_ATTR_SIZE_BYTES, info.size);
    }
    m.sockets(sock.as_raw_fd());
    // A device connected with a backend identifier takes a reconfigure
    // only naming the same one.
    m.string(NBD_ATTR_BACKEND_IDENTIFIER, backend);
    nl.request(m)
        .map_err(|e| anyhow::anyhow!("kernel NBD reconnect of /dev/nbd{index}: {e}"))?;
    Ok(())
}

/// Gives connected `/dev/nbd{index}`, labelled `backend`, the current
/// size of `export` (it grew): the kernel tells the block layer, and a
/// mounted file system can grow into it. Returns the size.
pub fn refresh_size(
    index: u32,
    addr: &LocalAddr,
    export: &str,
    backend: &str,
) -> anyhow::Result<u64> {
    let (_, info) = open_export(addr, export)?;
    resize(index, backend, info.size)?;
    Ok(info.size)
}

/// Sets the size of connected `/dev/nbd{index}`, labelled `backend`, to
/// `size`.
fn resize(index: u32, backend: &str, size: u64) -> anyhow::Result<()> {
    let mut nl = Netlink::open()?;
    let family = nl.family_id()?;
    let mut m = Msg::new(family, NBD_CMD_RECONFIGURE);
    m.u32(NBD_ATTR_INDEX, index);
    m.u64(NBD_ATTR_SIZE_BYTES, size);
    m.string(NBD_ATTR_BACKEND_IDENTIFIER, backend);
    nl.request(m)
        .map_err(|e| anyhow::anyhow!("kernel NBD resize of /dev/nbd{index}: {e}"))?;
    Ok(())
}

/// A device something holds (a mounted file system, a device-mapper
/// table): not disconnected.
#[derive(Debug)]
pub struct InUse(pub PathBuf);

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is in use (mounted?); release it first",
            self.0.display()
        )
    }
}

impl std::error::Error for InUse {}

/// Disconnects `/dev/nbd{index}`: the kernel sends NBD_CMD_DISC, drops
/// the socket and the device reads as empty. Refused ([`InUse`]) while
/// something holds the device: the kernel would fail its I/O.
pub fn detach(index: u32) -> anyhow::Result<()> {
    if in_use(&path(index)) {
        return Err(InUse(path(index)).into());
    }
    let mut nl = Netlink::open()?;
    let family = nl.family_id()?;
    let mut m = Msg::new(family, NBD_CMD_DISCONNECT);
    m.u32(NBD_ATTR_INDEX, index);
    nl.request(m)
        .map_err(|e| anyhow::anyhow!("kernel NBD disconnect of /dev/nbd{index}: {e}"))?;
    // The teardown finishes asynchronously; wait for the configuration to
    // go so a new connect may take the device.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while device(index).is_some_and(|d| d.connected) {
        if std::time::Instant::now() > until {
            anyhow::bail!("/dev/nbd{index} still connected 10 s after the disconnect");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether something holds `dev` open exclusively (a mounted file
/// system, a device-mapper table): an exclusive open of it fails then.
fn in_use(dev: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    matches!(
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(dev),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY)
    )
}

/// `/dev/nbd{index}` as sysfs shows it, if it exists.
pub fn device(index: u32) -> Option<Device> {
    let sys = PathBuf::from(format!("/sys/block/nbd{index}"));
    let sectors: u64 = std::fs::read_to_string(sys.join("size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let backend = std::fs::read_to_string(sys.join("backend"))
        .map(|s| s.trim_end_matches('\n').to_string())
        .unwrap_or_default();
    Some(Device {
        index,
        backend,
        size: sectors * 512,
        // The kernel makes the pid file when it starts a device and
        // removes it when the configuration goes.
        connected: sys.join("pid").exists(),
    })
}

/// Every NBD device connected now.
pub fn connected() -> Vec<Device> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<Device> = rd
        .flatten()
        .filter_map(|e| index_of(Path::new(&e.file_name())))
        .filter_map(device)
        .filter(|d| d.connected)
        .collect();
    out.sort_by_key(|d| d.index);
    out
}

/// The block size the device gets: 4 KiB when the export is a multiple
/// of it (volumes are), else 512.
fn block_size(size: u64) -> u64 {
    if size.is_multiple_of(4096) { 4096 } else { 512 }
}

/// Connects to `addr` and negotiates `export` (fixed newstyle, NBD_OPT_GO,
/// simple replies: the kernel's client knows no structured replies).
pub fn open_export(addr: &LocalAddr, export: &str) -> anyhow::Result<(OwnedFd, ExportInfo)> {
    let fail = |e: std::io::Error| anyhow::anyhow!("NBD server {addr}: {e}");
    // The handshake has a deadline; the connection the kernel gets none.
    macro_rules! negotiate {
        ($s:expr) => {{
            let s = $s;
            s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(fail)?;
            s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(fail)?;
            let info =
                handshake(&s, export).map_err(|e| anyhow::anyhow!("NBD server {addr}: {e}"))?;
            s.set_read_timeout(None).map_err(fail)?;
            s.set_write_timeout(None).map_err(fail)?;
            Ok((s.into(), info))
        }};
    }
    match addr {
        LocalAddr::Tcp(a) => {
            let s = std::net::TcpStream::connect_timeout(a, HANDSHAKE_TIMEOUT).map_err(fail)?;
            s.set_nodelay(true).map_err(fail)?;
            negotiate!(s)
        }
        LocalAddr::Unix(p) => negotiate!(std::os::unix::net::UnixStream::connect(p).map_err(fail)?),
    }
}

/// The client side of the handshake on a connected stream.
fn handshake<S>(mut s: S, export: &str) -> anyhow::Result<ExportInfo>
where
    S: Read + Write,
{
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet)?;
    let magic = u64::from_be_bytes(greet[0..8].try_into().expect("8"));
    let opt = u64::from_be_bytes(greet[8..16].try_into().expect("8"));
    let hflags = u16::from_be_bytes([greet[16], greet[17]]);
    if magic != proto::NBD_MAGIC || opt != proto::IHAVEOPT {
        anyhow::bail!("not an NBD newstyle server");
    }
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        anyhow::bail!("the server does not speak fixed newstyle");
    }
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if hflags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    let mut b = Vec::new();
    proto::put_u32(&mut b, cflags);
    proto::put_u64(&mut b, proto::IHAVEOPT);
    proto::put_u32(&mut b, proto::OPT_GO);
    proto::put_u32(&mut b, 4 + export.len() as u32 + 2);
    proto::put_u32(&mut b, export.len() as u32);
    b.extend_from_slice(export.as_bytes());
    proto::put_u16(&mut b, 0);
    s.write_all(&b)?;
    let mut info = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        if magic != proto::REPLY_MAGIC || len > 64 << 10 {
            anyhow::bail!("bad option reply from the server");
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match kind {
            proto::REP_ACK => {
                return info
                    .ok_or_else(|| anyhow::anyhow!("export {export}: no size from the server"));
            }
            proto::REP_INFO if data.len() >= 12 && data[..2] == [0, 0] => {
                info = Some(ExportInfo {
                    size: u64::from_be_bytes(data[2..10].try_into().expect("8")),
                    flags: u16::from_be_bytes([data[10], data[11]]),
                });
            }
            proto::REP_INFO => {}
            k if k & proto::REP_ERR != 0 => {
                anyhow::bail!(
                    "export {export} refused: {}",
                    String::from_utf8_lossy(&data)
                );
            }
            k => anyhow::bail!("unexpected option reply type {k:#x}"),
        }
    }
}

// Generic netlink, the parts the NBD family needs (linux/netlink.h,
// linux/genetlink.h, linux/nbd-netlink.h).
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// One generic netlink request being built: the netlink and genl headers,
/// then attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(family: u16, cmd: u8) -> Msg {
        let mut buf = vec![0u8; 20];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf[16] = cmd;
        buf[17] = if family == GENL_ID_CTRL {
            1
        } else {
            NBD_GENL_VERSION
        };
        Msg { buf }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_ne_bytes());
    }

    fn u64(&mut self, kind: u16, v: u64) {
        self.attr(kind, &v.to_ne_bytes());
    }

    fn string(&mut self, kind: u16, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(kind, &b);
    }

    /// NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD = fd } }.
    fn sockets(&mut self, fd: i32) {
        let mut fd_attr = Vec::new();
        fd_attr.extend_from_slice(&8u16.to_ne_bytes());
        fd_attr.extend_from_slice(&NBD_SOCK_FD.to_ne_bytes());
        fd_attr.extend_from_slice(&(fd as u32).to_ne_bytes());
        let mut item = Vec::new();
        item.extend_from_slice(&((4 + fd_attr.len()) as u16).to_ne_bytes());
        item.extend_from_slice(&NBD_SOCK_ITEM.to_ne_bytes());
        item.extend_from_slice(&fd_attr);
        self.attr(NBD_ATTR_SOCKETS, &item);
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// The attributes of a genl reply's payload (after its 4-byte genl
/// header): (type, payload) pairs.
fn attrs(payload: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= payload.len() {
        let len = u16::from_ne_bytes([payload[at], payload[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([payload[at + 2], payload[at + 3]]) & 0x3fff;
        if len < 4 || at + len > payload.len() {
            break;
        }
        out.push((kind, &payload[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

fn attr_u32(reply: &[u8], kind: u16) -> Option<u32> {
    attrs(reply)
        .into_iter()
        .find(|(k, v)| *k == kind && v.len() >= 4)
        .map(|(_, v)| u32::from_ne_bytes(v[..4].try_into().expect("4")))
}

/// A generic netlink socket.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> std::io::Result<Netlink> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 30,
            tv_usec: 0,
        };
        // SAFETY: tv outlives the call and its size is passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Netlink { fd, seq: 0 })
    }

    /// The id of the `nbd` family (ENOENT without the module).
    fn family_id(&mut self) -> std::io::Result<u16> {
        let mut m = Msg::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY);
        m.string(CTRL_ATTR_FAMILY_NAME, "nbd");
        let reply = self.request(m)?.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no nbd netlink family")
        })?;
        attrs(&reply)
            .into_iter()
            .find(|(k, v)| *k == CTRL_ATTR_FAMILY_ID && v.len() >= 2)
            .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]]))
            .ok_or_else(|| std::io::Error::other("no family id in the reply"))
    }

    /// Sends `m` and waits for its acknowledgement; returns the attributes
    /// of a data reply that came before it, if any.
    fn request(&mut self, m: Msg) -> std::io::Result<Option<Vec<u8>>> {
        self.seq += 1;
        let seq = self.seq;
        let out = m.finish(seq);
        // SAFETY: out is a valid buffer of its length; the kernel is the
        // destination (a zeroed sockaddr_nl).
        let sent = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.fd.as_raw_fd(),
                out.as_ptr().cast(),
                out.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut data = None;
        let mut buf = vec![0u8; 16 << 10];
        loop {
            // SAFETY: buf is a valid writable buffer of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut at = 0;
            let n = n as usize;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4")) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let mseq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().expect("4"));
                if len < 16 || at + len > n {
                    return Err(std::io::Error::other("truncated netlink message"));
                }
                let body = &buf[at + 16..at + len];
                if mseq == seq {
                    if kind == NLMSG_ERROR {
                        let err = i32::from_ne_bytes(body[..4].try_into().expect("4"));
                        if err == 0 {
                            return Ok(data);
                        }
                        return Err(std::io::Error::from_raw_os_error(-err));
                    }
                    if body.len() >= 4 {
                        data = Some(body[4..].to_vec());
                    }
                }
                at += (len + 3) & !3;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_message_nests_the_socket_in_a_sock_item() {
        let mut m = Msg::new(0x20, NBD_CMD_CONNECT);
        m.u64(NBD_ATTR_SIZE_BYTES, 1 << 20);
        m.sockets(7);
        m.string(NBD_ATTR_BACKEND_IDENTIFIER, "abc");
        let b = m.finish(9);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x20);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 9);
        assert_eq!((b[16], b[17]), (NBD_CMD_CONNECT, NBD_GENL_VERSION));
        let a = attrs(&b[20..]);
        assert_eq!(a.len(), 3);
        assert_eq!(a[0], (NBD_ATTR_SIZE_BYTES, &(1u64 << 20).to_ne_bytes()[..]));
        assert_eq!(a[1].0, NBD_ATTR_SOCKETS);
        let item = attrs(a[1].1);
        assert_eq!(item.len(), 1);
        assert_eq!(item[0].0, NBD_SOCK_ITEM);
        let fd = attrs(item[0].1);
        assert_eq!(fd, vec![(NBD_SOCK_FD, &7u32.to_ne_bytes()[..])]);
        assert_eq!(a[2], (NBD_ATTR_BACKEND_IDENTIFIER, &b"abc\0"[..]));
        assert_eq!(b.len() % 4, 0);
    }

    #[test]
    fn device_paths_name_their_index() {
        assert_eq!(index_of(Path::new("/dev/nbd12")), Some(12));
        assert_eq!(index_of(Path::new("/dev/loop1")), None);
        assert_eq!(path(3), PathBuf::from("/dev/nbd3"));
        assert_eq!(block_size(64 << 20), 4096);
        assert_eq!(block_size(4096 * 3 + 512), 512);
    }

    #[test]
    fn the_handshake_reads_the_size_and_flags_of_the_export() {
        // The bytes a server sends: greeting, INFO_EXPORT, ACK (the real
        // server is met in .ci/kernel-nbd.sh and the node's tests).
        let mut server = Vec::new();
        proto::put_u64(&mut server, proto::NBD_MAGIC);
        proto::put_u64(&mut server, proto::IHAVEOPT);
        proto::put_u16(
            &mut server,
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        );
        let mut info = Vec::new();
        proto::put_u16(&mut info, proto::INFO_EXPORT);
        proto::put_u64(&mut info, 8 << 20);
        proto::put_u16(&mut info, proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH);
        for (kind, data) in [(proto::REP_INFO, info), (proto::REP_ACK, Vec::new())] {
            proto::put_u64(&mut server, proto::REPLY_MAGIC);
            proto::put_u32(&mut server, proto::OPT_GO);
            proto::put_u32(&mut server, kind);
            proto::put_u32(&mut server, data.len() as u32);
            server.extend_from_slice(&data);
        }
        let mut sent = Vec::new();
        let stream = Duplex {
            rd: std::io::Cursor::new(server),
            wr: &mut sent,
        };
        let got = handshake(stream, "volumes/v1").unwrap();
        assert_eq!(
            got,
            ExportInfo {
                size: 8 << 20,
                flags: proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH
            }
        );
        // Client flags, then NBD_OPT_GO naming the export with no info requests.
        assert_eq!(&sent[..4], &3u32.to_be_bytes());
        assert_eq!(&sent[12..16], &proto::OPT_GO.to_be_bytes());
        assert!(sent.windows(10).any(|w| w == b"volumes/v1"));
    }

    #[test]
    fn a_refused_export_is_an_error_naming_it() {
        let mut server = Vec::new();
        proto::put_u64(&mut server, proto::NBD_MAGIC);
        proto::put_u64(&mut server, proto::IHAVEOPT);
        proto::put_u16(&mut server, proto::FLAG_FIXED_NEWSTYLE);
        proto::put_u64(&mut server, proto::REPLY_MAGIC);
        proto::put_u32(&mut server, proto::OPT_GO);
        proto::put_u32(&mut server, proto::REP_ERR_UNKNOWN);
        proto::put_u32(&mut server, 7);
        server.extend_from_slice(b"no such");
        let mut sent = Vec::new();
        let e = handshake(
            Duplex {
                rd: std::io::Cursor::new(server),
                wr: &mut sent,
            },
            "volumes/x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("volumes/x refused: no such"), "{e}");
    }

    struct Duplex<'a> {
        rd: std::io::Cursor<Vec<u8>>,
        wr: &'a mut Vec<u8>,
    }

    impl Read for Duplex<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.rd.read(buf)
        }
    }

    impl Write for Duplex<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.wr.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

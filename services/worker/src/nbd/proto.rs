//! The NBD wire format: magic numbers, flags, option/command/reply codes, the
//! request header, reply encodings, and the mapping of errnos to the error
//! values the protocol allows. Everything on the wire is big-endian.
//!
//! Only the parts this server speaks are here: the fixed newstyle handshake,
//! the compact (32-bit length) request header, simple and structured replies.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// TLS must be started (`NBD_OPT_STARTTLS`) before this option is answered.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

// Information types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// A transmission command: the request header's type field, parsed once
/// when the header is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1): the only command with a payload.
    Write,
    /// `NBD_CMD_DISC` (2): never answered.
    Disconnect,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// A type this server does not speak (`NBD_CMD_CACHE`,
    /// `NBD_CMD_BLOCK_STATUS`, anything else): refused with `EINVAL`.
    Unknown(u16),
}

impl Command {
    pub fn from_code(code: u16) -> Command {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            other => Command::Unknown(other),
        }
    }

    /// The type field on the wire.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::Unknown(code) => code,
        }
    }

    /// Name of the command, for logs and messages.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disconnect => "disconnect",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write-zeroes",
            Command::Unknown(_) => "unknown command",
        }
    }

    /// The command flags a request of this command may carry; `None` for a
    /// command that is not served (unknown, or a disconnect, which is never
    /// a request to run).
    pub fn allowed_flags(self) -> Option<u16> {
        match self {
            Command::Read | Command::Write | Command::Trim | Command::Flush => Some(CMD_FLAG_FUA),
            Command::WriteZeroes => Some(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE),
            Command::Disconnect | Command::Unknown(_) => None,
        }
    }

    /// Changes the export's content (refused on a read-only export).
    pub fn modifies(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }

    /// Carries data in one buffer, either way (a write's payload, a read's
    /// reply): limited to `MAX_PAYLOAD` bytes and held in the buffer budget.
    pub fn moves_data(self) -> bool {
        matches!(self, Command::Read | Command::Write)
    }
}

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// The error values the protocol defines (they equal Linux's errnos, but the
// protocol fixes them, so they are spelled out rather than taken from libc).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest string (export name, description, error message) the protocol
/// allows.
pub const MAX_STRING: usize = 4096;

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;

/// The NBD error value for a host errno: the protocol's own values pass
/// through, a few close relatives map onto them, anything else is EIO.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// A transmission request header (without its write payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Decodes a header; `Err` carries the bad magic.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, u32> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
            command: Command::from_code(u16::from_be_bytes(b[6..8].try_into().expect("2 bytes"))),
            handle: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }

    /// Encodes a header (the tests' clients use this too).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = Vec::with_capacity(REQUEST_LEN);
        put_u32(&mut b, REQUEST_MAGIC);
        put_u16(&mut b, self.flags);
        put_u16(&mut b, self.command.code());
        put_u64(&mut b, self.handle);
        put_u64(&mut b, self.offset);
        put_u32(&mut b, self.length);
        b.try_into().expect("28 bytes")
    }
}

/// Name of an option, for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// One option reply: header and data.
pub fn option_reply(out: &mut Vec<u8>, opt: u32, kind: u32, data: &[u8]) {
    put_u64(out, REPLY_MAGIC);
    put_u32(out, opt);
    put_u32(out, kind);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// A simple reply header (16 bytes); read data, if any, follows it.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = Vec::with_capacity(16);
    put_u32(&mut b, SIMPLE_REPLY_MAGIC);
    put_u32(&mut b, error);
    put_u64(&mut b, handle);
    b.try_into().expect("16 bytes")
}

/// A structured reply chunk header (20 bytes); `len` bytes of payload follow.
pub fn structured_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    put_u32(out, STRUCTURED_REPLY_MAGIC);
    put_u16(out, flags);
    put_u16(out, kind);
    put_u64(out, handle);
    put_u32(out, len);
}

/// A complete final error chunk: `NBD_REPLY_TYPE_ERROR`, or
/// `NBD_REPLY_TYPE_ERROR_OFFSET` when `offset` says where it happened.
pub fn structured_error(
    out: &mut Vec<u8>,
    handle: u64,
    error: u32,
    message: &str,
    offset: Option<u64>,
) {
    let message = truncate(message, MAX_STRING);
    let (kind, extra) = match offset {
        Some(_) => (REPLY_TYPE_ERROR_OFFSET, 8),
        None => (REPLY_TYPE_ERROR, 0),
    };
    let len = 4 + 2 + message.len() + extra;
    structured_header(out, REPLY_FLAG_DONE, kind, handle, len as u32);
    put_u32(out, error);
    put_u16(out, message.len() as u16);
    out.extend_from_slice(message.as_bytes());
    if let Some(off) = offset {
        put_u64(out, off);
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Big-endian appends onto a `Vec<u8>`.
pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 65536,
        };
        assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] ^= 0xff;
        assert!(RequestHeader::parse(&bad).is_err());
    }

    #[test]
    fn commands_round_trip_through_their_codes() {
        for code in 0..=u16::MAX {
            assert_eq!(Command::from_code(code).code(), code);
        }
        assert_eq!(Command::from_code(5), Command::Unknown(5));
        assert_eq!(Command::from_code(7), Command::Unknown(7));
        assert_eq!(Command::from_code(6), Command::WriteZeroes);
        let mut h = RequestHeader {
            flags: 0,
            command: Command::Unknown(99),
            handle: 1,
            offset: 0,
            length: 0,
        };
        assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
        h.command = Command::Disconnect;
        assert_eq!(&h.encode()[6..8], &2u16.to_be_bytes());
    }

    #[test]
    fn errnos_map_onto_the_protocol_set() {
        assert_eq!(nbd_errno(libc::EIO), EIO);
        assert_eq!(nbd_errno(libc::EROFS), EPERM);
        assert_eq!(nbd_errno(libc::EDQUOT), ENOSPC);
        assert_eq!(nbd_errno(libc::ENODEV), EIO);
        assert_eq!(nbd_errno(libc::EBUSY), EIO);
        assert_eq!(nbd_errno(libc::ESHUTDOWN), ESHUTDOWN);
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        structured_error(&mut out, 7, EINVAL, "bad", Some(512));
        assert_eq!(out.len(), 20 + 4 + 2 + 3 + 8);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR_OFFSET.to_be_bytes());
        assert_eq!(&out[16..20], &17u32.to_be_bytes());
        assert_eq!(&out[20..24], &EINVAL.to_be_bytes());
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}

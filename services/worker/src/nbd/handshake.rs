//! The fixed newstyle handshake and option haggling, up to the start of the
//! transmission phase.
//!
//! Options answered: `NBD_OPT_GO` and `NBD_OPT_INFO` (with
//! `NBD_INFO_EXPORT`, `NAME`, `DESCRIPTION`, and always `BLOCK_SIZE`),
//! `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`,
//! `NBD_OPT_STRUCTURED_REPLY` and, when TLS is set up, `NBD_OPT_STARTTLS`;
//! every other option gets `NBD_REP_ERR_UNSUP` (so clients fall back:
//! `SET_META_CONTEXT` means no block status). An unknown export name is
//! `NBD_REP_ERR_UNKNOWN`, or a closed connection after
//! `NBD_OPT_EXPORT_NAME`, which cannot carry an error.
//!
//! TLS ([`super::tls`] has the modes): `NBD_OPT_STARTTLS` is acknowledged,
//! the TLS handshake runs on the raw stream, and haggling goes on inside
//! TLS, with nothing negotiated before it kept. When TLS is required, any
//! other option before it gets `NBD_REP_ERR_TLS_REQD` (so `NBD_OPT_LIST`,
//! `INFO` and `GO` say nothing about exports) and `NBD_OPT_EXPORT_NAME`
//! closes the connection.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;

use super::proto::{self, put_u16, put_u32, put_u64};
use super::tls::NbdTls;
use super::{ConnError, MAX_PAYLOAD};
use crate::exports::{Export, Exports};

/// Largest option payload accepted; a longer one is taken for abuse and the
/// connection is dropped (a GO with a 4 KiB name is far below it).
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// The block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSizes {
    /// The constraints of `export`: the engine's alignment, its chunk size
    /// (made a power of two of at least 512 and the minimum), and
    /// [`MAX_PAYLOAD`].
    pub fn of(export: &Export) -> BlockSizes {
        let minimum = export.min_block_size().max(1);
        let floor = minimum.max(512);
        let preferred = if export.preferred_block_size <= floor {
            floor
        } else {
            export.preferred_block_size.min(MAX_PAYLOAD)
        };
        let preferred = preferred.checked_next_power_of_two().unwrap_or(floor);
        BlockSizes {
            minimum,
            preferred,
            maximum: MAX_PAYLOAD,
        }
    }
}

/// The transmission flags of `export`. Read-only exports advertise neither
/// trim nor write-zeroes (as qemu-nbd does); writes to them still get EPERM.
pub fn transmission_flags(export: &Export) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_CAN_MULTI_CONN;
    if export.writable {
        flags |= proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
    } else {
        flags |= proto::FLAG_READ_ONLY;
    }
    flags
}

/// A human-readable description of an export, from its resource name.
pub fn describe(export: &Export) -> String {
    let parts: Vec<&str> = export.name.split('/').collect();
    let what = match parts[..] {
        ["volumes", vol] => format!("cowsnap volume {vol}"),
        ["volumes", vol, "snapshots", snap] => format!("cowsnap snapshot {snap} of volume {vol}"),
        _ => format!("cowsnap export {}", export.name),
    };
    if export.writable {
        what
    } else {
        format!("{what} (read-only)")
    }
}

/// What the handshake settled on.
pub struct Negotiated {
    pub export: Arc<Export>,
    /// The client asked for structured replies.
    pub structured: bool,
    pub size: u64,
    pub flags: u16,
    pub block: BlockSizes,
}

/// The stream a connection continues on: as accepted, or TLS over it after
/// `NBD_OPT_STARTTLS`.
pub enum Transport<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

/// Runs the handshake on a connection, upgrading it to TLS when the client
/// sends `NBD_OPT_STARTTLS` and `tls` is set. `Ok(None)`: the client
/// aborted, or asked by `NBD_OPT_EXPORT_NAME` (which cannot carry an error)
/// for an export that does not exist or before starting the TLS the server
/// requires. On success, the stream to run transmission on: no byte past
/// the handshake has been read from it.
pub async fn negotiate<S>(
    mut stream: S,
    exports: &Exports,
    tls: Option<&NbdTls>,
    peer: &str,
) -> Result<Option<(Negotiated, Transport<S>)>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(18);
    put_u64(&mut out, proto::NBD_MAGIC);
    put_u64(&mut out, proto::IHAVEOPT);
    put_u16(&mut out, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    stream.write_all(&out).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {client_flags:#x} in the handshake"
        )));
    }
    let mut session = Session {
        exports,
        peer,
        no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
        structured: false,
        tls: match tls {
            None => TlsState::Unavailable,
            Some(t) if t.required() => TlsState::Required,
            Some(_) => TlsState::Offered,
        },
    };
    let mut transport = Transport::Plain(stream);
    loop {
        let step = match &mut transport {
            Transport::Plain(s) => session.haggle(s).await?,
            Transport::Tls(s) => session.haggle(s.as_mut()).await?,
        };
        match step {
            Step::Go(neg) => return Ok(Some((neg, transport))),
            Step::Close => return Ok(None),
            Step::StartTls => {
                // `haggle` only asks for TLS on a plain stream with TLS set up.
                let (Transport::Plain(plain), Some(tls)) = (transport, tls) else {
                    return Err(ConnError::Protocol("NBD_OPT_STARTTLS out of place".into()));
                };
                let upgraded = tls.accept(plain).await.map_err(ConnError::Tls)?;
                tracing::debug!(
                    %peer,
                    "NBD client {peer} started TLS ({:?})",
                    upgraded.get_ref().1.protocol_version()
                );
                session.tls = TlsState::On;
                // Nothing agreed in plain text carries over into TLS: a
                // man in the middle could have sent it (CVE-2021-3716).
                session.structured = false;
                transport = Transport::Tls(Box::new(upgraded));
            }
        }
    }
}

/// Where TLS stands on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsState {
    /// The server has no TLS: `NBD_OPT_STARTTLS` is unsupported.
    Unavailable,
    /// The client may start TLS, or go on in plain text.
    Offered,
    /// The client must start TLS before any other option is answered.
    Required,
    /// TLS is running.
    On,
}

/// How one round of option haggling ended.
enum Step {
    Go(Negotiated),
    Close,
    /// `NBD_REP_ACK` to `NBD_OPT_STARTTLS` is sent: the TLS handshake comes
    /// next.
    StartTls,
}

/// The state of one connection's option haggling.
struct Session<'a> {
    exports: &'a Exports,
    peer: &'a str,
    no_zeroes: bool,
    /// The client asked for structured replies.
    structured: bool,
    tls: TlsState,
}

impl Session<'_> {
    /// Answers options on `stream` until the client chooses an export,
    /// leaves, or starts TLS.
    async fn haggle<S>(&mut self, stream: &mut S) -> Result<Step, ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (exports, peer) = (self.exports, self.peer);
        loop {
            let magic = stream.read_u64().await?;
            if magic != proto::IHAVEOPT {
                return Err(ConnError::Protocol(format!(
                    "bad option magic {magic:#018x} (expected IHAVEOPT)"
                )));
            }
            let opt = stream.read_u32().await?;
            let len = stream.read_u32().await?;
            if len > MAX_OPTION_LEN {
                return Err(ConnError::Protocol(format!(
                    "{} ({opt}) with {len} bytes of data (at most {MAX_OPTION_LEN} accepted)",
                    proto::option_name(opt)
                )));
            }
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).await?;

            let mut out = Vec::new();
            match opt {
                proto::OPT_ABORT => {
                    proto::option_reply(&mut out, opt, proto::REP_ACK, &[]);
                    // The client may already be gone: it need not wait for this.
                    let _ = stream.write_all(&out).await;
                    let _ = stream.flush().await;
                    return Ok(Step::Close);
                }
                proto::OPT_STARTTLS => match self.tls {
                    TlsState::Unavailable => {
                        let msg = "TLS is not configured on this server";
                        proto::option_reply(&mut out, opt, proto::REP_ERR_UNSUP, msg.as_bytes());
                    }
                    TlsState::On => {
                        invalid(&mut out, opt, peer, "TLS is already running");
                    }
                    TlsState::Offered | TlsState::Required if len != 0 => {
                        invalid(&mut out, opt, peer, "NBD_OPT_STARTTLS carries no data");
                    }
                    TlsState::Offered | TlsState::Required => {
                        proto::option_reply(&mut out, opt, proto::REP_ACK, &[]);
                        stream.write_all(&out).await?;
                        stream.flush().await?;
                        return Ok(Step::StartTls);
                    }
                },
                proto::OPT_EXPORT_NAME if self.tls == TlsState::Required => {
                    tracing::warn!(
                        %peer,
                        "NBD client {peer} asked for an export with NBD_OPT_EXPORT_NAME \
                         without starting the TLS this server requires; closing"
                    );
                    return Ok(Step::Close);
                }
                _ if self.tls == TlsState::Required => {
                    // Not a word about exports before TLS: the option's
                    // data (a name, perhaps) is neither used nor echoed.
                    tracing::debug!(
                        %peer,
                        "NBD client {peer} sent {} before starting TLS",
                        proto::option_name(opt)
                    );
                    let msg = "this server requires TLS: send NBD_OPT_STARTTLS first";
                    proto::option_reply(&mut out, opt, proto::REP_ERR_TLS_REQD, msg.as_bytes());
                }
                proto::OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    let Some(export) = exports.get(&name) else {
                        tracing::warn!(
                            %peer,
                            export = %name,
                            "NBD client {peer} asked for unknown export {name:?} \
                             with NBD_OPT_EXPORT_NAME; closing"
                        );
                        return Ok(Step::Close);
                    };
                    let neg = negotiated(export, self.structured);
                    put_u64(&mut out, neg.size);
                    put_u16(&mut out, neg.flags);
                    if !self.no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                    return Ok(Step::Go(neg));
                }
                proto::OPT_LIST if len != 0 => {
                    invalid(&mut out, opt, peer, "NBD_OPT_LIST carries no data");
                }
                proto::OPT_LIST => {
                    for export in exports.list() {
                        let mut d = Vec::new();
                        put_u32(&mut d, export.name.len() as u32);
                        d.extend_from_slice(export.name.as_bytes());
                        d.extend_from_slice(describe(&export).as_bytes());
                        proto::option_reply(&mut out, opt, proto::REP_SERVER, &d);
                    }
                    proto::option_reply(&mut out, opt, proto::REP_ACK, &[]);
                }
                proto::OPT_INFO | proto::OPT_GO => match parse_info_request(&data) {
                    Err(why) => invalid(&mut out, opt, peer, &why),
                    Ok((name, requests)) => match exports.get(&name) {
                        None => {
                            tracing::warn!(
                                %peer,
                                export = %name,
                                "NBD client {peer} asked for unknown export {name:?}"
                            );
                            let msg = format!("no export named {name:?} on this server");
                            proto::option_reply(
                                &mut out,
                                opt,
                                proto::REP_ERR_UNKNOWN,
                                msg.as_bytes(),
                            );
                        }
                        Some(export) => {
                            let neg = negotiated(export, self.structured);
                            info_replies(&mut out, opt, &neg, &requests);
                            proto::option_reply(&mut out, opt, proto::REP_ACK, &[]);
                            if opt == proto::OPT_GO {
                                stream.write_all(&out).await?;
                                stream.flush().await?;
                                return Ok(Step::Go(neg));
                            }
                        }
                    },
                },
                proto::OPT_STRUCTURED_REPLY if len != 0 => {
                    invalid(
                        &mut out,
                        opt,
                        peer,
                        "NBD_OPT_STRUCTURED_REPLY carries no data",
                    );
                }
                proto::OPT_STRUCTURED_REPLY => {
                    self.structured = true;
                    proto::option_reply(&mut out, opt, proto::REP_ACK, &[]);
                }
                _ => {
                    let name = proto::option_name(opt);
                    tracing::debug!(%peer, option = opt, "unsupported NBD option {name} ({opt})");
                    let msg = format!(
                        "{} ({opt}) is not supported by this server",
                        proto::option_name(opt)
                    );
                    proto::option_reply(&mut out, opt, proto::REP_ERR_UNSUP, msg.as_bytes());
                }
            }
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
    }
}

fn negotiated(export: Arc<Export>, structured: bool) -> Negotiated {
    Negotiated {
        size: export.size(),
        flags: transmission_flags(&export),
        block: BlockSizes::of(&export),
        export,
        structured,
    }
}

/// Replies `NBD_REP_ERR_INVALID` to a malformed option, and logs it.
fn invalid(out: &mut Vec<u8>, opt: u32, peer: &str, why: &str) {
    tracing::warn!(%peer, "NBD client {peer} sent a malformed {}: {why}", proto::option_name(opt));
    proto::option_reply(out, opt, proto::REP_ERR_INVALID, why.as_bytes());
}

/// Decodes the data of `NBD_OPT_INFO`/`NBD_OPT_GO`: the export name and the
/// information types asked for.
fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    if data.len() < 6 {
        return Err(format!("{} bytes of data, at least 6 needed", data.len()));
    }
    let name_len = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
    if name_len > data.len() - 6 {
        return Err(format!(
            "export name length {name_len} runs past the option's {} bytes",
            data.len()
        ));
    }
    if name_len > proto::MAX_STRING {
        return Err(format!(
            "export name of {name_len} bytes (at most {} allowed)",
            proto::MAX_STRING
        ));
    }
    let name = std::str::from_utf8(&data[4..4 + name_len])
        .map_err(|_| "export name is not UTF-8".to_string())?
        .to_string();
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest[0..2].try_into().expect("2 bytes")) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(format!(
            "{count} information requests announced but {} bytes follow",
            list.len()
        ));
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, requests))
}

/// The `NBD_REP_INFO` replies for a known export: always the export's size
/// and flags and its block sizes (the engine cannot take unaligned I/O, so
/// every client is told), its name and description when asked.
fn info_replies(out: &mut Vec<u8>, opt: u32, neg: &Negotiated, requests: &[u16]) {
    let mut d = Vec::new();
    put_u16(&mut d, proto::INFO_EXPORT);
    put_u64(&mut d, neg.size);
    put_u16(&mut d, neg.flags);
    proto::option_reply(out, opt, proto::REP_INFO, &d);

    let mut d = Vec::new();
    put_u16(&mut d, proto::INFO_BLOCK_SIZE);
    put_u32(&mut d, neg.block.minimum);
    put_u32(&mut d, neg.block.preferred);
    put_u32(&mut d, neg.block.maximum);
    proto::option_reply(out, opt, proto::REP_INFO, &d);

    if requests.contains(&proto::INFO_NAME) {
        let mut d = Vec::new();
        put_u16(&mut d, proto::INFO_NAME);
        d.extend_from_slice(neg.export.name.as_bytes());
        proto::option_reply(out, opt, proto::REP_INFO, &d);
    }
    if requests.contains(&proto::INFO_DESCRIPTION) {
        let mut d = Vec::new();
        put_u16(&mut d, proto::INFO_DESCRIPTION);
        d.extend_from_slice(proto::truncate(&describe(&neg.export), proto::MAX_STRING).as_bytes());
        proto::option_reply(out, opt, proto::REP_INFO, &d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        put_u32(&mut d, name.len() as u32);
        d.extend_from_slice(name.as_bytes());
        put_u16(&mut d, infos.len() as u16);
        for &i in infos {
            put_u16(&mut d, i);
        }
        d
    }

    #[test]
    fn info_request_parses() {
        let d = go_data("volumes/v1", &[proto::INFO_NAME, proto::INFO_BLOCK_SIZE]);
        let (name, reqs) = parse_info_request(&d).unwrap();
        assert_eq!(name, "volumes/v1");
        assert_eq!(reqs, vec![proto::INFO_NAME, proto::INFO_BLOCK_SIZE]);
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        assert!(parse_info_request(&[0, 0, 0]).is_err());
        let mut d = go_data("v", &[1]);
        d[3] = 200; // name length past the end
        assert!(parse_info_request(&d).is_err());
        let mut d = go_data("v", &[1]);
        d.push(0); // one stray byte after the list
        assert!(parse_info_request(&d).is_err());
    }
}

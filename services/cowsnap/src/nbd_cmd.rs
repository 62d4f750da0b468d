//! `cowsnap nbd`: the kernel's NBD client, as the CSI node plugin drives
//! it (generic netlink, no `nbd-client` needed): attach an export as
//! `/dev/nbdN`, reconnect a device whose server restarted, give it the
//! export's new size, detach it, list what is attached. Needs the `nbd` module and root.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cowsnap_csi::node::kernel_nbd;
use cowsnap_worker::nbd::LocalAddr;

#[derive(clap::Subcommand, Debug)]
pub enum NbdCommand {
    /// Attach an export as a free /dev/nbdN and print the device.
    Attach {
        /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH
        uri: String,
        /// The label /sys/block/nbdN/backend shows [default: the URI].
        #[arg(long)]
        backend: Option<String>,
    },
    /// Give an attached device a new connection to its export (after its
    /// server restarted); held I/O resumes, mounts stay.
    Reconnect {
        device: PathBuf,
        /// The export, as for attach.
        uri: String,
        /// The label the device was attached with [default: the URI].
        #[arg(long)]
        backend: Option<String>,
    },
    /// Give an attached device its export's current size (after the
    /// volume grew); prints the size in bytes.
    Resize {
        device: PathBuf,
        /// The export, as for attach.
        uri: String,
        /// The label the device was attached with [default: the URI].
        #[arg(long)]
        backend: Option<String>,
    },
    /// Detach a device (refused while it is mounted or held).
    Detach { device: PathBuf },
    /// The attached NBD devices: device, size in bytes, backend label.
    List,
}

pub fn run(cmd: NbdCommand) -> anyhow::Result<u8> {
    match cmd {
        NbdCommand::Attach { uri, backend } => {
            let (addr, export) = parse_uri(&uri)?;
            let d = kernel_nbd::attach(&addr, &export, backend.as_deref().unwrap_or(&uri))?;
            println!("{}", d.path().display());
        }
        NbdCommand::Reconnect {
            device,
            uri,
            backend,
        } => {
            let (index, addr, export, backend) = attached(&device, &uri, backend)?;
            kernel_nbd::reconnect(index, &addr, &export, &backend)?;
        }
        NbdCommand::Resize {
            device,
            uri,
            backend,
        } => {
            let (index, addr, export, backend) = attached(&device, &uri, backend)?;
            println!(
                "{}",
                kernel_nbd::refresh_size(index, &addr, &export, &backend)?
            );
        }
        NbdCommand::Detach { device } => {
            let index = index(&device)?;
            if !kernel_nbd::device(index).is_some_and(|d| d.connected) {
                bail!("{} is not attached", device.display());
            }
            kernel_nbd::detach(index)?;
        }
        NbdCommand::List => {
            for d in kernel_nbd::connected() {
                println!("{}\t{}\t{}", d.path().display(), d.size, d.backend);
            }
        }
    }
    Ok(0)
}

/// An attached device and its export, as `reconnect` and `resize` name
/// them: its index, the server, the export, its label (the URI if none).
fn attached(
    device: &Path,
    uri: &str,
    backend: Option<String>,
) -> anyhow::Result<(u32, LocalAddr, String, String)> {
    let (addr, export) = parse_uri(uri)?;
    Ok((
        index(device)?,
        addr,
        export,
        backend.unwrap_or_else(|| uri.to_string()),
    ))
}

fn index(dev: &Path) -> anyhow::Result<u32> {
    kernel_nbd::index_of(dev)
        .with_context(|| format!("{}: not an NBD device (/dev/nbdN)", dev.display()))
}

/// The server and export an NBD URI names.
fn parse_uri(uri: &str) -> anyhow::Result<(LocalAddr, String)> {
    if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
        let (export, query) = rest
            .split_once('?')
            .with_context(|| format!("{uri}: nbd+unix needs ?socket=PATH"))?;
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .with_context(|| format!("{uri}: nbd+unix needs ?socket=PATH"))?;
        return Ok((LocalAddr::Unix(socket.into()), export.to_string()));
    }
    let Some(rest) = uri.strip_prefix("nbd://") else {
        bail!("{uri}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)");
    };
    let (host, export) = rest
        .split_once('/')
        .with_context(|| format!("{uri}: no export name"))?;
    if export.is_empty() {
        bail!("{uri}: no export name");
    }
    let hostport = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !host.ends_with(']')
    {
        host.to_string()
    } else {
        format!("{host}:10809")
    };
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("{uri}: cannot resolve {hostport}"))?
        .next()
        .with_context(|| format!("{uri}: {hostport} has no address"))?;
    Ok((LocalAddr::Tcp(addr), export.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris_name_the_server_and_the_export() {
        let (a, e) = parse_uri("nbd://127.0.0.1:10900/volumes/v1").unwrap();
        assert_eq!(a, LocalAddr::Tcp("127.0.0.1:10900".parse().unwrap()));
        assert_eq!(e, "volumes/v1");
        let (a, _) = parse_uri("nbd://127.0.0.1/volumes/v1").unwrap();
        assert_eq!(a, LocalAddr::Tcp("127.0.0.1:10809".parse().unwrap()));
        let (a, e) = parse_uri("nbd+unix:///volumes/v1/snapshots/s?socket=/run/n.sock").unwrap();
        assert_eq!(a, LocalAddr::Unix("/run/n.sock".into()));
        assert_eq!(e, "volumes/v1/snapshots/s");
        for bad in [
            "http://x/y",
            "nbd://127.0.0.1:1/",
            "nbd+unix:///v",
            "nbd://h",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}

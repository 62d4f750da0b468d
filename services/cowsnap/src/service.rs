//! What the three service commands (`up`, `worker`, `control`) share:
//! the TOML config file, the TLS certificate, key and CA, flag values
//! parsed with the flag named in the error, and running a service until
//! SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use cowsnap_proto::server::TlsFiles;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// The settings of config file `path` (`--config`), or none.
pub fn config_file<T: DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text =
        std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: bad config file", p.display()))
}

/// The TLS files, from `--tls-cert`, `--tls-key` and `--tls-ca`: a
/// certificate and its key, or nothing at all.
pub fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> anyhow::Result<Option<TlsFiles>> {
    match (cert, key, ca) {
        (Some(cert), Some(key), ca) => Ok(Some(TlsFiles { cert, key, ca })),
        (None, None, None) => Ok(None),
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key (and optionally --tls-ca)"),
    }
}

/// `value` of `flag` (an address, an I/O backend), parsed.
pub fn parse_flag<T: FromStr<Err = String>>(flag: &str, value: &str) -> anyhow::Result<T> {
    value
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{flag}: {e}"))
}

/// Cancels `token` on SIGTERM or SIGINT.
fn cancel_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        token.cancel();
    });
    Ok(())
}

/// Runs `serve` on a new multi-threaded runtime with a token that SIGTERM
/// or SIGINT cancels; exits 0 when it returns.
pub fn run_until_signal(
    serve: impl AsyncFnOnce(CancellationToken) -> anyhow::Result<()>,
) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stop = CancellationToken::new();
        cancel_on_signals(stop.clone())?;
        serve(stop).await?;
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Default, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        listen: Option<String>,
    }

    #[test]
    fn config_files_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(config_file::<Settings>(None).unwrap(), Settings::default());
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "listen = \"unix:/run/x.sock\"\n").unwrap();
        assert_eq!(
            config_file::<Settings>(Some(&good))
                .unwrap()
                .listen
                .as_deref(),
            Some("unix:/run/x.sock")
        );
        let unknown = dir.path().join("unknown.toml");
        std::fs::write(&unknown, "listne = \"x\"\n").unwrap();
        let e = format!("{:#}", config_file::<Settings>(Some(&unknown)).unwrap_err());
        assert!(e.contains("unknown.toml: bad config file"), "{e}");
        let missing = dir.path().join("missing.toml");
        let e = format!("{:#}", config_file::<Settings>(Some(&missing)).unwrap_err());
        assert!(e.contains("missing.toml: cannot read"), "{e}");
    }

    #[test]
    fn tls_needs_a_certificate_and_its_key_or_nothing() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert!(tls_files(None, None, None).unwrap().is_none());
        let t = tls_files(p("c.pem"), p("k.pem"), None).unwrap().unwrap();
        assert_eq!(
            (t.cert, t.key, t.ca),
            ("c.pem".into(), "k.pem".into(), None)
        );
        let t = tls_files(p("c.pem"), p("k.pem"), p("ca.pem"))
            .unwrap()
            .unwrap();
        assert_eq!(t.ca, p("ca.pem"));
        for (cert, key, ca) in [
            (p("c.pem"), None, None),
            (None, p("k.pem"), None),
            (None, None, p("ca.pem")),
            (p("c.pem"), None, p("ca.pem")),
        ] {
            let e = tls_files(cert, key, ca).unwrap_err().to_string();
            assert!(e.contains("needs both --tls-cert and --tls-key"), "{e}");
        }
    }

    #[test]
    fn a_bad_flag_value_is_named() {
        let e = parse_flag::<cowsnap_proto::server::Listen>("--listen", "")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--listen: "), "{e}");
        let e = parse_flag::<cowsnap_store::BackendChoice>("--io", "fast")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--io: unknown I/O backend"), "{e}");
    }
}

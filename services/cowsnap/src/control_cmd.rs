//! `cowsnap control`: runs the control service (the public `cowsnap.v1`
//! API over its SQLite catalog, driving the workers). Every setting is a
//! flag, the same as a `COWSNAP_*` environment variable, or a key of a TOML
//! config file (`--config`), in that order of precedence. Logs go to
//! stderr (`COWSNAP_LOG`); traces are exported with OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cowsnap_control::server::{ControlConfig, start};
use serde::Deserialize;

use crate::service::{config_file, parse_flag, run_until_signal, tls_files};

const DEFAULT_DATA_DIR: &str = "/var/lib/cowsnap/control";
const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

#[derive(clap::Args, Debug)]
pub struct ControlArgs {
    /// TOML file with any of the settings below (keys: data_dir, listen,
    /// workers, auth_token_file, tls_cert, tls_key, tls_ca,
    /// worker_tls_server_name, metrics_listen,
    /// request_timeout, worker_timeout, max_concurrent_calls,
    /// health_interval, reconcile_interval, csi_endpoint).
    #[arg(long, env = "COWSNAP_CONFIG")]
    config: Option<PathBuf>,
    /// The catalog lives at DATA_DIR/catalog.db [default: /var/lib/cowsnap/control].
    #[arg(long, env = "COWSNAP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Public gRPC API address: host:port or unix:PATH [default: 127.0.0.1:50051].
    #[arg(long, env = "COWSNAP_LISTEN")]
    listen: Option<String>,
    /// Worker gRPC addresses to register at start (host:port or unix:PATH).
    /// Repeat or separate with commas.
    #[arg(long = "worker", env = "COWSNAP_WORKERS", value_delimiter = ',', num_args = 1..)]
    workers: Vec<String>,
    /// A file holding the bearer token every caller must send
    /// (`authorization: Bearer TOKEN`); health and reflection stay open.
    #[arg(long, env = "COWSNAP_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// PEM certificate: the server's on the public API, the client's towards
    /// workers (mTLS). Needs --tls-key.
    #[arg(long, env = "COWSNAP_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "COWSNAP_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA that workers' certificates (and callers' client certificates)
    /// are checked against.
    #[arg(long, env = "COWSNAP_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name (DNS SAN) every worker's certificate must carry, e.g.
    /// cowsnap-worker: one certificate then serves workers at any address
    /// [default: the host of each worker's address].
    #[arg(long, env = "COWSNAP_WORKER_TLS_SERVER_NAME")]
    worker_tls_server_name: Option<String>,
    /// Prometheus metrics over HTTP at host:port/metrics [default: off].
    #[arg(long, env = "COWSNAP_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Longest a call may take, e.g. 60s, 500ms, 2m [default: 60s].
    #[arg(long, env = "COWSNAP_REQUEST_TIMEOUT")]
    request_timeout: Option<String>,
    /// Longest a call to a worker may take [default: 60s].
    #[arg(long, env = "COWSNAP_WORKER_TIMEOUT")]
    worker_timeout: Option<String>,
    /// Calls served at once; more wait [default: 256].
    #[arg(long, env = "COWSNAP_MAX_CONCURRENT_CALLS")]
    max_concurrent_calls: Option<usize>,
    /// How often workers are health-checked [default: 10s].
    #[arg(long, env = "COWSNAP_HEALTH_INTERVAL")]
    health_interval: Option<String>,
    /// How often the catalog is reconciled with the workers [default: 30s].
    #[arg(long, env = "COWSNAP_RECONCILE_INTERVAL")]
    reconcile_interval: Option<String>,
    /// Serve the Kubernetes CSI driver (Identity and Controller) on this
    /// unix socket, e.g. unix:///run/cowsnap/csi.sock [default: off].
    #[arg(long, env = "COWSNAP_CSI_ENDPOINT")]
    csi_endpoint: Option<String>,
    /// Advertise the CSI SnapshotMetadata service in GetPluginCapabilities
    /// (it is served on the CSI endpoint either way): the
    /// external-snapshot-metadata sidecar requires it; csi-sanity fails a
    /// driver that reports it [default: off].
    #[arg(long, env = "COWSNAP_CSI_ADVERTISE_SNAPSHOT_METADATA")]
    csi_advertise_snapshot_metadata: bool,
    /// Advertise ONLINE volume expansion (published volumes grow): only
    /// when every node's plugin attaches with the kernel's NBD client
    /// (worker --csi-attach kernel); an nbdfuse device cannot grow while
    /// published [default: off, OFFLINE].
    #[arg(long, env = "COWSNAP_CSI_ONLINE_EXPANSION")]
    csi_online_expansion: bool,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    workers: Option<Vec<String>>,
    auth_token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    worker_tls_server_name: Option<String>,
    metrics_listen: Option<String>,
    request_timeout: Option<String>,
    worker_timeout: Option<String>,
    max_concurrent_calls: Option<usize>,
    health_interval: Option<String>,
    reconcile_interval: Option<String>,
    csi_endpoint: Option<String>,
}

/// A duration: `500ms`, `60s`, `2m`, `1h`, or plain seconds.
pub(crate) fn duration(flag: &str, s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n
        .parse()
        .with_context(|| format!("{flag}: {s:?} is not a duration (e.g. 60s, 500ms)"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => anyhow::bail!("{flag}: {s:?}: the unit is ms, s, m or h"),
    })
}

/// The settings resolved from flags, environment, config file and
/// defaults, and the CSI endpoint if one is asked for.
pub fn resolve(args: ControlArgs) -> anyhow::Result<(ControlConfig, Option<String>)> {
    let file: FileConfig = config_file(args.config.as_deref())?;
    let csi_endpoint = args.csi_endpoint.or(file.csi_endpoint);
    let listen = parse_flag(
        "--listen",
        &args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into()),
    )?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    let mut cfg = ControlConfig::new(data_dir, listen);
    cfg.workers = if args.workers.is_empty() {
        file.workers.unwrap_or_default()
    } else {
        args.workers
    };
    cfg.auth_token_file = args.auth_token_file.or(file.auth_token_file);
    cfg.tls = tls_files(
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        args.tls_ca.or(file.tls_ca),
    )?;
    cfg.worker_tls_server_name = args.worker_tls_server_name.or(file.worker_tls_server_name);
    if let Some(n) = &cfg.worker_tls_server_name {
        anyhow::ensure!(
            cfg.tls.is_some(),
            "--worker-tls-server-name {n:?} needs TLS (--tls-cert, --tls-key)"
        );
        anyhow::ensure!(
            !n.is_empty() && !n.contains(|c: char| c.is_whitespace() || c == '/' || c == ':'),
            "--worker-tls-server-name {n:?} is not a DNS name"
        );
    }
    cfg.metrics_listen = args.metrics_listen.or(file.metrics_listen);
    if let Some(d) = args.request_timeout.or(file.request_timeout) {
        cfg.request_timeout = duration("--request-timeout", &d)?;
    }
    if let Some(d) = args.worker_timeout.or(file.worker_timeout) {
        cfg.worker_timeout = duration("--worker-timeout", &d)?;
    }
    if let Some(n) = args.max_concurrent_calls.or(file.max_concurrent_calls) {
        anyhow::ensure!(n > 0, "--max-concurrent-calls must be positive");
        cfg.max_concurrent_calls = n;
    }
    if let Some(d) = args.health_interval.or(file.health_interval) {
        cfg.health_interval = duration("--health-interval", &d)?;
    }
    if let Some(d) = args.reconcile_interval.or(file.reconcile_interval) {
        cfg.reconcile_interval = duration("--reconcile-interval", &d)?;
    }
    for (flag, d) in [
        ("--request-timeout", cfg.request_timeout),
        ("--worker-timeout", cfg.worker_timeout),
        ("--health-interval", cfg.health_interval),
        ("--reconcile-interval", cfg.reconcile_interval),
    ] {
        anyhow::ensure!(!d.is_zero(), "{flag} must be positive");
    }
    Ok((cfg, csi_endpoint))
}

pub fn run(args: ControlArgs) -> anyhow::Result<u8> {
    let advertise_metadata = args.csi_advertise_snapshot_metadata;
    let online_expansion = args.csi_online_expansion;
    let (cfg, csi_endpoint) = resolve(args)?;
    run_until_signal(async |shutdown| {
        let _telemetry = cowsnap_control::telemetry::init("info", "cowsnap-control")?;
        // Bound before the service starts: a live socket fails the start.
        let csi = csi_endpoint
            .as_deref()
            .map(cowsnap_csi::endpoint::bind)
            .transpose()?;
        let control = start(cfg, shutdown.clone()).await?;
        let csi = match csi {
            None => None,
            Some(bound) => {
                let router = cowsnap_csi::endpoint::router(
                    cowsnap_csi::identity::Identity::new(Some(control.control.clone()))
                        .advertise_snapshot_metadata(advertise_metadata)
                        .online_expansion(online_expansion),
                    Some(cowsnap_csi::controller::Controller::new(
                        control.control.clone(),
                    )),
                );
                Some(bound.serve(router, shutdown.child_token())?)
            }
        };
        let csi_served = match csi {
            Some(c) => c.wait().await,
            None => Ok(()),
        };
        csi_served.and(control.wait().await)
    })
}

#[cfg(test)]
mod tests {
    use super::{ControlArgs, duration, resolve};
    use clap::Parser;
    use std::time::Duration;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControlArgs,
    }

    fn resolve_args(argv: &[&str]) -> anyhow::Result<Option<String>> {
        let cli = Cli::try_parse_from(std::iter::once("control").chain(argv.iter().copied()))?;
        Ok(resolve(cli.args)?.0.worker_tls_server_name)
    }

    #[test]
    fn worker_tls_server_name_needs_tls_and_a_dns_name() {
        let tls = ["--tls-cert", "/c.pem", "--tls-key", "/c.key"];
        let mut argv = tls.to_vec();
        argv.extend(["--worker-tls-server-name", "cowsnap-worker"]);
        assert_eq!(
            resolve_args(&argv).unwrap().as_deref(),
            Some("cowsnap-worker")
        );
        assert_eq!(resolve_args(&tls).unwrap(), None);
        let e = resolve_args(&["--worker-tls-server-name", "cowsnap-worker"]).unwrap_err();
        assert!(e.to_string().contains("needs TLS"), "{e}");
        let mut argv = tls.to_vec();
        argv.extend(["--worker-tls-server-name", "10.0.0.1:50052"]);
        let e = resolve_args(&argv).unwrap_err();
        assert!(e.to_string().contains("not a DNS name"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(duration("f", "500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("f", "60s").unwrap(), Duration::from_secs(60));
        assert_eq!(duration("f", "2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration("f", "7").unwrap(), Duration::from_secs(7));
        assert!(duration("f", "7d").is_err());
        assert!(duration("f", "x").is_err());
    }
}

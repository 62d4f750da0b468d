//! `cowsnap health`: asks a cowsnap service's `grpc.health.v1` whether it
//! serves, over TCP (with TLS, and a client certificate for a worker's
//! mTLS, when given) or a unix socket. Exit 0 when the answer is SERVING,
//! 1 for any other answer, 2 when the service cannot be reached. Kubernetes
//! exec probes use it: kubelet's own gRPC probes speak plaintext only.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cowsnap_proto::server::Listen;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::service::parse_flag;

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// The service's gRPC address: host:port or unix:PATH.
    #[arg(long, env = "COWSNAP_HEALTH_ADDR")]
    addr: String,
    /// The service to ask about; empty: the server as a whole.
    #[arg(long, default_value = "")]
    service: String,
    /// PEM CA the server's certificate must chain to: TLS on.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate to present (a worker's mTLS). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry [default: the host of --addr].
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Longest the check may take, e.g. 5s, 500ms.
    #[arg(long, default_value = "5s")]
    timeout: String,
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}: cannot read the {what}", path.display()))
}

fn tls(a: &HealthArgs) -> anyhow::Result<Option<ClientTlsConfig>> {
    let Some(ca) = &a.tls_ca else {
        anyhow::ensure!(
            a.tls_cert.is_none() && a.tls_server_name.is_none(),
            "--tls-cert and --tls-server-name need --tls-ca"
        );
        return Ok(None);
    };
    let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "TLS CA")?));
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        cfg = cfg.identity(Identity::from_pem(
            read(cert, "client certificate")?,
            read(key, "client key")?,
        ));
    }
    if let Some(name) = &a.tls_server_name {
        cfg = cfg.domain_name(name.clone());
    }
    Ok(Some(cfg))
}

async fn channel(a: &HealthArgs, timeout: Duration) -> anyhow::Result<Channel> {
    let tls = tls(a)?;
    match parse_flag::<Listen>("--addr", &a.addr)? {
        Listen::Unix(path) => {
            anyhow::ensure!(
                tls.is_none(),
                "--addr unix:PATH is plaintext: no --tls-* flags"
            );
            Endpoint::from_static("http://cowsnap.local")
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let p = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(p).await?,
                        ))
                    }
                }))
                .await
                .with_context(|| format!("cannot connect to {}", a.addr))
        }
        Listen::Tcp(hostport) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut ep = Endpoint::from_shared(format!("{scheme}://{hostport}"))
                .with_context(|| format!("--addr {hostport:?} is not host:port"))?
                .connect_timeout(timeout);
            if let Some(t) = tls {
                ep = ep.tls_config(t).context("bad TLS configuration")?;
            }
            ep.connect()
                .await
                .with_context(|| format!("cannot connect to {hostport}"))
        }
    }
}

pub fn run(a: HealthArgs) -> anyhow::Result<u8> {
    let timeout = crate::control_cmd::duration("--timeout", &a.timeout)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let check = async {
                let ch = channel(&a, timeout).await?;
                HealthClient::new(ch)
                    .check(HealthCheckRequest {
                        service: a.service.clone(),
                    })
                    .await
                    .with_context(|| format!("{}: the health check failed", a.addr))
            };
            let answer = tokio::time::timeout(timeout, check)
                .await
                .with_context(|| format!("{}: no answer within {}", a.addr, a.timeout))??;
            let status = ServingStatus::try_from(answer.into_inner().status)
                .unwrap_or(ServingStatus::Unknown);
            println!("{}", status.as_str_name());
            Ok(if status == ServingStatus::Serving {
                0
            } else {
                1
            })
        })
}

//! TLS for real, with certificates made here (rcgen): the public API over
//! TLS, and mutual TLS between the control service and a worker on TCP. A
//! worker with a CA only answers callers holding a certificate that CA
//! signed: no certificate, a plain-text client, or a certificate from
//! another CA are all refused.

mod common;

use std::path::Path;

use common::*;
use cowsnap_control::server::TlsFiles;
use cowsnap_proto::cowsnap::v1 as pb;
use cowsnap_proto::worker::v1 as wpb;
use cowsnap_worker::server::ServeOptions;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA that signs certificates for localhost / 127.0.0.1.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// Writes `NAME.pem` and `NAME.key` (server and client use) under `dir`.
    fn issue(&self, dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        self.issue_for(dir, name, &["localhost", "127.0.0.1"])
    }

    /// As [`Ca::issue`], naming only `sans`.
    fn issue_for(
        &self,
        dir: &Path,
        name: &str,
        sans: &[&str],
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let sans = sans.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn write(&self, dir: &Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

async fn worker_call(addr: &str, tls: Option<ClientTlsConfig>) -> Result<wpb::WorkerInfo, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(5));
    if let Some(t) = tls {
        ep = ep.tls_config(t).map_err(|e| e.to_string())?;
    }
    let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    wpb::worker_service_client::WorkerServiceClient::new(ch)
        .get_worker_info(wpb::GetWorkerInfoRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_between_control_and_worker_and_tls_on_the_public_api() {
    init_logs();
    let dir = scratch();
    let d = dir.path();
    let ca = Ca::new("cowsnap test CA");
    let ca_pem = ca.write(d, "ca");
    let (worker_cert, worker_key) = ca.issue(d, "worker");
    let (control_cert, control_key) = ca.issue(d, "control");
    let other = Ca::new("another CA");
    let (stranger_cert, stranger_key) = other.issue(d, "stranger");

    // A worker on TCP that requires client certificates from the CA.
    let token = CancellationToken::new();
    let w = cowsnap_worker::server::start(
        worker_config(d.join("worker"), "node-tls"),
        ServeOptions {
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            nbd_listen: "127.0.0.1:0".parse().unwrap(),
            nbd_advertise: None,
            nbd_tls: None,
            tls: Some(TlsFiles {
                cert: worker_cert,
                key: worker_key,
                ca: Some(ca_pem.clone()),
            }),
            nbd_limits: Default::default(),
        },
        token.clone(),
    )
    .await
    .unwrap();
    let cowsnap_proto::server::Listen::Tcp(worker_addr) = w.grpc.clone() else {
        panic!("TCP")
    };

    // The control service reaches it with its own certificate (mTLS) and
    // serves its public API over TLS.
    let mut cfg = Control::config(d, &[]);
    cfg.workers = vec![worker_addr.clone()];
    cfg.tls = Some(TlsFiles {
        cert: control_cert.clone(),
        key: control_key.clone(),
        ca: Some(ca_pem.clone()),
    });
    let control = Control::start(cfg).await;
    let cowsnap_proto::server::Listen::Tcp(api_addr) = control.running().grpc.clone() else {
        panic!("TCP")
    };
    let ca_cert = Certificate::from_pem(std::fs::read(&ca_pem).unwrap());
    let ch = Endpoint::from_shared(format!("https://{api_addr}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca_cert.clone()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut volumes = pb::volume_service_client::VolumeServiceClient::new(ch.clone());
    let v = volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v1".into(),
            volume: Some(pb::Volume {
                size_bytes: 4 * MIB,
                ..Default::default()
            }),
        })
        .await
        .expect("create over TLS, placed on the mTLS worker")
        .into_inner();
    assert_eq!(v.state(), pb::State::Ready);
    assert_eq!(v.worker, "workers/node-tls");

    // Plain text to the TLS API fails.
    let plain = Endpoint::from_shared(format!("http://{api_addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = pb::volume_service_client::VolumeServiceClient::new(ch)
            .get_volume(pb::GetVolumeRequest {
                name: "volumes/v1".into(),
            })
            .await;
        assert!(r.is_err(), "plain text answered: {r:?}");
    }

    // The worker: the control's certificate works; no certificate, plain
    // text, or another CA's certificate do not.
    let with = |cert: &Path, key: &Path| {
        ClientTlsConfig::new()
            .ca_certificate(ca_cert.clone())
            .identity(Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ))
    };
    let info = worker_call(&worker_addr, Some(with(&control_cert, &control_key)))
        .await
        .expect("the control's certificate is accepted");
    assert_eq!(info.node, "node-tls");
    let r = worker_call(
        &worker_addr,
        Some(ClientTlsConfig::new().ca_certificate(ca_cert.clone())),
    )
    .await;
    assert!(r.is_err(), "no client certificate was accepted: {r:?}");
    let r = worker_call(&worker_addr, None).await;
    assert!(r.is_err(), "plain text was accepted: {r:?}");
    let r = worker_call(&worker_addr, Some(with(&stranger_cert, &stranger_key))).await;
    assert!(r.is_err(), "another CA's certificate was accepted: {r:?}");

    let mut control = control;
    control.stop().await;
    token.cancel();
    w.wait().await.unwrap();
}

/// One worker certificate for every node: it names `cowsnap-worker` only,
/// not the address the worker is reached at (127.0.0.1). The control
/// service accepts it when told to check workers' certificates against that
/// name (`--worker-tls-server-name`), and refuses it without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_tls_server_name_lets_one_certificate_serve_any_address() {
    init_logs();
    let dir = scratch();
    let d = dir.path();
    let ca = Ca::new("cowsnap test CA");
    let ca_pem = ca.write(d, "ca");
    let (worker_cert, worker_key) = ca.issue_for(d, "worker", &["cowsnap-worker"]);
    let (control_cert, control_key) = ca.issue(d, "control");

    let token = CancellationToken::new();
    let w = cowsnap_worker::server::start(
        worker_config(d.join("worker"), "node-any"),
        ServeOptions {
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            nbd_listen: "127.0.0.1:0".parse().unwrap(),
            nbd_advertise: None,
            nbd_tls: None,
            tls: Some(TlsFiles {
                cert: worker_cert,
                key: worker_key,
                ca: Some(ca_pem.clone()),
            }),
            nbd_limits: Default::default(),
        },
        token.clone(),
    )
    .await
    .unwrap();
    let cowsnap_proto::server::Listen::Tcp(worker_addr) = w.grpc.clone() else {
        panic!("TCP")
    };
    let ca_cert = Certificate::from_pem(std::fs::read(&ca_pem).unwrap());

    for server_name in [None, Some("cowsnap-worker")] {
        let sub = d.join(server_name.unwrap_or("by-address"));
        let mut cfg = Control::config(&sub, &[]);
        cfg.tls = Some(TlsFiles {
            cert: control_cert.clone(),
            key: control_key.clone(),
            ca: Some(ca_pem.clone()),
        });
        cfg.worker_tls_server_name = server_name.map(str::to_string);
        let mut control = Control::start(cfg).await;
        let cowsnap_proto::server::Listen::Tcp(api_addr) = control.running().grpc.clone() else {
            panic!("TCP")
        };
        let ch = Endpoint::from_shared(format!("https://{api_addr}"))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(ca_cert.clone()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let r = pb::worker_service_client::WorkerServiceClient::new(ch)
            .register_worker(pb::RegisterWorkerRequest {
                address: worker_addr.clone(),
                worker_id: String::new(),
            })
            .await;
        match server_name {
            None => {
                let s = r.expect_err("a certificate not naming 127.0.0.1 was accepted");
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(s.message().contains(&worker_addr), "{s:?}");
            }
            Some(_) => {
                let wk = r
                    .expect("the certificate names the configured name")
                    .into_inner();
                assert_eq!(wk.name, "workers/node-any");
                assert_eq!(wk.health(), pb::WorkerHealth::Healthy);
            }
        }
        control.stop().await;
    }
    token.cancel();
    w.wait().await.unwrap();
}

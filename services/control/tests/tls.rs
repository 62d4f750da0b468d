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
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
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

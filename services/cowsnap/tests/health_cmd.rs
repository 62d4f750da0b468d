//! `cowsnap health` against a real `cowsnap worker` serving its gRPC API
//! with mTLS (certificates made with rcgen), as the Helm chart's exec
//! probes call it: SERVING with the CA and a client certificate; refused
//! without the client certificate or with a server name the certificate
//! does not carry; a clear error when nothing listens.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// ca.crt, worker.crt/.key (names 127.0.0.1 and cowsnap-worker), client.crt/.key.
fn make_certs(dir: &Path) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "health test CA");
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.crt"), p.self_signed(&ca_key).unwrap().pem()).unwrap();
    let ca = Issuer::new(p, ca_key);
    let issue = |name: &str, sans: Vec<String>| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    issue("worker", vec!["127.0.0.1".into(), "cowsnap-worker".into()]);
    issue("client", vec!["client".into()]);
}

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn health(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .arg("health")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn health_answers_over_mtls_and_refuses_what_mtls_refuses() {
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(base).unwrap();
    let d = tmp.path();
    make_certs(d);
    let f = |n: &str| d.join(n).to_str().unwrap().to_string();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _worker = Worker(
        Command::new(env!("CARGO_BIN_EXE_cowsnap"))
            .args(["worker", "--data-dir", &f("data"), "--grpc-listen", &addr])
            .args(["--nbd-listen", &format!("unix:{}", f("nbd.sock"))])
            .args([
                "--tls-cert",
                &f("worker.crt"),
                "--tls-key",
                &f("worker.key"),
            ])
            .args(["--tls-ca", &f("ca.crt")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mtls = [
        "--addr",
        &addr,
        "--tls-ca",
        &f("ca.crt"),
        "--tls-cert",
        &f("client.crt"),
        "--tls-key",
        &f("client.key"),
    ];
    // The worker starts listening soon after start: ask until it answers.
    let mut last = (0, String::new());
    for _ in 0..150 {
        last = health(&mtls);
        if last.0 == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last.0, 0, "health over mTLS: {}", last.1);
    assert_eq!(last.1.trim(), "SERVING");

    // The name the chart's certificates carry for every worker.
    let mut named = mtls.to_vec();
    named.extend(["--tls-server-name", "cowsnap-worker"]);
    let (code, out) = health(&named);
    assert_eq!(code, 0, "with --tls-server-name cowsnap-worker: {out}");

    // A name the certificate does not carry: refused.
    let mut wrong = mtls.to_vec();
    wrong.extend(["--tls-server-name", "elsewhere"]);
    let (code, out) = health(&wrong);
    assert_eq!(
        code, 2,
        "a server name not in the certificate was accepted: {out}"
    );

    // No client certificate: the worker's mTLS refuses the call.
    let (code, out) = health(&["--addr", &addr, "--tls-ca", &f("ca.crt")]);
    assert_eq!(
        code, 2,
        "a caller without a client certificate got an answer: {out}"
    );

    // Nothing listens: a clear error naming the address.
    let closed = format!("127.0.0.1:{}", free_port());
    let (code, out) = health(&["--addr", &closed, "--timeout", "2s"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&closed),
        "the error does not name {closed}: {out}"
    );
}

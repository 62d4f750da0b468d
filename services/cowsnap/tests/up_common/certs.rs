//! Test certificates made with rcgen, for NBD over TLS.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// Writes `name.pem` and `name.key` (0600) under `dir`.
fn write_pair(dir: &Path, name: &str, cert: String, key: String) {
    std::fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&k, key).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A CA (`ca.pem`), the server's certificate for 127.0.0.1 (`server.pem`,
/// `server.key`) under `dir`, and a libnbd certificates directory
/// `dir/client` (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
pub fn make_certs(dir: &Path) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "cowsnap test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = p.self_signed(&ca_key).unwrap().pem();
    let ca = Issuer::new(p, ca_key);
    std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
    let issue = |sans: Vec<String>, usage| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (c, k) = issue(
        vec!["127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write_pair(dir, "server", c, k);
    let client = dir.join("client");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::write(client.join("ca-cert.pem"), &ca_pem).unwrap();
    let (c, k) = issue(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(client.join("client-cert.pem"), c).unwrap();
    std::fs::write(client.join("client-key.pem"), k).unwrap();
}

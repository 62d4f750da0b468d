//! `cowsnap up` with NBD over TLS set through its environment
//! (`COWSNAP_NBD_TLS_CERT`, `_KEY`, `_CA`; certificates made here with
//! rcgen): the public API hands out `nbds://` URIs, libnbd's nbdcopy moves
//! data through them with a client certificate, and a plain client is
//! refused without learning a volume name.

mod up_common;

use std::process::Command;

use cowsnap_proto::cowsnap::v1 as pb;
use up_common::certs::make_certs;
use up_common::*;

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): apt-get install libnbd-bin"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_nbd_over_tls_set_through_its_environment() {
    let tmp = scratch();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let file = |n: &str| certs.join(n).to_str().unwrap().to_string();
    let mut up = Up::start_with_env(
        &tmp.path().join("data"),
        &[
            ("COWSNAP_NBD_TLS_CERT", &file("server.pem")),
            ("COWSNAP_NBD_TLS_KEY", &file("server.key")),
            ("COWSNAP_NBD_TLS_CA", &file("ca.pem")),
        ],
    );
    up.ready().await;
    let mut api = up.clients().await;
    let v = api
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v1".into(),
            volume: Some(pb::Volume {
                size_bytes: 4 * MIB,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.nbd_uri, format!("nbds://{}/volumes/v1", up.nbd()));

    // Through the URI the API gave, with a client certificate.
    let uri = format!("{}?tls-certificates={}", v.nbd_uri, file("client"));
    let src = tmp.path().join("in.raw");
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let (ok, log) = run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    assert!(ok, "nbdcopy into {uri}: {log}");
    let back = tmp.path().join("back.raw");
    let (ok, log) = run("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(ok, "nbdcopy out of {uri}: {log}");
    assert!(std::fs::read(&back).unwrap() == data, "read back differs");

    // Plain text: refused, and no volume name given away.
    let plain = format!("nbd://{}", up.nbd());
    let (ok, log) = run("nbdinfo", &["--list", &plain]);
    assert!(!ok && !log.contains("volumes/"), "plain list: {log}");
    let (ok, log) = run("nbdinfo", &[&format!("{plain}/volumes/v1")]);
    assert!(!ok, "plain nbdinfo: {log}");
    assert!(up.terminate().success(), "{}", up.log_text());
}

//! NBD over TLS (`NBD_OPT_STARTTLS`) with real certificates (rcgen) and
//! real clients: qemu-io with `tls-creds-x509` and a client certificate,
//! nbdinfo and nbdcopy with `nbds://` URIs and a certificates directory.
//! In `require` mode a plain client is refused and learns no export name, a
//! certificate from another CA (or none) is refused; in `optional` mode
//! plain clients work as before. The hand-written client checks the
//! protocol's corners: `NBD_REP_ERR_TLS_REQD` before TLS, `STARTTLS`
//! twice, and that nothing negotiated in plain text survives into TLS.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Output;

use common::pki::Pki;
use common::*;
use cowsnap_store::Target;
use cowsnap_worker::nbd::TlsMode;

/// A server in `mode` (client certificates from the CA when
/// `client_certs`), and its certificates (in the returned directory).
fn start(mode: TlsMode, client_certs: bool) -> (Harness, Pki, tempfile::TempDir) {
    let dir = scratch();
    let pki = Pki::new(dir.path());
    let h = Harness::start_with_tls(Some(pki.nbd_tls(mode, client_certs)));
    (h, pki, dir)
}

/// qemu-io on `export` over TLS, with the credentials in `creds`.
fn qemu_io_tls(h: &Harness, creds: &Path, export: &str, cmds: &[&str]) -> Output {
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        creds.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},\
         export={export},tls-creds=tls0",
        h.tcp.port()
    );
    let mut args = vec!["--object", &object, "--image-opts", &image];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    run_tool("qemu-io", &args)
}

/// `nbds://127.0.0.1:PORT/EXPORT` with libnbd's certificates directory.
fn nbds(h: &Harness, creds: &Path, export: &str) -> String {
    format!(
        "nbds://{}/{export}?tls-certificates={}",
        h.tcp,
        creds.display()
    )
}

/// Everything a tool printed.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_refused(out: &Output, what: &str) {
    assert!(!out.status.success(), "{what} succeeded:\n{}", text(out));
}

/// Whether the server refused a TLS client: the handshake failed, or (TLS
/// 1.3, where the client's side ends before the server checked its
/// certificate) the first option gets no answer but an alert or a close.
fn tls_refused(started: std::io::Result<Client<TlsConn>>) -> bool {
    let Ok(mut t) = started else {
        return true;
    };
    let mut list = Vec::new();
    list.extend_from_slice(&IHAVEOPT.to_be_bytes());
    list.extend_from_slice(&OPT_LIST.to_be_bytes());
    list.extend_from_slice(&0u32.to_be_bytes());
    if t.try_write(&list).and_then(|()| t.s.flush()).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    matches!(t.s.read(&mut b), Ok(0) | Err(_))
}

fn list_names(v: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn qemu_io_writes_and_reads_back_over_tls_with_a_client_certificate() {
    let (h, pki, _dir) = start(TlsMode::Require, true);
    let out = qemu_io_tls(
        &h,
        &pki.client_dir,
        VOLUME,
        &[
            "write -P 0x5a 0 64k",
            "write -f -P 0xc3 1M 128k",
            "flush",
            "read -P 0x5a 0 64k",
            "read -P 0xc3 1M 128k",
        ],
    );
    let log = ok(out, "qemu-io over TLS");
    assert!(!log.contains("failed"), "{log}");
    assert!(
        log.contains("read 131072/131072 bytes at offset 1048576"),
        "{log}"
    );
    // The bytes reached the engine; the snapshot kept the old ones.
    assert!(
        h.engine_read(Target::Origin, 0, 65536)
            .iter()
            .all(|&b| b == 0x5a)
    );
    assert!(
        h.engine_read(Target::Origin, 1 << 20, 131072)
            .iter()
            .all(|&b| b == 0xc3)
    );
    assert_eq!(
        h.engine_read(Target::Snapshot(h.snap), 0, 65536),
        h.snapshot_model[..65536]
    );
    h.stop();
}

#[test]
fn nbdinfo_and_nbdcopy_use_nbds_uris_with_a_certificates_dir() {
    let (h, pki, _dir) = start(TlsMode::Require, true);
    let creds = &pki.client_dir;
    let info = ok(
        run_tool("nbdinfo", &["--json", &nbds(&h, creds, VOLUME)]),
        "nbdinfo nbds://",
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["exports"][0]["export-name"], VOLUME);
    assert_eq!(v["exports"][0]["export-size"], SIZE);
    assert_eq!(v["TLS"], true, "{info}");

    // Inside TLS the list names every export.
    let list = ok(
        run_tool("nbdinfo", &["--list", "--json", &nbds(&h, creds, "")]),
        "nbdinfo --list nbds://",
    );
    assert_eq!(
        list_names(&serde_json::from_str(&list).unwrap()),
        vec![VOLUME.to_string(), SNAPSHOT.to_string()]
    );

    // Into the volume over four TLS connections, and out of the snapshot.
    let src = h.path("in.raw");
    let data = pattern(SIZE as usize, 11);
    std::fs::write(&src, &data).unwrap();
    ok(
        run_tool(
            "nbdcopy",
            &[
                "--connections=4",
                "--requests=16",
                src.to_str().unwrap(),
                &nbds(&h, creds, VOLUME),
            ],
        ),
        "nbdcopy into the volume over TLS",
    );
    assert!(
        h.engine_read(Target::Origin, 0, SIZE) == data,
        "volume differs from what nbdcopy sent"
    );
    let snap = h.path("snap.raw");
    ok(
        run_tool(
            "nbdcopy",
            &[&nbds(&h, creds, SNAPSHOT), snap.to_str().unwrap()],
        ),
        "nbdcopy out of the snapshot over TLS",
    );
    assert!(
        std::fs::read(&snap).unwrap() == h.snapshot_model,
        "snapshot read over TLS differs from its model"
    );

    // TLS over the unix socket too.
    let unix = format!(
        "nbds+unix:///{VOLUME}?socket={}&tls-certificates={}",
        h.unix.display(),
        creds.display()
    );
    let info = ok(run_tool("nbdinfo", &[&unix]), "nbdinfo nbds+unix://");
    assert!(info.contains("export-size: 4194304"), "{info}");
    h.stop();
}

#[test]
fn require_mode_refuses_plain_clients_and_names_no_export() {
    let (h, pki, _dir) = start(TlsMode::Require, true);
    let out = run_tool(
        "qemu-io",
        &["-f", "raw", &h.uri(VOLUME), "-c", "write -P 0xee 0 4k"],
    );
    assert_refused(&out, "plain qemu-io");
    assert!(text(&out).contains("TLS"), "{}", text(&out));
    let out = run_tool("nbdinfo", &[&h.uri(VOLUME)]);
    assert_refused(&out, "plain nbdinfo");
    let out = run_tool("nbdinfo", &[&h.unix_uri(SNAPSHOT)]);
    assert_refused(&out, "plain nbdinfo on the unix socket");

    // The list: refused, and no name in anything the tool printed.
    let out = run_tool("nbdinfo", &["--list", &format!("nbd://{}", h.tcp)]);
    assert_refused(&out, "plain nbdinfo --list");
    let all = text(&out);
    assert!(!all.contains("volumes/") && !all.contains("v1"), "{all}");

    // Nothing was written; a TLS client still gets in.
    assert_eq!(
        h.engine_read(Target::Origin, 0, 4096),
        h.snapshot_model[..4096]
    );
    ok(
        qemu_io_tls(&h, &pki.client_dir, VOLUME, &["read 0 4k"]),
        "qemu-io over TLS after plain clients were refused",
    );
    h.stop();
}

#[test]
fn client_certificates_from_another_ca_or_none_are_refused() {
    let (h, pki, _dir) = start(TlsMode::Require, true);
    for (creds, what) in [
        (&pki.stranger_dir, "a certificate from another CA"),
        (&pki.anonymous_dir, "no client certificate"),
    ] {
        let out = qemu_io_tls(&h, creds, VOLUME, &["write -P 0x11 0 4k"]);
        assert_refused(&out, &format!("qemu-io with {what}"));
        let out = run_tool("nbdinfo", &["--list", &nbds(&h, creds, "")]);
        assert_refused(&out, &format!("nbdinfo --list with {what}"));
        assert!(!text(&out).contains("volumes/"), "{}", text(&out));
    }
    // GnuTLS clients only send a certificate the server's CA issued; a
    // rustls client sends its own whatever the server asks for: the
    // server itself must turn it down.
    for creds in [&pki.stranger_dir, &pki.anonymous_dir] {
        let c = Client::start(h.tcp);
        assert!(
            tls_refused(c.starttls(pki.client_config(creds))),
            "{} accepted",
            creds.display()
        );
    }
    assert_eq!(
        h.engine_read(Target::Origin, 0, 4096),
        h.snapshot_model[..4096]
    );
    // The rightful client is still served.
    ok(
        run_tool("nbdinfo", &[&nbds(&h, &pki.client_dir, SNAPSHOT)]),
        "nbdinfo with the CA's certificate",
    );
    h.stop();
}

#[test]
fn optional_mode_serves_plain_and_tls_clients_alike() {
    // No CA: TLS without client certificates (anonymous clients trust
    // the server's certificate).
    let (h, pki, _dir) = start(TlsMode::Optional, false);
    let out = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &h.uri(VOLUME),
            "-c",
            "write -P 0x21 0 64k",
            "-c",
            "read -P 0x21 0 64k",
        ],
    );
    let log = ok(out, "plain qemu-io in optional mode");
    assert!(!log.contains("failed"), "{log}");
    let log = ok(
        qemu_io_tls(&h, &pki.anonymous_dir, VOLUME, &["read -P 0x21 0 64k"]),
        "qemu-io over TLS without a client certificate",
    );
    assert!(!log.contains("failed"), "{log}");
    let plain: serde_json::Value = serde_json::from_str(&ok(
        run_tool(
            "nbdinfo",
            &["--list", "--json", &format!("nbd://{}", h.tcp)],
        ),
        "plain nbdinfo --list",
    ))
    .unwrap();
    assert_eq!(
        list_names(&plain),
        vec![VOLUME.to_string(), SNAPSHOT.to_string()]
    );
    let tls = ok(
        run_tool(
            "nbdinfo",
            &["--json", &nbds(&h, &pki.anonymous_dir, SNAPSHOT)],
        ),
        "nbdinfo nbds:// in optional mode",
    );
    let tls: serde_json::Value = serde_json::from_str(&tls).unwrap();
    assert_eq!(tls["TLS"], true, "{tls}");
    assert_eq!(plain["TLS"], false, "{plain}");
    h.stop();
}

// ---------------------------------------------------------------------------
// The protocol, with the hand-written client.

#[test]
fn before_tls_every_option_but_starttls_and_abort_gets_tls_reqd() {
    let (h, pki, _dir) = start(TlsMode::Require, true);
    let mut c = Client::start(h.tcp);
    let go = Client::go_data(VOLUME, &[INFO_NAME]);
    let go_unknown = Client::go_data("volumes/nope", &[]);
    for (opt, data) in [
        (OPT_LIST, &[][..]),
        (OPT_INFO, &go[..]),
        (OPT_GO, &go[..]),
        // An unknown name gets the same answer: no oracle for names.
        (OPT_GO, &go_unknown[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (OPT_SET_META_CONTEXT, &[][..]),
        (4242, &[][..]),
    ] {
        c.option(opt, data);
        let r = c.opt_reply();
        assert_eq!((r.opt, r.kind), (opt, REP_ERR_TLS_REQD), "option {opt}");
        let msg = String::from_utf8_lossy(&r.data);
        assert!(!msg.contains("volumes/"), "{msg}");
    }
    // STARTTLS carries no data.
    c.option(OPT_STARTTLS, b"x");
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);

    // Inside TLS: the list, no second STARTTLS, then transmission.
    let mut t = c.starttls(pki.client_config(&pki.client_dir)).unwrap();
    t.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = t.opt_reply();
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_SERVER);
        let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
    }
    names.sort();
    assert_eq!(names, vec![VOLUME.to_string(), SNAPSHOT.to_string()]);
    t.option(OPT_STARTTLS, &[]);
    let r = t.opt_reply();
    assert_eq!((r.opt, r.kind), (OPT_STARTTLS, REP_ERR_INVALID));
    let info = t.info_or_go(OPT_GO, VOLUME).unwrap();
    assert_eq!(info.size, SIZE);
    let data = pattern(8192, 3);
    t.write_ok(1 << 20, &data);
    assert_eq!(t.read_ok(1 << 20, 8192), data);
    assert_eq!(h.engine_read(Target::Origin, 1 << 20, 8192), data);

    // NBD_OPT_EXPORT_NAME cannot carry an error: the connection closes.
    let mut c = Client::start(h.tcp);
    c.option(OPT_EXPORT_NAME, VOLUME.as_bytes());
    assert!(c.closed(), "EXPORT_NAME before TLS was answered");
    // NBD_OPT_ABORT is acknowledged.
    let mut c = Client::start(h.tcp);
    c.option(OPT_ABORT, &[]);
    let r = c.opt_reply();
    assert_eq!((r.opt, r.kind), (OPT_ABORT, REP_ACK));
    h.stop();
}

#[test]
fn structured_replies_agreed_in_plain_text_do_not_survive_starttls() {
    let (h, pki, _dir) = start(TlsMode::Optional, true);
    let mut c = Client::start(h.tcp);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    let mut t = c.starttls(pki.client_config(&pki.client_dir)).unwrap();
    t.info_or_go(OPT_GO, VOLUME).unwrap();
    let r = t.call(0, CMD_READ, 0, 4096, &[]);
    assert!(!r.structured, "a structured reply after STARTTLS reset it");
    assert_eq!(assemble(&r, 0, 4096), h.snapshot_model[..4096]);

    // Asked again inside TLS, it holds.
    let c = Client::start(h.tcp);
    let mut t = c.starttls(pki.client_config(&pki.client_dir)).unwrap();
    t.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(t.opt_reply().kind, REP_ACK);
    t.structured = true;
    t.info_or_go(OPT_GO, SNAPSHOT).unwrap();
    let r = t.call(0, CMD_READ, 0, 4096, &[]);
    assert!(r.structured);

    // Plain text still works in optional mode.
    let (mut p, _) = Client::open(h.tcp, VOLUME, true);
    assert_eq!(p.read_ok(0, 4096), h.snapshot_model[..4096]);
    h.stop();
}

//! The NBD server against the real clients: `qemu-io`, `qemu-img` (from
//! qemu-utils), `nbdinfo` and `nbdcopy` (from libnbd-bin), over TCP and a
//! unix socket, checked against the content the exports must hold. The
//! snapshot's model is the volume as it was when the snapshot was taken.

mod common;

use common::*;
use cowsnap_store::Target;

fn qemu_io(args: &[&str]) -> std::process::Output {
    run_tool("qemu-io", args)
}

/// qemu-io exits non-zero when a command fails, but say it in the assertion
/// too: a pattern mismatch is the failure these tests look for.
fn qemu_io_ok(uri: &str, cmds: &[&str], extra: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    args.extend_from_slice(extra);
    args.push(uri);
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    let out = ok(qemu_io(&args), &format!("qemu-io {args:?}"));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    out
}

#[test]
fn qemu_io_writes_and_reads_back_over_tcp_with_and_without_cache_and_fua() {
    let h = Harness::start();
    let out = qemu_io_ok(
        &h.uri(VOLUME),
        &["write -P 0xab 0 64k", "read -P 0xab 0 64k"],
        &[],
    );
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    // Cache mode none, and FUA writes (-f), at unaligned-to-chunk offsets.
    let out = qemu_io_ok(
        &h.uri(VOLUME),
        &[
            "write -f -P 0xcd 68k 60k",
            "write -z 256k 32k",
            "flush",
            "read -P 0xcd 68k 60k",
            "read -P 0 256k 32k",
            "read -P 0xab 0 64k",
        ],
        &["-t", "none"],
    );
    assert!(
        out.contains("wrote 61440/61440 bytes at offset 69632"),
        "{out}"
    );
    // The bytes are in the engine (and so on the origin).
    assert!(
        h.engine_read(Target::Origin, 0, 65536)
            .iter()
            .all(|&b| b == 0xab)
    );
    assert!(
        h.engine_read(Target::Origin, 69632, 61440)
            .iter()
            .all(|&b| b == 0xcd)
    );
    assert!(
        h.engine_read(Target::Origin, 262144, 32768)
            .iter()
            .all(|&b| b == 0)
    );
    // The snapshot still holds the old data.
    assert_eq!(
        h.engine_read(Target::Snapshot(h.snap), 0, 65536),
        h.snapshot_model[..65536]
    );
    h.stop();
}

#[test]
fn qemu_io_over_a_unix_socket_uri() {
    let h = Harness::start();
    let uri = h.unix_uri(VOLUME);
    qemu_io_ok(
        &uri,
        &["write -P 0x42 1M 128k", "read -P 0x42 1M 128k"],
        &[],
    );
    // The same data through TCP.
    qemu_io_ok(&h.uri(VOLUME), &["read -P 0x42 1M 128k"], &[]);
    let info = ok(run_tool("nbdinfo", &[&uri]), "nbdinfo unix");
    assert!(info.contains("export-size: 4194304"), "{info}");
    h.stop();
}

#[test]
fn qemu_img_converts_the_snapshot_to_its_model_after_the_volume_changed() {
    let h = Harness::start();
    // Overwrite the whole volume through NBD (copy-on-write of every chunk).
    qemu_io_ok(&h.uri(VOLUME), &["write -P 0x77 0 4M"], &[]);
    let out = h.path("snap.raw");
    ok(
        run_tool(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &h.uri(SNAPSHOT),
                out.to_str().unwrap(),
            ],
        ),
        "qemu-img convert",
    );
    assert!(
        std::fs::read(&out).unwrap() == h.snapshot_model,
        "snapshot image differs from the model"
    );
    let vol = h.path("vol.raw");
    ok(
        run_tool(
            "qemu-img",
            &[
                "convert",
                "-T",
                "none",
                "-f",
                "raw",
                "-O",
                "raw",
                &h.uri(VOLUME),
                vol.to_str().unwrap(),
            ],
        ),
        "qemu-img convert volume",
    );
    assert!(std::fs::read(&vol).unwrap().iter().all(|&b| b == 0x77));

    let info = ok(
        run_tool("qemu-img", &["info", &h.uri(SNAPSHOT)]),
        "qemu-img info",
    );
    assert!(
        info.contains("virtual size: 4 MiB (4194304 bytes)"),
        "{info}"
    );
    h.stop();
}

#[test]
fn qemu_img_converts_an_image_into_the_volume() {
    let h = Harness::start();
    let src = h.path("src.raw");
    let data = pattern(SIZE as usize, 9);
    std::fs::write(&src, &data).unwrap();
    ok(
        run_tool(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-t",
                "none",
                "-f",
                "raw",
                "-O",
                "raw",
                src.to_str().unwrap(),
                &h.uri(VOLUME),
            ],
        ),
        "qemu-img convert into the volume",
    );
    assert!(
        h.engine_read(Target::Origin, 0, SIZE) == data,
        "volume differs from the image"
    );
    assert!(
        h.engine_read(Target::Snapshot(h.snap), 0, SIZE) == h.snapshot_model,
        "snapshot changed"
    );
    h.stop();
}

fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let out = ok(run_tool("nbdinfo", args), &format!("nbdinfo {args:?}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON ({e}):\n{out}"))
}

#[test]
fn nbdinfo_reports_size_block_sizes_flags_and_read_only() {
    let h = Harness::start();
    let min = h.min_block();
    let v = nbdinfo_json(&["--json", &h.uri(VOLUME)]);
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], VOLUME);
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag}");
    }
    assert_eq!(e["block_size_minimum"], min);
    assert_eq!(e["block_size_preferred"], u64::from(CHUNK).max(min));
    assert_eq!(e["block_size_maximum"], 32u64 << 20);
    assert_eq!(e["description"], "cowsnap volume v1");

    let s = nbdinfo_json(&["--json", &h.uri(SNAPSHOT)]);
    let e = &s["exports"][0];
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);
    h.stop();
}

#[test]
fn nbdinfo_list_names_every_export() {
    let h = Harness::start();
    let v = nbdinfo_json(&["--list", "--json", &format!("nbd://{}", h.tcp)]);
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, vec![VOLUME.to_string(), SNAPSHOT.to_string()]);
    h.stop();
}

#[test]
fn nbdcopy_both_ways_with_64_requests_in_flight() {
    let h = Harness::start();
    let src = h.path("in.raw");
    let data = pattern(SIZE as usize, 5);
    std::fs::write(&src, &data).unwrap();
    // Into the volume: 64 requests of 16 KiB in flight, over 4 connections
    // (the server offers multi-conn).
    ok(
        run_tool(
            "nbdcopy",
            &[
                "--requests=64",
                "--request-size=16384",
                "--connections=4",
                src.to_str().unwrap(),
                &h.uri(VOLUME),
            ],
        ),
        "nbdcopy into the volume",
    );
    assert!(
        h.engine_read(Target::Origin, 0, SIZE) == data,
        "volume differs from the source"
    );
    // And out again, both exports.
    let back = h.path("back.raw");
    ok(
        run_tool(
            "nbdcopy",
            &[
                "--requests=64",
                "--request-size=65536",
                &h.uri(VOLUME),
                back.to_str().unwrap(),
            ],
        ),
        "nbdcopy out of the volume",
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "copy of the volume differs"
    );
    let snap = h.path("snap.raw");
    ok(
        run_tool(
            "nbdcopy",
            &[
                "--requests=64",
                "--connections=1",
                &h.unix_uri(SNAPSHOT),
                snap.to_str().unwrap(),
            ],
        ),
        "nbdcopy out of the snapshot",
    );
    assert!(
        std::fs::read(&snap).unwrap() == h.snapshot_model,
        "copy of the snapshot differs from the model"
    );
    h.stop();
}

#[test]
fn writes_to_the_read_only_snapshot_fail_and_change_nothing() {
    let h = Harness::start();
    let out = qemu_io(&["-f", "raw", &h.uri(SNAPSHOT), "-c", "write -P 1 0 4k"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    let src = h.path("ones.raw");
    std::fs::write(&src, vec![1u8; SIZE as usize]).unwrap();
    let out = run_tool("nbdcopy", &[src.to_str().unwrap(), &h.uri(SNAPSHOT)]);
    assert!(!out.status.success(), "nbdcopy onto a read-only export");
    assert!(h.engine_read(Target::Snapshot(h.snap), 0, SIZE) == h.snapshot_model);
    // Reads still work.
    qemu_io_ok(&h.uri(SNAPSHOT), &["read 0 64k"], &["-r"]);
    h.stop();
}

#[test]
fn unknown_export_fails_cleanly_and_the_server_keeps_serving() {
    let h = Harness::start();
    let out = qemu_io(&["-f", "raw", &h.uri("volumes/nope"), "-c", "read 0 4k"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("volumes/nope"), "{stderr}");
    let out = run_tool("nbdinfo", &[&h.uri("volumes/v2/snapshots/s1")]);
    assert!(!out.status.success());
    // An empty export name is no default export.
    let out = run_tool("nbdinfo", &[&format!("nbd://{}/", h.tcp)]);
    assert!(!out.status.success(), "empty export name");
    qemu_io_ok(&h.uri(VOLUME), &["read 0 4k"], &[]);
    h.stop();
}

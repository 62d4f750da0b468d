//! `cowsnap io`, the engine's qemu-io, run as the real binary on real files
//! with O_DIRECT: qemu-io style output, pattern checks, unaligned I/O,
//! snapshot addressing, both ways of giving commands, and clear failures.

mod common;

use std::path::{Path, PathBuf};

use common::{arg, run};

const MIB: u64 = 1 << 20;

/// `cowsnap io --origin O [--cow C]... EXTRA... -c CMD...`.
fn io(origin: &Path, cows: &[&Path], extra: &[&str], cmds: &[&str]) -> common::Run {
    let mut args = vec!["io".to_string(), "--origin".into(), arg(origin)];
    for c in cows {
        args.extend(["--cow".into(), arg(c)]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    for c in cmds {
        args.extend(["-c".into(), c.to_string()]);
    }
    run(&args)
}

fn origin(dir: &Path, size: u64) -> PathBuf {
    common::pattern_file(&dir.join("origin"), size, 21)
}

#[test]
fn writes_and_reads_print_qemu_io_lines() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let r = io(
        &o,
        &[],
        &[],
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 4k 4k",
            "read -P 171 0 64k",
            "flush",
            "write -z 64k 4k",
            "read -P 0 64k 4k",
            "discard 0 64k",
        ],
    )
    .expect(0);
    assert_eq!(
        r.stdout.lines().collect::<Vec<_>>(),
        vec![
            "wrote 65536/65536 bytes at offset 0",
            "read 4096/4096 bytes at offset 4096",
            "read 65536/65536 bytes at offset 0",
            "wrote 4096/4096 bytes at offset 65536",
            "read 4096/4096 bytes at offset 65536",
            "discard 65536/65536 bytes at offset 0",
        ]
    );
    let data = std::fs::read(&o).unwrap();
    assert!(
        data[..65536].iter().all(|&b| b == 0xab),
        "discard leaves the data as it is"
    );
    assert!(data[65536..69632].iter().all(|&b| b == 0));
    assert_eq!(&data[69632..], &common::pattern(MIB as usize, 21)[69632..]);
}

#[test]
fn a_read_pattern_mismatch_fails_at_the_first_differing_byte_and_stops() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let r = io(
        &o,
        &[],
        &[],
        &[
            "write -P 1 0 8k",
            "write -P 2 8192 100",
            "read -P 1 0 16k",
            "write -P 3 0 4k",
        ],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("Pattern verification failed at offset 8192"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("read "), "{}", r.stdout);
    // The command after the failing one did not run.
    assert!(std::fs::read(&o).unwrap()[..4096].iter().all(|&b| b == 1));
}

#[test]
fn unaligned_offsets_and_lengths_are_read_modify_written() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let cow = common::zero_file(&dir.path().join("cow"), MIB);
    let before = std::fs::read(&o).unwrap();
    io(
        &o,
        &[&cow],
        &["--chunk-sectors", "8"],
        &[
            "write -P 0x11 100 1000",
            "write -P 0x22 4000 200",
            "write -z 9000 1",
            "read -P 0x11 100 1000",
            "read -P 0x22 4000 200",
        ],
    )
    .expect(0);
    let mut want = before.clone();
    want[100..1100].fill(0x11);
    want[4000..4200].fill(0x22);
    want[9000] = 0;
    assert!(
        std::fs::read(&o).unwrap() == want,
        "only the bytes asked for changed"
    );
    // The snapshot kept every byte of the chunks the writes touched.
    let out = dir.path().join("image");
    run(&[
        "cow",
        "export",
        "--origin",
        &arg(&o),
        &arg(&cow),
        "-o",
        &arg(&out),
    ])
    .expect(0);
    assert!(std::fs::read(&out).unwrap() == before);
}

#[test]
fn snapshot_k_addresses_the_kth_cow_device() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let (c1, c2) = (dir.path().join("c1"), dir.path().join("c2"));
    common::zero_file(&c1, MIB);
    common::zero_file(&c2, MIB);
    // Snapshot 1 of the original, then a write, then snapshot 2 of that.
    io(&o, &[&c1], &[], &["write -P 1 0 16k"]).expect(0);
    io(&o, &[&c1, &c2], &[], &["write -P 2 0 16k"]).expect(0);
    io(
        &o,
        &[&c1, &c2],
        &["--snapshot", "2"],
        &["read -P 1 0 16k", "write -P 3 16k 16k", "read -P 3 16k 16k"],
    )
    .expect(0);
    io(&o, &[&c1, &c2], &[], &["read -P 2 0 16k"]).expect(0);
    let r = io(&o, &[&c1, &c2], &["--snapshot", "1"], &["read -P 1 0 1"]);
    assert!(
        r.stderr.contains("Pattern verification failed at offset 0"),
        "snapshot 1 is older than the first write: {}",
        r.stderr
    );
    let pre = common::pattern(MIB as usize, 21);
    let out = dir.path().join("image");
    run(&[
        "cow",
        "export",
        "--origin",
        &arg(&o),
        &arg(&c1),
        "-o",
        &arg(&out),
    ])
    .expect(0);
    assert!(std::fs::read(&out).unwrap() == pre);
    // The origin never saw the snapshot's write.
    assert_eq!(
        &std::fs::read(&o).unwrap()[16384..32768],
        &pre[16384..32768]
    );

    for k in ["0", "3"] {
        let r = io(&o, &[&c1, &c2], &["--snapshot", k], &["read 0 4k"]).expect(2);
        assert!(
            r.stderr.contains(&format!("--snapshot {k}")),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn commands_as_separate_words_or_one_string() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let args: Vec<String> = [
        "io",
        "--origin",
        &arg(&o),
        "-c",
        "write",
        "-P",
        "0x5c",
        "4k",
        "8k",
        "-c",
        "read",
        "-P",
        "0x5c",
        "4k",
        "8k",
        "-c",
        "read -P 92 4k 4k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let r = run(&args).expect(0);
    assert_eq!(r.stdout.lines().count(), 3, "{}", r.stdout);
    assert!(
        std::fs::read(&o).unwrap()[4096..12288]
            .iter()
            .all(|&b| b == 0x5c)
    );
    let r = io(&o, &[], &["--json"], &["write -P 1 0 4k", "flush"]).expect(0);
    let lines: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["command"], "write");
    assert_eq!(lines[0]["length"], 4096);
    assert_eq!(lines[1]["command"], "flush");
    assert!(lines.iter().all(|l| l["ok"] == true));
}

#[test]
fn bad_commands_are_refused_before_anything_runs() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let before = std::fs::read(&o).unwrap();
    for cmd in [
        "frob 0 4k",
        "write -P 0x100 0 4k",
        "write -P 1 0",
        "read 0 4q",
        "write -P 1 -z 0 4k",
        "write -x 0 4k",
    ] {
        let r = io(&o, &[], &[], &["write -P 7 0 4k", cmd]).expect(2);
        assert!(r.stderr.contains(cmd), "{cmd}: {}", r.stderr);
    }
    assert!(std::fs::read(&o).unwrap() == before);
}

#[test]
fn io_past_the_end_fails_with_exit_1() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let r = io(&o, &[], &[], &["write -P 1 1020k 8k"]).expect(1);
    assert!(
        r.stderr.contains("past the end") && r.stderr.contains(&arg(&o)),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_devices_are_refused_with_their_name() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let missing = dir.path().join("missing");
    let r = io(&missing, &[], &[], &["read 0 4k"]).expect(2);
    assert!(r.stderr.contains(&arg(&missing)), "{}", r.stderr);

    let junk = common::pattern_file(&dir.path().join("junk"), MIB, 3);
    let r = io(&o, &[&junk], &[], &["read 0 4k"]).expect(2);
    assert!(
        r.stderr.contains(&arg(&junk)) && r.stderr.contains("bad magic"),
        "{}",
        r.stderr
    );

    let cow = common::zero_file(&dir.path().join("cow"), MIB);
    run(&["cow", "create", "--chunk-sectors", "8", &arg(&cow)]).expect(0);
    common::write_at(&cow, 8, &2u32.to_le_bytes());
    let r = io(&o, &[&cow], &[], &["read 0 4k"]).expect(2);
    assert!(
        r.stderr.contains(&arg(&cow)) && r.stderr.contains("version 2"),
        "{}",
        r.stderr
    );

    let zero = common::zero_file(&dir.path().join("zero"), MIB);
    let r = io(&o, &[&zero], &["--chunk-sectors", "48"], &["read 0 4k"]).expect(2);
    assert!(
        r.stderr.contains(&arg(&zero)) && r.stderr.contains("chunk size 48"),
        "{}",
        r.stderr
    );

    let tiny = common::zero_file(&dir.path().join("tiny"), 8192);
    let r = io(&o, &[&tiny], &["--chunk-sectors", "8"], &["read 0 4k"]).expect(2);
    assert!(
        r.stderr.contains(&arg(&tiny)) && r.stderr.contains("too small"),
        "{}",
        r.stderr
    );

    // An origin whose size is not a whole number of blocks.
    let odd = dir.path().join("odd");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let r = io(&odd, &[], &[], &["read 0 512"]).expect(2);
    assert!(r.stderr.contains(&arg(&odd)), "{}", r.stderr);
}

#[test]
fn an_invalid_snapshot_fails_its_io_but_not_the_origins() {
    let dir = common::scratch();
    let o = origin(dir.path(), MIB);
    let cow = common::zero_file(&dir.path().join("cow"), 64 << 10);
    io(
        &o,
        &[&cow],
        &["--chunk-sectors", "8"],
        &["write -P 1 0 256k"],
    )
    .expect(0);
    let r = io(&o, &[&cow], &["--snapshot", "1"], &["read 0 4k"]).expect(1);
    assert!(
        r.stderr.contains("invalid") && r.stderr.contains(&arg(&cow)),
        "{}",
        r.stderr
    );
    io(&o, &[&cow], &[], &["read -P 1 0 256k", "write -P 2 0 4k"]).expect(0);
}

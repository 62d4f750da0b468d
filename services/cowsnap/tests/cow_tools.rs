//! The offline tools (`cowsnap cow create|check|dump|status|export|merge|
//! delta`) run as the real binary on real files with O_DIRECT: the numbers
//! the kernel would print, exit codes on real corruptions, images and
//! deltas against what was written, and merges, interrupted ones included.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{arg, build_cow_image, run, write_at, write_record};

const MIB: u64 = 1 << 20;

/// An origin filled with pattern `seed`, and an all-zero COW device beside it.
fn origin_and_cow(dir: &Path, origin_bytes: u64, cow_bytes: u64) -> (PathBuf, PathBuf) {
    let origin = common::pattern_file(&dir.join("origin"), origin_bytes, 1);
    let cow = common::zero_file(&dir.join("cow"), cow_bytes);
    (origin, cow)
}

/// `cowsnap io --origin O --cow C --chunk-sectors CS -c CMD...`: the COW
/// becomes a snapshot (if new), then the commands write through the origin.
fn io(origin: &Path, cow: &Path, chunk_sectors: u32, cmds: &[&str]) -> common::Run {
    let mut args = vec![
        "io".to_string(),
        "--origin".into(),
        arg(origin),
        "--cow".into(),
        arg(cow),
    ];
    args.extend(["--chunk-sectors".into(), chunk_sectors.to_string()]);
    for c in cmds {
        args.extend(["-c".into(), c.to_string()]);
    }
    run(&args)
}

fn status_json(origin: &Path, cow: &Path) -> serde_json::Value {
    run(&[
        "cow",
        "status",
        "--json",
        "--origin",
        &arg(origin),
        &arg(cow),
    ])
    .expect(0)
    .json()
}

fn check(cow: &Path, origin: Option<&Path>) -> common::Run {
    let mut args = vec!["cow".to_string(), "check".into(), "--json".into()];
    if let Some(o) = origin {
        args.extend(["--origin".into(), arg(o)]);
    }
    args.push(arg(cow));
    run(&args)
}

/// The kinds of the problems a `check --json` run reported.
fn problem_kinds(r: &common::Run) -> Vec<String> {
    r.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn create_then_status_prints_the_kernels_fresh_numbers() {
    let dir = common::scratch();
    let origin = common::zero_file(&dir.path().join("origin"), 64 * MIB);
    for (cs, line) in [
        (8, "16/32768 16"),
        (32, "64/32768 64"),
        (1024, "2048/32768 2048"),
    ] {
        let cow = common::zero_file(&dir.path().join(format!("cow{cs}")), 16 * MIB);
        run(&[
            "cow",
            "create",
            "--chunk-sectors",
            &cs.to_string(),
            &arg(&cow),
        ])
        .expect(0);
        let r = run(&["cow", "status", &arg(&cow)]).expect(0);
        assert_eq!(r.stdout.trim(), line, "chunk {cs}");
        let r = run(&["cow", "status", "--origin", &arg(&origin), &arg(&cow)]).expect(0);
        assert_eq!(
            r.stdout.trim(),
            format!("0 131072 snapshot {line}"),
            "chunk {cs}"
        );
        let j = run(&["cow", "status", "--json", &arg(&cow)])
            .expect(0)
            .json();
        assert_eq!(j["line"], line);
        assert_eq!(j["chunk_sectors"], cs);
        assert_eq!(j["exceptions"], 0);
    }
}

#[test]
fn create_refuses_an_existing_header_unless_forced() {
    let dir = common::scratch();
    let (origin, cow) = origin_and_cow(dir.path(), MIB, 4 * MIB);
    run(&["cow", "create", "--chunk-sectors", "8", &arg(&cow)]).expect(0);
    io(&origin, &cow, 8, &["write -P 1 0 8k"]).expect(0);
    assert_eq!(status_json(&origin, &cow)["exceptions"], 2);

    let r = run(&["cow", "create", "--chunk-sectors", "16", &arg(&cow)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(&arg(&cow)) && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    // Untouched: same chunk size, same exceptions.
    let s = status_json(&origin, &cow);
    assert_eq!(
        (s["chunk_sectors"].as_u64(), s["exceptions"].as_u64()),
        (Some(8), Some(2))
    );

    // Bad magic is refused too: it is not ours to overwrite.
    let other = common::pattern_file(&dir.path().join("other"), MIB, 9);
    let r = run(&["cow", "create", &arg(&other)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("bad magic"), "{}", r.stderr);

    let j = run(&[
        "cow",
        "create",
        "--force",
        "--json",
        "--chunk-sectors",
        "16",
        &arg(&cow),
    ])
    .expect(0)
    .json();
    assert_eq!(j["overwritten"], true);
    let s = status_json(&origin, &cow);
    assert_eq!(
        (s["chunk_sectors"].as_u64(), s["exceptions"].as_u64()),
        (Some(16), Some(0))
    );
    assert_eq!(s["line"], "0 2048 snapshot 32/8192 32");
    check(&cow, Some(&origin)).expect(0);
}

#[test]
fn create_refuses_bad_chunk_sizes_and_small_devices() {
    let dir = common::scratch();
    let cow = common::zero_file(&dir.path().join("cow"), 4 * MIB);
    for cs in ["0", "4", "12", "24", "2048"] {
        let r = run(&["cow", "create", "--chunk-sectors", cs, &arg(&cow)]).expect(2);
        assert!(
            r.stderr
                .contains(&format!("invalid chunk size {cs} sectors")),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains(&arg(&cow)), "{}", r.stderr);
    }
    // Header, area 0 and one data chunk of 4 KiB need 12 KiB.
    let small = common::zero_file(&dir.path().join("small"), 8192);
    let r = run(&["cow", "create", "--chunk-sectors", "8", &arg(&small)]).expect(2);
    assert!(
        r.stderr.contains("too small") && r.stderr.contains(&arg(&small)),
        "{}",
        r.stderr
    );
    // Nothing was written to either device.
    for p in [&cow, &small] {
        assert!(std::fs::read(p).unwrap().iter().all(|&b| b == 0));
    }
    let r = run(&["cow", "check", "--json", &arg(&cow)]).expect(0);
    assert_eq!(r.json()["state"], "new");
}

#[test]
fn tools_name_a_missing_device_and_exit_2() {
    let dir = common::scratch();
    let missing = arg(&dir.path().join("no-such-cow"));
    let origin = arg(&common::zero_file(&dir.path().join("origin"), MIB));
    let out = arg(&dir.path().join("out"));
    for args in [
        vec!["cow", "create", &missing],
        vec!["cow", "check", &missing],
        vec!["cow", "dump", &missing],
        vec!["cow", "status", &missing],
        vec!["cow", "export", "--origin", &origin, &missing, "-o", &out],
        vec!["cow", "merge", "--origin", &origin, &missing],
        vec!["cow", "delta", "--origin", &origin, &missing],
    ] {
        let r = run(&args).expect(2);
        assert!(
            r.stderr.contains(&missing) && r.stderr.contains("cannot open"),
            "{args:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn status_counts_allocation_and_metadata_like_the_kernel() {
    let dir = common::scratch();
    let (origin, cow) = origin_and_cow(dir.path(), 2 * MIB, 4 * MIB);
    // 300 exceptions at chunk 8: area 0 (256 records) is full, area 1 holds 44.
    io(&origin, &cow, 8, &["write -P 7 0 1200k"]).expect(0);
    let last = common::allocation_order(8).nth(299).unwrap();
    let s = status_json(&origin, &cow);
    assert_eq!(s["exceptions"], 300);
    assert_eq!(
        s["line"],
        format!("0 4096 snapshot {}/8192 24", (last + 1) * 8)
    );
    assert_eq!(
        run(&["cow", "status", &arg(&cow)]).expect(0).stdout.trim(),
        format!("{}/8192 24", (last + 1) * 8)
    );
}

#[test]
fn export_gives_the_pre_write_image_while_the_origin_has_the_new_one() {
    let dir = common::scratch();
    // A mostly-zero origin with some data, so the export can be sparse.
    let origin = common::zero_file(&dir.path().join("origin"), 8 * MIB);
    write_at(&origin, MIB, &common::pattern(256 << 10, 3));
    let cow = common::zero_file(&dir.path().join("cow"), 4 * MIB);
    let before = std::fs::read(&origin).unwrap();
    io(
        &origin,
        &cow,
        16,
        &[
            "write -P 0x5a 1000k 100k",
            "write -P 0xa5 7m 4k",
            "write -z 0 8k",
        ],
    )
    .expect(0);
    let after = std::fs::read(&origin).unwrap();
    assert!(after[1000 << 10..1100 << 10].iter().all(|&b| b == 0x5a));
    assert!(after[7 << 20..(7 << 20) + 4096].iter().all(|&b| b == 0xa5));

    let out = dir.path().join("image");
    // A stale output file is truncated first.
    std::fs::write(&out, vec![0xffu8; 16 << 20]).unwrap();
    let j = run(&[
        "cow",
        "export",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&cow),
        "-o",
        &arg(&out),
    ])
    .expect(0)
    .json();
    let image = std::fs::read(&out).unwrap();
    assert_eq!(image.len() as u64, 8 * MIB);
    assert!(
        image == before,
        "the export is the origin as it was when the snapshot was taken"
    );
    assert_eq!(
        std::fs::read(&origin).unwrap(),
        after,
        "the origin keeps the new data"
    );
    assert_eq!(j["bytes"], 8 * MIB);
    // Sparse: only the non-zero data was written.
    let written = j["written_bytes"].as_u64().unwrap();
    assert!(written <= (256 << 10) + 64 * 1024, "written {written}");
    use std::os::unix::fs::MetadataExt;
    assert!(
        std::fs::metadata(&out).unwrap().blocks() * 512 < 2 * MIB,
        "the output file is sparse"
    );

    // The output must not be one of the inputs.
    let r = run(&[
        "cow",
        "export",
        "--origin",
        &arg(&origin),
        &arg(&cow),
        "-o",
        &arg(&origin),
    ])
    .expect(2);
    assert!(r.stderr.contains("same file"), "{}", r.stderr);
}

#[test]
fn an_overflowed_snapshot_is_invalid_for_status_check_and_export() {
    let dir = common::scratch();
    // 64 KiB at chunk 8: header, area 0 and 14 data chunks.
    let (origin, cow) = origin_and_cow(dir.path(), MIB, 64 << 10);
    let r = io(&origin, &cow, 8, &["write -P 1 0 128k"]);
    r.expect(0); // the origin keeps working; the snapshot is dropped
    assert!(
        std::fs::read(&origin).unwrap()[..128 << 10]
            .iter()
            .all(|&b| b == 1)
    );

    let r = run(&["cow", "status", "--origin", &arg(&origin), &arg(&cow)]).expect(0);
    assert_eq!(r.stdout.trim(), "0 2048 snapshot Invalid");
    let r = run(&["cow", "check", &arg(&cow)]).expect(0);
    assert!(
        r.stdout.contains("snapshot is marked invalid"),
        "{}",
        r.stdout
    );
    assert_eq!(check(&cow, None).expect(0).json()["state"], "invalid");
    let out = dir.path().join("image");
    let r = run(&[
        "cow",
        "export",
        "--origin",
        &arg(&origin),
        &arg(&cow),
        "-o",
        &arg(&out),
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("invalid") && r.stderr.contains(&arg(&cow)),
        "{}",
        r.stderr
    );
    let r = run(&["cow", "merge", "--origin", &arg(&origin), &arg(&cow)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("invalid"), "{}", r.stderr);
}

/// A COW device at chunk 8 with 5 exceptions (origin chunks 0..4), checked
/// clean, for the corruption tests to damage.
fn clean_cow(dir: &Path) -> (PathBuf, PathBuf) {
    let (origin, cow) = origin_and_cow(dir, MIB, 2 * MIB);
    io(&origin, &cow, 8, &["write -P 9 0 20k"]).expect(0);
    let r = check(&cow, Some(&origin)).expect(0);
    assert_eq!(r.json()["exceptions"], 5);
    assert!(r.json()["problems"].as_array().unwrap().is_empty());
    (origin, cow)
}

#[test]
fn check_exits_0_on_clean_new_and_invalid_devices() {
    let dir = common::scratch();
    let (origin, cow) = clean_cow(dir.path());
    let r = run(&["cow", "check", "--origin", &arg(&origin), &arg(&cow)]).expect(0);
    assert!(
        r.stdout.contains("5 exceptions") && r.stdout.contains("clean"),
        "{}",
        r.stdout
    );

    let new = common::zero_file(&dir.path().join("new"), MIB);
    let r = run(&["cow", "check", &arg(&new)]).expect(0);
    assert!(r.stdout.contains("new COW device"), "{}", r.stdout);

    // valid = 0 is the consistent metadata of an invalidated snapshot.
    write_at(&cow, 4, &0u32.to_le_bytes());
    let r = check(&cow, Some(&origin)).expect(0);
    assert_eq!(r.json()["state"], "invalid");
}

#[test]
fn check_reports_a_bad_header_with_exit_1() {
    let dir = common::scratch();
    let (_, cow) = clean_cow(dir.path());
    for (off, bytes, kind) in [
        (0u64, b"XnAp".to_vec(), "bad_magic"),
        (8, 2u32.to_le_bytes().to_vec(), "unsupported_version"),
        (12, 12u32.to_le_bytes().to_vec(), "bad_chunk_size"),
        (12, 2048u32.to_le_bytes().to_vec(), "bad_chunk_size"),
    ] {
        let saved = std::fs::read(&cow).unwrap();
        write_at(&cow, off, &bytes);
        let r = check(&cow, None).expect(1);
        assert_eq!(problem_kinds(&r), vec![kind.to_string()]);
        let r = run(&["cow", "check", &arg(&cow)]).expect(1);
        assert!(
            r.stdout.contains("header:") && r.stdout.contains("1 problem found"),
            "{}",
            r.stdout
        );
        // The loader refuses it, naming the device.
        let r = run(&["cow", "status", &arg(&cow)]).expect(2);
        assert!(r.stderr.contains(&arg(&cow)), "{}", r.stderr);
        std::fs::write(&cow, saved).unwrap();
    }
}

#[test]
fn check_reports_a_record_on_a_metadata_chunk() {
    let dir = common::scratch();
    let (origin, cow) = clean_cow(dir.path());
    write_record(&cow, 8, 0, 2, 2, 1); // COW chunk 1 is area 0
    let r = check(&cow, Some(&origin)).expect(1);
    assert_eq!(problem_kinds(&r), vec!["new_chunk_is_metadata"]);
    let p = &r.json()["problems"][0];
    assert_eq!(
        (p["area"].as_u64(), p["index"].as_u64(), p["new"].as_u64()),
        (Some(0), Some(2), Some(1))
    );
    let text = run(&["cow", "check", &arg(&cow)]).expect(1).stdout;
    assert!(
        text.contains("area 0 record 2: origin chunk 2 -> COW chunk 1"),
        "{text}"
    );
    let r = run(&["cow", "status", &arg(&cow)]).expect(2);
    assert!(r.stderr.contains("corrupt"), "{}", r.stderr);
}

#[test]
fn check_reports_duplicate_new_and_old_chunks() {
    let dir = common::scratch();
    let (origin, cow) = clean_cow(dir.path());
    let (_, new0) = common::read_record(&cow, 8, 0, 0);
    let (old1, _) = common::read_record(&cow, 8, 0, 1);
    write_record(&cow, 8, 0, 3, 3, new0);
    write_record(&cow, 8, 0, 4, old1, 40);
    let r = check(&cow, Some(&origin)).expect(1);
    assert_eq!(
        problem_kinds(&r),
        vec!["duplicate_new_chunk", "duplicate_old_chunk"]
    );
    assert_eq!(r.json()["exceptions"], 3);
}

#[test]
fn check_reports_an_old_chunk_past_the_origin_only_when_given_the_origin() {
    let dir = common::scratch();
    let (origin, cow) = clean_cow(dir.path());
    // The origin has 256 chunks of 4 KiB.
    write_record(&cow, 8, 0, 1, 256, common::read_record(&cow, 8, 0, 1).1);
    check(&cow, None).expect(0);
    let r = check(&cow, Some(&origin)).expect(1);
    assert_eq!(problem_kinds(&r), vec!["old_chunk_past_origin"]);
    assert_eq!(r.json()["problems"][0]["origin_chunks"], 256);
}

#[test]
fn check_reports_an_area_tail_not_zeroed_and_chunks_past_the_end() {
    let dir = common::scratch();
    let (origin, cow) = clean_cow(dir.path());
    // Garbage after the end-of-list record of the last area.
    write_at(&cow, common::record_offset(8, 0, 100) + 3, &[0x42]);
    let r = check(&cow, Some(&origin)).expect(1);
    assert_eq!(problem_kinds(&r), vec!["area_not_zeroed"]);
    write_at(&cow, common::record_offset(8, 0, 100) + 3, &[0]);
    check(&cow, Some(&origin)).expect(0);
    // A COW chunk past the device's 512 chunks.
    write_record(&cow, 8, 0, 0, 0, 512);
    let r = check(&cow, Some(&origin)).expect(1);
    assert_eq!(problem_kinds(&r), vec!["new_chunk_past_end"]);
}

#[test]
fn check_reports_a_full_last_area_without_a_next_one() {
    let dir = common::scratch();
    // Area 0 full at chunk 8 (256 records) and the device ends right after
    // its data: area 1 would lie past the end.
    let records: Vec<(u64, u64)> = (0..256).zip(common::allocation_order(8)).collect();
    let img = build_cow_image(8, 258, &records, |old| common::pattern(4096, old));
    let cow = dir.path().join("cow");
    std::fs::write(&cow, img).unwrap();
    let r = check(&cow, None).expect(1);
    assert_eq!(problem_kinds(&r), vec!["area_past_end"]);
}

#[test]
fn check_cannot_read_exits_2() {
    let dir = common::scratch();
    let r = run(&["cow", "check", &arg(&dir.path().join("missing"))]).expect(2);
    assert!(
        r.stderr.contains("missing") && r.stderr.contains("cannot open"),
        "{}",
        r.stderr
    );
    let r = run(&["cow", "check", &arg(dir.path())]).expect(2);
    assert!(
        r.stderr.contains("is a directory") && r.stderr.contains(&arg(dir.path())),
        "{}",
        r.stderr
    );
}

#[test]
fn dump_json_lists_header_areas_and_exceptions() {
    let dir = common::scratch();
    let (origin, cow) = origin_and_cow(dir.path(), 2 * MIB, 4 * MIB);
    io(&origin, &cow, 8, &["write -P 3 0 1200k"]).expect(0);
    let j = run(&["cow", "dump", "--json", &arg(&cow)]).expect(0).json();
    assert_eq!(j["header"]["magic"], 0x7041_6e53);
    assert_eq!(j["header"]["version"], 1);
    assert_eq!(j["header"]["valid"], true);
    assert_eq!(j["header"]["chunk_sectors"], 8);
    let areas = j["areas"].as_array().unwrap();
    assert_eq!(areas.len(), 2);
    assert_eq!(
        (
            areas[0]["chunk"].as_u64(),
            areas[0]["records"].as_u64(),
            areas[0]["full"].as_bool()
        ),
        (Some(1), Some(256), Some(true))
    );
    assert_eq!(
        (
            areas[1]["chunk"].as_u64(),
            areas[1]["records"].as_u64(),
            areas[1]["full"].as_bool()
        ),
        (Some(258), Some(44), Some(false))
    );
    let ex = j["exceptions"].as_array().unwrap();
    assert_eq!(ex.len(), 300);
    let mut olds: Vec<u64> = ex
        .iter()
        .map(|e| e["old_chunk"].as_u64().unwrap())
        .collect();
    olds.sort_unstable();
    assert_eq!(olds, (0..300).collect::<Vec<_>>());
    let mut news: Vec<u64> = ex
        .iter()
        .map(|e| e["new_chunk"].as_u64().unwrap())
        .collect();
    news.sort_unstable();
    assert_eq!(
        news,
        common::allocation_order(8).take(300).collect::<Vec<_>>()
    );
    assert_eq!(
        (ex[256]["area"].as_u64(), ex[256]["index"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(j["problems"].as_array().unwrap().is_empty());

    // A damaged record is shown with its problem.
    write_record(&cow, 8, 1, 5, 5, 258);
    let j = run(&["cow", "dump", "--json", &arg(&cow)]).expect(0).json();
    assert!(
        j["exceptions"][261]["problem"]
            .as_str()
            .unwrap()
            .contains("metadata")
    );
    let text = run(&["cow", "dump", &arg(&cow)]).expect(0).stdout;
    assert!(
        text.contains("area 1 at chunk 258: 44 records, not full"),
        "{text}"
    );
}

/// The ranges of a `delta --json` run as (offset, length).
fn ranges(j: &serde_json::Value) -> Vec<(u64, u64)> {
    j["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn delta_from_metadata_matches_the_writes() {
    let dir = common::scratch();
    let (origin, cow) = origin_and_cow(dir.path(), 4 * MIB, 4 * MIB);
    io(
        &origin,
        &cow,
        8,
        &[
            "write -P 1 0 8k",
            "write -P 2 64k 4k",
            "write -P 3 1052676 10",
            "write -P 4 4k 4k",
        ],
    )
    .expect(0);
    let j = run(&[
        "cow",
        "delta",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&cow),
    ])
    .expect(0)
    .json();
    assert_eq!(ranges(&j), vec![(0, 8192), (65536, 4096), (1052672, 4096)]);
    assert_eq!(j["chunk_bytes"], 4096);
    assert_eq!(
        (
            j["ranges"][0]["first_chunk"].as_u64(),
            j["ranges"][0]["chunks"].as_u64()
        ),
        (Some(0), Some(2))
    );
    assert_eq!(j["ranges"][2]["first_chunk"], 257);
    assert_eq!(j["total_bytes"], 16384);
    let text = run(&["cow", "delta", "--origin", &arg(&origin), &arg(&cow)])
        .expect(0)
        .stdout;
    assert!(text.lines().any(|l| l == "65536 4096 16 1"), "{text}");
}

#[test]
fn delta_exact_drops_chunks_whose_data_did_not_change() {
    let dir = common::scratch();
    let origin = common::zero_file(&dir.path().join("origin"), 2 * MIB);
    let cow = common::zero_file(&dir.path().join("cow"), 2 * MIB);
    // Zeros over zeros: exceptions, but the data is the same.
    io(&origin, &cow, 16, &["write -z 0 32k", "write -P 1 16k 1"]).expect(0);
    let meta = run(&[
        "cow",
        "delta",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&cow),
    ])
    .expect(0)
    .json();
    assert_eq!(ranges(&meta), vec![(0, 32768)]);
    let exact = run(&[
        "cow",
        "delta",
        "--exact",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&cow),
    ])
    .expect(0)
    .json();
    assert_eq!(ranges(&exact), vec![(16384, 8192)]);
    assert_eq!(exact["exact"], true);
}

#[test]
fn delta_between_two_snapshots_in_bytes_across_chunk_sizes() {
    let dir = common::scratch();
    let origin = common::pattern_file(&dir.path().join("origin"), 4 * MIB, 5);
    let (s1, s2) = (dir.path().join("s1"), dir.path().join("s2"));
    common::zero_file(&s1, 4 * MIB);
    common::zero_file(&s2, 4 * MIB);
    // Snapshot 1 (chunk 8), write A; snapshot 2 (chunk 32), write B.
    io(&origin, &s1, 8, &["write -P 1 0 4k"]).expect(0);
    let r = run(&[
        "io",
        "--origin",
        &arg(&origin),
        "--cow",
        &arg(&s1),
        "--cow",
        &arg(&s2),
        "--chunk-sectors",
        "32",
        "-c",
        "write -P 2 1m 4k",
    ]);
    r.expect(0);
    let j = run(&[
        "cow",
        "delta",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&s1),
        &arg(&s2),
    ])
    .expect(0)
    .json();
    // Snapshot 1 has chunks of A and B (4 KiB each), snapshot 2 the 16 KiB chunk of B.
    assert_eq!(ranges(&j), vec![(0, 4096), (MIB, 16384)]);
    assert!(j["chunk_bytes"].is_null() && j["ranges"][0].get("first_chunk").is_none());
    // Only A differs between the two snapshots: at B both hold the data
    // from before B.
    let j = run(&[
        "cow",
        "delta",
        "--exact",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&s1),
        &arg(&s2),
    ])
    .expect(0)
    .json();
    assert_eq!(ranges(&j), vec![(0, 4096)]);
}

/// A COW device at chunk 8 whose `n` exceptions are the even origin chunks
/// 0, 2, 4, ...: no two are consecutive, so a merge takes one step per
/// exception. Returns (origin, cow, the snapshot's image).
fn sparse_snapshot(dir: &Path, n: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let cb = 4096u64;
    let origin = common::pattern_file(&dir.join("origin"), 2 * n * cb, 11);
    let records: Vec<(u64, u64)> = (0..n)
        .map(|i| 2 * i)
        .zip(common::allocation_order(8))
        .collect();
    let data = |old: u64| common::pattern(cb as usize, 1000 + old);
    let last = records.last().unwrap().1;
    let cow = dir.join("cow");
    std::fs::write(&cow, build_cow_image(8, last + 300, &records, data)).unwrap();
    let mut image = std::fs::read(&origin).unwrap();
    for &(old, _) in &records {
        image[(old * cb) as usize..((old + 1) * cb) as usize].copy_from_slice(&data(old));
    }
    check(&cow, Some(&origin)).expect(0);
    (origin, cow, image)
}

#[test]
fn merge_restores_the_origin_to_the_snapshot() {
    let dir = common::scratch();
    let (origin, cow) = origin_and_cow(dir.path(), 4 * MIB, 4 * MIB);
    let before = std::fs::read(&origin).unwrap();
    io(
        &origin,
        &cow,
        8,
        &[
            "write -P 1 0 1200k",
            "write -P 2 3m 12k",
            "write -P 3 100k 1",
        ],
    )
    .expect(0);
    assert_ne!(std::fs::read(&origin).unwrap(), before);
    let j = run(&[
        "cow",
        "merge",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&cow),
    ])
    .expect(0)
    .json();
    assert_eq!(j["merged_chunks"], 303);
    assert!(
        std::fs::read(&origin).unwrap() == before,
        "the origin holds the snapshot's content"
    );
    let s = status_json(&origin, &cow);
    assert_eq!(s["exceptions"], 0);
    check(&cow, Some(&origin)).expect(0);
    // Merging again has nothing left to do.
    let j = run(&[
        "cow",
        "merge",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&cow),
    ])
    .expect(0)
    .json();
    assert_eq!(j["merged_chunks"], 0);
}

#[test]
fn merge_resumes_after_being_killed() {
    let dir = common::scratch();
    let n = 2048;
    let (origin, cow, image) = sparse_snapshot(dir.path(), n);
    let mut child = common::cowsnap()
        .args(["cow", "merge", "--origin", &arg(&origin), &arg(&cow)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Progress lines: "merge COW: DONE/TOTAL chunks (P%)". Kill it once it
    // has merged some but (with one durable step per exception) far from all.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        let done = line
            .split_once(": ")
            .and_then(|(_, rest)| rest.split_once('/'))
            .and_then(|(d, _)| d.parse::<u64>().ok());
        if done.is_some_and(|d| d > 0) {
            break;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the merge was killed, not finished; stderr: {seen:?}"
    );
    let left = status_json(&origin, &cow)["exceptions"].as_u64().unwrap();
    assert!(
        0 < left && left < n,
        "interrupted mid-way: {left} of {n} exceptions left"
    );
    assert!(std::fs::read(&origin).unwrap() != image);

    let j = run(&[
        "cow",
        "merge",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&cow),
    ])
    .expect(0)
    .json();
    assert_eq!(j["merged_chunks"], left);
    assert!(
        std::fs::read(&origin).unwrap() == image,
        "the resumed merge ends with the snapshot's content"
    );
    assert_eq!(status_json(&origin, &cow)["exceptions"], 0);
}

#[test]
fn merge_resumes_after_an_interrupted_library_merge() {
    use cowsnap_store::{Backend, Origin, SnapshotOptions};
    let dir = common::scratch();
    let n = 600;
    let (origin, cow, image) = sparse_snapshot(dir.path(), n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let backend = Backend::from_env();
        let o = Origin::new(backend.open(&origin, true).unwrap()).unwrap();
        let opts = SnapshotOptions {
            merging: true,
            ..Default::default()
        };
        let id = o
            .add_snapshot(backend.open(&cow, true).unwrap(), opts)
            .await
            .unwrap()
            .id;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let merge = o.merge(id, move |p| {
            let _ = tx.send(p.chunks_left);
        });
        tokio::pin!(merge);
        // Stop polling (and drop) the merge in the middle of the step after
        // the 100th: whatever that step had written stays as it was.
        let mut steps = 0;
        loop {
            tokio::select! {
                r = &mut merge => panic!("the merge finished before it was interrupted: {r:?}"),
                Some(_) = rx.recv() => {
                    steps += 1;
                    if steps == 101 {
                        break;
                    }
                }
            }
        }
        tokio::select! {
            biased;
            r = &mut merge => panic!("finished: {r:?}"),
            _ = tokio::task::yield_now() => {}
        }
    });
    drop(rt);
    let left = status_json(&origin, &cow)["exceptions"].as_u64().unwrap();
    assert!(left < n && left > n / 2, "{left} of {n} exceptions left");
    run(&["cow", "merge", "--origin", &arg(&origin), &arg(&cow)]).expect(0);
    assert!(
        std::fs::read(&origin).unwrap() == image,
        "the resumed merge ends with the snapshot's content"
    );
    assert_eq!(status_json(&origin, &cow)["exceptions"], 0);
}

#[test]
fn a_chunk_size_asked_for_loses_to_the_on_disk_header() {
    let dir = common::scratch();
    let (origin, cow) = origin_and_cow(dir.path(), MIB, 4 * MIB);
    let before = std::fs::read(&origin).unwrap();
    run(&["cow", "create", "--chunk-sectors", "8", &arg(&cow)]).expect(0);
    let r = io(&origin, &cow, 32, &["write -P 1 4k 4k"]).expect(0);
    assert!(
        r.stderr
            .contains("overrides the requested chunk size of 32"),
        "{}",
        r.stderr
    );
    let s = status_json(&origin, &cow);
    assert_eq!(
        (s["chunk_sectors"].as_u64(), s["exceptions"].as_u64()),
        (Some(8), Some(1))
    );
    let j = run(&[
        "cow",
        "delta",
        "--json",
        "--origin",
        &arg(&origin),
        &arg(&cow),
    ])
    .expect(0)
    .json();
    assert_eq!(ranges(&j), vec![(4096, 4096)]);
    let out = dir.path().join("image");
    run(&[
        "cow",
        "export",
        "--origin",
        &arg(&origin),
        &arg(&cow),
        "-o",
        &arg(&out),
    ])
    .expect(0);
    assert!(std::fs::read(&out).unwrap() == before);
}

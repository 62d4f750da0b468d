//! Smoke test of `cowsnap bench store`: the quick run completes on a disk
//! file system and its JSON report carries every figure with a positive value
//! and a ratio. Speed itself is measured, never asserted.

use std::path::PathBuf;
use std::process::Command;

const FIGURES: &[&str] = &[
    "first_write",
    "first_write_commit_bound",
    "overwrite",
    "overwrite_random_4k",
    "snapshot_read_cow",
    "snapshot_read_origin",
    "exceptions_per_commit",
    "first_write_8_bound",
    "load_time",
    "ram_per_exception",
];

#[test]
fn bench_store_quick_json_has_every_figure() {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-smoke");
    std::fs::create_dir_all(&base).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(["bench", "store", "--quick", "--json", "--dir"])
        .arg(&base)
        .output()
        .expect("run cowsnap");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cowsnap bench store failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    assert!(
        ["io_uring", "portable"].contains(&report["backend"].as_str().unwrap_or("")),
        "{report}"
    );
    assert_eq!(report["chunk_sectors"], 32);
    for key in [
        "read_mb_s",
        "write_mb_s",
        "random_write_4k_iops",
        "flush_ms",
        "dsync_write_ms",
    ] {
        let v = report["baseline"][key].as_f64().unwrap_or(0.0);
        assert!(v > 0.0, "baseline {key} = {v}");
    }
    let figures = report["figures"].as_object().expect("figures object");
    for id in FIGURES {
        let f = figures
            .get(*id)
            .unwrap_or_else(|| panic!("figure {id} missing: {report}"));
        for key in ["value", "baseline", "ratio"] {
            let v = f[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "figure {id}: {key} = {v}");
        }
        assert!(
            ["pass", "miss", "info"].contains(&f["result"].as_str().unwrap_or("")),
            "figure {id}: {f}"
        );
        if f["result"] != "info" {
            assert!(
                f["target"].is_object() && f["pass"].is_boolean(),
                "figure {id} lacks its target: {f}"
            );
        }
    }
    // The scratch subdirectory is removed at the end of the run.
    let left: Vec<_> = std::fs::read_dir(&base).unwrap().collect();
    assert!(left.is_empty(), "scratch files left behind: {left:?}");
}

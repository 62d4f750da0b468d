//! Smoke test of `cowsnap bench api`: a run with a tiny catalog completes
//! against a real `cowsnap up` and a second worker registered with it, and
//! its JSON report carries both baselines and every figure with a positive
//! value, baseline and ratio, the catalog grew to the size asked, its
//! volumes are spread over both workers, and nothing is left behind. Speed
//! itself is measured, never asserted. Too few workers for the descriptor
//! limit is refused before anything starts.

use std::path::PathBuf;
use std::process::{Command, Output};

const KINDS: &[&str] = &[
    "create_volume",
    "get_volume",
    "list_volumes",
    "delete_volume",
    "create_snapshot",
    "get_snapshot",
    "list_snapshots",
    "list_all_snapshots",
    "delete_snapshot",
];

/// Runs `cowsnap bench api ARGS --dir BASE`, BASE a fresh directory named
/// `scratch` under the tests' target dir; what it printed, and BASE.
fn bench_api(scratch: &str, args: &[&str]) -> (Output, PathBuf) {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(scratch);
    std::fs::create_dir_all(&base).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(["bench", "api"])
        .args(args)
        .arg("--dir")
        .arg(&base)
        .output()
        .expect("run cowsnap");
    (out, base)
}

/// Fails unless `base` is empty: the scratch subdirectory (and the
/// services in it) is gone.
fn assert_nothing_left(base: &std::path::Path) {
    let left: Vec<_> = std::fs::read_dir(base).unwrap().collect();
    assert!(left.is_empty(), "scratch files left behind: {left:?}");
}

#[test]
fn bench_api_tiny_json_has_every_figure() {
    let (out, base) = bench_api(
        "bench-api-smoke",
        &[
            "--volumes",
            "6",
            "--first-point",
            "3",
            "--snapshots-per-volume",
            "2",
            "--measure-secs",
            "0.3",
            "--latency-samples",
            "4",
            "--baseline-samples",
            "5",
            "--grow-clients",
            "4",
            "--workers",
            "2",
            "--json",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cowsnap bench api failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    for key in [
        "sqlite_commit_ms",
        "fua_write_ms",
        "create_snapshot_p50_ms",
        "create_snapshot_p99_ms",
        "disk_bytes",
    ] {
        let v = report[key].as_f64().unwrap_or(0.0);
        assert!(v > 0.0, "{key} = {v}: {report}");
    }
    assert_eq!(report["first_point"]["volumes"], 3, "{report}");
    assert_eq!(report["first_point"]["snapshots"], 6, "{report}");
    assert_eq!(report["last_point"]["volumes"], 6, "{report}");
    assert_eq!(report["last_point"]["snapshots"], 12, "{report}");
    assert_eq!(report["growth_cut_short"], false, "{report}");

    let mut ids: Vec<String> = vec![
        "create_snapshot_p50".into(),
        "create_snapshot_p99".into(),
        "growth_creates".into(),
        "disk_use".into(),
    ];
    for k in KINDS {
        for c in [1, 8, 64] {
            ids.push(format!("{k}_{c}"));
        }
    }
    let figures = report["figures"].as_object().expect("figures object");
    assert_eq!(figures.len(), ids.len(), "{report}");
    for id in &ids {
        let f = figures
            .get(id)
            .unwrap_or_else(|| panic!("figure {id} missing: {report}"));
        for key in ["value", "baseline", "ratio"] {
            let v = f[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "figure {id}: {key} = {v}");
        }
        assert!(
            ["pass", "miss", "info"].contains(&f["result"].as_str().unwrap_or("")),
            "figure {id}: {f}"
        );
    }
    // Reads carry the "must not slow down" target; CreateSnapshot p50 its
    // bound against the baselines.
    for id in ["get_volume_8", "list_volumes_64", "create_snapshot_p50"] {
        let f = &figures[id];
        assert!(
            f["target"].is_object() && f["pass"].is_boolean(),
            "figure {id} lacks its target: {f}"
        );
    }
    // Both workers hold volumes: the grown ones, the latency run's, the 64
    // scratch volumes and what the rates made were placed alternately (the
    // rates' deletes need not take as many from each).
    let per_worker = report["volumes_per_worker"].as_array().expect("list");
    assert_eq!(per_worker.len(), 2, "{report}");
    let counts: Vec<u64> = per_worker.iter().map(|w| w[1].as_u64().unwrap()).collect();
    let (least, most) = (counts[0].min(counts[1]), counts[0].max(counts[1]));
    assert!(least > 0 && most <= 2 * least, "{counts:?}: {report}");
    assert_nothing_left(&base);
}

#[test]
fn bench_api_refuses_too_few_workers_before_starting() {
    // Ten billion device files on one worker: over any descriptor limit
    // Linux allows (fs.nr_open stays below 2^31).
    let (out, base) = bench_api(
        "bench-api-few-workers",
        &[
            "--volumes",
            "10000",
            "--snapshots-per-volume",
            "1000000",
            "--workers",
            "1",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--workers 1: each worker would hold about 10000011024 device files"),
        "{stderr}"
    );
    assert_nothing_left(&base);
}

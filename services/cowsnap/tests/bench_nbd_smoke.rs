//! Smoke test of `cowsnap bench nbd`: the quick run completes on a disk file
//! system (our worker, qemu-nbd and fio on the raw file), and its JSON report
//! carries every figure with positive values on all three sides and both
//! ratios. Speed itself is measured, never asserted. Needs fio and qemu-nbd
//! (Debian packages fio and qemu-utils; CI installs them).

use std::path::PathBuf;
use std::process::Command;

const FIGURES: &[&str] = &[
    "randwrite_4k_first_touch",
    "seqwrite_1m_first_touch",
    "randwrite_4k_overwrite",
    "seqwrite_1m_overwrite",
    "randread_4k",
    "seqread_1m",
];

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn num(v: &serde_json::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or(f64::NAN);
    assert!(x.is_finite() && x > 0.0, "{what} = {v}");
    x
}

#[test]
fn bench_nbd_quick_json_has_every_figure() {
    let missing: Vec<&str> = ["fio", "qemu-nbd", "qemu-img"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    assert!(
        missing.is_empty(),
        "bench nbd needs {}: install the Debian packages fio and qemu-utils (apt-get install fio qemu-utils)",
        missing.join(", ")
    );

    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-nbd-smoke");
    std::fs::create_dir_all(&base).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(["bench", "nbd", "--quick", "--json", "--dir"])
        .arg(&base)
        .output()
        .expect("run cowsnap");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cowsnap bench nbd failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    // What each side ran is in the report.
    assert_eq!(report["ours"]["chunk_sectors"], 32, "{}", report["ours"]);
    assert!(
        ["io_uring", "portable"].contains(&report["ours"]["io_backend"].as_str().unwrap_or("")),
        "{}",
        report["ours"]
    );
    assert!(
        report["client"]["fio_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("fio-")),
        "{}",
        report["client"]
    );
    let cmd = report["qemu_nbd"]["command"].as_str().unwrap_or("");
    assert!(
        cmd.contains("--cache=none") && cmd.contains("--aio="),
        "{cmd}"
    );
    assert!(
        ["io_uring", "libaio"].contains(&report["raw"]["engine"].as_str().unwrap_or("")),
        "{}",
        report["raw"]
    );

    let rounds = report["rounds"].as_u64().expect("rounds") as usize;
    assert!(rounds >= 1);
    let figures = report["figures"].as_object().expect("figures object");
    for id in FIGURES {
        let f = figures
            .get(*id)
            .unwrap_or_else(|| panic!("figure {id} missing: {report}"));
        let value = num(&f["value"], &format!("{id} value (ours)"));
        let baseline = num(&f["baseline"], &format!("{id} baseline"));
        let raw = num(&f["ceiling"], &format!("{id} ceiling (raw)"));
        let ratio = num(&f["ratio"], &format!("{id} ratio"));
        let ratio_raw = num(&f["ceiling_ratio"], &format!("{id} ours/raw"));
        assert!(
            (ratio - value / baseline).abs() <= 1e-9 * ratio,
            "{id}: {f}"
        );
        // The sequential fill is judged against the format's bound from the
        // raw 1 MiB read and overwrite; everything else against qemu-nbd.
        let expected = if *id == "seqwrite_1m_first_touch" {
            let ceiling = |w: &str| num(&figures[w]["ceiling"], &format!("{w} ceiling"));
            1.0 / (1.0 / ceiling("seqread_1m") + 2.0 / ceiling("seqwrite_1m_overwrite"))
        } else {
            f["rounds"][1]["best"]
                .as_f64()
                .expect("qemu-nbd's best round")
        };
        assert!((baseline - expected).abs() <= 1e-9 * expected, "{id}: {f}");
        assert!(
            (ratio_raw - value / raw).abs() <= 1e-9 * ratio_raw,
            "{id}: {f}"
        );
        assert!(
            ["pass", "miss"].contains(&f["result"].as_str().unwrap_or("")),
            "figure {id} has no target: {f}"
        );
        assert!(f["pass"].is_boolean(), "{id}: {f}");
        let sides = f["rounds"].as_array().expect("rounds per side");
        let names: Vec<&str> = sides.iter().filter_map(|s| s["side"].as_str()).collect();
        assert_eq!(names, ["ours", "qemu_nbd", "raw"], "{id}: {f}");
        for s in sides {
            let values = s["values"].as_array().expect("values");
            assert_eq!(values.len(), rounds, "{id}: {s}");
            for v in values {
                num(v, &format!("{id} {} round", s["side"]));
            }
            let spread = s["spread"].as_f64().expect("spread");
            assert!((0.0..1.0).contains(&spread), "{id}: {s}");
        }
    }
    // Server CPU per I/O of both sides, for every workload, in its order.
    let cpu = report["server_cpu_per_io"]
        .as_array()
        .expect("server_cpu_per_io");
    let ids: Vec<&str> = cpu.iter().filter_map(|c| c["workload"].as_str()).collect();
    assert_eq!(ids, FIGURES, "{cpu:?}");
    for c in cpu {
        let ours = num(&c["ours_us"], "our server CPU µs per I/O");
        let qemu = num(&c["qemu_nbd_us"], "qemu-nbd's CPU µs per I/O");
        let ratio = num(&c["ratio"], "CPU ours/qemu-nbd");
        assert!((ratio - ours / qemu).abs() <= 1e-9 * ratio, "{c}");
    }
    // Every fio run is listed: six workloads, three sides, every round.
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), FIGURES.len() * 3 * rounds);
    // The first-touch runs did copy chunks and allocate clusters.
    let ft = &report["first_touch_random"];
    num(
        &ft["chunks_copied"],
        "chunks copied by the first-touch writes",
    );
    num(&ft["qemu_clusters_allocated"], "qcow2 clusters allocated");
    // The scratch subdirectory is removed at the end of the run.
    let left: Vec<_> = std::fs::read_dir(&base).unwrap().collect();
    assert!(left.is_empty(), "scratch files left behind: {left:?}");
}

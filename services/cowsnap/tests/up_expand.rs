//! Growing a volume online through `cowsnap up`: the admin CLI grows a
//! volume with a snapshot while a client is connected, real clients
//! (qemu-img, qemu-io) see the new size on new connections, the snapshot
//! keeps its size and image; and a real `kill -9` (the
//! `COWSNAP_TEST_KILL_AT` hook) at each step of the grow, then a restart:
//! the recorded operation is carried on, and catalog, worker and devices
//! agree.

mod up_common;

use cowsnap_proto::cowsnap::v1 as pb;
use up_common::*;

const MIB: u64 = 1024 * 1024;

/// A 4 MiB volume with 4 KiB chunks (one exception per 4 KiB written).
async fn create_volume(up: &Up, vol: &str) {
    up.clients()
        .await
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: vol.into(),
            volume: Some(pb::Volume {
                size_bytes: 4 * MIB,
                chunk_sectors: 8,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

async fn volume(up: &Up, vol: &str) -> pb::Volume {
    up.clients()
        .await
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: format!("volumes/{vol}"),
        })
        .await
        .unwrap()
        .into_inner()
}

fn uri(up: &Up, export: &str) -> String {
    format!("nbd://{}/{export}", up.nbd())
}

/// The export's size as qemu-img sees it on a new connection.
fn client_size(up: &Up, export: &str) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", &uri(up, export)])
        .output()
        .expect("qemu-img (apt install qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn io(up: &Up, export: &str, cmd: &str) {
    let (ok, text) = qemu_io(&uri(up, export), cmd);
    assert!(ok, "qemu-io {export} {cmd}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_grows_a_volume_online_and_its_snapshot_keeps_its_size() {
    let (_tmp, mut up) = up_in_scratch().await;
    create_volume(&up, "v1").await;
    io(&up, "volumes/v1", "write -P 0x33 0 4M");
    up.clients()
        .await
        .create_snapshot("v1", "s1")
        .await
        .unwrap();
    // A client connected across the grow (qemu-nbd-style long connection).
    let held = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &uri(&up, "volumes/v1"),
            "-c",
            "sleep 3000",
            "-c",
            "read -P 0x33 0 1M",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let (code, out, err) = cowsnap_cli(&up, &["volume", "expand", "v1", "--size", "8m", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["size_bytes"], serde_json::json!(8 * MIB), "{out}");
    let held = held.wait_with_output().unwrap();
    assert!(
        held.status.success(),
        "the connection open across the grow still reads: {}{}",
        String::from_utf8_lossy(&held.stdout),
        String::from_utf8_lossy(&held.stderr)
    );

    assert_eq!(client_size(&up, "volumes/v1"), 8 * MIB);
    assert_eq!(client_size(&up, "volumes/v1/snapshots/s1"), 4 * MIB);
    io(&up, "volumes/v1", "read -P 0 4M 4M");
    io(&up, "volumes/v1", "write -P 0x44 4M 4M");
    io(&up, "volumes/v1", "write -P 0x55 0 1M");
    io(&up, "volumes/v1/snapshots/s1", "read -P 0x33 0 4M");
    let s = up
        .clients()
        .await
        .get_snapshot("volumes/v1/snapshots/s1")
        .await
        .unwrap();
    assert_eq!(s.size_bytes, 4 * MIB);
    assert_eq!(
        s.usage.unwrap().exceptions,
        MIB / 4096,
        "only the write within the snapshot copied"
    );
    let (code, out, err) = cowsnap_cli(&up, &["snapshot", "get", "v1/s1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("4194304 bytes"), "{out}");

    // Growing to the size it has is a no-op; shrinking is refused.
    let (code, _, err) = cowsnap_cli(&up, &["volume", "expand", "v1", "--size", "8m"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cowsnap_cli(&up, &["volume", "expand", "v1", "--size", "6m"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("InvalidArgument")
            || err.contains("INVALID_ARGUMENT")
            || err.contains("invalid"),
        "{err}"
    );
    assert!(err.contains("only grow"), "{err}");
    // A merge of the smaller snapshot is refused, naming why.
    let (code, _, err) = cowsnap_cli(&up, &["snapshot", "merge", "v1/s1"]);
    assert_ne!(code, 0);
    assert!(err.contains("has grown"), "{err}");

    up.kill9();
    up.restart().await;
    assert_eq!(volume(&up, "v1").await.size_bytes, 8 * MIB);
    assert_eq!(
        up.clients()
            .await
            .get_snapshot("volumes/v1/snapshots/s1")
            .await
            .unwrap()
            .size_bytes,
        4 * MIB
    );
    io(&up, "volumes/v1", "read -P 0x44 4M 4M");
    io(&up, "volumes/v1/snapshots/s1", "read -P 0x33 0 4M");
    up.assert_consistent().await;
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_each_step_of_a_grow() {
    let (_tmp, mut up) = up_in_scratch().await;
    let points = [
        "expand_volume:before_worker",
        "worker:expand_volume:device",
        "worker:expand_volume:recorded",
        "expand_volume:after_worker",
    ];
    for (i, point) in points.into_iter().enumerate() {
        let vol = format!("e{i}");
        create_volume(&up, &vol).await;
        io(&up, &format!("volumes/{vol}"), "write -P 0x33 0 4M");
        up.clients().await.create_snapshot(&vol, "s").await.unwrap();
        up.kill9();
        up.set_env(&[("COWSNAP_TEST_KILL_AT", point)]);
        up.restart().await;
        let r = up
            .clients()
            .await
            .volumes
            .expand_volume(pb::ExpandVolumeRequest {
                name: format!("volumes/{vol}"),
                size_bytes: 8 * MIB,
            })
            .await;
        let e = r.expect_err(point);
        assert!(
            matches!(
                e.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            "{point}: killed during the call, not refused: {e:?}"
        );
        assert!(!up.exited().success());
        up.set_env(&[]);
        up.restart().await;
        up.settle().await;
        // Recorded before the worker was asked: carried on to the end.
        let v = volume(&up, &vol).await;
        assert_eq!(v.size_bytes, 8 * MIB, "{point}\n{}", up.log_text());
        assert_eq!(v.state(), pb::State::Ready, "{point}");
        let name = format!("volumes/{vol}/snapshots/s");
        assert_eq!(
            up.clients()
                .await
                .get_snapshot(&name)
                .await
                .unwrap()
                .size_bytes,
            4 * MIB,
            "{point}"
        );
        assert_eq!(
            client_size(&up, &format!("volumes/{vol}")),
            8 * MIB,
            "{point}"
        );
        assert_eq!(client_size(&up, &name), 4 * MIB, "{point}");
        io(&up, &format!("volumes/{vol}"), "write -P 0x44 0 8M");
        io(&up, &name, "read -P 0x33 0 4M");
        up.assert_consistent().await;
    }
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}

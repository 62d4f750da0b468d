//! The server's cross-cutting layers over real sockets: bearer-token auth
//! (health and reflection stay open), reflection v1 and v1alpha, health,
//! and the Prometheus endpoint.

mod common;

use common::*;
use cowsnap_proto::cowsnap::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::Code;

async fn setup_with_token() -> (tempfile::TempDir, Worker, Control) {
    init_logs();
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let mut cfg = Control::config(dir.path(), &[&w]);
    cfg.auth_token_file = Some(token_file);
    let mut control = Control::start(cfg).await;
    control.token = Some("s3cret-token".into());
    (dir, w, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_required_except_for_health_and_reflection() {
    let (_dir, _w, control) = setup_with_token().await;
    let list = || pb::ListVolumesRequest::default();

    let mut none = control.clients_with(None).await;
    let s = code(none.volumes.list_volumes(list()).await);
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = code(
        none.operations
            .list_operations(pb::ListOperationsRequest::default())
            .await,
    );
    assert_eq!(s.code(), Code::Unauthenticated);

    let mut wrong = control.clients_with(Some("s3cret-tokeX".into())).await;
    let s = code(wrong.volumes.list_volumes(list()).await);
    assert_eq!(s.code(), Code::Unauthenticated);

    let mut right = control.clients().await;
    right.volumes.list_volumes(list()).await.unwrap();
    right.create_volume("v1", 4 * MIB).await;

    // Health: open, and every public service is SERVING.
    let mut health = tonic_health::pb::health_client::HealthClient::new(control.channel().await);
    for svc in [
        "",
        "cowsnap.v1.VolumeService",
        "cowsnap.v1.SnapshotService",
        "cowsnap.v1.OperationService",
        "cowsnap.v1.WorkerService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: svc.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{svc:?}"
        );
    }

    // Reflection v1 and v1alpha: open, listing the public services.
    use tonic_reflection::pb::v1 as r1;
    use tonic_reflection::pb::v1alpha as r1a;
    let mut v1 = r1::server_reflection_client::ServerReflectionClient::new(control.channel().await);
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = v1
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        resp.message_response
    else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    for svc in [
        "cowsnap.v1.VolumeService",
        "cowsnap.v1.SnapshotService",
        "cowsnap.v1.OperationService",
        "cowsnap.v1.WorkerService",
    ] {
        assert!(names.iter().any(|n| n == svc), "{svc} in {names:?}");
    }
    // Only what this server serves: not the worker API it is a client of.
    assert!(
        !names.iter().any(|n| n.starts_with("cowsnap.worker.")),
        "{names:?}"
    );
    let mut va =
        r1a::server_reflection_client::ServerReflectionClient::new(control.channel().await);
    let req = r1a::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            r1a::server_reflection_request::MessageRequest::FileContainingSymbol(
                "cowsnap.v1.VolumeService".into(),
            ),
        ),
    };
    let mut stream = va
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    assert!(
        matches!(
            resp.message_response,
            Some(r1a::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
        ),
        "{resp:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_matched_in_any_case() {
    let (_dir, _w, control) = setup_with_token().await;
    let mut none = control.clients_with(None).await;
    let call = |value: &str| {
        let mut r = tonic::Request::new(pb::ListVolumesRequest::default());
        r.metadata_mut()
            .insert("authorization", value.parse().unwrap());
        r
    };
    for ok in [
        "Bearer s3cret-token",
        "bearer s3cret-token",
        "BEARER s3cret-token",
        "bEaReR s3cret-token",
        "Bearer    s3cret-token",
    ] {
        none.volumes
            .list_volumes(call(ok))
            .await
            .unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    for bad in [
        "Basic s3cret-token",
        "Bearers3cret-token",
        "s3cret-token",
        "Bearer s3cret",
    ] {
        let s = code(none.volumes.list_volumes(call(bad)).await);
        assert_eq!(s.code(), Code::Unauthenticated, "{bad:?}");
    }
}

/// `GET path` on the metrics endpoint: (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_counters() {
    init_logs();
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let control = Control::start(Control::config(dir.path(), &[&w])).await;
    let mut c = control.clients().await;
    let v = c.create_volume("v1", 4 * MIB).await;
    c.create_snapshot("v1", "s1").await;
    // 64 KiB written over NBD: four 16 KiB chunks copied on write.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 64k", &v.nbd_uri])
        .output()
        .expect("qemu-io (apt-get install qemu-utils)");
    assert!(out.status.success(), "{out:?}");
    // A health check (GetWorker checks now) brings the worker's I/O figures.
    c.workers
        .get_worker(pb::GetWorkerRequest {
            name: "workers/node-a".into(),
        })
        .await
        .unwrap();
    let _ = c
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/none".into(),
        })
        .await;
    let addr = control.running().metrics.expect("metrics listen");
    let (status, body) = http_get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    for needle in [
        r#"cowsnap_control_rpc_requests_total{code="Ok",method="/cowsnap.v1.VolumeService/CreateVolume"} 1"#,
        r#"cowsnap_control_rpc_requests_total{code="NotFound",method="/cowsnap.v1.VolumeService/GetVolume"} 1"#,
        r#"cowsnap_control_rpc_duration_seconds_count{method="/cowsnap.v1.SnapshotService/CreateSnapshot"} 1"#,
        r#"cowsnap_control_operations{kind="create_volume",state="succeeded"} 1"#,
        r#"cowsnap_control_operations{kind="create_snapshot",state="succeeded"} 1"#,
        r#"cowsnap_worker_up{worker="workers/node-a"} 1"#,
        r#"cowsnap_worker_volumes{worker="workers/node-a"} 1"#,
        r#"cowsnap_snapshot_total_bytes{snapshot="volumes/v1/snapshots/s1"}"#,
        r#"cowsnap_worker_writes_total{worker="workers/node-a"} 1"#,
        r#"cowsnap_worker_written_bytes_total{worker="workers/node-a"} 65536"#,
        r#"cowsnap_worker_cow_exceptions_total{worker="workers/node-a"} 4"#,
        r#"cowsnap_worker_commits_total{worker="workers/node-a"}"#,
        r#"cowsnap_worker_exceptions_per_commit{worker="workers/node-a"}"#,
        r#"cowsnap_worker_reads_total{worker="workers/node-a"}"#,
        r#"cowsnap_snapshot_exceptions{snapshot="volumes/v1/snapshots/s1"}"#,
    ] {
        assert!(body.contains(needle), "{needle} not in\n{body}");
    }
    let (status, _) = http_get(addr, "/other").await;
    assert!(status.contains("404"), "{status}");
}

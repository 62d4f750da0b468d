//! `cowsnap up --csi-endpoint` as a real process: the CSI driver answers on
//! its unix socket next to the `cowsnap.v1` API; a second process does not
//! take over a live socket; after `kill -9` the stale socket is replaced;
//! a clean stop removes it.

mod up_common;

use std::path::Path;

use cowsnap_proto::csi::v1 as csi;
use tonic::transport::Channel;
use up_common::*;

async fn csi_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://csi.test")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

async fn plugin_name(sock: &Path) -> String {
    csi::identity_client::IdentityClient::new(csi_channel(sock).await)
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_csi_and_takes_over_only_a_stale_socket() {
    let dir = scratch();
    let sock = dir.path().join("csi").join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let mut up = Up::start_with_env(
        &dir.path().join("a"),
        &[("COWSNAP_CSI_ENDPOINT", endpoint.as_str())],
    );
    up.ready().await;
    assert_eq!(plugin_name(&sock).await, "csi.cowsnap.io");

    // A volume made through CSI is the cowsnap.v1 API's too.
    let mut c = csi::controller_client::ControllerClient::new(csi_channel(&sock).await);
    let v = c
        .create_volume(csi::CreateVolumeRequest {
            name: "pvc-from-csi".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: (4 * MIB) as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![csi::VolumeCapability {
                access_type: Some(csi::volume_capability::AccessType::Block(
                    csi::volume_capability::BlockVolume {},
                )),
                access_mode: Some(csi::volume_capability::AccessMode {
                    mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "pvc-from-csi");
    let states = up.clients().await.states().await;
    assert!(
        states.iter().any(|(n, _)| n == "volumes/pvc-from-csi"),
        "{states:?}"
    );

    // Another process on the same endpoint fails at once, naming it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .arg("up")
        .arg("--data-dir")
        .arg(dir.path().join("b"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--nbd-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--csi-endpoint", &endpoint])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("serving on it already"), "{stderr}");
    assert_eq!(plugin_name(&sock).await, "csi.cowsnap.io", "still served");

    // kill -9 leaves the socket file behind; the next start replaces it.
    up.kill9();
    assert!(sock.exists());
    up.restart().await;
    assert_eq!(plugin_name(&sock).await, "csi.cowsnap.io");
    assert!(up.terminate().success());
    assert!(!sock.exists(), "a clean stop removes the socket");
}

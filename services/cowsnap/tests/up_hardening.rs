//! Who may read what `cowsnap up` keeps: whatever the umask, everything
//! under its data dir is its owner's alone (files 0600, directories 0700),
//! and a token file other users can read is warned about (and still used).

mod up_common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cowsnap_proto::cowsnap::v1 as pb;
use up_common::*;

/// Every entry under `dir`, `dir` included: (path, mode, is a directory).
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32, bool)>) {
    let meta = std::fs::symlink_metadata(dir).unwrap();
    out.push((dir.to_path_buf(), meta.mode() & 0o7777, meta.is_dir()));
    if meta.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            walk(&e.unwrap().path(), out);
        }
    }
}

/// Checks the modes under `data`; returns the names of the files seen.
fn assert_private(data: &Path, umask: u32) -> Vec<String> {
    let mut seen = Vec::new();
    walk(data, &mut seen);
    let mut files = Vec::new();
    for (path, mode, is_dir) in &seen {
        if *is_dir {
            assert_eq!(
                *mode,
                0o700,
                "umask {umask:03o}: directory {} is {mode:04o}",
                path.display()
            );
        } else {
            assert_eq!(
                mode & 0o177,
                0,
                "umask {umask:03o}: {} is {mode:04o}, not 0600 or stricter",
                path.display()
            );
            files.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_its_owners_alone_whatever_the_umask() {
    for umask in [0o000, 0o022] {
        let tmp = scratch();
        let data = tmp.path().join("data");
        let mut up = Up::start_with(&data, &[], Some(umask));
        up.ready().await;
        let mut api = up.clients().await;
        api.volumes
            .create_volume(pb::CreateVolumeRequest {
                volume_id: "v1".into(),
                volume: Some(pb::Volume {
                    size_bytes: 4 * MIB,
                    labels: [("team".to_string(), "secret".to_string())].into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        api.snapshots
            .create_snapshot(pb::CreateSnapshotRequest {
                parent: "volumes/v1".into(),
                snapshot_id: "s1".into(),
                snapshot: None,
            })
            .await
            .unwrap();
        let files = assert_private(&data, umask);
        for f in [
            "catalog.db",
            "state.json",
            "v1.vol",
            "v1.s1.cow",
            "worker.sock",
        ] {
            assert!(files.iter().any(|x| x == f), "{f} in {files:?}");
        }
        let sock = std::fs::symlink_metadata(data.join("worker.sock")).unwrap();
        assert!(sock.file_type().is_socket());
        // And after a clean stop (state saved again, WAL checkpointed).
        assert!(up.terminate().success(), "{}", up.log_text());
        assert_private(&data, umask);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_others_can_read_is_warned_about_and_still_used() {
    const WARNING: &str = "the auth token file is open to other users (mode 0644)";
    let tmp = scratch();
    let token = tmp.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = tmp.path().join("data");
    let mut up = Up::start_with_env(
        &data,
        &[("COWSNAP_AUTH_TOKEN_FILE", token.to_str().unwrap())],
    );
    up.ready().await;
    assert_eq!(
        up.log_text().matches(WARNING).count(),
        1,
        "{}",
        up.log_text()
    );
    let mut api = up.clients().await;
    let mut req = tonic::Request::new(pb::ListVolumesRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer t0ken".parse().unwrap());
    api.volumes.list_volumes(req).await.unwrap();
    let e = api
        .volumes
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(up.terminate().success());

    // 0600: no warning.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    up.restart().await;
    assert!(up.terminate().success());
    assert_eq!(
        up.log_text().matches("auth token file is open").count(),
        1,
        "{}",
        up.log_text()
    );
}

//! The CSI node path for real, through `cowsnap up --csi-endpoint` (and
//! once `cowsnap worker --csi-endpoint`) as a child process: volumes made
//! by the CSI Controller, staged and published
//! by the CSI Node service (nbdfuse + loop device + bind mounts), data
//! checked over NBD with qemu-io and through the file system; a kill -9
//! between stage and publish; and at the end nothing of the test left
//! mounted (`/proc/self/mountinfo`), attached (`losetup -a`) or running
//! (nbdfuse). Needs root, /dev/fuse, loop devices, nbdfuse, qemu-io,
//! mkfs.ext4.

mod up_common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cowsnap_proto::bad_request::field_violation;
use cowsnap_proto::csi::v1 as csi;
use tonic::transport::Channel;
use up_common::{MIB, Up, scratch};

/// A `cowsnap up` serving CSI, with a kubelet dir of its own. Fields drop
/// in order: the process is killed, then whatever it left under the
/// scratch dir is released, then the dir is removed.
struct Rig {
    up: Up,
    _release: Release,
    socket: PathBuf,
    kubelet: PathBuf,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn start() -> Rig {
        Rig::start_with(scratch(), &[]).await
    }

    /// A rig in `dir`, `cowsnap up` given `extra` environment too.
    async fn start_with(dir: tempfile::TempDir, extra: &[(&str, String)]) -> Rig {
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        let socket = dir.path().join("csi.sock");
        let mut env = vec![
            (
                "COWSNAP_CSI_ENDPOINT",
                format!("unix://{}", socket.display()),
            ),
            ("COWSNAP_KUBELET_DIR", kubelet.display().to_string()),
        ];
        env.extend(extra.iter().cloned());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut up = Up::start_with_env(&dir.path().join("data"), &env);
        up.ready().await;
        let rig = Rig {
            up,
            _release: Release(dir.path().to_path_buf()),
            socket,
            kubelet,
            dir,
        };
        rig.wait_for_csi().await;
        rig
    }

    /// Waits until the CSI endpoint answers NodeGetInfo: it serves only
    /// once the node plugin has brought its staged volumes back.
    async fn wait_for_csi(&self) {
        for _ in 0..600 {
            if let Ok(s) = tokio::net::UnixStream::connect(&self.socket).await {
                drop(s);
                let mut n = self.node().await;
                if n.node_get_info(csi::NodeGetInfoRequest {}).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no CSI endpoint:\n{}", self.up.log_text());
    }

    async fn restart(&mut self) {
        self.up.restart().await;
        self.wait_for_csi().await;
    }

    fn path(&self, rel: &str) -> String {
        self.kubelet.join(rel).display().to_string()
    }

    async fn channel(&self) -> Channel {
        let path = self.socket.clone();
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

    async fn controller(&self) -> csi::controller_client::ControllerClient<Channel> {
        csi::controller_client::ControllerClient::new(self.channel().await)
    }

    async fn node(&self) -> csi::node_client::NodeClient<Channel> {
        csi::node_client::NodeClient::new(self.channel().await)
    }

    /// Creates a volume through the Controller, repeating while it answers
    /// ABORTED (a restore still being made usable).
    async fn create_volume(&self, req: csi::CreateVolumeRequest) -> csi::Volume {
        let mut c = self.controller().await;
        for _ in 0..600 {
            match c.create_volume(req.clone()).await {
                Ok(r) => return r.into_inner().volume.unwrap(),
                Err(s) if s.code() == tonic::Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => panic!("CreateVolume {}: {s}", req.name),
            }
        }
        panic!("CreateVolume {} never finished", req.name);
    }

    fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.up.nbd())
    }

    /// Nothing of this test is mounted, attached or running.
    fn assert_nothing_left(&self) {
        let root = self.dir.path();
        assert_eq!(mounts_under(root), Vec::<PathBuf>::new(), "left mounted");
        assert_eq!(loops_under(root), Vec::<String>::new(), "left attached");
        assert_eq!(
            nbdfuse_under(root),
            Vec::<u32>::new(),
            "nbdfuse left running"
        );
    }
}

fn capability(fs: Option<&str>) -> csi::VolumeCapability {
    use csi::volume_capability::{
        AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
    };
    csi::VolumeCapability {
        access_type: Some(match fs {
            Some(fs) => AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            }),
            None => AccessType::Block(BlockVolume {}),
        }),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create(name: &str, fs: Option<&str>) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: (64 * MIB) as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(fs)],
        ..Default::default()
    }
}

fn stage(vol: &str, staging: &str, fs: Option<&str>) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(capability(fs)),
        ..Default::default()
    }
}

fn publish(
    vol: &str,
    staging: &str,
    target: &str,
    fs: Option<&str>,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(capability(fs)),
        ..Default::default()
    }
}

async fn stage_publish(
    n: &mut csi::node_client::NodeClient<Channel>,
    vol: &str,
    staging: &str,
    target: &str,
    fs: Option<&str>,
) {
    n.node_stage_volume(stage(vol, staging, fs)).await.unwrap();
    n.node_publish_volume(publish(vol, staging, target, fs))
        .await
        .unwrap();
}

async fn unpublish_unstage(
    n: &mut csi::node_client::NodeClient<Channel>,
    vol: &str,
    staging: &str,
    target: &str,
) {
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.into(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.into(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_block_volume_written_through_its_published_device_reads_back_over_nbd() {
    let rig = Rig::start().await;
    let vol = rig.create_volume(create("pvc-blk", None)).await.volume_id;
    let mut n = rig.node().await;
    let info = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let topo = info.accessible_topology.unwrap().segments;
    assert_eq!(topo.get("topology.cowsnap.io/node"), Some(&info.node_id));
    let (staging, target) = (rig.path("staging/blk"), rig.path("pods/p/blk"));
    stage_publish(&mut n, &vol, &staging, &target, None).await;
    write_device(&target, 5 * MIB, 0x5a).await;
    // Read over NBD while it is still published, then again after.
    qemu_io(
        &rig.nbd_uri(&format!("volumes/{vol}")),
        "read -P 0x5a 5M 1M",
    );
    unpublish_unstage(&mut n, &vol, &staging, &target).await;
    qemu_io(
        &rig.nbd_uri(&format!("volumes/{vol}")),
        "read -P 0x5a 5M 1M",
    );
    qemu_io(&rig.nbd_uri(&format!("volumes/{vol}")), "read -P 0 0 5M");
    rig.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_outlives_snapshot_and_restore_into_a_new_volume() {
    let rig = Rig::start().await;
    let src = rig
        .create_volume(create("pvc-src", Some("ext4")))
        .await
        .volume_id;
    let mut n = rig.node().await;
    let (staging, target) = (rig.path("staging/src"), rig.path("pods/p/src"));
    stage_publish(&mut n, &src, &staging, &target, Some("ext4")).await;
    write_synced(&Path::new(&target).join("data.txt"), b"before the snapshot");
    unpublish_unstage(&mut n, &src, &staging, &target).await;

    let snap = rig
        .controller()
        .await
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "snap-1".into(),
            source_volume_id: src.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    let mut req = create("pvc-restored", Some("ext4"));
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored = rig.create_volume(req).await.volume_id;
    let (staging2, target2) = (rig.path("staging/restored"), rig.path("pods/q/restored"));
    stage_publish(&mut n, &restored, &staging2, &target2, Some("ext4")).await;
    let text = std::fs::read(Path::new(&target2).join("data.txt")).unwrap();
    assert_eq!(text, b"before the snapshot");
    unpublish_unstage(&mut n, &restored, &staging2, &target2).await;
    rig.assert_nothing_left();
}

/// Bytes of the file system mounted at `path` (statvfs: blocks × size).
fn fs_bytes(path: &str) -> u64 {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: statvfs fills the zeroed struct; `c` is NUL-terminated.
    let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut v) },
        0,
        "statvfs {path}"
    );
    v.f_blocks as u64 * v.f_frsize as u64
}

fn grow_to(vol: &str, bytes: u64, fs: Option<&str>) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: vol.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        volume_capability: Some(capability(fs)),
        ..Default::default()
    }
}

fn node_grow(vol: &str, path: &str, bytes: u64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: vol.into(),
        volume_path: path.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

/// Offline expansion as Kubernetes drives it: the controller grows a
/// volume that has a snapshot while it is not published, the next stage
/// grows its file system (NodeExpandVolume then finds nothing left to do),
/// the snapshot keeps its size, a restore into a larger volume gets a grown
/// file system too, and a node asked to grow a device attached before the
/// volume grew says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_with_a_snapshot_grows_and_its_file_system_follows() {
    let rig = Rig::start().await;
    let mut c = rig.controller().await;
    let vol = rig
        .create_volume(create("pvc-grow", Some("ext4")))
        .await
        .volume_id;
    let mut n = rig.node().await;
    let (staging, target) = (rig.path("staging/grow"), rig.path("pods/p/grow"));
    stage_publish(&mut n, &vol, &staging, &target, Some("ext4")).await;
    write_synced(&Path::new(&target).join("data.txt"), b"before the grow");
    let small = fs_bytes(&target);
    assert!(small < 64 * MIB, "{small}");
    unpublish_unstage(&mut n, &vol, &staging, &target).await;
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "snap-grow".into(),
            source_volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.size_bytes, (64 * MIB) as i64);

    let r = c
        .controller_expand_volume(grow_to(&vol, 128 * MIB - 1000, Some("ext4")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, (128 * MIB) as i64, "rounded up");
    assert!(r.node_expansion_required);
    // Repeated, or asked for less: nothing changes (volumes never shrink).
    for ask in [128 * MIB, 32 * MIB] {
        let r = c
            .controller_expand_volume(grow_to(&vol, ask, Some("ext4")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, (128 * MIB) as i64);
    }
    let mut over = grow_to(&vol, 256 * MIB, None);
    over.capacity_range.as_mut().unwrap().limit_bytes = (200 * MIB) as i64;
    let e = c.controller_expand_volume(over).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");

    stage_publish(&mut n, &vol, &staging, &target, Some("ext4")).await;
    let grown = fs_bytes(&target);
    assert!(
        grown > 100 * MIB,
        "the stage grew the file system: {small} -> {grown}"
    );
    let r = n
        .node_expand_volume(node_grow(&vol, &target, 128 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, (128 * MIB) as i64);
    assert_eq!(fs_bytes(&target), grown, "nothing left to grow");
    assert_eq!(
        std::fs::read(Path::new(&target).join("data.txt")).unwrap(),
        b"before the grow"
    );
    let listed = c
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sizes: Vec<_> = listed
        .entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().size_bytes)
        .collect();
    assert_eq!(sizes, [(64 * MIB) as i64], "the snapshot kept its size");

    // Grown while published: the device was attached at 128 MiB.
    let r = c
        .controller_expand_volume(grow_to(&vol, 160 * MIB, Some("ext4")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, (160 * MIB) as i64);
    let e = n
        .node_expand_volume(node_grow(&vol, &target, 160 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("stage it again"), "{}", e.message());
    unpublish_unstage(&mut n, &vol, &staging, &target).await;

    // A restore into a larger volume: made at the snapshot's size, grown,
    // and its file system grown at stage.
    let mut req = create("pvc-grow-restored", Some("ext4"));
    req.capacity_range.as_mut().unwrap().required_bytes = (96 * MIB) as i64;
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored = rig.create_volume(req).await;
    assert_eq!(restored.capacity_bytes, (96 * MIB) as i64);
    let restored = restored.volume_id;
    let (staging2, target2) = (rig.path("staging/grown"), rig.path("pods/q/grown"));
    stage_publish(&mut n, &restored, &staging2, &target2, Some("ext4")).await;
    let restored_fs = fs_bytes(&target2);
    assert!(restored_fs > 80 * MIB, "{restored_fs}");
    assert_eq!(
        std::fs::read(Path::new(&target2).join("data.txt")).unwrap(),
        b"before the grow"
    );
    unpublish_unstage(&mut n, &restored, &staging2, &target2).await;
    rig.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_after_kill9_between_stage_and_publish_finds_the_staged_volume() {
    let mut rig = Rig::start().await;
    let vol = rig
        .create_volume(create("pvc-crash", Some("ext4")))
        .await
        .volume_id;
    let (staging, target) = (rig.path("staging/crash"), rig.path("pods/p/crash"));
    {
        let mut n = rig.node().await;
        n.node_stage_volume(stage(&vol, &staging, Some("ext4")))
            .await
            .unwrap();
    }
    write_synced(
        &Path::new(&staging).join("staged.txt"),
        b"written while staged",
    );
    let loops_before = loops_under(rig.dir.path());
    assert_eq!(loops_before.len(), 1, "{loops_before:?}");

    rig.up.kill9();
    rig.restart().await;

    let mut n = rig.node().await;
    // The repeated stage (kubelet's retry) is idempotent, then publish.
    // The endpoint serves only once the plugin has recovered.
    n.node_stage_volume(stage(&vol, &staging, Some("ext4")))
        .await
        .unwrap();
    assert!(
        rig.up.log_text().contains("recovered a staged volume"),
        "{}",
        rig.up.log_text()
    );
    n.node_publish_volume(publish(&vol, &staging, &target, Some("ext4")))
        .await
        .unwrap();
    let text = std::fs::read(Path::new(&target).join("staged.txt")).unwrap();
    assert_eq!(text, b"written while staged");
    write_synced(&Path::new(&target).join("after.txt"), b"after the restart");
    let loops = loops_under(rig.dir.path());
    assert_eq!(
        loops.len(),
        1,
        "one attachment after the restart: {loops:?}"
    );
    assert_eq!(nbdfuse_under(rig.dir.path()).len(), 1);
    unpublish_unstage(&mut n, &vol, &staging, &target).await;
    rig.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_published_block_volume_works_again_after_kill9() {
    let mut rig = Rig::start().await;
    let vol = rig.create_volume(create("pvc-pub", None)).await.volume_id;
    let (staging, target) = (rig.path("staging/pub"), rig.path("pods/p/pub"));
    {
        let mut n = rig.node().await;
        stage_publish(&mut n, &vol, &staging, &target, None).await;
    }
    write_device(&target, 2 * MIB, 0x11).await;
    rig.up.kill9();
    rig.restart().await;
    // The target kubelet knows works again without a new publish: the
    // restarted plugin attached the volume again and bound it there.
    write_device(&target, 3 * MIB, 0x22).await;
    qemu_io(
        &rig.nbd_uri(&format!("volumes/{vol}")),
        "read -P 0x11 2M 1M",
    );
    qemu_io(
        &rig.nbd_uri(&format!("volumes/{vol}")),
        "read -P 0x22 3M 1M",
    );
    assert_eq!(loops_under(rig.dir.path()).len(), 1);
    let mut n = rig.node().await;
    unpublish_unstage(&mut n, &vol, &staging, &target).await;
    rig.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_attaches_when_its_nbd_listener_requires_tls() {
    let dir = scratch();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    up_common::certs::make_certs(&certs);
    let file = |n: &str| certs.join(n).display().to_string();
    let rig = Rig::start_with(
        dir,
        &[
            ("COWSNAP_NBD_TLS_CERT", file("server.pem")),
            ("COWSNAP_NBD_TLS_KEY", file("server.key")),
            ("COWSNAP_NBD_TLS_CA", file("ca.pem")),
        ],
    )
    .await;
    // The node reaches its worker on a private plain-text socket: root's
    // alone, while the TCP listener refuses plain clients.
    let private = rig.dir.path().join("data/worker/private");
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&private), 0o700);
    assert!(private.join("nbd.sock").exists());
    let vol = rig.create_volume(create("pvc-tls", None)).await.volume_id;
    let plain = Command::new("nbdinfo")
        .arg(rig.nbd_uri(&format!("volumes/{vol}")))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plain client is refused on TCP");
    let mut n = rig.node().await;
    let (staging, target) = (rig.path("staging/tls"), rig.path("pods/p/tls"));
    stage_publish(&mut n, &vol, &staging, &target, None).await;
    write_device(&target, 5 * MIB, 0x5a).await;
    unpublish_unstage(&mut n, &vol, &staging, &target).await;
    // Read back over TLS with a client certificate, as a remote client.
    let uri = format!(
        "nbds://{}/volumes/{vol}?tls-certificates={}",
        rig.up.nbd(),
        file("client")
    );
    let out = rig.dir.path().join("back.raw");
    let copy = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        copy.status.success(),
        "nbdcopy {uri}: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let back = std::fs::read(&out).unwrap();
    assert!(
        back[5 * MIB as usize..6 * MIB as usize]
            .iter()
            .all(|&b| b == 0x5a)
    );
    assert!(back[..5 * MIB as usize].iter().all(|&b| b == 0));
    rig.assert_nothing_left();
}

/// Writes 1 MiB of `byte` at `offset` of a block device (O_DIRECT, synced).
async fn write_device(path: &str, offset: u64, byte: u8) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let buf = aligned(MIB as usize, byte);
        dev.seek(SeekFrom::Start(offset)).unwrap();
        dev.write_all(&buf.0[buf.1..buf.1 + MIB as usize]).unwrap();
        dev.sync_all().unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn cowsnap_worker_serves_identity_and_node_on_its_csi_endpoint() {
    let dir = scratch();
    let _release = Release(dir.path().to_path_buf());
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet).unwrap();
    let (grpc, nbd, socket) = (
        dir.path().join("grpc.sock"),
        dir.path().join("nbd.sock"),
        dir.path().join("csi.sock"),
    );
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .arg("worker")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--grpc-listen")
        .arg(format!("unix:{}", grpc.display()))
        .arg("--nbd-listen")
        .arg(format!("unix:{}", nbd.display()))
        .args(["--node", "Node_7.example"])
        .arg("--csi-endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--kubelet-dir")
        .arg(&kubelet)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child);
    let rig_socket = socket.clone();
    let channel = || async {
        let path = rig_socket.clone();
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
    };
    let mut ch = None;
    for _ in 0..600 {
        if let Ok(c) = channel().await {
            ch = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ch = ch.expect("the worker's CSI endpoint answers");
    let mut id = csi::identity_client::IdentityClient::new(ch.clone());
    let caps = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let controller = csi::plugin_capability::Type::Service(csi::plugin_capability::Service {
        r#type: csi::plugin_capability::service::Type::ControllerService as i32,
    });
    assert!(
        !caps.iter().any(|c| c.r#type.as_ref() == Some(&controller)),
        "a worker serves no Controller: {caps:?}"
    );
    let metadata = csi::plugin_capability::Type::Service(csi::plugin_capability::Service {
        r#type: csi::plugin_capability::service::Type::SnapshotMetadataService as i32,
    });
    assert!(
        !caps.iter().any(|c| c.r#type.as_ref() == Some(&metadata)),
        "a worker serves no SnapshotMetadata: {caps:?}"
    );
    let mut n = csi::node_client::NodeClient::new(ch);
    let info = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    // The id the control service registers this worker by.
    assert_eq!(info.node_id, "node-7-example");

    // A volume made on the worker's own API, staged and published by CSI.
    let mut w = cowsnap_proto::worker::v1::worker_service_client::WorkerServiceClient::new(
        tonic::transport::Endpoint::from_static("http://worker.test")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let p = grpc.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .unwrap(),
    );
    w.create_volume(cowsnap_proto::worker::v1::CreateVolumeRequest {
        volume_id: "wv1".into(),
        size_bytes: 32 * MIB,
        ..Default::default()
    })
    .await
    .unwrap();
    let staging = kubelet.join("staging/wv1").display().to_string();
    let target = kubelet.join("pods/p/wv1").display().to_string();
    let outside = dir.path().join("elsewhere").display().to_string();
    let e = n
        .node_stage_volume(stage("wv1", &outside, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // The field at fault travels as data (`google.rpc.BadRequest`).
    let (field, _) = field_violation(&e).expect("a field violation in the details");
    assert_eq!(field, "staging_target_path", "{e}");
    let mut bad = stage("wv1", &staging, None);
    bad.volume_capability = None;
    let e = n.node_stage_volume(bad).await.unwrap_err();
    assert_eq!(
        field_violation(&e).map(|(f, _)| f).as_deref(),
        Some("volume_capability"),
        "{e}"
    );
    let e = n
        .node_stage_volume(stage("nope", &staging, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = n
        .node_publish_volume(publish("wv1", &staging, &target, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "not staged: {e}");
    stage_publish(&mut n, "wv1", &staging, &target, None).await;
    write_device(&target, MIB, 0x77).await;
    let uri = format!("nbd+unix:///volumes/wv1?socket={}", nbd.display());
    qemu_io(&uri, "read -P 0x77 1M 1M");
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "wv1".into(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, (32 * MIB) as i64);
    unpublish_unstage(&mut n, "wv1", &staging, &target).await;
    let root = dir.path();
    assert_eq!(mounts_under(root), Vec::<PathBuf>::new(), "left mounted");
    assert_eq!(loops_under(root), Vec::<String>::new(), "left attached");
    assert_eq!(nbdfuse_under(root), Vec::<u32>::new(), "nbdfuse left");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// A buffer with `len` bytes of `byte` at a 4 KiB-aligned offset.
fn aligned(len: usize, byte: u8) -> (Vec<u8>, usize) {
    let v = vec![byte; len + 4096];
    let off = (4096 - (v.as_ptr() as usize % 4096)) % 4096;
    (v, off)
}

fn qemu_io(uri: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, uri])
        .output()
        .expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {cmd} on {uri}: {text}");
}

/// Mount points under `root`, from `/proc/self/mountinfo`.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(root))
        .collect()
}

/// Loop devices whose backing file is under `root`, from `losetup -a`.
fn loops_under(root: &Path) -> Vec<String> {
    let out = Command::new("losetup").arg("-a").output().unwrap();
    let root = root.display().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&root))
        .filter_map(|l| l.split(':').next().map(str::to_string))
        .collect()
}

/// nbdfuse processes whose command line names a path under `root`.
fn nbdfuse_under(root: &Path) -> Vec<u32> {
    let needle = root.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv0 = cmd.split(|&b| b == 0).next()?;
            (argv0.ends_with(b"nbdfuse") && cmd.windows(needle.len()).any(|w| w == needle))
                .then_some(pid)
        })
        .collect()
}

/// Releases whatever is left under its dir when dropped (a failed test):
/// lazy unmounts, innermost first; loop detaches (a loop device whose file
/// system is still mounted somewhere is freed when that goes); nbdfuse
/// killed.
struct Release(PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        // The loop devices are found by their backing files' paths, which
        // a lazy unmount of their FUSE mount would hide: list them first.
        let loops = loops_under(&self.0);
        for m in mounts_under(&self.0).iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        for l in loops {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        for pid in nbdfuse_under(&self.0) {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

//! The node plugin's operations on a real worker in this process: volumes
//! attached through nbdfuse and a loop device, file systems made and
//! mounted, bind mounts published; data checked over NBD with qemu-io.
//! Needs root, /dev/fuse, loop devices, nbdfuse, qemu-io, mkfs.ext4.

mod node_common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

use cowsnap_csi::node::error::NodeError;
use cowsnap_csi::node::publish::PublishReq;
use cowsnap_csi::node::stage::Stage;
use cowsnap_csi::node::state::Access;
use node_common::{Fixture, qemu_io};

fn ext4() -> Access {
    Access::Mount {
        fs_type: "ext4".into(),
        flags: vec![],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn block_volume_data_written_through_the_published_device_reads_back_over_nbd() {
    let f = Fixture::start().await;
    f.create_volume("blk1", 64 << 20).await;
    let node = f.node();
    let stage = Stage {
        volume: "blk1".into(),
        staging_path: f.kubelet("staging/blk1"),
        access: Access::Block,
    };
    let publish = PublishReq {
        volume: "blk1".into(),
        staging_path: stage.staging_path.clone(),
        target_path: f.kubelet("pods/p1/blk1"),
        access: Access::Block,
        readonly: false,
    };
    let (n, s, p) = (node.clone(), stage.clone(), publish.clone());
    tokio::task::spawn_blocking(move || {
        n.stage(&s).unwrap();
        n.stage(&s).unwrap(); // idempotent
        n.publish(&p).unwrap();
        n.publish(&p).unwrap(); // idempotent
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p.target_path)
            .unwrap();
        let buf = node_common::Aligned::filled(1 << 20, 0xab);
        dev.seek(SeekFrom::Start(3 << 20)).unwrap();
        dev.write_all(buf.as_slice()).unwrap();
        dev.sync_all().unwrap();
        // Published the other way at the same target: refused.
        let ro = PublishReq {
            readonly: true,
            ..p.clone()
        };
        assert!(matches!(n.publish(&ro), Err(NodeError::AlreadyExists(_))));
        // Staged as something else: refused.
        let other = Stage {
            access: ext4(),
            ..s.clone()
        };
        assert!(matches!(n.stage(&other), Err(NodeError::AlreadyExists(_))));
        // Unstage while published: the spec's precondition.
        assert!(matches!(
            n.unstage(&s.volume, &s.staging_path),
            Err(NodeError::FailedPrecondition(_))
        ));
        drop(dev);
        n.unpublish(&p.volume, &p.target_path).unwrap();
        n.unpublish(&p.volume, &p.target_path).unwrap();
        assert!(!p.target_path.exists(), "the target file is removed");
        n.unstage(&s.volume, &s.staging_path).unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
    })
    .await
    .unwrap();
    f.assert_nothing_attached();
    let out = qemu_io(
        &f.nbd_uri("volumes/blk1"),
        &["read -P 0xab 3M 1M", "read -P 0 0 3M"],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_system_is_made_once_and_its_files_outlive_unstage() {
    let f = Fixture::start().await;
    f.create_volume("fs1", 64 << 20).await;
    let node = f.node();
    let stage = Stage {
        volume: "fs1".into(),
        staging_path: f.kubelet("staging/fs1"),
        access: ext4(),
    };
    let publish = PublishReq {
        volume: "fs1".into(),
        staging_path: stage.staging_path.clone(),
        target_path: f.kubelet("pods/p1/fs1"),
        access: ext4(),
        readonly: false,
    };
    let (n, s, p) = (node.clone(), stage.clone(), publish.clone());
    tokio::task::spawn_blocking(move || {
        n.stage(&s).unwrap();
        n.publish(&p).unwrap();
        std::fs::write(p.target_path.join("hello.txt"), b"kept across stages").unwrap();
        n.unpublish(&p.volume, &p.target_path).unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
        // Staged again: blkid finds the ext4, nothing is formatted.
        n.stage(&s).unwrap();
        let ro = PublishReq {
            readonly: true,
            target_path: p.target_path.with_file_name("fs1-ro"),
            ..p.clone()
        };
        n.publish(&ro).unwrap();
        let mut text = String::new();
        std::fs::File::open(ro.target_path.join("hello.txt"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "kept across stages");
        let e = std::fs::write(ro.target_path.join("new.txt"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        n.unpublish(&ro.volume, &ro.target_path).unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
    })
    .await
    .unwrap();
    f.assert_nothing_attached();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_holding_another_file_system_is_never_formatted_over() {
    let f = Fixture::start().await;
    f.create_volume("fs2", 64 << 20).await;
    let node = f.node();
    let ext = Stage {
        volume: "fs2".into(),
        staging_path: f.kubelet("staging/fs2"),
        access: ext4(),
    };
    let (n, s) = (node.clone(), ext.clone());
    tokio::task::spawn_blocking(move || {
        n.stage(&s).unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
        let xfs = Stage {
            access: Access::Mount {
                fs_type: "xfs".into(),
                flags: vec![],
            },
            ..s.clone()
        };
        let e = n.stage(&xfs).unwrap_err();
        assert!(matches!(e, NodeError::FailedPrecondition(_)), "{e}");
        assert!(e.to_string().contains("ext4"), "{e}");
        // Nothing of the failed stage is left attached.
        assert!(!n.is_staged("fs2"));
    })
    .await
    .unwrap();
    f.assert_nothing_attached();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reopened_node_finds_its_staged_volume_and_attaches_it_again() {
    let f = Fixture::start().await;
    f.create_volume("rs1", 64 << 20).await;
    let stage = Stage {
        volume: "rs1".into(),
        staging_path: f.kubelet("staging/rs1"),
        access: ext4(),
    };
    let publish = PublishReq {
        volume: "rs1".into(),
        staging_path: stage.staging_path.clone(),
        target_path: f.kubelet("pods/p1/rs1"),
        access: ext4(),
        readonly: false,
    };
    let first = f.node();
    let s = stage.clone();
    tokio::task::spawn_blocking(move || {
        first.stage(&s).unwrap();
        std::fs::write(s.staging_path.join("before"), b"1").unwrap();
    })
    .await
    .unwrap();
    // A second plugin on the same data dir (as after a restart) attaches
    // the volume again and publishes it.
    let second = f.node();
    let (n, s, p) = (second.clone(), stage.clone(), publish.clone());
    tokio::task::spawn_blocking(move || {
        n.recover().unwrap();
        assert!(n.is_staged("rs1"));
        n.publish(&p).unwrap();
        assert_eq!(std::fs::read(p.target_path.join("before")).unwrap(), b"1");
        n.unpublish(&p.volume, &p.target_path).unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
    })
    .await
    .unwrap();
    f.assert_nothing_attached();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_stage_attaches_again_when_nbdfuse_was_killed() {
    let f = Fixture::start().await;
    f.create_volume("kl1", 64 << 20).await;
    let node = f.node();
    let stage = Stage {
        volume: "kl1".into(),
        staging_path: f.kubelet("staging/kl1"),
        access: ext4(),
    };
    let publish = PublishReq {
        volume: "kl1".into(),
        staging_path: stage.staging_path.clone(),
        target_path: f.kubelet("pods/p1/kl1"),
        access: ext4(),
        readonly: false,
    };
    let root = f.dir.path().to_path_buf();
    let (n, s, p) = (node.clone(), stage.clone(), publish.clone());
    tokio::task::spawn_blocking(move || {
        n.stage(&s).unwrap();
        std::fs::write(s.staging_path.join("kept"), b"on the volume").unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
        n.stage(&s).unwrap();
        let killed = node_common::nbdfuse_under(&root);
        assert_eq!(killed.len(), 1, "{killed:?}");
        // SAFETY: kill has no memory effects; the pid is this test's nbdfuse.
        unsafe { libc::kill(killed[0] as i32, libc::SIGKILL) };
        // Gone once it has exited (a zombie has no command line).
        for _ in 0..500 {
            if node_common::nbdfuse_under(&root).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // kubelet's repeated stage finds the attachment gone and remakes it.
        n.stage(&s).unwrap();
        let now = node_common::nbdfuse_under(&root);
        assert_eq!(now.len(), 1, "{now:?}");
        assert_ne!(now, killed);
        n.publish(&p).unwrap();
        assert_eq!(
            std::fs::read(p.target_path.join("kept")).unwrap(),
            b"on the volume"
        );
        n.unpublish(&p.volume, &p.target_path).unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
    })
    .await
    .unwrap();
    f.assert_nothing_attached();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_block_publish_refuses_writes_and_reads_the_volume() {
    let f = Fixture::start().await;
    f.create_volume("ro1", 64 << 20).await;
    qemu_io(&f.nbd_uri("volumes/ro1"), &["write -P 0x3c 0 1M"]);
    let node = f.node();
    let stage = Stage {
        volume: "ro1".into(),
        staging_path: f.kubelet("staging/ro1"),
        access: Access::Block,
    };
    let ro = PublishReq {
        volume: "ro1".into(),
        staging_path: stage.staging_path.clone(),
        target_path: f.kubelet("pods/p1/ro1"),
        access: Access::Block,
        readonly: true,
    };
    let (n, s, p) = (node.clone(), stage.clone(), ro.clone());
    tokio::task::spawn_blocking(move || {
        n.stage(&s).unwrap();
        n.publish(&p).unwrap();
        n.publish(&p).unwrap(); // idempotent
        // The kernel opens a read-only block device for writing, and
        // fails every write to it.
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.target_path)
            .unwrap();
        let e = dev.write_all(&[0u8; 4096]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        drop(dev);
        let mut buf = vec![0u8; 4096];
        std::fs::File::open(&p.target_path)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0x3c));
        n.unpublish(&p.volume, &p.target_path).unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
    })
    .await
    .unwrap();
    f.assert_nothing_attached();
    qemu_io(&f.nbd_uri("volumes/ro1"), &["read -P 0x3c 0 1M"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_xfs_volume_is_made_mounted_and_published() {
    let f = Fixture::start().await;
    // mkfs.xfs wants at least 300 MB; the device file is sparse.
    f.create_volume("xfs1", 512 << 20).await;
    let node = f.node();
    let xfs = Access::Mount {
        fs_type: "xfs".into(),
        flags: vec!["noatime".into()],
    };
    let stage = Stage {
        volume: "xfs1".into(),
        staging_path: f.kubelet("staging/xfs1"),
        access: xfs.clone(),
    };
    let publish = PublishReq {
        volume: "xfs1".into(),
        staging_path: stage.staging_path.clone(),
        target_path: f.kubelet("pods/p1/xfs1"),
        access: xfs,
        readonly: false,
    };
    let (n, s, p) = (node.clone(), stage.clone(), publish.clone());
    tokio::task::spawn_blocking(move || {
        n.stage(&s).unwrap();
        let m = cowsnap_csi::node::mounts::mounted_at(&s.staging_path)
            .unwrap()
            .unwrap();
        assert_eq!(m.fs_type, "xfs");
        assert!(m.options.iter().any(|o| o == "noatime"), "{m:?}");
        n.publish(&p).unwrap();
        std::fs::write(p.target_path.join("x"), b"on xfs").unwrap();
        assert_eq!(std::fs::read(s.staging_path.join("x")).unwrap(), b"on xfs");
        n.unpublish(&p.volume, &p.target_path).unwrap();
        n.unstage(&s.volume, &s.staging_path).unwrap();
    })
    .await
    .unwrap();
    f.assert_nothing_attached();
}

/// The kernel NBD client's handshake (what it hands the kernel) against
/// the real worker: the export's size and transmission flags; an unknown
/// export is refused by name. The kernel side runs in .ci/kernel-nbd.sh.
#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_clients_handshake_learns_the_export_from_a_real_worker() {
    use cowsnap_csi::node::kernel_nbd;
    use cowsnap_worker::nbd::proto;
    let f = Fixture::start().await;
    f.create_volume("k1", 8 << 20).await;
    let addr = f.nbd();
    let (fd, info) =
        tokio::task::spawn_blocking(move || kernel_nbd::open_export(&addr, "volumes/k1").unwrap())
            .await
            .unwrap();
    drop(fd);
    assert_eq!(info.size, 8 << 20);
    for flag in [
        proto::FLAG_HAS_FLAGS,
        proto::FLAG_SEND_FLUSH,
        proto::FLAG_SEND_FUA,
    ] {
        assert_ne!(info.flags & flag, 0, "flag {flag:#x} in {:#x}", info.flags);
    }
    assert_eq!(info.flags & proto::FLAG_READ_ONLY, 0);
    let addr = f.nbd();
    let e = tokio::task::spawn_blocking(move || kernel_nbd::open_export(&addr, "volumes/none"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("volumes/none refused"), "{e}");
}

//! Which volume capabilities cowsnap volumes have: block, or a file system
//! (ext4, xfs, or the node's default) with any mount flags, on one node at
//! a time. A volume is one NBD export attached to one node, so multi-node
//! access modes are refused.

use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::names::quote;
use csi::volume_capability::AccessType;
use csi::volume_capability::access_mode::Mode;

/// The file systems a mount capability may ask for ("" is the default,
/// ext4).
pub const FS_TYPES: [&str; 3] = ["", "ext4", "xfs"];

/// Checks every capability; `Err` says what is not supported (the caller
/// makes it INVALID_ARGUMENT, or an unconfirmed validation).
pub fn check(caps: &[csi::VolumeCapability]) -> Result<(), String> {
    if caps.is_empty() {
        return Err("volume_capabilities: at least one is required".into());
    }
    caps.iter().try_for_each(check_one)
}

fn check_one(cap: &csi::VolumeCapability) -> Result<(), String> {
    match &cap.access_type {
        None => return Err("a volume capability has neither block nor mount".into()),
        Some(AccessType::Block(_)) => {}
        Some(AccessType::Mount(m)) => {
            if !FS_TYPES.contains(&m.fs_type.as_str()) {
                return Err(format!(
                    "file system {} is not supported (ext4 or xfs)",
                    quote(&m.fs_type)
                ));
            }
        }
    }
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or("a volume capability has no access mode")?
        .mode;
    match Mode::try_from(mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => Ok(()),
        Ok(
            m @ (Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter),
        ) => Err(format!(
            "access mode {} is not supported: a cowsnap volume is used from one node at a time",
            m.as_str_name()
        )),
        Ok(Mode::Unknown) | Err(_) => Err(format!("access mode {mode} is not a valid one")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(access: AccessType, mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(access),
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        })
    }

    #[test]
    fn single_node_block_and_mount_are_accepted() {
        let block = AccessType::Block(csi::volume_capability::BlockVolume {});
        assert!(check(&[cap(block, Mode::SingleNodeWriter)]).is_ok());
        for fs in FS_TYPES {
            assert!(
                check(&[cap(mount(fs), Mode::SingleNodeReaderOnly)]).is_ok(),
                "{fs}"
            );
        }
    }

    #[test]
    fn the_rest_is_refused_with_a_reason() {
        let e = check(&[cap(mount("ext4"), Mode::MultiNodeMultiWriter)]).unwrap_err();
        assert!(e.contains("MULTI_NODE_MULTI_WRITER"), "{e}");
        let e = check(&[cap(mount("btrfs"), Mode::SingleNodeWriter)]).unwrap_err();
        assert!(e.contains("btrfs"), "{e}");
        assert!(check(&[]).is_err());
        assert!(check(&[cap(mount(""), Mode::Unknown)]).is_err());
        let mut c = cap(mount(""), Mode::SingleNodeWriter);
        c.access_type = None;
        assert!(check(&[c]).is_err());
        let mut c = cap(mount(""), Mode::SingleNodeWriter);
        c.access_mode = None;
        assert!(check(&[c]).is_err());
    }
}

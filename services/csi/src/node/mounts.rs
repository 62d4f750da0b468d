//! Mounts on this node: reading `/proc/self/mountinfo`, and the `mount`,
//! `umount`, `mkfs` and `blkid` commands the node runs, each failing with
//! the command, its target and its stderr.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{NodeError, Result};

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The mounted device or source (`/dev/loop3`, `nbdfuse`, ...).
    pub source: String,
    pub fs_type: String,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub options: Vec<String>,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(l[4])),
                source: unescape(r[1]),
                fs_type: r[0].to_string(),
                options: l[5].split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Every mount of this process's namespace.
pub fn mount_table() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| NodeError::internal(format!("/proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mounted_at(path: &Path) -> Result<Option<MountEntry>> {
    Ok(mount_table()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path))
}

/// Runs `cmd`, failing with its name, arguments and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| NodeError::internal(format!("{what}: cannot run: {e}")))?;
    if !out.status.success() {
        return Err(NodeError::internal(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Mounts the file system on `device` at `target`.
pub fn mount_fs(device: &Path, target: &Path, fs_type: &str, flags: &[String]) -> Result<()> {
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fs_type);
    if !flags.is_empty() {
        cmd.arg("-o").arg(flags.join(","));
    }
    run(cmd.arg(device).arg(target)).map(drop)
}

/// Bind-mounts `source` on `target`, then makes the bind read-only and
/// adds `flags` if asked (a bind takes its flags only on a remount).
pub fn bind(source: &Path, target: &Path, readonly: bool, flags: &[String]) -> Result<()> {
    run(Command::new("mount").arg("--bind").arg(source).arg(target))?;
    let mut opts = vec!["remount".to_string(), "bind".to_string()];
    if readonly {
        opts.push("ro".into());
    }
    opts.extend(flags.iter().cloned());
    if opts.len() == 2 {
        return Ok(());
    }
    run(Command::new("mount")
        .arg("-o")
        .arg(opts.join(","))
        .arg(target))
    .map(drop)
    .inspect_err(|_| {
        let _ = unmount(target);
    })
}

/// Unmounts every mount stacked at `target`; nothing mounted there is fine.
pub fn unmount(target: &Path) -> Result<()> {
    while mounted_at(target)?.is_some() {
        run(Command::new("umount").arg(target))?;
    }
    Ok(())
}

/// The file system type `blkid` finds on `device`, `None` when it finds
/// nothing at all (exit status 2): only then may the node make one.
pub fn probe_fs(device: &Path) -> Result<Option<String>> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .map_err(|e| NodeError::internal(format!("blkid {}: cannot run: {e}", device.display())))?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if t.is_empty() {
                // Something (a partition table, a RAID member...) but no
                // file system type: not empty, so never formatted over.
                Err(NodeError::FailedPrecondition(format!(
                    "{} holds data blkid cannot name as a file system; not formatting it",
                    device.display()
                )))
            } else {
                Ok(Some(t))
            }
        }
        Some(2) => Ok(None),
        _ => Err(NodeError::internal(format!(
            "blkid -p {} failed ({}): {}",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Makes a `fs_type` file system on `device` (quietly, whole device).
pub fn mkfs(device: &Path, fs_type: &str) -> Result<()> {
    let mut cmd = Command::new(format!("mkfs.{fs_type}"));
    match fs_type {
        "ext4" | "ext3" | "ext2" => cmd.args(["-q", "-F"]),
        "xfs" => cmd.arg("-q"),
        other => {
            return Err(NodeError::invalid(
                "volume_capability.mount.fs_type",
                format!("file system type {other:?} is not supported (ext4, ext3, ext2, xfs)"),
            ));
        }
    };
    run(cmd.arg(device)).map(drop)
}

/// Grows the `fs_type` file system on `device` (of `device_bytes`) to the
/// whole device. Called before the staging mount (`mounted_at` `None`) and
/// after it: an ext2/3/4 file system smaller than its device grows
/// unmounted (`e2fsck -f -p`, then `resize2fs`: the online resize ioctl
/// needs CAP_SYS_RESOURCE, which a node plugin may lack), or mounted with
/// `resize2fs` when it was already mounted; xfs grows only mounted
/// (`xfs_growfs -d`). One that fills its device already is left alone.
pub fn grow_fs(
    device: &Path,
    device_bytes: u64,
    fs_type: &str,
    mounted_at: Option<&Path>,
) -> Result<()> {
    match (fs_type, mounted_at) {
        ("ext4" | "ext3" | "ext2", _) => {
            let (blocks, block) = ext_geometry(device)?;
            if (blocks + 1) * block > device_bytes {
                return Ok(());
            }
            if mounted_at.is_none() {
                e2fsck_preen(device)?;
            }
            tracing::info!(device = %device.display(), from = blocks * block, to = device_bytes, "growing the file system to its device");
            run(Command::new("resize2fs").arg(device)).map(drop)
        }
        ("xfs", None) => Ok(()),
        ("xfs", Some(m)) => run(Command::new("xfs_growfs").arg("-d").arg(m)).map(drop),
        (other, _) => Err(NodeError::internal(format!(
            "file system type {other:?} cannot be grown (ext4, ext3, ext2, xfs)"
        ))),
    }
}

/// (block count, block size) of the ext2/3/4 file system on `device`
/// (`dumpe2fs -h`).
fn ext_geometry(device: &Path) -> Result<(u64, u64)> {
    let text = run(Command::new("dumpe2fs").arg("-h").arg(device))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                NodeError::internal(format!("dumpe2fs -h {}: no {name:?}", device.display()))
            })
    };
    Ok((field("Block count:")?, field("Block size:")?))
}

/// `e2fsck -f -p`: what resize2fs wants of an unmounted file system first.
/// Exit 1 (errors corrected) is fine; more is an error.
fn e2fsck_preen(device: &Path) -> Result<()> {
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(device)
        .output()
        .map_err(|e| {
            NodeError::internal(format!("e2fsck {}: cannot run: {e}", device.display()))
        })?;
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(NodeError::FailedPrecondition(format!(
            "e2fsck -f -p {} found errors it cannot fix ({}): {}; not growing the file system",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 7:3 / /var/lib/kubelet/x ro,relatime shared:2 - xfs /dev/loop3 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].source, "/dev/root");
        assert!(!m[0].read_only());
        assert_eq!(m[1].fs_type, "xfs");
        assert_eq!(m[1].source, "/dev/loop3");
        assert!(m[1].read_only());
    }

    /// An ext4 image grown unmounted to its (larger) file, then left alone
    /// once it fills it. Needs mkfs.ext4, e2fsck, resize2fs and dumpe2fs.
    #[test]
    fn an_ext4_file_system_grows_to_its_device_once() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(16 << 20).unwrap();
        mkfs(&img, "ext4").unwrap();
        let (blocks, block) = ext_geometry(&img).unwrap();
        assert_eq!(blocks * block, 16 << 20);
        f.set_len(32 << 20).unwrap();
        grow_fs(&img, 32 << 20, "ext4", None).unwrap();
        let (blocks, block) = ext_geometry(&img).unwrap();
        assert_eq!(blocks * block, 32 << 20);
        let before = std::fs::read(&img).unwrap();
        grow_fs(&img, 32 << 20, "ext4", None).unwrap();
        assert!(
            std::fs::read(&img).unwrap() == before,
            "a full-size file system is left alone"
        );
    }
}

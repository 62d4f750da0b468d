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

/// Grows the `fs_type` file system of `device`, mounted at `mount_point`,
/// to the whole device, online (resize2fs on a mounted ext file system,
/// xfs_growfs on the mount point). One that fills the device already is
/// left as it is (both tools succeed without a change).
pub fn grow_fs(device: &Path, mount_point: &Path, fs_type: &str) -> Result<()> {
    match fs_type {
        "ext4" | "ext3" | "ext2" => run(Command::new("resize2fs").arg(device)).map(drop),
        "xfs" => run(Command::new("xfs_growfs").arg("-d").arg(mount_point)).map(drop),
        other => Err(NodeError::internal(format!(
            "file system type {other:?} cannot be grown (ext4, ext3, ext2, xfs)"
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
}

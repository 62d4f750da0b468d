//! The status line `dmsetup status` prints for a snapshot target, from a
//! store's usage.

use crate::pstore::Usage;

/// `0 <origin sectors> snapshot <allocated>/<total> <metadata>`, or
/// `... snapshot Invalid` for an invalid snapshot: exactly what the kernel
/// prints for the same COW device. Without the origin size, just the part
/// after the target name.
pub fn dm_status_line(origin_sectors: Option<u64>, usage: Option<Usage>) -> String {
    let body = match usage {
        Some(u) => format!(
            "{}/{} {}",
            u.allocated_sectors, u.total_sectors, u.metadata_sectors
        ),
        None => "Invalid".to_string(),
    };
    match origin_sectors {
        Some(len) => format!("0 {len} snapshot {body}"),
        None => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_dmsetup() {
        let u = Usage {
            allocated_sectors: 16,
            total_sectors: 32768,
            metadata_sectors: 16,
        };
        assert_eq!(
            dm_status_line(Some(131072), Some(u)),
            "0 131072 snapshot 16/32768 16"
        );
        assert_eq!(
            dm_status_line(Some(131072), None),
            "0 131072 snapshot Invalid"
        );
        assert_eq!(dm_status_line(None, Some(u)), "16/32768 16");
    }
}

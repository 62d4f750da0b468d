//! The parameters cowsnap takes from a StorageClass (CreateVolume) and a
//! VolumeSnapshotClass (CreateSnapshot), and how a `capacity_range`
//! becomes a volume size.
//!
//! StorageClass keys:
//! - `chunkSectors`: the chunk size of the volume's snapshots, in 512-byte
//!   sectors (a power of two from 8 to 1024; default 32, i.e. 16 KiB), as
//!   `cowsnap.v1` `Volume.chunk_sectors`;
//! - `cowSizeBytes`: the COW reserve each snapshot of the volume gets, in
//!   bytes (a multiple of 4096; default 0: large enough never to overflow),
//!   as `cowsnap.v1` `Snapshot.cow_size_bytes`. Kept as the volume label
//!   [`COW_SIZE_LABEL`].
//!
//! VolumeSnapshotClass keys: `cowSizeBytes` (overrides the volume's).
//!
//! Keys under `csi.storage.k8s.io/` are the Kubernetes sidecars' own and
//! are ignored; any other key is INVALID_ARGUMENT naming it.

use std::collections::HashMap;

use cowsnap_proto::bad_request::field_error;
use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::names::quote;
use tonic::Status;

/// The label that keeps a volume's default snapshot COW reserve.
pub const COW_SIZE_LABEL: &str = "csi.cowsnap.io/cow-size-bytes";
/// The label that keeps the CSI name a volume or snapshot was made for,
/// when it fits in a label value (63 printable characters).
pub const NAME_LABEL: &str = "csi.cowsnap.io/name";

/// A volume's size when the CO gives no capacity range: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// What a StorageClass asks of a volume (0: the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeParams {
    pub chunk_sectors: u32,
    pub cow_size_bytes: u64,
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, Status> {
    value.trim().parse().map_err(|_| {
        field_error(
            &format!("parameters.{key}"),
            format!("parameter {key}: {} is not a whole number", quote(value)),
        )
    })
}

fn cow_size(value: &str) -> Result<u64, Status> {
    let n: u64 = number("cowSizeBytes", value)?;
    if !n.is_multiple_of(4096) {
        return Err(field_error(
            "parameters.cowSizeBytes",
            format!("parameter cowSizeBytes: {n} is not a multiple of 4096"),
        ));
    }
    Ok(n)
}

fn unknown(key: &str, known: &str) -> Status {
    field_error(
        &format!("parameters.{key}"),
        format!("unknown parameter {}: cowsnap takes {known}", quote(key)),
    )
}

/// The StorageClass parameters of a CreateVolume (or GetCapacity).
pub fn volume_params(params: &HashMap<String, String>) -> Result<VolumeParams, Status> {
    let mut p = VolumeParams::default();
    for (k, v) in params {
        match k.as_str() {
            "chunkSectors" => {
                let cs: u32 = number(k, v)?;
                if !cs.is_power_of_two() || !(8..=1024).contains(&cs) {
                    return Err(field_error(
                        "parameters.chunkSectors",
                        format!(
                            "parameter chunkSectors: {cs} is not a power of two from 8 to 1024"
                        ),
                    ));
                }
                p.chunk_sectors = cs;
            }
            "cowSizeBytes" => p.cow_size_bytes = cow_size(v)?,
            k if k.starts_with(SIDECAR_PREFIX) => {}
            _ => return Err(unknown(k, "chunkSectors and cowSizeBytes")),
        }
    }
    Ok(p)
}

/// The VolumeSnapshotClass parameters of a CreateSnapshot: the COW
/// reserve, if given.
pub fn snapshot_params(params: &HashMap<String, String>) -> Result<Option<u64>, Status> {
    let mut cow = None;
    for (k, v) in params {
        match k.as_str() {
            "cowSizeBytes" => cow = Some(cow_size(v)?),
            k if k.starts_with(SIDECAR_PREFIX) => {}
            _ => return Err(unknown(k, "cowSizeBytes")),
        }
    }
    Ok(cow)
}

/// The size of a new empty volume for `range`, a multiple of `align`:
/// `required_bytes` rounded up; with only a limit, the default size or the
/// limit rounded down, whichever is smaller; OUT_OF_RANGE when the limit
/// cannot be met.
pub fn volume_size(range: Option<&csi::CapacityRange>, align: u64) -> Result<u64, Status> {
    let (required, limit) = bounds(range)?;
    let size = if required > 0 {
        required.div_ceil(align).saturating_mul(align)
    } else if limit > 0 {
        DEFAULT_SIZE.min(limit / align * align)
    } else {
        DEFAULT_SIZE
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "capacity range [{required}, {limit}] cannot be met: sizes are multiples of {align} bytes"
        )));
    }
    Ok(size)
}

/// The size of a volume that has (or starts with) `size` bytes, for
/// `range`: `required_bytes` rounded up to `align`, or `size` when that is
/// not more (a restored or cloned volume starts at its source's size and
/// is grown once made; a volume never shrinks). OUT_OF_RANGE when
/// `limit_bytes` is below the result.
pub fn size_at_least(
    range: Option<&csi::CapacityRange>,
    size: u64,
    align: u64,
) -> Result<u64, Status> {
    let (required, limit) = bounds(range)?;
    let want = size.max(required.div_ceil(align).saturating_mul(align));
    if limit > 0 && limit < want {
        return Err(Status::out_of_range(format!(
            "capacity range [{required}, {limit}] cannot be met: the volume has at least \
             {size} bytes (its source's, or its own: volumes never shrink), in multiples of {align}"
        )));
    }
    Ok(want)
}

/// `(required, limit)` of a range, 0 for unset; negative ones refused.
fn bounds(range: Option<&csi::CapacityRange>) -> Result<(u64, u64), Status> {
    let Some(r) = range else {
        return Ok((0, 0));
    };
    let field = |name: &str, n: i64| {
        u64::try_from(n).map_err(|_| {
            field_error(
                &format!("capacity_range.{name}"),
                format!("capacity_range.{name} is negative ({n})"),
            )
        })
    };
    let (required, limit) = (
        field("required_bytes", r.required_bytes)?,
        field("limit_bytes", r.limit_bytes)?,
    );
    if limit > 0 && required > limit {
        return Err(Status::out_of_range(format!(
            "capacity_range.required_bytes ({required}) is above limit_bytes ({limit})"
        )));
    }
    Ok((required, limit))
}

/// The alignment of a volume's size: 4096 bytes and its chunk size.
pub fn alignment(chunk_sectors: u32) -> u64 {
    (u64::from(chunk_sectors) * 512).max(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn range(required_bytes: i64, limit_bytes: i64) -> csi::CapacityRange {
        csi::CapacityRange {
            required_bytes,
            limit_bytes,
        }
    }

    #[test]
    fn sizes_round_up_and_limits_hold() {
        let a = 16384;
        assert_eq!(volume_size(None, a).unwrap(), DEFAULT_SIZE);
        assert_eq!(volume_size(Some(&range(1, 0)), a).unwrap(), a);
        assert_eq!(volume_size(Some(&range(a as i64, a as i64)), a).unwrap(), a);
        assert_eq!(
            volume_size(Some(&range(0, 3 * a as i64 + 5)), a).unwrap(),
            3 * a
        );
        let e = volume_size(Some(&range(a as i64 + 1, a as i64 + 100)), a).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        let e = volume_size(Some(&range(0, 100)), a).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        let e = volume_size(Some(&range(-1, 0)), a).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = volume_size(Some(&range(10, 5)), a).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
    }

    #[test]
    fn sizes_only_grow_and_round_up() {
        const M: u64 = 1 << 20;
        // No range, or one asking for no more: the size it has.
        assert_eq!(size_at_least(None, M, 4096).unwrap(), M);
        assert_eq!(
            size_at_least(Some(&range(M as i64, 0)), M, 4096).unwrap(),
            M
        );
        assert_eq!(size_at_least(Some(&range(4096, 0)), M, 4096).unwrap(), M);
        // More: rounded up to the alignment.
        assert_eq!(
            size_at_least(Some(&range(M as i64 + 1, 0)), M, 16384).unwrap(),
            M + 16384
        );
        // A limit below the source's size, or below the rounded size.
        for r in [range(0, 4096), range(M as i64 + 1, M as i64 + 4096)] {
            assert_eq!(
                size_at_least(Some(&r), M, 16384).unwrap_err().code(),
                Code::OutOfRange,
                "{r:?}"
            );
        }
        assert_eq!(
            size_at_least(Some(&range(-1, 0)), M, 4096)
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn parameters_are_checked_and_unknown_keys_named() {
        let m = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let p = volume_params(&m(&[
            ("chunkSectors", "64"),
            ("cowSizeBytes", "1048576"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            VolumeParams {
                chunk_sectors: 64,
                cow_size_bytes: 1 << 20
            }
        );
        let e = volume_params(&m(&[("chunkSize", "64")])).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("\"chunkSize\""), "{}", e.message());
        for bad in [
            ("chunkSectors", "12"),
            ("chunkSectors", "x"),
            ("cowSizeBytes", "100"),
        ] {
            let e = volume_params(&m(&[bad])).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
            assert!(e.message().contains(bad.0), "{}", e.message());
        }
        assert_eq!(
            snapshot_params(&m(&[("cowSizeBytes", "8192")])).unwrap(),
            Some(8192)
        );
        assert_eq!(snapshot_params(&m(&[])).unwrap(), None);
        assert!(snapshot_params(&m(&[("chunkSectors", "64")])).is_err());
    }
}

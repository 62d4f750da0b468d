//! How CSI ids and names map to cowsnap's.
//!
//! - A CSI `volume_id` is the cowsnap volume id (`cowsnap volume list`
//!   shows it as `volumes/{volume_id}`).
//! - A CSI `snapshot_id` is `VOLUME/SNAPSHOT`: the cowsnap snapshot
//!   `volumes/VOLUME/snapshots/SNAPSHOT` without its collection words.
//! - A CSI name (`pvc-<uuid>`, up to 128 bytes of any characters) becomes a
//!   cowsnap id deterministically ([`id_from_name`]): a name that is already
//!   a valid id (`[a-z0-9-]`, 1 to 63 characters, starting with a letter,
//!   not ending with a hyphen) is used as it is, so `pvc-<uuid>` stays
//!   `pvc-<uuid>`; any other name becomes a readable prefix made from it,
//!   a hyphen and 16 hex digits of its FNV-1a 64-bit hash (e.g.
//!   `My Volume` → `my-volume-…`).

use cowsnap_proto::names::check_id;

/// The longest CSI name accepted, in bytes (the spec's limit for strings).
pub const MAX_NAME_BYTES: usize = 128;

/// Longest prefix kept from a name that is not a valid id (63 minus the
/// hyphen and the 16 hex digits of the hash).
const PREFIX_MAX: usize = 63 - 17;

/// Checks a CSI name: not empty, at most [`MAX_NAME_BYTES`], none of the
/// control characters the spec bans. Returns what is wrong.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "is {} bytes long; at most {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|&c| {
        matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
    }) {
        return Err(format!("contains the control character {c:?}"));
    }
    Ok(())
}

/// The cowsnap id a CSI name maps to (see the module doc).
pub fn id_from_name(name: &str) -> String {
    if check_id(name).is_ok() {
        return name.to_string();
    }
    let mut prefix = String::new();
    for c in name.chars().map(|c| c.to_ascii_lowercase()) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (prefix.is_empty() || prefix.ends_with('-')) {
            continue;
        }
        if prefix.len() == PREFIX_MAX {
            break;
        }
        prefix.push(c);
    }
    let prefix = prefix.trim_end_matches('-');
    let start = if prefix.starts_with(|c: char| c.is_ascii_lowercase()) {
        ""
    } else {
        "n-"
    };
    let mut id = format!("{start}{prefix}");
    id.truncate(PREFIX_MAX);
    let id = id.trim_end_matches('-');
    format!("{id}-{:016x}", fnv1a64(name.as_bytes()))
}

/// FNV-1a, 64 bits: small, stable across versions and platforms.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The CSI `snapshot_id` of a cowsnap snapshot.
pub fn snapshot_id(volume: &str, snapshot: &str) -> String {
    format!("{volume}/{snapshot}")
}

/// The (volume, snapshot) ids of a CSI `snapshot_id`, if it is one of ours.
pub fn parse_snapshot_id(id: &str) -> Option<(&str, &str)> {
    let (v, s) = id.split_once('/')?;
    (check_id(v).is_ok() && check_id(s).is_ok()).then_some((v, s))
}

/// A CSI `volume_id`, if it can be one of ours.
pub fn parse_volume_id(id: &str) -> Option<&str> {
    check_id(id).is_ok().then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_are_kept() {
        let pvc = "pvc-0b3c9b6e-8a7c-4b7e-9a55-0f2ff3a1c0de";
        assert_eq!(id_from_name(pvc), pvc);
        assert_eq!(id_from_name("a"), "a");
    }

    #[test]
    fn other_names_get_a_readable_prefix_and_a_hash() {
        let id = id_from_name("My Volume");
        assert!(id.starts_with("my-volume-"), "{id}");
        assert_eq!(id.len(), "my-volume-".len() + 16);
        assert_eq!(id, id_from_name("My Volume"), "deterministic");
        assert_ne!(id, id_from_name("my volume"), "case is part of the name");
        for name in [
            "x".repeat(128),
            "9lives".into(),
            "-".into(),
            "日本語".into(),
            "pvc-".into(),
            "UPPER-CASE-".repeat(11),
            "a--b".into(),
        ] {
            let id = id_from_name(&name);
            assert!(check_id(&id).is_ok(), "{name:?} -> {id:?}");
        }
        assert!(id_from_name("9lives").starts_with("n-9lives-"));
        assert!(id_from_name("日本語").starts_with("n-"));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("pvc-1").is_ok());
        assert!(check_name(&"é".repeat(64)).is_ok());
        assert!(check_name(&"x".repeat(129)).is_err());
        assert!(check_name("").is_err());
        assert!(check_name("a\u{1}b").is_err());
        assert!(check_name("tab\tand newline\n").is_ok());
    }

    #[test]
    fn snapshot_ids_round_trip() {
        assert_eq!(
            parse_snapshot_id(&snapshot_id("v1", "s1")),
            Some(("v1", "s1"))
        );
        for bad in ["v1", "v1/", "/s1", "v1/s1/x", "V1/s1", ""] {
            assert_eq!(parse_snapshot_id(bad), None, "{bad}");
        }
    }
}

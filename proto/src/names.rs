//! Resource names of the API (AIP-122): `volumes/{volume}` and
//! `volumes/{volume}/snapshots/{snapshot}`, which are also the NBD export
//! names, and `operations/{op}` / `tasks/{task}` for long-running work.
//! Scripts depend on these names, so they are parsed in one place.

/// The most characters of a caller's input an error message quotes.
pub const QUOTE_MAX: usize = 80;

/// `input` quoted for an error message: whole when short, else its first
/// [`QUOTE_MAX`] characters, `…` and its length (a 10 KB id must not make a
/// 10 KB status message, which some gRPC clients reject).
pub fn quote(input: &str) -> String {
    match input.char_indices().nth(QUOTE_MAX) {
        None => format!("{input:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &input[..cut], input.len()),
    }
}

/// Checks a resource id: 1 to 63 characters of `[a-z0-9-]`, starting with a
/// letter and not ending with a hyphen. Returns a message naming what is
/// wrong.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > 63 {
        return Err(format!("{} is longer than 63 characters", quote(id)));
    }
    if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!("{} must start with a lower-case letter", quote(id)));
    }
    if id.ends_with('-') {
        return Err(format!("{} must not end with a hyphen", quote(id)));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{} contains {c:?}: only lower-case letters, digits and hyphens are allowed",
            quote(id)
        ));
    }
    Ok(())
}

/// `volumes/{volume}`.
pub fn volume(volume: &str) -> String {
    format!("volumes/{volume}")
}

/// `volumes/{volume}/snapshots/{snapshot}`.
pub fn snapshot(volume: &str, snapshot: &str) -> String {
    format!("volumes/{volume}/snapshots/{snapshot}")
}

/// The volume id of `volumes/{volume}`.
pub fn parse_volume(name: &str) -> Result<&str, String> {
    let id = name
        .strip_prefix("volumes/")
        .filter(|rest| !rest.contains('/'))
        .ok_or_else(|| format!("{} is not a volume name (volumes/VOLUME)", quote(name)))?;
    check_id(id).map_err(|e| format!("volume id {e}"))?;
    Ok(id)
}

/// The volume and snapshot ids of `volumes/{volume}/snapshots/{snapshot}`.
pub fn parse_snapshot(name: &str) -> Result<(&str, &str), String> {
    let bad = || {
        format!(
            "{} is not a snapshot name (volumes/VOLUME/snapshots/SNAPSHOT)",
            quote(name)
        )
    };
    let rest = name.strip_prefix("volumes/").ok_or_else(bad)?;
    let (vol, snap) = rest.split_once("/snapshots/").ok_or_else(bad)?;
    if snap.contains('/') {
        return Err(bad());
    }
    check_id(vol).map_err(|e| format!("volume id {e}"))?;
    check_id(snap).map_err(|e| format!("snapshot id {e}"))?;
    Ok((vol, snap))
}

/// The id of `{collection}/{id}` for a collection such as `operations` or
/// `tasks` (ids there may also contain digits first).
pub fn parse_in<'a>(collection: &str, name: &'a str) -> Result<&'a str, String> {
    name.strip_prefix(collection)
        .and_then(|r| r.strip_prefix('/'))
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .ok_or_else(|| format!("{} is not a name of the form {collection}/ID", quote(name)))
}

/// The number of `{collection}/{number}`: canonical decimal digits only
/// (`operations/7`; not `operations/+7`, `operations/07` or `operations/ 7`),
/// so one resource has one name.
pub fn parse_number_in(collection: &str, name: &str) -> Result<u64, String> {
    let id = parse_in(collection, name)?;
    let canonical = id.bytes().all(|b| b.is_ascii_digit()) && (id == "0" || !id.starts_with('0'));
    let bad = || format!("{}: the id is a number in decimal digits", quote(name));
    if !canonical {
        return Err(bad());
    }
    id.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["v", "vol-1", "a1", &"a".repeat(63)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a/b",
            &"a".repeat(64),
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(parse_volume("volumes/v1"), Ok("v1"));
        assert!(parse_volume("volumes/v1/snapshots/s").is_err());
        assert!(parse_volume("vols/v1").is_err());
        assert_eq!(parse_snapshot("volumes/v1/snapshots/s1"), Ok(("v1", "s1")));
        assert!(parse_snapshot("volumes/v1/snapshots/").is_err());
        assert!(parse_snapshot("volumes/v1/snapshots/s1/x").is_err());
        assert!(parse_snapshot("volumes/v1").is_err());
        assert_eq!(parse_in("tasks", "tasks/7"), Ok("7"));
        assert!(parse_in("tasks", "operations/7").is_err());
        assert_eq!(snapshot("a", "b"), "volumes/a/snapshots/b");
    }

    #[test]
    fn numbers_are_canonical() {
        assert_eq!(parse_number_in("operations", "operations/1"), Ok(1));
        assert_eq!(parse_number_in("operations", "operations/0"), Ok(0));
        assert_eq!(parse_number_in("operations", "operations/120"), Ok(120));
        for bad in [
            "operations/+1",
            "operations/-1",
            "operations/01",
            "operations/00",
            "operations/ 1",
            "operations/1 ",
            "operations/1e3",
            "operations/",
            "operations/99999999999999999999999",
            "operations/١",
        ] {
            assert!(parse_number_in("operations", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quotes_are_capped() {
        assert_eq!(quote("v1"), "\"v1\"");
        let long = "é".repeat(10_000);
        let q = quote(&long);
        assert!(q.chars().count() < QUOTE_MAX + 30, "{q}");
        assert!(q.ends_with("… (20000 bytes)"), "{q}");
        assert!(check_id(&"a".repeat(10_000)).unwrap_err().len() < 200);
        assert!(parse_volume(&"x".repeat(10_000)).unwrap_err().len() < 200);
    }
}

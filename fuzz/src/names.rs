//! Resource names (`cowsnap_proto::names`) under arbitrary text.
//!
//! [`check_names`] takes the input as text (lossily: any bytes) and checks
//! that every parser answers without panicking, that an error message
//! stays short whatever the input, and that whatever parses formats back
//! to the same text (one resource, one name); it also splits the input into
//! two ids and checks that valid ids make names that parse back to them.

use cowsnap_proto::names;

/// Longest error message any input may produce: a status carries at most
/// 1 KiB (the input is quoted at most [`names::QUOTE_MAX`] characters).
const MAX_MESSAGE: usize = 1024;

fn short<T>(what: &str, r: &Result<T, String>) {
    if let Err(e) = r {
        assert!(
            e.len() <= MAX_MESSAGE,
            "{what}: message of {} bytes",
            e.len()
        );
    }
}

pub fn check_names(input: &[u8]) {
    let s = String::from_utf8_lossy(input);
    let s = s.as_ref();

    let q = names::quote(s);
    assert!(q.len() <= MAX_MESSAGE, "quote of {} bytes", q.len());

    let id = names::check_id(s);
    short("check_id", &id);
    if id.is_ok() {
        assert!(!s.is_empty() && s.len() <= 63, "id {s:?} accepted");
        assert_eq!(
            names::parse_volume(&names::volume(s)),
            Ok(s),
            "volume of id {s:?}"
        );
    }

    let v = names::parse_volume(s);
    short("parse_volume", &v);
    if let Ok(vol) = v {
        assert_eq!(names::volume(vol), s, "volume name round trip");
        assert!(names::check_id(vol).is_ok());
        assert!(
            names::parse_snapshot(s).is_err(),
            "{s:?} is both volume and snapshot"
        );
    }

    let sn = names::parse_snapshot(s);
    short("parse_snapshot", &sn);
    if let Ok((vol, snap)) = sn {
        assert_eq!(names::snapshot(vol, snap), s, "snapshot name round trip");
        assert!(names::check_id(vol).is_ok() && names::check_id(snap).is_ok());
    }

    for collection in ["operations", "tasks", "workers"] {
        let p = names::parse_in(collection, s);
        short("parse_in", &p);
        if let Ok(id) = p {
            assert_eq!(
                format!("{collection}/{id}"),
                s,
                "{collection} name round trip"
            );
        }
        let n = names::parse_number_in(collection, s);
        short("parse_number_in", &n);
        if let Ok(n) = n {
            assert_eq!(
                format!("{collection}/{n}"),
                s,
                "{collection} number round trip"
            );
        }
    }

    // Two ids from the input: names made of valid ones parse back.
    let (a, b) = s.split_at(
        s.char_indices()
            .nth(s.chars().count() / 2)
            .map_or(s.len(), |(i, _)| i),
    );
    if names::check_id(a).is_ok() && names::check_id(b).is_ok() {
        assert_eq!(names::parse_snapshot(&names::snapshot(a, b)), Ok((a, b)));
        assert!(names::parse_volume(&names::snapshot(a, b)).is_err());
    }

    // A number from the input's first bytes formats to a name that parses.
    let mut n = [0u8; 8];
    let k = input.len().min(8);
    n[..k].copy_from_slice(&input[..k]);
    let n = u64::from_le_bytes(n);
    assert_eq!(
        names::parse_number_in("operations", &format!("operations/{n}")),
        Ok(n)
    );
}

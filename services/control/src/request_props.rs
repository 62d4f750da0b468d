//! No input may panic a handler: every parser of request fields (names,
//! ids, page sizes and tokens, filters, sizes, labels, durations, the
//! `grpc-timeout` and `authorization` headers), fed arbitrary text and
//! numbers, answers a value or INVALID_ARGUMENT with a bounded message.

use std::collections::BTreeMap;

use cowsnap_proto::names;
use proptest::prelude::*;

use crate::control::{OperationFilter, operation_cursor};
use crate::error::{ControlError, ErrorKind, Result};
use crate::snapshots::snapshot_cursor;
use crate::volumes::VolumeFilter;
use crate::{api, auth, calls, listing, model};

/// Ok, or INVALID_ARGUMENT whose message stays short whatever the input.
fn refused_well<T>(what: &str, r: Result<T>) -> std::result::Result<(), TestCaseError> {
    if let Err(e) = r {
        let m = e.to_string();
        let start: String = m.chars().take(120).collect();
        prop_assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{}: {}", what, start);
        prop_assert!(m.len() <= 1024, "{}: {} bytes: {}", what, m.len(), start);
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Text a caller may send: anything; pieces of the grammar the parsers
/// look for, mixed with multi-byte characters; long runs of one
/// character; and page tokens (hex of a valid-looking or arbitrary key).
fn input() -> impl Strategy<Value = String> {
    let pieces = || {
        proptest::string::string_regex(
            "((volumes|snapshots|operations|workers|tasks|labels\\.|state|done|kind|target|worker|READY|true)|[/=:+ \"-]| AND |[0-9]|[a-z]|é|€|😀|\\x00|\t){0,24}",
        )
        .unwrap()
    };
    prop_oneof![
        any::<String>(),
        pieces(),
        (any::<char>(), 0usize..12_000).prop_map(|(c, n)| c.to_string().repeat(n)),
        proptest::collection::vec(any::<u8>(), 0..48).prop_map(|b| hex(&b)),
        (
            prop_oneof![Just("volumes"), Just("snapshots"), Just("operations")],
            pieces()
        )
            .prop_map(|(k, key)| hex(format!("{k}:{key}").as_bytes())),
    ]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(input(), input(), 0..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn request_parsers_never_panic_and_refuse_with_invalid_argument(
        s in input(),
        n in any::<i32>(),
        u in any::<u32>(),
        big in any::<u64>(),
        seconds in any::<i64>(),
        nanos in any::<i32>(),
        l in labels(),
    ) {
        let name = |r: std::result::Result<(), String>| r.map_err(|e| ControlError::invalid("name", e));
        refused_well("page_size", listing::page_size(n))?;
        for kind in ["volumes", "snapshots", "operations"] {
            refused_well("page_token", listing::after(kind, &s))?;
        }
        refused_well("operations page_token", operation_cursor(&s))?;
        refused_well("snapshots page_token", snapshot_cursor(&s))?;
        refused_well("filter", listing::filter_terms(&s))?;
        refused_well("volume filter", VolumeFilter::parse(&s))?;
        refused_well("operation filter", OperationFilter::parse(&s))?;
        refused_well("operation name", model::parse_operation(&s))?;
        refused_well("worker name", model::parse_worker(&s))?;
        refused_well("id", model::check_id("volume_id", &s))?;
        refused_well("volume name", name(names::parse_volume(&s).map(drop)))?;
        refused_well("snapshot name", name(names::parse_snapshot(&s).map(drop)))?;
        refused_well("chunk_sectors", model::chunk_sectors("volume.chunk_sectors", u, 32))?;
        refused_well("size", model::check_size("volume.size_bytes", big, u))?;
        refused_well("labels", model::check_labels("volume.labels", &l))?;
        refused_well(
            "timeout",
            api::operations::timeout(Some(prost_types::Duration { seconds, nanos })),
        )?;
        let _ = calls::grpc_timeout(&s);
        let _ = auth::bearer(&s);
    }
}

#[test]
fn multi_byte_page_tokens_are_refused() {
    for t in ["aé", "aéb", "€0", "0€", "😀", "😀😀", "ab€", "ab😀cd"] {
        for kind in ["volumes", "snapshots", "operations"] {
            let e = listing::after(kind, t).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{t}");
        }
        assert!(operation_cursor(t).is_err());
        assert!(snapshot_cursor(t).is_err());
    }
}

#[test]
fn timeouts_are_valid_durations() {
    use prost_types::Duration;
    let t = |seconds, nanos| api::operations::timeout(Some(Duration { seconds, nanos }));
    assert_eq!(t(1, 500).unwrap(), std::time::Duration::new(1, 500));
    assert_eq!(
        t(0, 999_999_999).unwrap(),
        std::time::Duration::new(0, 999_999_999)
    );
    for (s, n) in [
        (0, 1_000_000_000),
        (1, i32::MAX),
        (0, -1),
        (-1, 0),
        (-1, -5),
    ] {
        let e = t(s, n).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().starts_with("invalid timeout:"), "{e}");
    }
    assert_eq!(
        api::operations::timeout(None).unwrap(),
        std::time::Duration::ZERO
    );
}

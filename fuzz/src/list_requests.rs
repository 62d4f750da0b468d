//! The control service's request-field parsers under arbitrary text: page
//! tokens of every list, filters, operation and worker names, ids, labels,
//! and the `grpc-timeout` and `authorization` header values.
//!
//! [`check_list_requests`] checks that each answers a value or
//! INVALID_ARGUMENT with a short message, never panics, and that a page
//! token made for a key gives that key back (for any key: the first half
//! of the input).

use std::collections::BTreeMap;

use cowsnap_control::control::{OperationFilter, operation_cursor};
use cowsnap_control::error::{ErrorKind, Result};
use cowsnap_control::snapshots::snapshot_cursor;
use cowsnap_control::volumes::VolumeFilter;
use cowsnap_control::{fuzzing, listing, model};

const MAX_MESSAGE: usize = 1024;

fn refused_well<T>(what: &str, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let m = e.to_string();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{what}: {m:.200}");
            assert!(
                m.len() <= MAX_MESSAGE,
                "{what}: message of {} bytes",
                m.len()
            );
            None
        }
    }
}

pub fn check_list_requests(input: &[u8]) {
    let s = String::from_utf8_lossy(input);
    let s = s.as_ref();
    let (key, rest) = s.split_at(
        s.char_indices()
            .nth(s.chars().count() / 2)
            .map_or(s.len(), |(i, _)| i),
    );

    for kind in ["volumes", "snapshots", "operations"] {
        if let Some(after) = refused_well("page_token", listing::after(kind, s)) {
            assert!(s.is_empty() || listing::token(kind, &after) == s.to_ascii_lowercase());
        }
        assert_eq!(
            listing::after(kind, &listing::token(kind, key))
                .ok()
                .as_deref(),
            Some(key)
        );
        assert!(
            listing::token(kind, key)
                .bytes()
                .all(|b| b.is_ascii_hexdigit())
        );
    }
    refused_well("operations page_token", operation_cursor(s));
    refused_well("snapshots page_token", snapshot_cursor(s));
    // A snapshots token as the list makes it: volume id, '/', sequence.
    let seq = i64::from_le_bytes({
        let mut b = [0u8; 8];
        let k = input.len().min(8);
        b[..k].copy_from_slice(&input[..k]);
        b
    });
    if !key.contains('/') {
        let t = listing::token("snapshots", &format!("{key}/{seq}"));
        assert_eq!(
            snapshot_cursor(&t).ok(),
            Some((key.to_string(), seq)),
            "snapshots token"
        );
        let t = listing::token("operations", &seq.to_string());
        assert_eq!(operation_cursor(&t).ok(), Some(seq), "operations token");
    }

    if let Some(terms) = refused_well("filter", listing::filter_terms(s)) {
        for (k, v) in terms {
            assert!(
                !k.contains(" AND ") && !v.contains(" AND "),
                "term {k:?}={v:?}"
            );
        }
    }
    refused_well("volume filter", VolumeFilter::parse(s));
    refused_well("operation filter", OperationFilter::parse(s));
    if let Some(id) = refused_well("operation name", model::parse_operation(s)) {
        assert_eq!(format!("operations/{id}"), s);
    }
    if let Some(id) = refused_well("worker name", model::parse_worker(s)) {
        assert_eq!(format!("workers/{id}"), s);
    }
    refused_well("id", model::check_id("volume_id", s));
    let w = model::worker_id_from_node(s);
    assert!(
        cowsnap_proto::names::check_id(&w).is_ok(),
        "worker id {w:?} from node {s:.100?}"
    );
    let mut labels = BTreeMap::new();
    labels.insert(key.to_string(), rest.to_string());
    refused_well("labels", model::check_labels("volume.labels", &labels));
    let u = u32::try_from(seq as u64 >> 32).expect("32 bits");
    refused_well(
        "chunk_sectors",
        model::chunk_sectors("volume.chunk_sectors", u, 32),
    );
    refused_well(
        "size",
        model::check_size("volume.size_bytes", seq as u64, u),
    );

    let _ = fuzzing::grpc_timeout(s);
    if let Some(t) = fuzzing::bearer(s) {
        assert!(t.len() < s.len(), "a token longer than its header");
    }
}

//! List calls (AIP-132, AIP-158, AIP-160): page sizes, opaque page tokens
//! and the small filter language `KEY=VALUE AND KEY=VALUE`.

use cowsnap_proto::names::quote;

use crate::error::{ControlError, Result};

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

/// A page size: 0 is the default; larger than the maximum is the maximum.
pub fn page_size(asked: i32) -> Result<usize> {
    match asked {
        n if n < 0 => Err(ControlError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

/// A page token for a list of `kind`, resuming after `key`.
pub fn token(kind: &str, key: &str) -> String {
    format!("{kind}:{key}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key a page token of `kind` resumes after ("" for no token). The
/// token is the caller's: any bytes, decoded as bytes (never sliced as
/// text, which panics inside a multi-byte character).
pub fn after(kind: &str, token: &str) -> Result<String> {
    if token.is_empty() {
        return Ok(String::new());
    }
    let bad = || ControlError::invalid("page_token", "not a token from this list");
    let hex = token.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    let digit = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = hex
        .chunks_exact(2)
        .map(|p| Some((digit(p[0])? << 4) | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    s.strip_prefix(kind)
        .and_then(|r| r.strip_prefix(':'))
        .map(str::to_string)
        .ok_or_else(bad)
}

/// The terms of a filter: `KEY=VALUE` joined with ` AND `.
pub fn filter_terms(filter: &str) -> Result<Vec<(String, String)>> {
    let filter = filter.trim();
    if filter.is_empty() {
        return Ok(Vec::new());
    }
    filter
        .split(" AND ")
        .map(|t| {
            let (k, v) = t.trim().split_once('=').ok_or_else(|| {
                ControlError::invalid("filter", format!("{} is not KEY=VALUE", quote(t)))
            })?;
            let v = v.trim().trim_matches('"');
            Ok((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = token("volumes", "v-9");
        assert_eq!(after("volumes", &t).unwrap(), "v-9");
        assert!(after("operations", &t).is_err());
        assert!(after("volumes", "zz").is_err());
        assert_eq!(after("volumes", "").unwrap(), "");
        // Multi-byte characters (odd and even byte lengths) are refused,
        // never sliced through.
        for t in ["é", "éé", "aé", "€0", "0€", "😀", "+1", " 1"] {
            assert!(after("volumes", t).is_err(), "{t}");
        }
    }

    #[test]
    fn filters() {
        assert_eq!(
            filter_terms("state=READY AND labels.app=\"db\"").unwrap(),
            vec![
                ("state".to_string(), "READY".to_string()),
                ("labels.app".to_string(), "db".to_string())
            ]
        );
        assert!(filter_terms("nonsense").is_err());
        assert!(filter_terms(" ").unwrap().is_empty());
    }
}

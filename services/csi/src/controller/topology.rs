//! Topology: a cowsnap volume lives on one worker, and is reachable from
//! that worker's node. Its one segment is
//! `{topology.cowsnap.io/node: WORKER_ID}`, the worker id being the
//! catalog's (`cowsnap worker list`); the node plugin reports the same
//! segment in NodeGetInfo.

use std::collections::HashMap;

use cowsnap_proto::bad_request::field_error;
use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::names::quote;
use tonic::Status;

use crate::TOPOLOGY_NODE_KEY;

/// The topology segment of a volume on `worker_id`.
pub fn segment(worker_id: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), worker_id.to_string())]),
    }
}

/// The worker a segment names; `field` is where the request holds it.
pub fn worker_of<'a>(field: &str, t: &'a csi::Topology) -> Result<&'a str, Status> {
    t.segments
        .get(TOPOLOGY_NODE_KEY)
        .map(String::as_str)
        .ok_or_else(|| {
            field_error(
                field,
                format!(
                    "a topology segment has no {TOPOLOGY_NODE_KEY} key (it has {})",
                    quote(&t.segments.keys().cloned().collect::<Vec<_>>().join(", "))
                ),
            )
        })
}

/// The workers a new volume may go on, preferred first: the preferred
/// segments (those also requisite, when requisite ones are given), then
/// the other requisite ones. Empty: anywhere.
pub fn candidates(req: Option<&csi::TopologyRequirement>) -> Result<Vec<String>, Status> {
    let Some(req) = req else {
        return Ok(Vec::new());
    };
    let requisite = req
        .requisite
        .iter()
        .map(|t| worker_of("accessibility_requirements.requisite", t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out: Vec<String> = Vec::new();
    for t in &req.preferred {
        let w = worker_of("accessibility_requirements.preferred", t)?;
        if (requisite.is_empty() || requisite.contains(&w)) && !out.iter().any(|o| o == w) {
            out.push(w.to_string());
        }
    }
    for w in requisite {
        if !out.iter().any(|o| o == w) {
            out.push(w.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_first_within_requisite() {
        let req = csi::TopologyRequirement {
            requisite: vec![segment("a"), segment("b"), segment("c")],
            preferred: vec![segment("c"), segment("z"), segment("a")],
        };
        assert_eq!(candidates(Some(&req)).unwrap(), ["c", "a", "b"]);
        let req = csi::TopologyRequirement {
            requisite: vec![],
            preferred: vec![segment("b")],
        };
        assert_eq!(candidates(Some(&req)).unwrap(), ["b"]);
        assert!(candidates(None).unwrap().is_empty());
        let req = csi::TopologyRequirement {
            requisite: vec![csi::Topology {
                segments: HashMap::from([("zone".to_string(), "z1".to_string())]),
            }],
            preferred: vec![],
        };
        assert_eq!(
            candidates(Some(&req)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}

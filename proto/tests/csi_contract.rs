//! `csi.v1` is a wire contract: every service, method, message, field
//! (name, number, type, label, oneof) and enum value that csi-sanity's own
//! generated code knows must be in our `csi.proto` the same. The reference
//! is the file descriptor the Go protobuf runtime embeds in the csi-sanity
//! binary (`../shared/tools/csi-sanity/csi-sanity`, or `CSI_SANITY`).

use std::collections::BTreeMap;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};

fn sanity_binary() -> std::path::PathBuf {
    std::env::var_os("CSI_SANITY").map_or_else(
        || {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/tools/csi-sanity/csi-sanity")
        },
        Into::into,
    )
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let c = *b.get(*i)?;
        *i += 1;
        v |= u64::from(c & 0x7f) << shift;
        if c < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The `csi.proto` descriptor embedded in a Go binary: it starts with
/// field 1 (`name`) = "csi.proto" and field 2 (`package`) = "csi.v1", and
/// runs as long as the bytes parse as top-level FileDescriptorProto fields.
fn embedded_descriptor(bin: &[u8]) -> FileDescriptorProto {
    let magic = b"\n\tcsi.proto\x12\x06csi.v1";
    let start = bin
        .windows(magic.len())
        .position(|w| w == magic)
        .expect("no csi.proto descriptor in the csi-sanity binary");
    let mut i = start;
    loop {
        let mut j = i;
        let Some(key) = varint(bin, &mut j) else {
            break;
        };
        let (field, wire) = (key >> 3, key & 7);
        if !(1..=14).contains(&field) {
            break;
        }
        match wire {
            0 => {
                if varint(bin, &mut j).is_none() {
                    break;
                }
            }
            2 => match varint(bin, &mut j) {
                Some(n) => j += n as usize,
                None => break,
            },
            _ => break,
        }
        i = j;
    }
    FileDescriptorProto::decode(&bin[start..i]).expect("the embedded descriptor decodes")
}

/// Every wire-relevant fact of a file, keyed by where it is.
fn facts(f: &FileDescriptorProto) -> BTreeMap<String, String> {
    fn message(out: &mut BTreeMap<String, String>, m: &DescriptorProto, path: &str) {
        let path = format!("{path}.{}", m.name());
        for fd in &m.field {
            let oneof = fd
                .oneof_index
                .and_then(|i| m.oneof_decl.get(i as usize))
                .map(|o| o.name().to_string());
            out.insert(
                format!("{path} field {}", fd.number()),
                format!(
                    "{} {:?} {:?} {} oneof={oneof:?}",
                    fd.name(),
                    fd.r#type(),
                    fd.label(),
                    fd.type_name()
                ),
            );
        }
        for e in &m.enum_type {
            enumeration(out, e, &path);
        }
        for n in &m.nested_type {
            message(out, n, &path);
        }
    }
    fn enumeration(out: &mut BTreeMap<String, String>, e: &EnumDescriptorProto, path: &str) {
        for v in &e.value {
            out.insert(
                format!("{path}.{} value {}", e.name(), v.number()),
                v.name().to_string(),
            );
        }
    }
    let mut out = BTreeMap::new();
    for m in &f.message_type {
        message(&mut out, m, "");
    }
    for e in &f.enum_type {
        enumeration(&mut out, e, "");
    }
    for s in &f.service {
        for m in &s.method {
            out.insert(
                format!("service {} method {}", s.name(), m.name()),
                format!(
                    "{} -> {} streaming={:?}/{:?}",
                    m.input_type(),
                    m.output_type(),
                    m.client_streaming(),
                    m.server_streaming()
                ),
            );
        }
    }
    out
}

#[test]
fn csi_proto_matches_what_csi_sanity_speaks() {
    let path = sanity_binary();
    let bin =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (set CSI_SANITY)", path.display()));
    let theirs = facts(&embedded_descriptor(&bin));
    let set = FileDescriptorSet::decode(cowsnap_proto::FILE_DESCRIPTOR_SET).unwrap();
    let ours = set
        .file
        .iter()
        .find(|f| f.package() == "csi.v1")
        .expect("csi.v1 is compiled");
    let ours = facts(ours);
    assert!(
        theirs.len() > 300,
        "only {} facts: wrong descriptor?",
        theirs.len()
    );
    let mismatches: Vec<String> = theirs
        .iter()
        .filter(|(k, v)| ours.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: csi-sanity has {v}, ours {:?}", ours.get(k)))
        .collect();
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // The SnapshotMetadata service cowsnap serves is among what was
    // compared (the suite's descriptor has it), message by message.
    for key in [
        "service SnapshotMetadata method GetMetadataAllocated",
        "service SnapshotMetadata method GetMetadataDelta",
        ".BlockMetadata field 1",
        ".BlockMetadata field 2",
        ".BlockMetadataType value 1",
        ".BlockMetadataType value 2",
        ".GetMetadataAllocatedRequest field 1",
        ".GetMetadataAllocatedRequest field 2",
        ".GetMetadataAllocatedRequest field 3",
        ".GetMetadataAllocatedRequest field 4",
        ".GetMetadataAllocatedResponse field 1",
        ".GetMetadataAllocatedResponse field 2",
        ".GetMetadataAllocatedResponse field 3",
        ".GetMetadataDeltaRequest field 1",
        ".GetMetadataDeltaRequest field 2",
        ".GetMetadataDeltaRequest field 3",
        ".GetMetadataDeltaRequest field 4",
        ".GetMetadataDeltaRequest field 5",
        ".GetMetadataDeltaResponse field 1",
        ".GetMetadataDeltaResponse field 2",
        ".GetMetadataDeltaResponse field 3",
        ".PluginCapability.Service.Type value 4",
    ] {
        assert!(
            theirs.contains_key(key),
            "csi-sanity's descriptor lacks {key}"
        );
        assert_eq!(ours.get(key), theirs.get(key), "{key}");
    }
    // What v1.11 and v1.12 add on top of the suite's copy: GetSnapshot.
    let extra: Vec<&String> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert!(
        extra.iter().all(|k| k.contains("GetSnapshot")
            || k.contains("ControllerServiceCapability.RPC.Type value 15")),
        "{extra:?}"
    );
}

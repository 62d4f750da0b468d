//! How the admin CLI prints: aligned tables (lists) and `FIELD: value`
//! blocks (single resources) for people; with `--json`, the API's own
//! messages in the protobuf JSON mapping with proto field names (as
//! `grpcurl -format-text=false` would, but snake_case and with 64-bit
//! numbers as numbers), one object per resource, lists as arrays.

use std::sync::LazyLock;

use cowsnap_proto::cowsnap::v1 as pb;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(cowsnap_proto::FILE_DESCRIPTOR_SET)
        .expect("the API's own descriptors decode")
});

/// A message as JSON, through its descriptor (`full_name`, e.g.
/// `cowsnap.v1.Volume`).
fn json_value<M: Message>(m: &M, full_name: &str) -> anyhow::Result<serde_json::Value> {
    let desc = POOL
        .get_message_by_name(full_name)
        .ok_or_else(|| anyhow::anyhow!("no descriptor for {full_name}"))?;
    let dynamic = DynamicMessage::decode(desc, m.encode_to_vec().as_slice())?;
    let opts = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(false);
    Ok(dynamic.serialize_with_options(serde_json::value::Serializer, &opts)?)
}

fn print_value(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_list<M: Message>(items: &[M], full_name: &str) -> anyhow::Result<()> {
    let values = items
        .iter()
        .map(|m| json_value(m, full_name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    print_value(&serde_json::Value::Array(values))
}

/// Columns padded to their widest cell; the last one is not padded.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                out.push_str(&c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn detail(fields: Vec<(&str, String)>) {
    let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in fields {
        if !v.is_empty() {
            println!("{:<w$} {v}", format!("{k}:"));
        }
    }
}

/// Bytes in binary units: `512 B`, `16 KiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A timestamp as RFC 3339 UTC (`2026-11-27T14:03:05Z`).
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else {
        return String::new();
    };
    let secs = t.seconds;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn labels(l: &std::collections::HashMap<String, String>) -> String {
    let mut kv: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    kv.sort();
    kv.join(",")
}

fn state(s: i32) -> String {
    pb::State::try_from(s)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| s.to_string())
}

fn usage(u: Option<&pb::Usage>) -> String {
    match u {
        Some(u) if u.total_bytes > 0 => format!(
            "{} / {} ({:.1}%), metadata {}",
            bytes(u.allocated_bytes),
            bytes(u.total_bytes),
            u.allocated_bytes as f64 * 100.0 / u.total_bytes as f64,
            bytes(u.metadata_bytes)
        ),
        _ => String::new(),
    }
}

pub fn volume(json: bool, v: &pb::Volume) -> anyhow::Result<()> {
    if json {
        return print_value(&json_value(v, "cowsnap.v1.Volume")?);
    }
    detail(vec![
        ("name", v.name.clone()),
        ("state", state(v.state)),
        (
            "size",
            format!("{} ({} bytes)", bytes(v.size_bytes), v.size_bytes),
        ),
        ("chunk", format!("{} sectors", v.chunk_sectors)),
        ("nbd", v.nbd_uri.clone()),
        ("worker", v.worker.clone()),
        ("source", v.source.clone()),
        ("labels", labels(&v.labels)),
        ("created", time(v.create_time.as_ref())),
        ("operation", v.operation.clone()),
        ("error", v.error.clone()),
    ]);
    Ok(())
}

pub fn volumes(json: bool, vs: &[pb::Volume]) -> anyhow::Result<()> {
    if json {
        return print_list(vs, "cowsnap.v1.Volume");
    }
    table(
        &["NAME", "STATE", "SIZE", "WORKER", "CREATED", "NBD"],
        vs.iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    state(v.state),
                    bytes(v.size_bytes),
                    v.worker.clone(),
                    time(v.create_time.as_ref()),
                    v.nbd_uri.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn snapshot(json: bool, s: &pb::Snapshot) -> anyhow::Result<()> {
    if json {
        return print_value(&json_value(s, "cowsnap.v1.Snapshot")?);
    }
    detail(vec![
        ("name", s.name.clone()),
        ("state", state(s.state)),
        (
            "size",
            format!("{} ({} bytes)", bytes(s.size_bytes), s.size_bytes),
        ),
        ("cow size", bytes(s.cow_size_bytes)),
        ("chunk", format!("{} sectors", s.chunk_sectors)),
        ("used", usage(s.usage.as_ref())),
        (
            "exceptions",
            s.usage
                .as_ref()
                .map(|u| u.exceptions.to_string())
                .unwrap_or_default(),
        ),
        ("nbd", s.nbd_uri.clone()),
        ("writable", s.writable.to_string()),
        ("labels", labels(&s.labels)),
        ("created", time(s.create_time.as_ref())),
        ("operation", s.operation.clone()),
    ]);
    Ok(())
}

/// A whole delta (every page): `# NAME vs BASE: ...` then `offset length`
/// lines, as `cowsnap cow delta` prints them.
pub fn delta(
    json: bool,
    name: &str,
    base: Option<&str>,
    d: &pb::SnapshotDelta,
) -> anyhow::Result<()> {
    if json {
        return print_value(&json_value(d, "cowsnap.v1.SnapshotDelta")?);
    }
    let total: u64 = d.ranges.iter().map(|r| r.length).sum();
    println!(
        "# {name} vs {}: {} range{}, {total} bytes (from metadata, chunks of {} bytes)",
        base.unwrap_or("its volume now"),
        d.ranges.len(),
        if d.ranges.len() == 1 { "" } else { "s" },
        d.block_bytes
    );
    println!("# offset length");
    for r in &d.ranges {
        println!("{} {}", r.offset, r.length);
    }
    Ok(())
}

pub fn snapshots(json: bool, ss: &[pb::Snapshot]) -> anyhow::Result<()> {
    if json {
        return print_list(ss, "cowsnap.v1.Snapshot");
    }
    table(
        &["NAME", "STATE", "COW SIZE", "USED", "CREATED", "NBD"],
        ss.iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    state(s.state),
                    bytes(s.cow_size_bytes),
                    s.usage
                        .as_ref()
                        .filter(|u| u.total_bytes > 0)
                        .map(|u| {
                            format!(
                                "{:.1}%",
                                u.allocated_bytes as f64 * 100.0 / u.total_bytes as f64
                            )
                        })
                        .unwrap_or_default(),
                    time(s.create_time.as_ref()),
                    s.nbd_uri.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

fn kind(m: Option<&pb::OperationMetadata>) -> String {
    m.and_then(|m| pb::OperationKind::try_from(m.kind).ok())
        .map(|k| k.as_str_name().to_string())
        .unwrap_or_default()
}

fn op_state(m: Option<&pb::OperationMetadata>) -> String {
    m.and_then(|m| pb::OperationState::try_from(m.state).ok())
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("OPERATION_STATE_")
                .to_string()
        })
        .unwrap_or_default()
}

pub fn operation(json: bool, op: &pb::Operation) -> anyhow::Result<()> {
    if json {
        return print_value(&json_value(op, "cowsnap.v1.Operation")?);
    }
    let m = op.metadata.as_ref();
    let error = match &op.result {
        Some(pb::operation::Result::Error(e)) => format!(
            "{}: {}",
            super::code_name(tonic::Code::from_i32(e.code)),
            e.message
        ),
        _ => String::new(),
    };
    detail(vec![
        ("name", op.name.clone()),
        ("kind", kind(m)),
        ("target", m.map(|m| m.target.clone()).unwrap_or_default()),
        ("source", m.map(|m| m.source.clone()).unwrap_or_default()),
        ("state", op_state(m)),
        ("done", op.done.to_string()),
        ("progress", format!("{:.1}%", op.percent)),
        ("worker", m.map(|m| m.worker.clone()).unwrap_or_default()),
        ("created", time(m.and_then(|m| m.create_time.as_ref()))),
        ("ended", time(m.and_then(|m| m.end_time.as_ref()))),
        ("error", error),
    ]);
    Ok(())
}

pub fn operations(json: bool, ops: &[pb::Operation]) -> anyhow::Result<()> {
    if json {
        return print_list(ops, "cowsnap.v1.Operation");
    }
    table(
        &["NAME", "KIND", "TARGET", "STATE", "PROGRESS", "CREATED"],
        ops.iter()
            .map(|op| {
                let m = op.metadata.as_ref();
                vec![
                    op.name.clone(),
                    kind(m),
                    m.map(|m| m.target.clone()).unwrap_or_default(),
                    op_state(m),
                    format!("{:.0}%", op.percent),
                    time(m.and_then(|m| m.create_time.as_ref())),
                ]
            })
            .collect(),
    );
    Ok(())
}

/// What a delete prints: the name (text), or `{"deleted": NAME}`.
pub fn deleted(json: bool, name: &str) -> anyhow::Result<()> {
    if json {
        print_value(&serde_json::json!({ "deleted": name }))
    } else {
        println!("deleted {name}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(16 << 10), "16 KiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn rfc3339_times() {
        let t = |s| {
            time(Some(&prost_types::Timestamp {
                seconds: s,
                nanos: 0,
            }))
        };
        assert_eq!(t(0), "1970-01-01T00:00:00Z");
        assert_eq!(t(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(t(1_795_790_585), "2026-11-27T14:43:05Z");
        assert_eq!(time(None), "");
    }

    #[test]
    fn json_uses_proto_names_and_numbers() {
        let v = pb::Volume {
            name: "volumes/v1".into(),
            size_bytes: 1 << 40,
            state: pb::State::Ready as i32,
            create_time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        };
        let j = json_value(&v, "cowsnap.v1.Volume").unwrap();
        assert_eq!(j["name"], "volumes/v1");
        assert_eq!(j["size_bytes"], 1u64 << 40);
        assert_eq!(j["state"], "READY");
        assert_eq!(j["create_time"], "1970-01-01T00:00:00Z");
    }
}

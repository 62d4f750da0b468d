//! Snapshot rows, with the usage their worker last reported.

use sqlx::SqliteConnection;

use super::{labels_from, labels_json};
use crate::error::Result;
use crate::model::{Reported, Snapshot, State, Usage};

/// A snapshot row as every query here selects it (`query_as!` maps the
/// columns by name), with its position in its volume's list order.
struct Row {
    volume_id: String,
    id: String,
    seq: i64,
    size_bytes: i64,
    cow_size_bytes: i64,
    chunk_sectors: i64,
    writable: i64,
    labels: String,
    state: String,
    allocated_bytes: Option<i64>,
    total_bytes: Option<i64>,
    metadata_bytes: Option<i64>,
    exceptions: Option<i64>,
    usage_time: Option<i64>,
    create_time: i64,
    nbd_base: String,
    operation: Option<i64>,
    error: Option<String>,
}

impl Row {
    /// The snapshot, and its position in list order.
    fn into_snapshot(self) -> Result<(Snapshot, i64)> {
        let usage = match (
            self.allocated_bytes,
            self.total_bytes,
            self.metadata_bytes,
            self.exceptions,
            self.usage_time,
        ) {
            (Some(a), Some(t), Some(m), Some(e), Some(u)) => Some(Usage {
                allocated_bytes: a as u64,
                total_bytes: t as u64,
                metadata_bytes: m as u64,
                exceptions: e as u64,
                update_time: u,
            }),
            _ => None,
        };
        let snapshot = Snapshot {
            volume_id: self.volume_id,
            id: self.id,
            size_bytes: self.size_bytes as u64,
            cow_size_bytes: self.cow_size_bytes as u64,
            chunk_sectors: self.chunk_sectors as u32,
            writable: self.writable != 0,
            labels: labels_from(&self.labels)?,
            state: State::parse(&self.state)?,
            usage,
            create_time: self.create_time,
            nbd_base: self.nbd_base,
            operation: self.operation,
            error: self.error,
        };
        Ok((snapshot, self.seq))
    }
}

pub async fn get(c: &mut SqliteConnection, volume_id: &str, id: &str) -> Result<Option<Snapshot>> {
    let row = sqlx::query_as!(
        Row,
        r#"SELECT s.volume_id, s.id, s.seq, s.size_bytes, s.cow_size_bytes, s.chunk_sectors, s.writable,
                  s.labels, s.state, s.allocated_bytes, s.total_bytes, s.metadata_bytes, s.exceptions,
                  s.usage_time, s.create_time, w.nbd_uri AS nbd_base,
                  (SELECT MAX(o.id) FROM operations o
                    WHERE o.target = 'volumes/' || s.volume_id || '/snapshots/' || s.id
                      AND o.state IN ('pending', 'running')) AS "operation?: i64",
                  s.error
           FROM snapshots s JOIN volumes v ON v.id = s.volume_id
                JOIN workers w ON w.id = v.worker_id
           WHERE s.volume_id = ? AND s.id = ?"#,
        volume_id,
        id
    )
    .fetch_optional(&mut *c)
    .await?;
    Ok(row.map(Row::into_snapshot).transpose()?.map(|(s, _)| s))
}

/// Snapshots of a volume (or of every volume when `volume_id` is `None`),
/// in creation order, after the position `after` (volume id, seq), at most
/// `limit` of them (negative: all). Each query reads its page through the
/// `(volume_id, seq)` index and stops at `limit` (migration 0004), so a
/// page costs the same however large the catalog is.
pub async fn list(
    c: &mut SqliteConnection,
    volume_id: Option<&str>,
    after: (&str, i64),
    limit: i64,
) -> Result<Vec<(Snapshot, i64)>> {
    let (after_vol, after_seq) = after;
    let rows =
        match volume_id {
            Some(vol) => {
                // The position in (volume id, seq) order, as in the list of
                // every volume: a cursor before this volume starts at its first
                // snapshot, one after it has nothing left.
                let after_seq = match after_vol.cmp(vol) {
                    std::cmp::Ordering::Less => 0,
                    std::cmp::Ordering::Equal => after_seq,
                    std::cmp::Ordering::Greater => i64::MAX,
                };
                sqlx::query_as!(
                Row,
                r#"SELECT s.volume_id, s.id, s.seq, s.size_bytes, s.cow_size_bytes, s.chunk_sectors, s.writable,
                          s.labels, s.state, s.allocated_bytes, s.total_bytes, s.metadata_bytes,
                          s.exceptions, s.usage_time, s.create_time, w.nbd_uri AS nbd_base,
                          (SELECT MAX(o.id) FROM operations o
                            WHERE o.target = 'volumes/' || s.volume_id || '/snapshots/' || s.id
                              AND o.state IN ('pending', 'running')) AS "operation?: i64",
                          s.error
                   FROM snapshots s JOIN volumes v ON v.id = s.volume_id
                        JOIN workers w ON w.id = v.worker_id
                   WHERE s.volume_id = ?1 AND s.seq > ?2
                   ORDER BY s.seq
                   LIMIT ?3"#,
                vol,
                after_seq,
                limit
            )
            .fetch_all(&mut *c)
            .await?
            }
            None => sqlx::query_as!(
                Row,
                r#"SELECT s.volume_id, s.id, s.seq, s.size_bytes, s.cow_size_bytes, s.chunk_sectors, s.writable,
                      s.labels, s.state, s.allocated_bytes, s.total_bytes, s.metadata_bytes,
                      s.exceptions, s.usage_time, s.create_time, w.nbd_uri AS nbd_base,
                      (SELECT MAX(o.id) FROM operations o
                        WHERE o.target = 'volumes/' || s.volume_id || '/snapshots/' || s.id
                          AND o.state IN ('pending', 'running')) AS "operation?: i64",
                      s.error
               FROM snapshots s JOIN volumes v ON v.id = s.volume_id
                    JOIN workers w ON w.id = v.worker_id
               WHERE (s.volume_id, s.seq) > (?1, ?2)
               ORDER BY s.volume_id, s.seq
               LIMIT ?3"#,
                after_vol,
                after_seq,
                limit
            )
            .fetch_all(&mut *c)
            .await?,
        };
    rows.into_iter().map(Row::into_snapshot).collect()
}

/// Every snapshot of the volumes on `worker_id`, in (volume id, seq)
/// order: what a reconciliation sweep compares with the worker's report
/// in one read, instead of a read per volume.
pub async fn list_on_worker(c: &mut SqliteConnection, worker_id: &str) -> Result<Vec<Snapshot>> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT s.volume_id, s.id, s.seq, s.size_bytes, s.cow_size_bytes, s.chunk_sectors, s.writable,
                  s.labels, s.state, s.allocated_bytes, s.total_bytes, s.metadata_bytes,
                  s.exceptions, s.usage_time, s.create_time, w.nbd_uri AS nbd_base,
                  (SELECT MAX(o.id) FROM operations o
                    WHERE o.target = 'volumes/' || s.volume_id || '/snapshots/' || s.id
                      AND o.state IN ('pending', 'running')) AS "operation?: i64",
                  s.error
           FROM snapshots s JOIN volumes v ON v.id = s.volume_id
                JOIN workers w ON w.id = v.worker_id
           WHERE v.worker_id = ?
           ORDER BY s.volume_id, s.seq"#,
        worker_id
    )
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter()
        .map(|r| r.into_snapshot().map(|(s, _)| s))
        .collect()
}

pub async fn count(c: &mut SqliteConnection, volume_id: &str) -> Result<u64> {
    let n = sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "n!: i64" FROM snapshots WHERE volume_id = ?"#,
        volume_id
    )
    .fetch_one(&mut *c)
    .await?;
    Ok(n as u64)
}

pub async fn insert(c: &mut SqliteConnection, s: &Snapshot, now: i64) -> Result<()> {
    let (size, cow, chunk, writable, labels, state) = (
        s.size_bytes as i64,
        s.cow_size_bytes as i64,
        i64::from(s.chunk_sectors),
        i64::from(s.writable),
        labels_json(&s.labels),
        s.state.as_str(),
    );
    sqlx::query!(
        "INSERT INTO snapshots (volume_id, id, size_bytes, cow_size_bytes, chunk_sectors,
                                writable, labels, state, seq, create_time, update_time)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?,
                 (SELECT COALESCE(MAX(seq), 0) + 1 FROM snapshots WHERE volume_id = ?), ?, ?)",
        s.volume_id,
        s.id,
        size,
        cow,
        chunk,
        writable,
        labels,
        state,
        s.volume_id,
        s.create_time,
        now
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub async fn set_state(
    c: &mut SqliteConnection,
    volume_id: &str,
    id: &str,
    state: State,
    now: i64,
) -> Result<()> {
    let s = state.as_str();
    sqlx::query!(
        "UPDATE snapshots SET state = ?, update_time = ? WHERE volume_id = ? AND id = ?",
        s,
        now,
        volume_id,
        id
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Records what the worker reports of a snapshot: its COW size and chunk
/// size, its usage and why it is invalid or failed; and its new `state`,
/// if it changes with the report (one statement: a catalog statement is a
/// round trip to the connection's thread).
pub async fn set_reported(
    c: &mut SqliteConnection,
    volume_id: &str,
    id: &str,
    r: Reported<'_>,
    state: Option<State>,
    now: i64,
) -> Result<()> {
    let state = state.map(State::as_str);
    let (cow, chunk) = (r.cow_size_bytes as i64, i64::from(r.chunk_sectors));
    let error = r.error;
    let (a, t, m, e, u) = match r.usage {
        Some(u) => (
            Some(u.allocated_bytes as i64),
            Some(u.total_bytes as i64),
            Some(u.metadata_bytes as i64),
            Some(u.exceptions as i64),
            Some(u.update_time),
        ),
        None => (None, None, None, None, None),
    };
    sqlx::query!(
        "UPDATE snapshots SET cow_size_bytes = ?, chunk_sectors = ?, allocated_bytes = ?,
                total_bytes = ?, metadata_bytes = ?, exceptions = ?, usage_time = ?,
                error = ?, state = COALESCE(?, state), update_time = ?
         WHERE volume_id = ? AND id = ?",
        cow,
        chunk,
        a,
        t,
        m,
        e,
        u,
        error,
        state,
        now,
        volume_id,
        id
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub async fn delete(c: &mut SqliteConnection, volume_id: &str, id: &str) -> Result<()> {
    sqlx::query!(
        "DELETE FROM snapshots WHERE volume_id = ? AND id = ?",
        volume_id,
        id
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

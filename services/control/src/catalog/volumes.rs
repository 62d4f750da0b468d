//! Volume rows. A volume's NBD base and its unfinished operation come from
//! its worker's row and the operations table.

use sqlx::SqliteConnection;

use super::{labels_from, labels_json};
use crate::error::Result;
use crate::model::{State, Volume};

struct Row {
    id: String,
    worker_id: String,
    size_bytes: i64,
    chunk_sectors: i64,
    labels: String,
    state: String,
    source: String,
    error: String,
    create_time: i64,
    nbd_base: String,
    operation: Option<i64>,
}

impl Row {
    fn into_volume(self) -> Result<Volume> {
        Ok(Volume {
            id: self.id,
            worker_id: self.worker_id,
            size_bytes: self.size_bytes as u64,
            chunk_sectors: self.chunk_sectors as u32,
            labels: labels_from(&self.labels)?,
            state: State::parse(&self.state)?,
            source: self.source,
            error: self.error,
            create_time: self.create_time,
            nbd_base: self.nbd_base,
            operation: self.operation,
        })
    }
}

pub async fn get(c: &mut SqliteConnection, id: &str) -> Result<Option<Volume>> {
    let row = sqlx::query_as!(
        Row,
        r#"SELECT v.id, v.worker_id, v.size_bytes, v.chunk_sectors, v.labels, v.state,
                  v.source, v.error, v.create_time, w.nbd_uri AS nbd_base,
                  (SELECT MAX(o.id) FROM operations o
                    WHERE o.volume_id = v.id AND o.state IN ('pending', 'running')
                      AND o.kind IN ('create_volume', 'delete_volume', 'merge_snapshot',
                                     'restore_volume', 'clone_volume',
                                     'expand_volume')) AS "operation?: i64"
           FROM volumes v JOIN workers w ON w.id = v.worker_id
           WHERE v.id = ?"#,
        id
    )
    .fetch_optional(&mut *c)
    .await?;
    row.map(Row::into_volume).transpose()
}

/// Volumes with ids after `after`, in id order, at most `limit` of them
/// (negative: all): a page reads its rows and no more.
pub async fn list_after(c: &mut SqliteConnection, after: &str, limit: i64) -> Result<Vec<Volume>> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT v.id, v.worker_id, v.size_bytes, v.chunk_sectors, v.labels, v.state,
                  v.source, v.error, v.create_time, w.nbd_uri AS nbd_base,
                  (SELECT MAX(o.id) FROM operations o
                    WHERE o.volume_id = v.id AND o.state IN ('pending', 'running')
                      AND o.kind IN ('create_volume', 'delete_volume', 'merge_snapshot',
                                     'restore_volume', 'clone_volume',
                                     'expand_volume')) AS "operation?: i64"
           FROM volumes v JOIN workers w ON w.id = v.worker_id
           WHERE v.id > ?
           ORDER BY v.id
           LIMIT ?"#,
        after,
        limit
    )
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter().map(Row::into_volume).collect()
}

pub async fn list_on_worker(c: &mut SqliteConnection, worker_id: &str) -> Result<Vec<Volume>> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT v.id, v.worker_id, v.size_bytes, v.chunk_sectors, v.labels, v.state,
                  v.source, v.error, v.create_time, w.nbd_uri AS nbd_base,
                  (SELECT MAX(o.id) FROM operations o
                    WHERE o.volume_id = v.id AND o.state IN ('pending', 'running')
                      AND o.kind IN ('create_volume', 'delete_volume', 'merge_snapshot',
                                     'restore_volume', 'clone_volume',
                                     'expand_volume')) AS "operation?: i64"
           FROM volumes v JOIN workers w ON w.id = v.worker_id
           WHERE v.worker_id = ?
           ORDER BY v.id"#,
        worker_id
    )
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter().map(Row::into_volume).collect()
}

pub async fn insert(c: &mut SqliteConnection, v: &Volume, now: i64) -> Result<()> {
    let (size, chunk, labels, state) = (
        v.size_bytes as i64,
        i64::from(v.chunk_sectors),
        labels_json(&v.labels),
        v.state.as_str(),
    );
    sqlx::query!(
        "INSERT INTO volumes (id, worker_id, size_bytes, chunk_sectors, labels, state, source,
                              error, create_time, update_time)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        v.id,
        v.worker_id,
        size,
        chunk,
        labels,
        state,
        v.source,
        v.error,
        v.create_time,
        now
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub async fn set_state(
    c: &mut SqliteConnection,
    id: &str,
    state: State,
    error: &str,
    now: i64,
) -> Result<()> {
    let s = state.as_str();
    sqlx::query!(
        "UPDATE volumes SET state = ?, error = ?, update_time = ? WHERE id = ?",
        s,
        error,
        now,
        id
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub async fn set_size(c: &mut SqliteConnection, id: &str, size_bytes: u64, now: i64) -> Result<()> {
    let size = size_bytes as i64;
    sqlx::query!(
        "UPDATE volumes SET size_bytes = ?, update_time = ? WHERE id = ?",
        size,
        now,
        id
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Deletes the volume's row and its snapshots' rows.
pub async fn delete(c: &mut SqliteConnection, id: &str) -> Result<()> {
    sqlx::query!("DELETE FROM snapshots WHERE volume_id = ?", id)
        .execute(&mut *c)
        .await?;
    sqlx::query!("DELETE FROM volumes WHERE id = ?", id)
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// Bytes of the volumes of `worker_id` still being created (not yet in the
/// worker's reported free room).
pub async fn creating_bytes(c: &mut SqliteConnection, worker_id: &str) -> Result<u64> {
    let n = sqlx::query_scalar!(
        r#"SELECT COALESCE(SUM(size_bytes), 0) AS "n!: i64" FROM volumes
           WHERE worker_id = ? AND state = 'creating'"#,
        worker_id
    )
    .fetch_one(&mut *c)
    .await?;
    Ok(n as u64)
}

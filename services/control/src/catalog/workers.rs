//! Worker rows: where each worker answers, who it is, the room it last
//! reported and its health.

use sqlx::SqliteConnection;

use crate::error::Result;
use crate::model::Worker;

struct Row {
    id: String,
    address: String,
    node: String,
    nbd_uri: String,
    capacity_bytes: i64,
    free_bytes: i64,
    version: String,
    io_backend: String,
    healthy: i64,
    last_error: String,
    last_seen_time: i64,
    create_time: i64,
    volume_count: i64,
}

impl From<Row> for Worker {
    fn from(r: Row) -> Worker {
        Worker {
            id: r.id,
            address: r.address,
            node: r.node,
            nbd_uri: r.nbd_uri,
            capacity_bytes: r.capacity_bytes as u64,
            free_bytes: r.free_bytes as u64,
            version: r.version,
            io_backend: r.io_backend,
            healthy: r.healthy != 0,
            last_error: r.last_error,
            last_seen_time: r.last_seen_time,
            create_time: r.create_time,
            volume_count: r.volume_count as u32,
        }
    }
}

pub async fn get(c: &mut SqliteConnection, id: &str) -> Result<Option<Worker>> {
    let row = sqlx::query_as!(
        Row,
        r#"SELECT w.id, w.address, w.node, w.nbd_uri, w.capacity_bytes, w.free_bytes, w.version,
                  w.io_backend, w.healthy, w.last_error, w.last_seen_time, w.create_time,
                  (SELECT COUNT(*) FROM volumes v WHERE v.worker_id = w.id) AS "volume_count!: i64"
           FROM workers w WHERE w.id = ?"#,
        id
    )
    .fetch_optional(&mut *c)
    .await?;
    Ok(row.map(Worker::from))
}

/// A worker as a call on it needs it (its address and health), without
/// counting its volumes: `volume_count` is left 0. That count reads every
/// volume row of the worker, which a call made for each snapshot create or
/// get would pay more of as the catalog grows.
pub async fn get_uncounted(c: &mut SqliteConnection, id: &str) -> Result<Option<Worker>> {
    let row = sqlx::query_as!(
        Row,
        r#"SELECT w.id, w.address, w.node, w.nbd_uri, w.capacity_bytes, w.free_bytes, w.version,
                  w.io_backend, w.healthy, w.last_error, w.last_seen_time, w.create_time,
                  0 AS "volume_count!: i64"
           FROM workers w WHERE w.id = ?"#,
        id
    )
    .fetch_optional(&mut *c)
    .await?;
    Ok(row.map(Worker::from))
}

pub async fn list(c: &mut SqliteConnection) -> Result<Vec<Worker>> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT w.id, w.address, w.node, w.nbd_uri, w.capacity_bytes, w.free_bytes, w.version,
                  w.io_backend, w.healthy, w.last_error, w.last_seen_time, w.create_time,
                  (SELECT COUNT(*) FROM volumes v WHERE v.worker_id = w.id) AS "volume_count!: i64"
           FROM workers w ORDER BY w.id"#
    )
    .fetch_all(&mut *c)
    .await?;
    Ok(rows.into_iter().map(Worker::from).collect())
}

/// Inserts a worker, or updates the one with the same id (a worker that
/// moved to another address keeps its id and volumes).
pub async fn upsert(c: &mut SqliteConnection, w: &Worker) -> Result<()> {
    let (cap, free, healthy) = (
        w.capacity_bytes as i64,
        w.free_bytes as i64,
        i64::from(w.healthy),
    );
    sqlx::query!(
        "INSERT INTO workers (id, address, node, nbd_uri, capacity_bytes, free_bytes, version,
                              io_backend, healthy, last_error, last_seen_time, create_time)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET
            address = excluded.address, node = excluded.node, nbd_uri = excluded.nbd_uri,
            capacity_bytes = excluded.capacity_bytes, free_bytes = excluded.free_bytes,
            version = excluded.version, io_backend = excluded.io_backend,
            healthy = excluded.healthy, last_error = excluded.last_error,
            last_seen_time = excluded.last_seen_time",
        w.id,
        w.address,
        w.node,
        w.nbd_uri,
        cap,
        free,
        w.version,
        w.io_backend,
        healthy,
        w.last_error,
        w.last_seen_time,
        w.create_time
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Records a failed health check.
pub async fn set_unhealthy(c: &mut SqliteConnection, id: &str, error: &str) -> Result<()> {
    sqlx::query!(
        "UPDATE workers SET healthy = 0, last_error = ? WHERE id = ?",
        error,
        id
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub async fn delete(c: &mut SqliteConnection, id: &str) -> Result<()> {
    sqlx::query!("DELETE FROM workers WHERE id = ?", id)
        .execute(&mut *c)
        .await?;
    Ok(())
}

//! The catalog: volumes, snapshots, workers and operations in SQLite
//! (`DATA_DIR/catalog.db`) through sqlx, in WAL mode with
//! `synchronous=FULL` (a committed transaction survives a power cut; D11 of
//! docs/design.md) and foreign keys on. The schema lives in `migrations/`,
//! embedded and applied at start.
//!
//! Queries are checked at compile time against the schema. A fresh clone
//! builds offline from the committed `.sqlx/` at the workspace root
//! (`SQLX_OFFLINE=true`, set in `.cargo/config.toml`). After changing a
//! query or the schema, refresh it (sqlx-cli:
//! `cargo install sqlx-cli --no-default-features --features sqlite`):
//!
//! ```sh
//! export DATABASE_URL=sqlite:///tmp/cowsnap-catalog.db
//! cargo sqlx database reset -y --source services/control/migrations
//! SQLX_OFFLINE=false cargo sqlx prepare --workspace
//! ```
//!
//! Every function takes a connection, so callers group them in one
//! transaction ([`Catalog::write`]) where a change spans rows.
//!
//! The settle of a recorded operation (what its worker answered) is
//! committed without its own fsync ([`Catalog::settle`]): it can always be
//! derived again, by reconciliation driving the operation, whose record
//! was committed durably before the worker acted (D11). In WAL mode such a
//! commit is never torn, and the next durable commit makes it durable too.
//!
//! A pooled connection whose transaction ended in an error is closed, not
//! reused: SQLite rolls a transaction back by itself on some errors
//! (`SQLITE_FULL` when the file system is full, I/O errors), the `ROLLBACK`
//! sqlx then sends fails, and sqlx would go on counting the connection as
//! inside a transaction, refusing every later `BEGIN` on it.

pub mod operations;
pub mod snapshots;
pub mod volumes;
pub mod workers;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool, Transaction};

use crate::error::{ControlError, Result};
use crate::model::Labels;

/// The catalog's database.
#[derive(Clone)]
pub struct Catalog {
    pool: SqlitePool,
    /// Connections with `synchronous=NORMAL`, for settles only
    /// ([`Catalog::settle`]).
    settle_pool: SqlitePool,
}

pub type Tx = Transaction<'static, sqlx::Sqlite>;

impl Catalog {
    /// Opens (or creates) the catalog at `path` and applies the migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Catalog> {
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool_of = |max, opts| {
            SqlitePoolOptions::new()
                .max_connections(max)
                // A SQLite connection does not drop like a socket: one is
                // checked on its way back (`reusable`), not with a ping on
                // every acquire (a round trip to its thread per query).
                .test_before_acquire(false)
                .after_release(|conn, _| Box::pin(async move { Ok(reusable(conn).await) }))
                .before_acquire(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
                .connect_with(opts)
        };
        let pool = pool_of(4, opts.clone())
            .await
            .with_context(|| format!("{}: cannot open the catalog", path.display()))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .with_context(|| format!("{}: cannot migrate the catalog", path.display()))?;
        let settle_pool = pool_of(2, opts.synchronous(SqliteSynchronous::Normal))
            .await
            .with_context(|| format!("{}: cannot open the catalog", path.display()))?;
        Ok(Catalog { pool, settle_pool })
    }

    /// A connection for reads (and single-statement writes).
    pub async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        Ok(self.pool.acquire().await?)
    }

    /// A write transaction. `BEGIN IMMEDIATE` takes the write lock at once,
    /// so two writers never deadlock upgrading a read lock.
    pub async fn write(&self) -> Result<Tx> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// A write transaction that settles a recorded operation, or records
    /// what a reconciliation sweep found on a worker (the next pass finds
    /// it again): its commit does not wait for the disk (see the module
    /// doc).
    pub async fn settle(&self) -> Result<Tx> {
        Ok(self.settle_pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub async fn close(&self) {
        self.settle_pool.close().await;
        self.pool.close().await;
    }
}

/// Whether a connection given back to the pool may serve again: not if it
/// still counts as inside a transaction once the rollback that dropping its
/// transaction queued has run (that rollback failed; see the module doc).
async fn reusable(conn: &mut SqliteConnection) -> bool {
    // Not in a transaction: nothing was queued behind the caller (a read,
    // or a transaction that committed or rolled back while awaited).
    if !conn.is_in_transaction() {
        return true;
    }
    // A transaction dropped unfinished queued its rollback. Commands run in
    // order: once the ping answers, that rollback has run.
    if let Err(e) = conn.ping().await {
        tracing::warn!("catalog connection closed: {e}");
        return false;
    }
    if conn.is_in_transaction() {
        tracing::warn!("catalog connection closed: its transaction could not be rolled back");
        return false;
    }
    true
}

/// Labels as stored (a JSON object, keys in order).
pub fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).expect("labels serialize")
}

pub fn labels_from(json: &str) -> Result<Labels> {
    serde_json::from_str(json)
        .map_err(|e| ControlError::Internal(anyhow::anyhow!("bad labels in the catalog: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn synchronous(c: &mut SqliteConnection) -> i64 {
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(c)
            .await
            .unwrap()
    }

    async fn count(c: &mut SqliteConnection) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(c)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn settles_run_with_synchronous_normal_and_writes_stay_full() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
        let mut tx = cat.write().await.unwrap();
        assert_eq!(synchronous(&mut tx).await, 2, "writes: FULL");
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        for i in 0..8 {
            let mut tx = cat.settle().await.unwrap();
            assert_eq!(synchronous(&mut tx).await, 1, "settles: NORMAL");
            sqlx::query("INSERT INTO t VALUES (?)")
                .bind(i)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let mut c = cat.conn().await.unwrap();
        assert_eq!(synchronous(&mut c).await, 2, "reads and plain writes: FULL");
        assert_eq!(count(&mut c).await, 8, "settles are committed");
        drop(c);
        cat.close().await;
        let cat = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
        let mut c = cat.conn().await.unwrap();
        assert_eq!(count(&mut c).await, 8, "and there after a reopen");
    }
}

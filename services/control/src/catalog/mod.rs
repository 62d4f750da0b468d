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
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .after_release(|conn, _| Box::pin(async move { Ok(reusable(conn).await) }))
            .before_acquire(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
            .connect_with(opts)
            .await
            .with_context(|| format!("{}: cannot open the catalog", path.display()))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .with_context(|| format!("{}: cannot migrate the catalog", path.display()))?;
        Ok(Catalog { pool })
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

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Whether a connection given back to the pool may serve again: not if it
/// still counts as inside a transaction once the rollback that dropping its
/// transaction queued has run (that rollback failed; see the module doc).
async fn reusable(conn: &mut SqliteConnection) -> bool {
    // Commands run in order: once the ping answers, the queued rollback
    // has run.
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

//! `bench api`'s baselines, measured in the same run on the same file
//! system as the service's data dir: one SQLite commit (an INSERT in its
//! own `BEGIN IMMEDIATE` transaction, on a WAL database with the catalog's
//! pragmas) and one 4 KiB FUA write (`O_DIRECT` + `RWF_DSYNC`, through the
//! store's own I/O backend, as a commit's area write goes).

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use cowsnap_store::{AlignedBuf, Backend, BackendChoice};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The median of `samples` (seconds), or 0 for none.
pub fn median(samples: &mut [f64]) -> f64 {
    percentile(samples, 0.5)
}

/// The `q` quantile (nearest rank) of `samples`, sorting them.
pub fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// Both baselines in a fresh `dir`: the SQLite commit and the FUA write
/// (medians, seconds), and the I/O backend's name.
pub async fn measure(dir: &Path, n: usize) -> anyhow::Result<(f64, f64, &'static str)> {
    std::fs::create_dir_all(dir)?;
    let commit = sqlite_commit(dir, n).await?;
    let (fua, backend) = fua_write(dir, n).await?;
    Ok((commit, fua, backend))
}

/// Median latency (seconds) of one committed single-row INSERT, `n` times,
/// on a fresh database in `dir` opened as the catalog opens its own
/// (`services/control/src/catalog/mod.rs`: WAL, `synchronous=FULL`,
/// foreign keys on, `BEGIN IMMEDIATE`).
pub async fn sqlite_commit(dir: &Path, n: usize) -> anyhow::Result<f64> {
    let path = dir.join("baseline.db");
    let opts = SqliteConnectOptions::from_str("sqlite://")?
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .with_context(|| format!("{}: cannot open", path.display()))?;
    sqlx::query(
        "CREATE TABLE rows (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, \
         time INTEGER NOT NULL) STRICT",
    )
    .execute(&pool)
    .await?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT INTO rows (name, time) VALUES (?, ?)")
            .bind(format!("volumes/baseline-{i}"))
            .bind(i as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        lat.push(t.elapsed().as_secs_f64());
    }
    pool.close().await;
    Ok(median(&mut lat))
}

/// Median latency (seconds) of one 4 KiB `RWF_DSYNC` write on an
/// `O_DIRECT` file in `dir`, `n` times, each on an allocated block (the
/// file is written and flushed first, as a COW device's areas are once in
/// use). Returns the backend's name too.
pub async fn fua_write(dir: &Path, n: usize) -> anyhow::Result<(f64, &'static str)> {
    const BLOCKS: u64 = 64;
    let path = dir.join("fua.img");
    super::super::files::sparse_file(&path, BLOCKS * 4096)?;
    let backend = Backend::start(BackendChoice::Auto).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dev = backend
        .open(&path, true)
        .with_context(|| format!("opening {}", path.display()))?;
    for b in 0..BLOCKS {
        dev.write(b * 4096, AlignedBuf::zeroed(4096), false).await?;
    }
    dev.flush().await?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t = Instant::now();
        dev.write((i % BLOCKS) * 4096, AlignedBuf::zeroed(4096), true)
            .await?;
        lat.push(t.elapsed().as_secs_f64());
    }
    Ok((median(&mut lat), backend.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut v, 1.0), 100.0);
        let mut one = [7.0];
        assert_eq!(percentile(&mut one, 0.99), 7.0);
        assert_eq!(median(&mut []), 0.0);
    }
}

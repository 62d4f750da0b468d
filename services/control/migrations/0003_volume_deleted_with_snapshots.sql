-- no-transaction
-- A volume deleted while it has snapshots stays, hidden, as
-- 'deleted_with_snapshots' until its last snapshot goes. SQLite cannot
-- change a CHECK constraint in place: the table is rebuilt (SQLite's
-- documented procedure, foreign keys off, in one transaction; the first
-- line above makes sqlx run this file outside its own transaction, since
-- foreign_keys cannot change inside one). Run again after a crash before
-- sqlx recorded it, it does the same again.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
CREATE TABLE volumes_new (
    id            TEXT PRIMARY KEY NOT NULL,
    worker_id     TEXT NOT NULL REFERENCES workers (id),
    size_bytes    INTEGER NOT NULL,
    chunk_sectors INTEGER NOT NULL,
    labels        TEXT NOT NULL,
    state         TEXT NOT NULL
        CHECK (state IN ('creating', 'ready', 'merging', 'deleting', 'invalid', 'failed',
                         'deleted_with_snapshots')),
    -- What it was restored or cloned from ('' for an empty volume).
    source        TEXT NOT NULL DEFAULT '',
    error         TEXT NOT NULL DEFAULT '',
    create_time   INTEGER NOT NULL,
    update_time   INTEGER NOT NULL
) STRICT;
INSERT INTO volumes_new (id, worker_id, size_bytes, chunk_sectors, labels, state, source,
                         error, create_time, update_time)
    SELECT id, worker_id, size_bytes, chunk_sectors, labels, state, source, error,
           create_time, update_time
    FROM volumes;
DROP TABLE volumes;
ALTER TABLE volumes_new RENAME TO volumes;
CREATE INDEX volumes_worker ON volumes (worker_id);
COMMIT;
PRAGMA foreign_keys = ON;

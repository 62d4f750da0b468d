-- no-transaction
-- Volumes grow (ExpandVolume), recorded as operations of a new kind.
-- SQLite cannot change a CHECK constraint in place: the table is rebuilt
-- as in 0003 (foreign keys off, one transaction, outside sqlx's own), with
-- its indexes and its AUTOINCREMENT counter (so no operation id is ever
-- handed out twice). Run again after a crash before sqlx recorded it, it
-- does the same again.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
CREATE TABLE operations_new (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL
        CHECK (kind IN ('create_volume', 'delete_volume', 'create_snapshot',
                        'delete_snapshot', 'merge_snapshot', 'restore_volume',
                        'clone_volume', 'expand_volume')),
    -- The resource it works on, by name; the source of a restore or clone.
    target        TEXT NOT NULL,
    -- The volume concerned: the target, the target's parent, or the volume
    -- a merge rolls back (no foreign key: operations outlive volumes).
    volume_id     TEXT NOT NULL,
    source        TEXT NOT NULL DEFAULT '',
    worker_id     TEXT NOT NULL,
    -- The arguments (JSON), to repeat the worker call on recovery.
    args          TEXT NOT NULL,
    state         TEXT NOT NULL
        CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
    -- The worker's long-running task (`tasks/N`), once started.
    worker_task   TEXT NOT NULL DEFAULT '',
    percent       REAL NOT NULL DEFAULT 0,
    -- Why it failed: an error kind (not_found, failed_precondition, ...)
    -- and message.
    error_kind    TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    -- The resource as it was when the operation ended (JSON), its result.
    result        TEXT NOT NULL DEFAULT '',
    create_time   INTEGER NOT NULL,
    update_time   INTEGER NOT NULL,
    end_time      INTEGER,
    -- The request field an INVALID_ARGUMENT failure names (0005).
    error_field   TEXT NOT NULL DEFAULT ''
) STRICT;
INSERT INTO operations_new (id, kind, target, volume_id, source, worker_id, args, state,
                            worker_task, percent, error_kind, error_message, result,
                            create_time, update_time, end_time, error_field)
    SELECT id, kind, target, volume_id, source, worker_id, args, state, worker_task, percent,
           error_kind, error_message, result, create_time, update_time, end_time, error_field
    FROM operations;
DELETE FROM sqlite_sequence WHERE name = 'operations_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'operations_new', seq FROM sqlite_sequence WHERE name = 'operations';
DROP TABLE operations;
ALTER TABLE operations_new RENAME TO operations;
CREATE INDEX operations_active ON operations (state) WHERE state IN ('pending', 'running');
CREATE INDEX operations_target ON operations (target);
CREATE INDEX operations_volume ON operations (volume_id);
CREATE INDEX operations_active_volume ON operations (volume_id)
    WHERE state IN ('pending', 'running');
CREATE INDEX operations_active_target ON operations (target)
    WHERE state IN ('pending', 'running');
COMMIT;
PRAGMA foreign_keys = ON;

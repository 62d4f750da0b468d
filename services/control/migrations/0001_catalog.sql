-- The control service's catalog: workers, the volumes and snapshots placed
-- on them, and the operations that change them. Times are Unix
-- milliseconds. Labels and operation arguments are JSON objects.

CREATE TABLE workers (
    id             TEXT PRIMARY KEY NOT NULL,
    address        TEXT NOT NULL UNIQUE,
    node           TEXT NOT NULL,
    nbd_uri        TEXT NOT NULL,
    capacity_bytes INTEGER NOT NULL,
    free_bytes     INTEGER NOT NULL,
    version        TEXT NOT NULL,
    io_backend     TEXT NOT NULL,
    healthy        INTEGER NOT NULL CHECK (healthy IN (0, 1)),
    last_error     TEXT NOT NULL DEFAULT '',
    last_seen_time INTEGER NOT NULL,
    create_time    INTEGER NOT NULL
) STRICT;

CREATE TABLE volumes (
    id            TEXT PRIMARY KEY NOT NULL,
    worker_id     TEXT NOT NULL REFERENCES workers (id),
    size_bytes    INTEGER NOT NULL,
    chunk_sectors INTEGER NOT NULL,
    labels        TEXT NOT NULL,
    state         TEXT NOT NULL
        CHECK (state IN ('creating', 'ready', 'merging', 'deleting', 'invalid', 'failed')),
    -- What it was restored or cloned from ('' for an empty volume).
    source        TEXT NOT NULL DEFAULT '',
    error         TEXT NOT NULL DEFAULT '',
    create_time   INTEGER NOT NULL,
    update_time   INTEGER NOT NULL
) STRICT;

CREATE INDEX volumes_worker ON volumes (worker_id);

CREATE TABLE snapshots (
    volume_id       TEXT NOT NULL REFERENCES volumes (id),
    id              TEXT NOT NULL,
    -- As asked (0: never overflows); the worker's figure once created.
    cow_size_bytes  INTEGER NOT NULL,
    chunk_sectors   INTEGER NOT NULL,
    writable        INTEGER NOT NULL CHECK (writable IN (0, 1)),
    labels          TEXT NOT NULL,
    state           TEXT NOT NULL
        CHECK (state IN ('creating', 'ready', 'merging', 'deleting', 'invalid', 'failed')),
    -- Usage as the worker last reported it (NULL: not yet, or invalid).
    allocated_bytes INTEGER,
    total_bytes     INTEGER,
    metadata_bytes  INTEGER,
    exceptions      INTEGER,
    usage_time      INTEGER,
    -- Creation order within the volume.
    seq             INTEGER NOT NULL,
    create_time     INTEGER NOT NULL,
    update_time     INTEGER NOT NULL,
    PRIMARY KEY (volume_id, id)
) STRICT;

CREATE TABLE operations (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL
        CHECK (kind IN ('create_volume', 'delete_volume', 'create_snapshot',
                        'delete_snapshot', 'merge_snapshot', 'restore_volume',
                        'clone_volume')),
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
    end_time      INTEGER
) STRICT;

CREATE INDEX operations_active ON operations (state) WHERE state IN ('pending', 'running');
CREATE INDEX operations_target ON operations (target);
CREATE INDEX operations_volume ON operations (volume_id);

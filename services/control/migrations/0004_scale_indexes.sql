-- Indexes for the control path at scale (`cowsnap bench api`: 10,000
-- volumes, 100,000 snapshots and their operations). Each serves a query
-- that otherwise reads rows in proportion to the catalog:
-- - a page of snapshots in (volume, creation) order, and the next `seq`
--   of a volume, read the volume's rows in order instead of sorting;
-- - the bytes of a worker's volumes still being created (asked on every
--   volume create) read only those, not every volume of the worker
--   (this index replaces volumes_worker, its prefix);
-- - the unfinished operation of a volume or of a snapshot (read by every
--   get and for every row of a list) reads only unfinished operations,
--   not every operation a long-lived volume has had.
CREATE INDEX snapshots_order ON snapshots (volume_id, seq);
DROP INDEX volumes_worker;
CREATE INDEX volumes_worker_state ON volumes (worker_id, state);
CREATE INDEX operations_active_volume ON operations (volume_id)
    WHERE state IN ('pending', 'running');
CREATE INDEX operations_active_target ON operations (target)
    WHERE state IN ('pending', 'running');

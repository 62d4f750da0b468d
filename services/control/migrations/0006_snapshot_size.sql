-- Volumes grow (ExpandVolume) and their snapshots keep the size the volume
-- had when each was taken. Until now every snapshot had its volume's size.
ALTER TABLE snapshots ADD COLUMN size_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE snapshots
SET size_bytes = (SELECT v.size_bytes FROM volumes v WHERE v.id = snapshots.volume_id);

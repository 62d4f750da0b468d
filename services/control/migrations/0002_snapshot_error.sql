-- Why a snapshot is INVALID or FAILED, as its worker reports it.
ALTER TABLE snapshots ADD COLUMN error TEXT;

-- Deleting an artifact (issue 18): its stored objects go, its records and events stay, and the
-- row becomes a tombstone. An artifact is deleted when deleted_at_ms is set (its status reads
-- 'deleted' through services/records.SELECT_ARTIFACT, whatever the upload's own status was);
-- purged_at_ms is set once storage no longer holds its objects (a failed purge is retried by
-- the sweeper and by the next delete). Columns, not a new status value: SQLite cannot change a
-- CHECK constraint in place, and these say who, when and why besides.
ALTER TABLE artifacts ADD COLUMN deleted_at_ms BIGINT;
ALTER TABLE artifacts ADD COLUMN deleted_by TEXT REFERENCES principals (id);
ALTER TABLE artifacts ADD COLUMN delete_reason TEXT;
ALTER TABLE artifacts ADD COLUMN purged_at_ms BIGINT;
-- The sweeper's question: deleted, not yet purged.
CREATE INDEX artifacts_unpurged ON artifacts (deleted_at_ms) WHERE deleted_at_ms IS NOT NULL AND purged_at_ms IS NULL;

-- Downloads by artifact id as sessions with receipts, and per-grant limits (issue 18).
-- A grant may bound how many downloads it gives (`max_downloads`, NULL: no limit); `downloads`
-- counts the sessions it opened, incremented by a guarded UPDATE as a link's are, so two
-- replicas cannot both spend the last one. Granting again is a new decision: the count restarts.
ALTER TABLE grants ADD COLUMN max_downloads INTEGER;
ALTER TABLE grants ADD COLUMN downloads INTEGER NOT NULL DEFAULT 0;

-- One download of an artifact by its id (GET /v1/artifacts/{id}/download): opened once,
-- renewed without counting while a long download needs fresh URLs, ended by the downloader's
-- signed receipt, as a link's session is. `counted` says a grant's download was spent on it.
CREATE TABLE download_sessions (
    id                  TEXT PRIMARY KEY,
    artifact_id         TEXT NOT NULL REFERENCES artifacts (id),
    principal_id        TEXT NOT NULL REFERENCES principals (id),
    counted             BOOLEAN NOT NULL,
    opened_at_ms        BIGINT NOT NULL,
    receipt_at_ms       BIGINT,
    receipt_signature   BLOB
);
CREATE INDEX download_sessions_artifact ON download_sessions (artifact_id, principal_id);

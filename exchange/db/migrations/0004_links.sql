-- Grants, download links and their sessions (issue: grants and links).
-- Portable SQL: BLOB becomes BYTEA on PostgreSQL; times are integer milliseconds (UTC).

-- A tester's right to an artifact of another organisation, until a time or until revoked. The
-- tester's age header lives in artifact_headers while the grant is active; revoking removes it.
-- One row per (artifact, principal): granting again after a revocation renews the row.
CREATE TABLE grants (
    artifact_id         TEXT NOT NULL REFERENCES artifacts (id),
    principal_id        TEXT NOT NULL REFERENCES principals (id),
    granted_by          TEXT NOT NULL REFERENCES principals (id),
    created_at_ms       BIGINT NOT NULL,
    expires_at_ms       BIGINT,
    revoked_at_ms       BIGINT,
    PRIMARY KEY (artifact_id, principal_id)
);
CREATE INDEX grants_principal ON grants (principal_id);

-- A download link: a capability for one artifact, bound to one recipient. The token is kept
-- only as its SHA-256. `downloads` counts opened download sessions against `max_downloads`
-- (NULL: no limit); the guarded UPDATE that increments it is what lets exactly one of several
-- racers take the last count.
CREATE TABLE links (
    id                  TEXT PRIMARY KEY,
    token_sha256        BLOB NOT NULL UNIQUE,
    artifact_id         TEXT NOT NULL REFERENCES artifacts (id),
    recipient_id        TEXT NOT NULL REFERENCES principals (id),
    created_by          TEXT NOT NULL REFERENCES principals (id),
    created_at_ms       BIGINT NOT NULL,
    expires_at_ms       BIGINT NOT NULL,
    max_downloads       INTEGER,
    downloads           INTEGER NOT NULL DEFAULT 0,
    revoked_at_ms       BIGINT
);
CREATE INDEX links_artifact ON links (artifact_id, created_at_ms);

-- One counted download of a link: its ranged requests carry the session id and are not counted
-- again. The receipt (the recipient's Ed25519 signature over the manifest digest) closes it.
CREATE TABLE link_sessions (
    id                  TEXT PRIMARY KEY,
    link_id             TEXT NOT NULL REFERENCES links (id),
    opened_at_ms        BIGINT NOT NULL,
    receipt_at_ms       BIGINT,
    receipt_signature   BLOB
);
CREATE INDEX link_sessions_link ON link_sessions (link_id);

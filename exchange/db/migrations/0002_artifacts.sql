-- Artifacts, their files and multipart uploads (issue: encrypted artifacts).
-- Portable SQL: BLOB becomes BYTEA on PostgreSQL; times are integer milliseconds (UTC).

-- One artifact: a file or a tree of files, owned by an organisation. Uploads start 'uploading',
-- end 'complete' (manifest verified and stored) or 'aborted' (by its uploader, or abandoned).
CREATE TABLE artifacts (
    id                  TEXT PRIMARY KEY,
    org_id              TEXT NOT NULL REFERENCES orgs (id),
    name                TEXT NOT NULL,
    kind                TEXT NOT NULL CHECK (kind IN ('model-weights', 'dataset', 'report',
                                                      'finding-attachment', 'other')),
    status              TEXT NOT NULL CHECK (status IN ('uploading', 'complete', 'aborted')),
    created_by          TEXT NOT NULL REFERENCES principals (id),
    created_at_ms       BIGINT NOT NULL,
    finished_at_ms      BIGINT,
    part_size           BIGINT NOT NULL,
    file_count          INTEGER NOT NULL,
    plaintext_bytes     BIGINT NOT NULL,
    -- The uploader's signed manifest: canonical JSON bytes exactly as signed, and the signature.
    manifest            BLOB,
    manifest_signature  BLOB,
    manifest_sha256     BLOB
);
CREATE INDEX artifacts_org ON artifacts (org_id, created_at_ms);
CREATE INDEX artifacts_status ON artifacts (status, created_at_ms);

-- One file of an artifact: its path (metadata only; the storage key is the server's own), its
-- sizes, its payload nonce (also the first 16 bytes of the stored object) and its upload.
CREATE TABLE artifact_files (
    artifact_id         TEXT NOT NULL REFERENCES artifacts (id),
    idx                 INTEGER NOT NULL,
    path                TEXT NOT NULL,
    plaintext_size      BIGINT NOT NULL,
    ciphertext_size     BIGINT NOT NULL,
    part_count          INTEGER NOT NULL,
    payload_nonce       BLOB NOT NULL,
    object_key          TEXT NOT NULL UNIQUE,
    upload_id           TEXT,
    PRIMARY KEY (artifact_id, idx),
    UNIQUE (artifact_id, path)
);

-- The SHA-256 each part URL was bound to: storage refuses any other bytes for that part, so
-- these digests describe what is stored, and completion checks the manifest against them.
CREATE TABLE artifact_parts (
    artifact_id         TEXT NOT NULL,
    file_idx            INTEGER NOT NULL,
    number              INTEGER NOT NULL,
    size                BIGINT NOT NULL,
    sha256              BLOB NOT NULL,
    PRIMARY KEY (artifact_id, file_idx, number),
    FOREIGN KEY (artifact_id, file_idx) REFERENCES artifact_files (artifact_id, idx)
);

-- One age header per recipient per artifact: that recipient's X25519 stanza and the header MAC.
-- header || payload is a standard age file for that recipient.
CREATE TABLE artifact_headers (
    artifact_id         TEXT NOT NULL REFERENCES artifacts (id),
    principal_id        TEXT NOT NULL REFERENCES principals (id),
    header              BLOB NOT NULL,
    created_at_ms       BIGINT NOT NULL,
    PRIMARY KEY (artifact_id, principal_id)
);
CREATE INDEX artifact_headers_principal ON artifact_headers (principal_id);

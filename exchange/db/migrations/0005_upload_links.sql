-- Upload links (issue: grants and links): a bounded, expiring right to upload one artifact into
-- an organisation — how testers return files. Portable SQL, times in integer milliseconds (UTC).

-- The token is kept only as its SHA-256. The link is bound to one uploader, one kind and a
-- maximum size; it is spent by the first upload it starts (`artifact_id`, set by a guarded
-- UPDATE in the transaction that creates the artifact, so two racers cannot both use it).
CREATE TABLE upload_links (
    id                  TEXT PRIMARY KEY,
    token_sha256        BLOB NOT NULL UNIQUE,
    org_id              TEXT NOT NULL REFERENCES orgs (id),
    uploader_id         TEXT NOT NULL REFERENCES principals (id),
    kind                TEXT NOT NULL CHECK (kind IN ('model-weights', 'dataset', 'report',
                                                      'finding-attachment', 'other')),
    max_bytes           BIGINT NOT NULL,
    note                TEXT NOT NULL DEFAULT '',
    created_by          TEXT NOT NULL REFERENCES principals (id),
    created_at_ms       BIGINT NOT NULL,
    expires_at_ms       BIGINT NOT NULL,
    revoked_at_ms       BIGINT,
    artifact_id         TEXT REFERENCES artifacts (id),
    used_at_ms          BIGINT
);
CREATE INDEX upload_links_org ON upload_links (org_id, created_at_ms);
CREATE INDEX upload_links_uploader ON upload_links (uploader_id);

-- A download link's optional IP allow-list: networks in CIDR form, comma-separated (NULL: any).
ALTER TABLE links ADD COLUMN allowed_networks TEXT;

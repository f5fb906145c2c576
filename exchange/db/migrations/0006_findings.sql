-- Findings (issue: findings): testers report back, encrypted to the developer, with a tracked
-- lifecycle. Portable SQL: BLOB becomes BYTEA on PostgreSQL; times are integer milliseconds (UTC).

-- A finding's body and attachments are artifacts (kind 'finding-attachment') owned by the
-- reported artifact's organisation and uploaded by the reporter; `subject_id` names the artifact
-- they report on, set in the transaction that creates them.
ALTER TABLE artifacts ADD COLUMN subject_id TEXT REFERENCES artifacts (id);

-- The finding: metadata in the clear (what auditors and both organisations see), the body and
-- the attachments only as references to encrypted artifacts.
CREATE TABLE findings (
    id                  TEXT PRIMARY KEY,
    artifact_id         TEXT NOT NULL REFERENCES artifacts (id),
    org_id              TEXT NOT NULL REFERENCES orgs (id),
    reporter_id         TEXT NOT NULL REFERENCES principals (id),
    reporter_org_id     TEXT NOT NULL REFERENCES orgs (id),
    body_id             TEXT NOT NULL UNIQUE REFERENCES artifacts (id),
    attachments_id      TEXT UNIQUE REFERENCES artifacts (id),
    title               TEXT NOT NULL,
    severity            TEXT NOT NULL CHECK (severity IN ('critical', 'high', 'medium', 'low', 'info')),
    category            TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('submitted', 'acknowledged', 'validated',
                                                        'remediated', 'wont-fix', 'closed')),
    created_at_ms       BIGINT NOT NULL,
    updated_at_ms       BIGINT NOT NULL
);
CREATE INDEX findings_artifact ON findings (artifact_id, created_at_ms);
CREATE INDEX findings_org ON findings (org_id, created_at_ms);
CREATE INDEX findings_reporter_org ON findings (reporter_org_id, created_at_ms);

-- Every move of a finding's status, the first being its submission. A note is an age payload
-- (nonce, then STREAM chunks) under the body's file key: never plaintext on the server.
CREATE TABLE finding_moves (
    finding_id          TEXT NOT NULL REFERENCES findings (id),
    seq                 INTEGER NOT NULL,
    from_status         TEXT,
    to_status           TEXT NOT NULL,
    actor_id            TEXT NOT NULL REFERENCES principals (id),
    at_ms               BIGINT NOT NULL,
    note                BLOB,
    PRIMARY KEY (finding_id, seq)
);

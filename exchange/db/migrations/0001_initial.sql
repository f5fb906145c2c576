-- Organisations, principals, invites, replay protection, and the audit log's events.
-- Portable SQL: BLOB becomes BYTEA on PostgreSQL; times are integer milliseconds (UTC).

CREATE TABLE orgs (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    created_at_ms   BIGINT NOT NULL
);

CREATE TABLE principals (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    org_id              TEXT NOT NULL REFERENCES orgs (id),
    role                TEXT NOT NULL CHECK (role IN ('admin', 'developer', 'tester', 'auditor')),
    key_id              TEXT NOT NULL UNIQUE,
    signing_public_key  BLOB NOT NULL,
    age_recipient       TEXT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at_ms       BIGINT NOT NULL
);
CREATE INDEX principals_org ON principals (org_id);

-- Only the SHA-256 of an invite code is kept: a copy of the database enrols nobody.
CREATE TABLE invites (
    id              TEXT PRIMARY KEY,
    code_hash       BLOB NOT NULL UNIQUE,
    role            TEXT NOT NULL CHECK (role IN ('admin', 'developer', 'tester', 'auditor')),
    org_id          TEXT NOT NULL REFERENCES orgs (id),
    created_by      TEXT REFERENCES principals (id),
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    used_at_ms      BIGINT,
    used_by         TEXT REFERENCES principals (id)
);

-- Nonces of accepted request signatures, kept until their signatures could no longer pass the
-- clock-skew check; shared by every replica, so a replay to another replica is caught too.
CREATE TABLE seen_nonces (
    key_id          TEXT NOT NULL,
    nonce           TEXT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (key_id, nonce)
);
CREATE INDEX seen_nonces_expiry ON seen_nonces (expires_at_ms);

-- The log's size, one row. Appending increments it with an UPDATE, which serialises appenders
-- (SQLite: the single writer; PostgreSQL: the row lock, held to commit) and, unlike a sequence,
-- rolls back with the transaction: indices have no gaps.
CREATE TABLE audit_head (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    size    BIGINT NOT NULL
);
INSERT INTO audit_head (id, size) VALUES (1, 0);

-- One row per event. `leaf` holds the event's RFC 8785 canonical JSON bytes exactly as hashed
-- into the log; the other columns are copies of some of its fields, for queries.
CREATE TABLE audit_events (
    idx             BIGINT PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    time_ms         BIGINT NOT NULL,
    action          TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    reason          TEXT,
    actor_id        TEXT,
    actor_org       TEXT,
    resource_type   TEXT,
    resource_id     TEXT,
    request_id      TEXT,
    leaf            BLOB NOT NULL
);
CREATE INDEX audit_events_actor ON audit_events (actor_id, idx);
CREATE INDEX audit_events_org ON audit_events (actor_org, idx);
CREATE INDEX audit_events_action ON audit_events (action, idx);
CREATE INDEX audit_events_resource ON audit_events (resource_type, resource_id, idx);
CREATE INDEX audit_events_time ON audit_events (time_ms);

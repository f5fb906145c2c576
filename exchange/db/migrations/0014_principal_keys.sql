-- Every key a principal has held (issue 18: key rotation). `principals` keeps the current pair,
-- the only one that authenticates; this table keeps them all, so that what was signed with a
-- retired key (an artifact's manifest) still verifies, and so that a key id is never enrolled
-- twice, by anyone: key_id is the primary key across the whole history. The current key is the
-- principal's row with valid_until_ms NULL; a rotation closes it and opens the next in one
-- transaction.
CREATE TABLE principal_keys (
    key_id              TEXT PRIMARY KEY,
    principal_id        TEXT NOT NULL REFERENCES principals (id),
    signing_public_key  BLOB NOT NULL,
    age_recipient       TEXT NOT NULL,
    valid_from_ms       BIGINT NOT NULL,
    valid_until_ms      BIGINT
);
CREATE INDEX principal_keys_principal ON principal_keys (principal_id, valid_from_ms);

-- The keys principals hold today, held since they enrolled.
INSERT INTO principal_keys (key_id, principal_id, signing_public_key, age_recipient, valid_from_ms, valid_until_ms)
SELECT key_id, id, signing_public_key, age_recipient, created_at_ms, NULL FROM principals;

-- A re-enrol invite (an admin's answer to lost keys) names the principal whose keys it replaces;
-- its role and organisation are that principal's. NULL: an invite for a new principal.
ALTER TABLE invites ADD COLUMN principal_id TEXT REFERENCES principals (id);

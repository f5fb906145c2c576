-- The log's current origin (issue: deployable beyond one machine; log key rotation).
-- Appends read it in the statement that takes their index, so after a key rotation
-- (services/logrotation.py) every replica appends under the new origin from the commit on.
-- NULL until a replica starts: it then takes that replica's origin (a log from before this).
ALTER TABLE audit_head ADD COLUMN origin TEXT;

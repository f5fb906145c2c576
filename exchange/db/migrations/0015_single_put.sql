-- A file of one part is sent with one presigned PUT of its object, not a multipart upload of its
-- own (issue 16: a directory of 1,000 small files). A PUT URL, unlike a part URL, outlives the
-- upload it was issued for: used after the artifact was aborted or deleted, it would put the
-- object back. put_until_ms is the latest time such a URL may still work (its expiry plus storage's
-- tolerance for clock skew); the sweeper deletes the object again once that has passed, if the
-- artifact is gone, and clears it. NULL: no PUT URL of this file is outstanding.
ALTER TABLE artifact_files ADD COLUMN put_until_ms BIGINT;
CREATE INDEX artifact_files_put_until ON artifact_files (put_until_ms) WHERE put_until_ms IS NOT NULL;

-- Sessions opened by a proof of the recipient's key (issue: edge hardening).
-- A link's counted session now opens only for whoever presents the proof from GET /l/TOKEN/challenge,
-- which the service encrypts to the recipient's age key. The proof's SHA-256 names the session it
-- opened, so every request carrying the same proof (curl's per-file commands) continues that one
-- session and is counted once. Sessions from before have none (NULLs never collide).
ALTER TABLE link_sessions ADD COLUMN proof_sha256 BLOB;
CREATE UNIQUE INDEX link_sessions_proof ON link_sessions (proof_sha256);

-- The audit log's Merkle tree and its signed checkpoints (issue: transparency log).
-- Portable SQL: BLOB becomes BYTEA on PostgreSQL; times are integer milliseconds (UTC).

-- Every complete perfect subtree of the RFC 6962 tree, keyed by (level, idx): level 0 holds the
-- leaf hashes, and the node at level L, index i covers leaves [i * 2^L, (i + 1) * 2^L). A node
-- is written in the transaction that appends its last leaf and never changes afterwards, so
-- any root, inclusion proof or consistency proof is a fold of O(log n) rows read by key
-- (exchange.format.merkle).
CREATE TABLE audit_tree_nodes (
    level   INTEGER NOT NULL,
    idx     BIGINT NOT NULL,
    hash    BLOB NOT NULL,
    PRIMARY KEY (level, idx)
);

-- Published checkpoints: the log's signed note (C2SP tlog-checkpoint) with the witnesses'
-- cosignature lines, one per tree size. Auditors fetch these; they are never rewritten.
CREATE TABLE audit_checkpoints (
    size            BIGINT PRIMARY KEY,
    note            BLOB NOT NULL,
    created_at_ms   BIGINT NOT NULL
);

-- Filtered queries by outcome and by actor organisation page in idx order.
CREATE INDEX audit_events_outcome ON audit_events (outcome, idx);

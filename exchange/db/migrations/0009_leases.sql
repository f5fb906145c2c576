-- One checkpoint signer at a time among the replicas (issue: a database lease with fencing).
-- Portable SQL: times are integer milliseconds (UTC) of the clock the lease is judged by.

-- A lease per job that only one replica may do at a time (today one: 'audit.signer'). The row is
-- made by the first replica that takes the lease and never deleted. `fence` numbers the terms:
-- it grows by one each time the lease passes to another holder (never when its holder renews),
-- and every write done under the lease re-checks, in its own transaction, that the row still
-- names its holder and its fence, so a replica that lost the lease cannot write (services/leases.py).
CREATE TABLE leases (
    name            TEXT PRIMARY KEY,
    holder          TEXT NOT NULL,
    fence           BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL
);

-- The lease term (leases.fence of 'audit.signer') under which each checkpoint was stored; NULL
-- for checkpoints stored before there was a signer lease.
ALTER TABLE audit_checkpoints ADD COLUMN fence BIGINT;

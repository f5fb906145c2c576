-- Limits shared by every replica (issue: several stateless replicas on one database): the token
-- buckets and the refusal counts that lived in each process's memory. Portable SQL; times are
-- integer milliseconds (UTC), the buckets' in microseconds. Neither table is a record: a row of
-- either can be lost (a restore, a purge) at the cost of a limit starting afresh.

-- A token bucket per key, namespaced by kind (`redeem-ip:SOURCE`, `redeem-link:SHA256HEX`,
-- `auth-failure:SOURCE`), kept as the time it will be full again (GCRA's "theoretical arrival
-- time"): its tokens at `now` are `burst - max(0, full_at_us - now) / interval`. Rate and burst
-- are the settings', passed with each statement. A row whose bucket is full is the same as no
-- row, so the purge deletes `full_at_us <= now` and the table holds the keys used within about
-- one refill time. No index on `full_at_us`: every take moves it, and the purge is a rare scan.
CREATE TABLE rate_buckets (
    key             TEXT PRIMARY KEY,
    full_at_us      BIGINT NOT NULL
);

-- Anonymous refusals counted per key and aligned window (api/refusals.py): `recorded` were
-- appended as events of their own (at most `refusal_log_allowance_events`, decided by a guarded
-- UPSERT here, so across all replicas); `suppressed` were only counted, added by each replica's
-- flush. Once the window has ended, one flush deletes its rows and appends their summaries in
-- the same transaction. `route` is '' for a refusal without a route (an unknown path, a parser
-- refusal).
CREATE TABLE refusal_counts (
    window_start_ms BIGINT NOT NULL,
    source          TEXT NOT NULL,
    action          TEXT NOT NULL,
    route           TEXT NOT NULL,
    code            TEXT NOT NULL,
    status          INTEGER NOT NULL,
    recorded        INTEGER NOT NULL DEFAULT 0,
    suppressed      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (window_start_ms, source, action, route, code, status)
);

-- How many keys of a window have a row of their own in refusal_counts: a key claims a place here
-- before its first row is written, and a window's places stop at `refusal_log_max_keys` (further
-- keys fold into the `other` key). Deleted with the window's counts.
CREATE TABLE refusal_windows (
    window_start_ms BIGINT PRIMARY KEY,
    keys            INTEGER NOT NULL
);

-- Indexes for the audit log's filtered queries at millions of events (issue 14: query speed).
-- A page is `... WHERE <filters> AND after < idx < size ORDER BY idx LIMIT n`: an index whose
-- equality columns are the page's filters, with idx last, hands the rows over in page order, so
-- a page reads about as many index entries as it returns however rare the match.
-- services/auditlog.py `query` writes each statement for one of these (`_WALK_ORDER`), on
-- both engines alike; the single-column ones are in 0001 and 0003.

-- The conjunctions auditors use: an organisation's downloads, its refusals, one action's
-- refusals. Each combination of common values can be rare, which no single-column index
-- (nor the planner's independence guess) finds without reading the common half.
CREATE INDEX audit_events_org_action_outcome ON audit_events (actor_org, action, outcome, idx);
CREATE INDEX audit_events_org_action ON audit_events (actor_org, action, idx);
CREATE INDEX audit_events_org_outcome ON audit_events (actor_org, outcome, idx);
CREATE INDEX audit_events_action_outcome ON audit_events (action, outcome, idx);
-- A resource type alone (0001's index leads with the type but then orders by id).
CREATE INDEX audit_events_resource_type ON audit_events (resource_type, idx);

-- Time is not in idx order (replicas' clocks differ), so a time window is found in
-- (time_ms, idx), read index-only: a short window's indices bound the page; a long window's
-- page walks (idx, time_ms), checking time without reading the rows it skips.
DROP INDEX audit_events_time;
CREATE INDEX audit_events_time ON audit_events (time_ms, idx);
CREATE INDEX audit_events_idx_time ON audit_events (idx, time_ms);

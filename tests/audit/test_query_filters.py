"""Filtered queries return exactly the matching events, in order, whichever index reads them.

`services.auditlog.query` shapes each statement for one index (migration 0011) and narrows a
time window by probes of the time index first; these tests hold every documented filter and
the usual conjunctions against a plain Python filter over the same events, page by page, on
both databases, with the probes' thresholds above and below the windows' sizes (so each way of
reading a window is exercised). Times are not in index order (the
clocks of replicas differ), as in a real log.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from exchange.db import Database
from exchange.errors import AuditLogDamaged
from exchange.services import auditlog
from exchange.services.audit import Actor, AuditLog, Context, Entry

T0 = 1_780_000_000_000
ACTORS = [
    Actor(type="principal", id=f"prn_{i}", name=f"u{i}", org=f"org{i % 3}", role="tester", key_id=f"k{i}")
    for i in range(7)
]
ACTIONS = ["artifact.download", "artifact.upload", "link.create", "grant.create"]
N = 300


async def _log(db: Database) -> list[dict[str, Any]]:
    """N events with every filtered field varied; returns the events as stored (their leaves)."""
    rng = random.Random(7)
    times = iter([T0 + i * 10 + rng.randrange(-40, 40) for i in range(N)])  # skewed clocks
    log = AuditLog(origin="test.example/audit", clock=lambda: next(times))
    entries = []
    for _ in range(N):
        outcome = rng.choice(["allowed", "allowed", "allowed", "denied", "error"])
        kind = rng.choice(["artifact", "link", None])
        entries.append(
            Entry(
                action=rng.choice(ACTIONS),
                outcome=outcome,  # type: ignore[arg-type]
                reason="no" if outcome != "allowed" else None,
                resource=None if kind is None else {"type": kind, "id": f"{kind}{rng.randrange(4)}"},
                actor=None if rng.random() < 0.1 else rng.choice(ACTORS),  # None: the system
            )
        )
    async with db.transaction() as conn:
        for start in range(0, N, 50):
            await log.append_many(conn, Context(), entries[start : start + 50])
    async with db.read() as conn:
        rows = await conn.fetchall("SELECT leaf FROM audit_events ORDER BY idx")
    return [json.loads(bytes(r["leaf"])) for r in rows]


def _matches(event: dict[str, Any], where: auditlog.Filter) -> bool:
    actor, resource = event.get("actor") or {}, event.get("resource") or {}
    return (
        (where.actor_id is None or actor.get("id") == where.actor_id)
        and (where.org is None or actor.get("org") == where.org)
        and (where.action is None or event["action"] == where.action)
        and (where.outcome is None or event["outcome"]["result"] == where.outcome)
        and (where.resource_type is None or resource.get("type") == where.resource_type)
        and (where.resource_id is None or resource.get("id") == where.resource_id)
        and (where.since_ms is None or event["time_ms"] >= where.since_ms)
        and (where.until_ms is None or event["time_ms"] < where.until_ms)
    )


FILTERS = [
    auditlog.Filter(),
    auditlog.Filter(actor_id="prn_3"),
    auditlog.Filter(actor_id="nobody"),
    auditlog.Filter(org="org1"),
    auditlog.Filter(action="grant.create"),
    auditlog.Filter(outcome="error"),
    auditlog.Filter(resource_type="link"),
    auditlog.Filter(resource_type="artifact", resource_id="artifact2"),
    auditlog.Filter(resource_id="link1"),
    auditlog.Filter(since_ms=T0 + 2500),
    auditlog.Filter(until_ms=T0 + 300),
    auditlog.Filter(since_ms=T0 + 1000, until_ms=T0 + 1100),
    auditlog.Filter(since_ms=T0 + 10 * N + 100),  # after every event
    auditlog.Filter(org="org0", action="artifact.download"),
    auditlog.Filter(org="org2", action="artifact.upload", outcome="denied"),
    auditlog.Filter(org="org1", outcome="allowed"),
    auditlog.Filter(action="link.create", outcome="error"),
    auditlog.Filter(actor_id="prn_1", action="artifact.download"),
    auditlog.Filter(actor_id="prn_2", since_ms=T0 + 1500),
    auditlog.Filter(org="org0", since_ms=T0 + 800, until_ms=T0 + 2000),
    auditlog.Filter(resource_type="link", resource_id="link0", outcome="allowed", until_ms=T0 + 2000),
    auditlog.Filter(org="org1", action="grant.create", outcome="allowed", actor_id="prn_4"),
]


# Time windows longer than both thresholds (walked from the cursor), longer than the probe but
# scanned for their bounds, and shorter than the probe (read by time).
@pytest.mark.parametrize(("probe_rows", "scan_rows"), [(2, 2), (2, 1000), (1000, 1000)])
async def test_every_filter_returns_exactly_its_events_page_by_page(
    db: Database, probe_rows: int, scan_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auditlog, "_TIME_PROBE_ROWS", probe_rows)
    monkeypatch.setattr(auditlog, "_TIME_SCAN_ROWS", scan_rows)
    events = await _log(db)
    size = N - 20  # pinned below the head: later events are never served
    for where in FILTERS:
        want = [i for i, event in enumerate(events[:size]) if _matches(event, where)]
        for limit in (7, 100):
            got: list[int] = []
            after = -1
            async with db.read() as conn:
                while True:
                    page = await auditlog.query(conn, where, size=size, after=after, limit=limit)
                    for idx, leaf in page:
                        assert json.loads(leaf) == events[idx]
                    got += [idx for idx, _ in page]
                    if len(page) < limit:
                        break
                    after = page[-1][0]
            assert got == want, (where, limit)
        # From a cursor in the middle: what follows it, in order.
        async with db.read() as conn:
            page = await auditlog.query(conn, where, size=size, after=size // 2, limit=10)
        assert [idx for idx, _ in page] == [i for i in want if i > size // 2][:10], where


async def test_a_row_whose_columns_lie_is_refused_whichever_index_found_it(db: Database) -> None:
    """The check of each row against its leaf still runs on every read path."""
    events = await _log(db)
    victim = next(i for i, e in enumerate(events) if (e.get("actor") or {}).get("org") == "org1")
    async with db.transaction() as conn:
        await conn.execute("UPDATE audit_events SET action = $1 WHERE idx = $2", "forged.action", victim)
    for where in (
        auditlog.Filter(action="forged.action"),
        auditlog.Filter(org="org1", action="forged.action"),
        auditlog.Filter(action="forged.action", since_ms=events[victim]["time_ms"]),
    ):
        async with db.read() as conn:
            with pytest.raises(AuditLogDamaged, match=f"event {victim}: the action column"):
                await auditlog.query(conn, where, size=N, after=-1, limit=100)

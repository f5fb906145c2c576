"""The service checks its own log and fails closed (issue 12, item 4).

Each tamper goes straight at the database with SQL, once while the service is stopped (found
by the check at start) and once while it runs (found before the next checkpoint, or by the next
append). Failing closed means: `/readyz` answers 503 naming `audit-log-damaged`, every write
answers 503 `audit-log-damaged` and changes nothing, no checkpoint is signed, and the service
logs one ERROR line naming what did not match. An undamaged log restarts without an alarm.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from exchange.api.audit import PUBLISHER
from exchange.api.keys import AUDIT
from exchange.client.audit import AuditClient
from exchange.db import Database
from exchange.errors import ExchangeError
from exchange.services.audit import Actor, Context, Entry
from tests.audit.conftest import Restart, add_events, edit_leaf, publish
from tests.conftest import Stack

_TABLES = ("orgs", "invites", "audit_events", "audit_tree_nodes", "audit_checkpoints")


async def _leaf(db: Database, idx: int) -> bytes:
    return bytes(await db.fetchval("SELECT leaf FROM audit_events WHERE idx = $1", idx))


async def _edit_leaf(db: Database, idx: int) -> None:
    """One leaf's bytes changed (a detail no column copies); its row's columns left alone."""
    forged = edit_leaf(await _leaf(db, idx), details={"note": "nothing happened here"})
    async with db.transaction() as conn:
        assert await conn.execute("UPDATE audit_events SET leaf = $1 WHERE idx = $2", forged, idx) == 1


async def _edit_action_column(db: Database, idx: int) -> None:
    """Only the indexed `action` column changed: the leaf, and so the tree, untouched."""
    async with db.transaction() as conn:
        assert (
            await conn.execute("UPDATE audit_events SET action = 'nothing.to.see' WHERE idx = $1", idx) == 1
        )


async def _delete_last_row(db: Database, idx: int) -> None:
    async with db.transaction() as conn:
        assert (
            await conn.execute("DELETE FROM audit_events WHERE idx = (SELECT MAX(idx) FROM audit_events)")
            == 1
        )


async def _row_past_head(db: Database, idx: int) -> None:
    """A well-formed event slipped in three places past the head."""
    head = int(await db.fetchval("SELECT size FROM audit_head"))
    event = json.loads(await _leaf(db, idx)) | {"idx": head + 3, "id": str(uuid.uuid4())}
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO audit_events (idx, id, time_ms, action, outcome, leaf) VALUES ($1, $2, $3, $4, $5, $6)",
            head + 3,
            event["id"],
            event["time_ms"],
            event["action"],
            event["outcome"]["result"],
            edit_leaf(await _leaf(db, idx), idx=head + 3, id=event["id"]),
        )


TAMPERS: dict[str, Callable[[Database, int], Awaitable[None]]] = {
    "leaf": _edit_leaf,
    "action-column": _edit_action_column,
    "last-row": _delete_last_row,
    "row-past-head": _row_past_head,
}


async def _history(stack: Stack) -> None:
    """Events of every shape: real requests, refusals, resources, reasons, non-ASCII text."""
    await stack.principal("audra", "auditor", org="ukaisi")
    async with stack.client(stack.admin) as admin:
        await admin.create_org("lab-b")
        with pytest.raises(ExchangeError):
            await admin.create_org("lab-b")  # a refusal, logged with its reason
    alice = Actor(type="principal", id=str(uuid.uuid4()), name="alice", org="lab-b", role="tester")
    await add_events(stack, 25)
    async with stack.db.transaction() as conn:
        await stack.app[AUDIT].append_many(
            conn,
            Context(actor=alice, ip="192.0.2.7", user_agent="café ☕ agent", request_id="r-1"),
            [
                Entry("artifact.download", resource={"type": "artifact", "id": "a1"}, details={"f": "é"}),
                Entry(
                    "artifact.download", outcome="denied", reason="link-expired", resource={"type": "link"}
                ),
                Entry("finding.share", details={"to": ["lab", "ukaisi"], "n": 3, "ok": True}),
            ],
        )


async def _readyz(stack: Stack) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(stack.url + "/readyz") as resp:
        return resp.status, await resp.json(content_type=None)


async def _counts(stack: Stack) -> dict[str, int]:
    counts = {t: await stack.count(t) for t in _TABLES}
    return counts | {"head": int(await stack.db.fetchval("SELECT size FROM audit_head"))}


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def _assert_failed_closed(stack: Stack, caplog: pytest.LogCaptureFixture, names: str) -> None:
    before = await _counts(stack)
    status, body = await _readyz(stack)
    assert status == 503, body
    assert body["code"] == "audit-log-damaged" and body["checks"]["audit-log"] == "audit-log-damaged"
    async with stack.client(stack.admin) as admin:
        for write in (admin.create_org("after-damage"), admin.create_invite(role="auditor", org="operators")):
            with pytest.raises(ExchangeError) as refused:
                await write
            assert refused.value.code == "audit-log-damaged" and refused.value.extra["status"] == 503
        # An audited read cannot be recorded either, so it is refused too, never served.
        with pytest.raises(ExchangeError) as read:
            [row async for row in AuditClient(admin).query({"action": "test.event"})]
        assert read.value.code == "audit-log-damaged"
    assert await stack.app[PUBLISHER].publish() is None
    assert await _counts(stack) == before  # nothing written, no checkpoint signed
    [line] = _errors(caplog)
    assert line.startswith("audit-log-damaged: ") and names in line, line


_NAMES = {
    "leaf": "does not match the leaves under it",
    "action-column": "the action column does not match its leaf",
    "last-row": "is missing",
    "row-past-head": "beyond the log's head",
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_damage_done_while_stopped_is_found_at_start(
    stack: Stack, restart: Restart, caplog: pytest.LogCaptureFixture, tamper: str
) -> None:
    await _history(stack)
    size = await publish(stack)
    target = size // 2

    async def damage(db: Database) -> None:
        await TAMPERS[tamper](db, target)

    stack = await restart(stack, while_stopped=damage)
    await _assert_failed_closed(stack, caplog, _NAMES[tamper])


@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_damage_done_while_running_is_found_before_the_next_checkpoint(
    stack: Stack, caplog: pytest.LogCaptureFixture, tamper: str
) -> None:
    await _history(stack)
    await publish(stack)  # checked up to here
    await add_events(stack, 7)  # not checked yet
    size = int(await stack.db.fetchval("SELECT size FROM audit_head"))
    checkpoints = await stack.count("audit_checkpoints")
    await TAMPERS[tamper](stack.db, size - 3)
    assert await stack.app[PUBLISHER].publish() is None
    assert await stack.count("audit_checkpoints") == checkpoints
    await _assert_failed_closed(stack, caplog, _NAMES[tamper])


async def test_deleted_last_row_is_not_appended_past(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """The last row deleted while running: the very next write is refused, before any checkpoint."""
    await _history(stack)
    size = await publish(stack)
    await _delete_last_row(stack.db, size - 1)
    async with stack.client(stack.admin) as admin:
        with pytest.raises(ExchangeError) as refused:
            await admin.create_org("past-the-gap")
    assert refused.value.code == "audit-log-damaged"
    assert await stack.db.fetchval("SELECT MAX(idx) FROM audit_events") == size - 2
    assert await stack.db.fetchval("SELECT COUNT(*) FROM orgs WHERE name = 'past-the-gap'") == 0
    await _assert_failed_closed(stack, caplog, "is missing")


async def test_a_misfiled_row_is_not_served(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A column edited while running, after the check read it: the query that selects the row by
    the edited column answers 503 instead of serving an event under a filter it does not match."""
    await _history(stack)
    await publish(stack)
    await _edit_action_column(stack.db, 3)
    await add_events(stack, 1)
    await publish(stack)
    async with stack.client(stack.admin) as admin:
        with pytest.raises(ExchangeError) as refused:
            [row async for row in AuditClient(admin).query({"action": "nothing.to.see"})]
    assert refused.value.code == "audit-log-damaged"
    await _assert_failed_closed(stack, caplog, "event 3: the action column does not match its leaf")


async def test_an_undamaged_log_restarts_without_alarm(
    stack: Stack, restart: Restart, caplog: pytest.LogCaptureFixture
) -> None:
    await _history(stack)
    # Many appends, across several of the check's batches, then a checkpoint inside the last one.
    await add_events(stack, 12_345, details={"text": "ünïcode ✓"})
    await publish(stack)
    await add_events(stack, 3)
    stack = await restart(stack)
    assert (await _readyz(stack))[0] == 200
    async with stack.client(stack.admin) as admin:
        await admin.create_org("after-restart")
    before = await stack.count("audit_checkpoints")
    assert await stack.app[PUBLISHER].publish() is not None
    assert await stack.count("audit_checkpoints") == before + 1
    # And again, now that the newest checkpoint covers everything.
    stack = await restart(stack)
    assert (await _readyz(stack))[0] == 200
    async with stack.client(stack.admin) as admin:
        await admin.create_org("after-second-restart")
        rows = [row async for row in AuditClient(admin).query({"action": "org.create"})]
    assert {row["event"]["details"].get("name") for row in rows} >= {"lab-b", "after-restart"}
    assert _errors(caplog) == []

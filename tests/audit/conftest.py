"""Helpers for the audit log tests: events, publication, exports, verification, tampering.

Tampering goes straight at the database with SQL, behind the service's back, the way an
operator with database access (or an intruder) could; the verdicts come from the offline
verifier (`exchange.auditverify`), which trusts only the keys the auditor pinned.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import rfc8785
from aiohttp.test_utils import TestServer

from exchange import auditverify
from exchange.api.app import create_app
from exchange.api.audit import PUBLISHER, SIGNER
from exchange.api.keys import AUDIT, CLOCK
from exchange.client.audit import AuditClient
from exchange.db import Database, connect
from exchange.dev.seaweed import SeaweedFS
from exchange.format import merkle
from exchange.identity import Identity
from exchange.services.audit import EVENT_COLUMNS, AuditLog, Context, Entry, event_columns
from exchange.services.auditlog import Publisher
from tests.conftest import FakeClock, Stack, start_stack


@dataclass
class Auditor:
    """One auditor organisation: its identity and its own verify state directory."""

    stack: Stack
    identity: Identity
    state: Path

    async def export(self, out: Path) -> Path:
        saved = auditverify.State.load(self.state)
        async with self.stack.client(self.identity) as c:
            await AuditClient(c).export(out, since_size=(saved.size or 0) if saved else 0)
        return out

    def verify(self, bundle: Path, **kwargs: Any) -> auditverify.Report:
        vkey = kwargs.pop("vkey", self.stack.app[SIGNER].verifier_key())
        return auditverify.run(
            bundle,
            self.state,
            vkey=vkey,
            witness_vkeys=kwargs.pop("witness_vkeys", ()),
            quorum=kwargs.pop("quorum", None),
        )

    def verdict(self, bundle: Path, **kwargs: Any) -> str:
        try:
            self.verify(bundle, **kwargs)
        except auditverify.VerifyFailure as exc:
            return exc.kind
        return "ok"


async def add_events(stack: Stack, n: int, action: str = "test.event", **fields: Any) -> None:
    async with stack.db.transaction() as conn:
        await stack.app[AUDIT].append_many(conn, Context(), [Entry(action, **fields) for _ in range(n)])


async def publish(stack: Stack) -> int:
    """Publish a checkpoint of the current tree now; return its size."""
    await stack.app[PUBLISHER].publish()
    row = await stack.db.fetchone("SELECT MAX(size) AS size FROM audit_checkpoints")
    assert row is not None
    return int(row["size"])


async def leaves(stack: Stack) -> list[bytes]:
    return [bytes(r["leaf"]) for r in await stack.db.fetchall("SELECT leaf FROM audit_events ORDER BY idx")]


def edit_leaf(leaf: bytes, **changes: Any) -> bytes:
    return bytes(rfc8785.dumps(json.loads(leaf) | changes))


async def set_leaf(stack: Stack, idx: int, leaf: bytes) -> None:
    async with stack.db.transaction() as conn:
        assert await conn.execute("UPDATE audit_events SET leaf = $1 WHERE idx = $2", leaf, idx) == 1


async def forge_event(stack: Stack, idx: int, **changes: Any) -> bytes:
    """Change an event's leaf and every column copied from it alike (a careful forger)."""
    leaf = edit_leaf((await leaves(stack))[idx], **changes)
    values = event_columns(json.loads(leaf))
    sets = ", ".join(f"{name} = ${n}" for n, name in enumerate(EVENT_COLUMNS, start=2))
    async with stack.db.transaction() as conn:
        assert (
            await conn.execute(
                f"UPDATE audit_events SET leaf = $1, {sets} WHERE idx = ${len(EVENT_COLUMNS) + 2}",  # noqa: S608
                leaf,
                *values,
                idx,
            )
            == 1
        )
    return leaf


async def publish_as_restarted(stack: Stack) -> int | None:
    """Publish as a freshly started service would: a new publisher, which checks the whole log
    first (AuditLogDamaged if it does not hold together). The size it signed, if any."""
    clock = stack.app[CLOCK]
    log = AuditLog(origin=stack.settings.log_origin, clock=clock)
    publisher = Publisher(stack.db, log, stack.app[SIGNER], stack.settings, clock)
    await publisher.check_at_start()
    note = await publisher.publish()
    return None if note is None else publisher.check.size


async def rebuild_tree(stack: Stack) -> None:
    """Recompute every stored Merkle node from the leaves as they now are (a thorough forger)."""
    nodes: dict[tuple[int, int], bytes] = {}
    for size, leaf in enumerate(await leaves(stack)):
        for level, index, h in merkle.nodes_completed_by_append(
            size, merkle.leaf_hash(leaf), lambda level, i: nodes[level, i]
        ):
            nodes[level, index] = h
    async with stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_tree_nodes")
        for (level, index), h in nodes.items():
            await conn.execute(
                "INSERT INTO audit_tree_nodes (level, idx, hash) VALUES ($1, $2, $3)", level, index, h
            )


class Restart(Protocol):
    async def __call__(
        self, stack: Stack, *, while_stopped: Callable[[Database], Awaitable[None]] | None = None
    ) -> Stack: ...


@pytest.fixture
async def restart() -> AsyncIterator[Restart]:
    """Stop a stack's app, optionally do something to its database meanwhile (through a
    connection of its own), and start a new app on the same settings, database and clock."""
    started: list[Stack] = []

    async def _restart(
        stack: Stack, *, while_stopped: Callable[[Database], Awaitable[None]] | None = None
    ) -> Stack:
        await stack.server.close()
        if while_stopped is not None:
            db = await connect(stack.settings.effective_database_url)
            try:
                await while_stopped(db)
            finally:
                await db.close()
        server = TestServer(create_app(stack.settings, clock=stack.app[CLOCK]), host="127.0.0.1")
        await server.start_server()
        started.append(Stack(server, stack.settings, stack.admin, stack.tmp_path))
        return started[-1]

    yield _restart
    for s in started:
        await s.server.close()


@pytest.fixture
async def auditor(stack: Stack, tmp_path: Path) -> AsyncIterator[Auditor]:
    identity = await stack.principal("audra", "auditor", org="ukaisi")
    yield Auditor(stack, identity, tmp_path / "audra-state")


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    """The usual stack, with the background publisher idle: tests publish when they mean to."""
    s = await start_stack(
        tmp_path, database_url, seaweed, clock, audit_checkpoint_interval_s=3600.0, audit_heartbeat_s=0
    )
    yield s
    await s.server.close()

"""Appending: leaves, tree nodes written in the same transaction, batches, canonical bytes."""

from __future__ import annotations

import json

import pytest
import rfc8785

from exchange.db import Database
from exchange.errors import AuditLogDamaged
from exchange.format import merkle
from exchange.services import auditlog
from exchange.services.audit import MAX_LEAF_BYTES, Actor, AuditLog, Context, Entry, canonical_json

LOG = AuditLog(origin="exchange.local/audit", clock=lambda: 1_700_000_000_000)
CTX = Context(
    actor=Actor(type="principal", id="prn_1", name="alice", org="lab"), ip="192.0.2.1", request_id="r1"
)


@pytest.mark.parametrize(
    "event",
    [
        {"b": 1, "a": {"d": [1, "x", None, True], "c": False}},
        {"ua": 'Mozilla/5.0 "quoted" \\ back\tslash\n\x00\x1f\x7f'},
        {"name": "é 中文 \u2028 \U0001f600", "\ue000": 1, "\U0001f600": 2},  # non-ASCII: the rfc8785 path
        {"n": 2**53 - 1, "m": -(2**53 - 1)},
    ],
)
def test_canonical_json_is_rfc8785(event: dict[str, object]) -> None:
    assert canonical_json(event) == rfc8785.dumps(event)


async def test_append_writes_leaves_and_nodes_together(db: Database) -> None:
    async with db.transaction() as conn:
        first = await LOG.append(
            conn, CTX, action="one", resource={"type": "artifact", "id": "a1", "sha256": "00"}
        )
        batch = await LOG.append_many(conn, CTX, [Entry("many", details={"i": i}) for i in range(40)])
    assert first == 0 and batch == list(range(1, 41))
    rows = await db.fetchall("SELECT idx, leaf FROM audit_events ORDER BY idx")
    leaves = [bytes(r["leaf"]) for r in rows]
    assert all(canonical_json(json.loads(leaf)) == leaf for leaf in leaves)
    assert [json.loads(leaf)["idx"] for leaf in leaves] == list(range(41))
    async with db.read() as conn:
        assert await auditlog.root_at(conn, 41) == merkle.root([merkle.leaf_hash(leaf) for leaf in leaves])
        assert await auditlog.root_at(conn, 17) == merkle.root(
            [merkle.leaf_hash(leaf) for leaf in leaves[:17]]
        )
    assert await db.fetchval("SELECT COUNT(*) FROM audit_tree_nodes") == 2 * 41 - bin(41).count("1")


async def test_a_rolled_back_append_leaves_no_leaf_node_or_gap(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await LOG.append(conn, CTX, action="doomed")
            raise RuntimeError("the change failed")
    async with db.transaction() as conn:
        assert await LOG.append(conn, CTX, action="kept") == 0
    assert await db.fetchval("SELECT COUNT(*) FROM audit_tree_nodes") == 1


async def test_an_oversized_event_takes_no_index(db: Database) -> None:
    async with db.transaction() as conn:
        with pytest.raises(ValueError):
            await LOG.append(
                conn, CTX, action="big", details={f"k{i}": "x" * 500 for i in range(MAX_LEAF_BYTES // 500)}
            )
        assert await LOG.append(conn, CTX, action="small") == 0


async def test_a_damaged_tree_stops_appends(db: Database) -> None:
    log = AuditLog(origin="exchange.local/audit", clock=lambda: 1_700_000_000_000)
    async with db.transaction() as conn:
        await log.append_many(conn, CTX, [Entry("x")] * 3)
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM audit_tree_nodes WHERE level = 1")
    with pytest.raises(AuditLogDamaged, match="missing"):
        async with db.transaction() as conn:
            await log.append(conn, CTX, action="y")
    assert await db.fetchval("SELECT size FROM audit_head") == 3
    # The process stays failed closed, even once the nodes are back: only a restart clears it.
    assert log.damage is not None and "missing" in log.damage


async def test_event_ids_are_time_ordered_uuid7(db: Database) -> None:
    import uuid

    clock = iter(range(1_700_000_000_000, 1_700_000_000_100))
    log = AuditLog(origin="exchange.local/audit", clock=lambda: next(clock))
    async with db.transaction() as conn:
        await log.append_many(conn, CTX, [Entry("x")] * 20)
    ids = [
        json.loads(bytes(r["leaf"]))["id"]
        for r in await db.fetchall("SELECT leaf FROM audit_events ORDER BY idx")
    ]
    assert all(uuid.UUID(i).version == 7 for i in ids) and ids == sorted(ids) and len(set(ids)) == 20


async def test_many_proofs_read_in_one_go(db: Database) -> None:
    """A page of 1,000 rows with proofs reads tens of thousands of nodes: chunked, by key."""
    async with db.transaction() as conn:
        await LOG.append_many(conn, CTX, [Entry("x")] * 3000)
    rows = await db.fetchall("SELECT leaf FROM audit_events ORDER BY idx")
    hashes = [merkle.leaf_hash(bytes(r["leaf"])) for r in rows]
    root = merkle.root(hashes)
    async with db.read() as conn:
        proofs = await auditlog.inclusion_proofs(conn, list(range(0, 3000, 3)), 3000)
    for index, proof in proofs.items():
        merkle.verify_inclusion(hashes[index], index, 3000, proof, root)

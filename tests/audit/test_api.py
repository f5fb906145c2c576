"""The auditor API: roles, checkpoints, proofs, entries, filtered queries, heartbeats, concurrency."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from exchange.api.audit import SIGNER
from exchange.api.keys import AUDIT, CLOCK
from exchange.client.audit import AuditClient
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import NotFound, PermissionDenied, ValidationError
from exchange.format import merkle
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import Verifier, open_note
from exchange.services import auditlog
from exchange.services.audit import Actor
from tests.audit.conftest import Auditor, add_events, leaves, publish
from tests.conftest import FakeClock, Stack, start_stack


def _open(stack: Stack, note: str) -> Checkpoint:
    return Checkpoint.parse(
        open_note(note.encode(), [Verifier.from_vkey(stack.app[SIGNER].verifier_key())]).text
    )


async def test_vkey_is_public_and_matches_the_key_file(stack: Stack) -> None:
    async with stack.client() as anon:
        data = await AuditClient(anon).vkey()
    assert data["origin"] == stack.settings.log_origin
    assert data["vkey"] == stack.app[SIGNER].verifier_key()
    assert data["vkey"].startswith(stack.settings.log_origin + "+")
    key_file = stack.settings.effective_log_signing_key_file
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert stack.app[SIGNER].signer_key() == key_file.read_text().strip()


async def test_only_auditors_and_admins_read_the_log(stack: Stack) -> None:
    await publish(stack)
    tester = await stack.principal("tina", "tester")
    async with stack.client(tester) as c:
        for call in (
            AuditClient(c).checkpoint(),
            AuditClient(c).inclusion_proof(0, 1),
            AuditClient(c).consistency_proof(1, 1),
        ):
            with pytest.raises(PermissionDenied):
                await call
        with pytest.raises(PermissionDenied):
            [item async for item in AuditClient(c).query({})]
        with pytest.raises(PermissionDenied):
            [leaf async for leaf in AuditClient(c).entries(0, 1)]
    refused = [e for e in await stack.events() if e["outcome"]["result"] == "denied"]
    assert {e["action"] for e in refused} >= {"audit.checkpoint", "audit.query", "audit.export"}
    async with stack.client(stack.admin) as c:
        assert (await AuditClient(c).checkpoint())["size"] > 0


async def test_proofs_verify_against_signed_checkpoints(stack: Stack, auditor: Auditor) -> None:
    await add_events(stack, 20)
    first = _open(stack, (await _checkpoint(stack, auditor, await publish(stack)))["note"])
    await add_events(stack, 13)
    second = _open(stack, (await _checkpoint(stack, auditor, await publish(stack)))["note"])
    all_leaves = await leaves(stack)
    async with stack.client(auditor.identity) as c:
        api = AuditClient(c)
        for index in range(second.size):
            proof = await api.inclusion_proof(index, second.size)
            merkle.verify_inclusion(
                merkle.leaf_hash(all_leaves[index]), index, second.size, proof, second.root_hash
            )
        proof = await api.consistency_proof(first.size, second.size)
        merkle.verify_consistency(first.size, second.size, first.root_hash, second.root_hash, proof)
        assert (await api.checkpoint(first.size))["size"] == first.size
        with pytest.raises(NotFound):
            await api.checkpoint(first.size + 1)
        # Malformed requests: an index outside the tree, the empty tree, sizes the log has not reached.
        for index, size in ((second.size, second.size), (0, 0), (0, 10**9)):
            with pytest.raises(ValidationError):
                await api.inclusion_proof(index, size)
        for old, new in ((5, 4), (1, 10**9), (10**9, 10**9)):
            with pytest.raises(ValidationError):
                await api.consistency_proof(old, new)


async def _checkpoint(stack: Stack, auditor: Auditor, size: int) -> dict[str, object]:
    async with stack.client(auditor.identity) as c:
        return await AuditClient(c).checkpoint(size)


async def test_entries_are_the_exact_leaves_and_exports_are_logged(stack: Stack, auditor: Auditor) -> None:
    await add_events(stack, 7)
    size = await publish(stack)
    async with stack.client(auditor.identity) as c:
        got = [leaf async for leaf in AuditClient(c).entries(2, size)]
        with pytest.raises(ValidationError):
            [leaf async for leaf in AuditClient(c).entries(0, size + 100)]
    assert got == (await leaves(stack))[2:size]
    export = [e for e in await stack.events() if e["action"] == "audit.export"]
    assert export[0]["details"] == {"start": 2, "end": size}
    assert export[0]["actor"]["name"] == "audra" and export[0]["outcome"] == {"result": "allowed"}


async def test_filtered_query_pinned_paged_with_proofs(
    stack: Stack, auditor: Auditor, tmp_path: Path
) -> None:
    alice = Actor(type="principal", id="prn_alice", name="alice", org="ukaisi", role="tester")
    bob = Actor(type="principal", id="prn_bob", name="bob", org="lab", role="developer")
    now = stack.app[CLOCK]()
    await add_events(
        stack, 25, action="artifact.download", actor=alice, resource={"type": "artifact", "id": "a1"}
    )
    await add_events(stack, 5, action="artifact.download", actor=bob, outcome="denied", reason="no-grant")
    await add_events(stack, 4, action="finding.create", actor=alice, resource={"type": "finding", "id": "f9"})
    size = await publish(stack)
    await add_events(stack, 3, action="artifact.download", actor=alice)  # after the checkpoint: not seen

    async def run(filters: dict[str, str | int | None], **kwargs: object) -> list[dict[str, object]]:
        async with stack.client(auditor.identity) as c:
            return [item async for item in AuditClient(c).query(filters, **kwargs)]  # type: ignore[arg-type]

    rows = await run({"actor": "prn_alice", "action": "artifact.download"}, limit=10, proofs=True)
    assert len(rows) == 25  # three pages, all pinned to the same checkpoint
    assert {r["checkpoint"]["size"] for r in rows} == {size}  # type: ignore[index]
    checkpoint = _open(stack, rows[0]["checkpoint"]["note"])  # type: ignore[index]
    for r in rows:
        proof = [base64.b64decode(h) for h in r["proof"]]  # type: ignore[attr-defined]
        merkle.verify_inclusion(
            merkle.leaf_hash(r["leaf"].encode()),
            r["idx"],
            size,
            proof,
            checkpoint.root_hash,  # type: ignore[attr-defined,arg-type]
        )
    assert [r["idx"] for r in rows] == sorted(r["idx"] for r in rows)  # type: ignore[type-var]
    assert len(await run({"outcome": "denied", "org": "lab"})) == 5
    assert len(await run({"resource": "finding:f9"})) == 4
    assert len(await run({"resource": "artifact"})) == 25
    assert len(await run({"action": "finding.create", "since": now, "until": now + 1})) == 4
    assert await run({"action": "finding.create", "until": now}) == []
    # Queries are events too, with what was asked.
    queries = [e for e in await stack.events() if e["action"] == "audit.query"]
    assert queries[-1]["details"] == {
        "action": "finding.create",
        "until_ms": now,
        "size": size,
        "after": -1,
        "returned": 0,
    }
    assert all(q["actor"]["name"] == "audra" for q in queries)
    # A name works as well as an id; the pinned checkpoint predates the queries just made.
    assert await run({"actor": "audra", "action": "audit.query"}) == []
    await publish(stack)
    assert len(await run({"actor": "audra", "action": "audit.query"})) == len(queries) + 1


async def test_query_needs_a_published_checkpoint(stack: Stack, auditor: Auditor) -> None:
    async with stack.client(auditor.identity) as c:
        with pytest.raises(NotFound):
            [item async for item in AuditClient(c).query({"size": 3})]
        with pytest.raises(ValidationError):
            [item async for item in AuditClient(c).query({"outcome": "maybe"})]
        for params in ({"cursor": "12"}, {"cursor": "9" * 19 + ".1"}, {"size": "9" * 19}, {"since": "-1"}):
            with pytest.raises(ValidationError):
                await c.request("GET", "/v1/audit/events", params=params)
        with pytest.raises(ValidationError):
            await c.request("GET", "/v1/audit/checkpoints/" + "9" * 19)


async def test_heartbeat_when_idle(stack: Stack) -> None:
    settings = stack.settings.replace(audit_heartbeat_s=1)
    publisher = auditlog.Publisher(stack.db, stack.app[AUDIT], stack.app[SIGNER], settings, stack.app[CLOCK])
    assert await publisher.heartbeat_if_idle() is None  # first look: remembers the size
    assert await publisher.heartbeat_if_idle() is None  # not idle long enough
    await asyncio.sleep(1.05)
    idx = await publisher.heartbeat_if_idle()
    assert idx is not None
    event = (await stack.events())[idx]
    assert event["action"] == "audit.heartbeat" and event["actor"] == {"type": "system"}
    assert await publisher.heartbeat_if_idle() is None  # the heartbeat itself counts as activity


async def test_background_publisher_signs_after_a_batch(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    stack = await start_stack(tmp_path, database_url, seaweed, clock, audit_checkpoint_interval_s=0.05)
    try:
        await add_events(stack, 3)
        for _ in range(100):
            latest = await auditlog.latest_checkpoint(stack.db)
            if latest and latest[0] == int(await stack.db.fetchval("SELECT size FROM audit_head")):
                break
            await asyncio.sleep(0.05)
        assert latest is not None
        _open(stack, latest[1].decode())
    finally:
        await stack.server.close()


async def test_concurrent_appends_in_one_process_keep_the_tree(stack: Stack) -> None:
    await asyncio.gather(*(add_events(stack, 5) for _ in range(20)))
    async with stack.db.read() as conn:
        size = await auditlog.tree_size(conn)
        root = await auditlog.root_at(conn, size)
    assert root == merkle.root([merkle.leaf_hash(leaf) for leaf in await leaves(stack)])
    assert [json.loads(leaf)["idx"] for leaf in await leaves(stack)] == list(range(size))

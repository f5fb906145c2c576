"""`exchange audit query` prints only what it verified (issue 12, item 4).

The service here is a real stack whose database is tampered with while it runs, after its own
checks read the rows (or, once, with its row check switched off, a service that lies). The CLI
runs in a thread of its own (it runs its own event loop), against that stack.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from exchange import auditverify
from exchange.api.audit import SIGNER
from exchange.client.audit import AuditClient
from exchange.errors import AuditEventUnverified
from exchange.format.note import Signer
from exchange.services import auditlog
from tests.audit.conftest import Auditor, add_events, forge_event, publish, publish_as_restarted, rebuild_tree
from tests.conftest import Stack


async def _cli(stack: Stack, *args: str) -> Result:
    argv = [
        "--server",
        stack.url,
        "--identity",
        str(stack.tmp_path / "admin.identity"),
        "audit",
        "query",
        *args,
    ]
    from exchange.cli import main

    return await asyncio.to_thread(CliRunner().invoke, main, argv, catch_exceptions=False)


def _pinned(stack: Stack, state: Path) -> tuple[str, ...]:
    return ("--state", str(state), "--vkey", stack.app[SIGNER].verifier_key())


async def _log(stack: Stack) -> int:
    await add_events(stack, 9, action="test.event")
    await add_events(stack, 3, action="artifact.download")
    return await publish(stack)


async def test_a_forged_event_is_never_printed(stack: Stack, tmp_path: Path) -> None:
    """A leaf rewritten with its columns (so the service's row check passes): its proof fails."""
    await _log(stack)
    good = await _cli(stack, *_pinned(stack, tmp_path / "state"), "--format", "jsonl", "--proofs")
    assert good.exit_code == 0, good.output
    assert (
        len(good.stdout.splitlines()) == await stack.count("audit_events") - 1
    )  # the query's own event is later
    await forge_event(stack, 4, action="artifact.download")
    for fmt in ("table", "jsonl", "csv"):
        got = await _cli(
            stack, *_pinned(stack, tmp_path / "state"), "--action", "artifact.download", "--format", fmt
        )
        assert got.exit_code == 8, got.output
        assert got.stdout == ""  # not one row, not even a header
        assert "event 4 is not in the checkpoint" in got.stderr and "[audit-unverified]" in got.stderr


async def test_the_sdk_raises_naming_the_event(stack: Stack) -> None:
    await _log(stack)
    await forge_event(stack, 2, actor={"type": "principal", "id": "someone-else"})
    state = auditverify.State(log_vkey=stack.app[SIGNER].verifier_key())
    async with stack.client(stack.admin) as c:
        rows: list[dict[str, Any]] = []
        with pytest.raises(AuditEventUnverified) as failure:
            async for row in AuditClient(c).verified_query({}, state):
                rows.append(row)
    assert failure.value.extra == {"check": "proof", "idx": 2}
    assert [row["idx"] for row in rows] == [0, 1]  # handed out only while they verified


async def test_a_misfiled_row_from_a_lying_service(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service that does not check its rows serves an event under a filter its leaf does not
    match (the action column was edited): the client refuses it, proof or no proof."""
    await _log(stack)
    monkeypatch.setattr(auditlog, "check_row", lambda row: bytes(row["leaf"]))
    async with stack.db.transaction() as conn:
        await conn.execute("UPDATE audit_events SET action = 'key.revoke' WHERE idx = 5")
    got = await _cli(stack, *_pinned(stack, tmp_path / "state"), "--action", "key.revoke")
    assert got.exit_code == 8, got.output
    assert got.stdout == "" and "event 5 does not match the filter --action" in got.stderr


async def test_the_checkpoint_must_be_signed_by_the_pinned_key(stack: Stack, tmp_path: Path) -> None:
    await _log(stack)
    other = Signer(stack.settings.log_origin, b"\x05" * 32).verifier_key()
    got = await _cli(stack, "--state", str(tmp_path / "state"), "--vkey", other)
    assert got.exit_code == 8 and got.stdout == ""
    assert "not signed by the pinned log key" in got.stderr


async def test_the_checkpoint_must_extend_the_saved_one(stack: Stack, tmp_path: Path) -> None:
    """History rewritten and re-signed with the real key: only the saved checkpoint shows it."""
    await _log(stack)
    auditor = Auditor(stack, stack.admin, tmp_path / "state")
    auditor.verify(await auditor.export(tmp_path / "bundle"))  # pins the key, saves the checkpoint
    ok = await _cli(stack, "--state", str(auditor.state))
    assert ok.exit_code == 0, ok.output
    await forge_event(stack, 3, action="rewritten")
    await rebuild_tree(stack)
    async with stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_checkpoints")
    await add_events(stack, 2)
    assert await publish_as_restarted(stack)
    got = await _cli(stack, "--state", str(auditor.state))
    assert got.exit_code == 8 and got.stdout == ""
    assert "not consistent with the saved one" in got.stderr


async def test_an_older_checkpoint_than_the_saved_one(stack: Stack, tmp_path: Path) -> None:
    """Pinned to a size before the saved one: the consistency proof runs from it to the saved one."""
    older = await _log(stack)
    await add_events(stack, 5)
    await publish(stack)
    auditor = Auditor(stack, stack.admin, tmp_path / "state")
    auditor.verify(await auditor.export(tmp_path / "bundle"))
    got = await _cli(stack, "--state", str(auditor.state), "--size", str(older), "--format", "jsonl")
    assert got.exit_code == 0, got.output
    assert [json.loads(line)["idx"] for line in got.stdout.splitlines()] == list(range(older))


async def test_no_pinned_key_is_a_usage_error(stack: Stack, tmp_path: Path) -> None:
    await _log(stack)
    got = await _cli(stack, "--state", str(tmp_path / "empty"))
    assert got.exit_code == 2 and got.stdout == ""
    assert "--vkey" in got.stderr and "exchange audit verify" in got.stderr
    wrong = await _cli(stack, "--state", str(tmp_path / "x"), "--vkey", "not a key")
    assert wrong.exit_code == 2, wrong.output


def test_filter_mismatch_mirrors_the_service() -> None:
    event = {
        "action": "artifact.download",
        "time_ms": 1000,
        "actor": {"type": "principal", "id": "p1", "name": "alice", "org": "lab"},
        "outcome": {"result": "denied", "reason": "link-expired"},
        "resource": {"type": "artifact", "id": "a1"},
    }
    match = auditverify.filter_mismatch
    assert match(event, {"actor": "alice", "org": "lab", "action": "artifact.download", "size": 9}) is None
    assert match(event, {"actor": "p1", "resource": "artifact", "outcome": "denied"}) is None
    assert match(event, {"resource": "artifact:a1", "since": 1000, "until": 1001}) is None
    assert match(event, {"actor": "bob"}) == "actor"
    assert match(event, {"org": "other"}) == "org"
    assert match(event, {"resource": "artifact:a2"}) == "resource"
    assert match(event, {"resource": "link"}) == "resource"
    assert match(event, {"outcome": "allowed"}) == "outcome"
    assert match(event, {"since": 1001}) == "since"
    assert match(event, {"until": 1000}) == "until"
    assert match({"action": "x"}, {"org": "lab"}) == "org"  # an absent member matches nothing
    assert json.dumps(event)  # untouched

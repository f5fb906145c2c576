"""Following the log through its tiles (`AuditClient.follow` + `auditverify.run_tiles`): only new
tiles are fetched, and a fork, a rollback or a gap is caught with its own verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exchange import auditverify
from exchange.api.audit import SIGNER
from exchange.client import Client
from exchange.client.audit import AuditClient
from exchange.format import tiles
from tests.audit.conftest import (
    Auditor,
    Restart,
    add_events,
    forge_event,
    publish,
    publish_as_restarted,
    rebuild_tree,
)
from tests.audit.test_rotation import NEW_ORIGIN, _restart_rotated, _rotate


async def _follow(
    auditor: Auditor, vkey: str | None = None
) -> tuple[auditverify.Report, dict[Any, bytes], bytes]:
    state = auditverify.load_pinned(auditor.state, vkey or auditor.stack.app[SIGNER].verifier_key())
    async with auditor.stack.client(auditor.identity) as c:
        note, fetched, rotations = await AuditClient(c).follow(state.size)
    return auditverify.run_tiles(auditor.state, state, note, fetched, rotations), fetched, note


def _verdict_of(exc: pytest.ExceptionInfo[auditverify.VerifyFailure]) -> tuple[str, int]:
    return exc.value.kind, exc.value.exit_code


async def test_incremental_follow_fetches_only_new_tiles(
    auditor: Auditor, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = auditor.stack
    await add_events(stack, 600)
    first = await publish(stack)
    report, _, _ = await _follow(auditor)
    assert report.size == first and report.previous_size is None and report.entries == first

    await add_events(stack, 10)
    second = await publish(stack)
    assert second > first
    paths: list[str] = []
    original = Client.request

    async def counting(self: Client, method: str, path: str, **kwargs: Any) -> Any:
        paths.append(path)
        return await original(self, method, path, **kwargs)

    monkeypatch.setattr(Client, "request", counting)
    report, fetched, _ = await _follow(auditor)
    assert report.previous_size == first and report.size == second and report.entries == second - first
    # The checkpoint, then exactly what moving from `first` to `second` needs: the Merkle tiles
    # of the old root and the consistency proof, and the entry bundle the new leaves are in.
    assert paths[0] == "/v1/audit/log/checkpoint"
    needed = auditverify.tiles_needed(first, second)
    assert sorted(paths[1:]) == sorted(
        "/v1/audit/log/" + (tiles.entries_path(n, w) if level < 0 else tiles.tile_path(level, n, w))
        for level, n, w in needed
    )
    # ... which is few, and none of the full tiles the first run read: the old root's tiles at
    # the right edge, one level-1 hash, the bundle of the new leaves.
    assert len(needed) <= 4
    assert all(n >= first // 256 for level, n, _ in needed if level <= 0)
    assert (-1, 2, second - 512) in needed and not any(k[0] == -1 and k[1] < 2 for k in needed)
    assert len(fetched) == len(paths) - 1
    saved = auditverify.State.load(auditor.state)
    assert saved is not None and saved.size == second

    # Nothing new but the recorded read: one more bundle, no full tile again.
    paths.clear()
    third = await publish(stack)
    report, _, _ = await _follow(auditor)
    assert report.size == third and not any(p.endswith(("/000", "/001")) for p in paths)


async def test_rewritten_history_is_a_fork(auditor: Auditor) -> None:
    stack = auditor.stack
    await add_events(stack, 12)
    await publish(stack)
    await _follow(auditor)
    saved = (auditor.state / "checkpoint").read_bytes()
    # A thorough forger: the leaf, its columns, every node, the checkpoints, all re-signed.
    await forge_event(stack, 3, action="rewritten")
    await rebuild_tree(stack)
    async with stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_checkpoints")
    await add_events(stack, 2)
    assert await publish_as_restarted(stack)
    with pytest.raises(auditverify.VerifyFailure) as failure:
        await _follow(auditor)
    assert _verdict_of(failure) == ("fork", 15)
    [evidence] = (auditor.state / "evidence").iterdir()
    assert (evidence / "saved.checkpoint").read_bytes() == saved
    assert (auditor.state / "checkpoint").read_bytes() == saved  # the state did not move


async def test_same_size_other_root_is_a_fork(auditor: Auditor) -> None:
    stack = auditor.stack
    await add_events(stack, 12)
    await publish(stack)
    await _follow(auditor)
    state = auditverify.State.load(auditor.state)
    assert state is not None and state.root is not None
    state.root = bytes(32)
    state.save(auditor.state)
    with pytest.raises(auditverify.VerifyFailure) as failure:
        await _follow(auditor)
    assert _verdict_of(failure) == ("fork", 15), failure.value.message


async def test_truncated_log_is_a_rollback(auditor: Auditor, restart: Restart) -> None:
    await add_events(auditor.stack, 12)
    size = await publish(auditor.stack)
    await _follow(auditor)
    async with auditor.stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_events WHERE idx >= $1", size - 4)
        await conn.execute("UPDATE audit_head SET size = $1", size - 4)
        await conn.execute("DELETE FROM audit_checkpoints")
    await rebuild_tree(auditor.stack)
    auditor.stack = await restart(auditor.stack)
    await add_events(auditor.stack, 1)
    assert await publish(auditor.stack) < size
    with pytest.raises(auditverify.VerifyFailure) as failure:
        await _follow(auditor)
    assert _verdict_of(failure) == ("rollback", 17)
    assert (auditor.state / "evidence").is_dir()


async def test_missing_bundle_or_misplaced_entry_is_a_gap(auditor: Auditor, tmp_path: Path) -> None:
    stack = auditor.stack
    await add_events(stack, 300)
    await publish(stack)
    state = auditverify.load_pinned(auditor.state, stack.app[SIGNER].verifier_key())
    async with stack.client(auditor.identity) as c:
        note, fetched, _ = await AuditClient(c).follow(None)
    bundles = sorted(key for key in fetched if key[0] == -1)
    without = {k: v for k, v in fetched.items() if k != bundles[0]}
    with pytest.raises(auditverify.VerifyFailure) as failure:
        auditverify.verify_tiles(state, note, without)
    assert _verdict_of(failure) == ("gap", 18)
    # Two entries swapped: each is at the other's position.
    data = fetched[bundles[1]]
    first_len = int.from_bytes(data[:2], "big")
    second_len = int.from_bytes(data[2 + first_len : 4 + first_len], "big")
    a, b = data[: 2 + first_len], data[2 + first_len : 4 + first_len + second_len]
    swapped = dict(fetched) | {bundles[1]: b + a + data[len(a) + len(b) :]}
    with pytest.raises(auditverify.VerifyFailure) as failure:
        auditverify.verify_tiles(state, note, swapped)
    assert _verdict_of(failure) == ("gap", 18)
    # A changed entry that is still at its place: the leaves do not hash to the root.
    changed = dict(fetched) | {bundles[1]: data.replace(b'"test.event"', b'"test.evenT"', 1)}
    with pytest.raises(auditverify.VerifyFailure) as failure:
        auditverify.verify_tiles(state, note, changed)
    assert _verdict_of(failure) == ("root", 14)
    # And untouched, it verifies.
    report, _ = auditverify.verify_tiles(state, note, fetched)
    assert report.entries == report.size


async def test_a_key_rotation_is_followed_through_the_tiles(
    auditor: Auditor, restart: Restart, tmp_path: Path
) -> None:
    stack = auditor.stack
    old_vkey = stack.app[SIGNER].verifier_key()
    await add_events(stack, 5)
    await publish(stack)
    await _follow(auditor, old_vkey)
    await add_events(stack, 3)
    done, key_file = await _rotate(stack)
    rotated = int(str(done["rotated_at_idx"]))
    # The old key's last word is the newest checkpoint: followed, still signed by the old key.
    report, _, _ = await _follow(auditor, old_vkey)
    assert report.size == rotated + 1 and [r["to_vkey"] for r in report.rotations] == [done["new_vkey"]]
    stack = auditor.stack = await _restart_rotated(stack, restart, key_file)
    await add_events(stack, 4)
    size = await publish(stack)
    report, _, _ = await _follow(auditor, old_vkey)
    assert report.size == size and report.origin == NEW_ORIGIN and report.rotations == []
    state = auditverify.State.load(auditor.state)
    assert state is not None and state.log_vkey == done["new_vkey"] and state.rotated_from == [old_vkey]
    # A fresh auditor who pinned only the first key follows the whole history in one step.
    fresh = Auditor(stack, auditor.identity, tmp_path / "fresh")
    report, _, _ = await _follow(fresh, old_vkey)
    assert [r["from_vkey"] for r in report.rotations] == [old_vkey] and report.size >= size

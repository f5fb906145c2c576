"""Tampering with the log behind the service's back, and the verdict an auditor reaches.

Each test edits the database directly (SQL), then exports a bundle through the API as an
auditor would, and runs the offline verifier. Verdicts are the classes of
`exchange.auditverify.EXIT_CODES`.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
import rfc8785

from exchange import auditverify
from exchange.api.audit import PUBLISHER, SIGNER
from exchange.errors import AuditLogDamaged, ExchangeError
from exchange.format import merkle
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import Signer, parse_note, sign_note
from tests.audit.conftest import (
    Auditor,
    Restart,
    add_events,
    edit_leaf,
    forge_event,
    leaves,
    publish,
    publish_as_restarted,
    rebuild_tree,
    set_leaf,
)
from tests.conftest import Stack


async def _verified_baseline(auditor: Auditor, tmp_path: Path, n: int = 12) -> int:
    """Some events, a checkpoint, and an auditor that verified it (its state saved)."""
    await add_events(auditor.stack, n)
    size = await publish(auditor.stack)
    report = auditor.verify(await auditor.export(tmp_path / "baseline"))
    assert report.size == size and report.entries == size
    return size


async def _fresh_verdict(auditor: Auditor, tmp_path: Path, name: str) -> str:
    """The verdict of an auditor with no saved state (only the pinned key) on a fresh export."""
    fresh = Auditor(auditor.stack, auditor.identity, tmp_path / f"{name}-state")
    return fresh.verdict(await auditor.export(tmp_path / name))


async def test_untouched_log_verifies_and_extends(auditor: Auditor, tmp_path: Path) -> None:
    size = await _verified_baseline(auditor, tmp_path)
    await add_events(auditor.stack, 5)
    newer = await publish(auditor.stack)
    report = auditor.verify(await auditor.export(tmp_path / "second"))
    assert newer > size and report.previous_size == size and report.size == newer
    consistency = json.loads((tmp_path / "second" / "consistency.json").read_text())
    assert consistency["old"] == size and consistency["proof"]


async def test_modified_leaf(auditor: Auditor, tmp_path: Path) -> None:
    await _verified_baseline(auditor, tmp_path)
    leaf = (await leaves(auditor.stack))[5]
    await set_leaf(auditor.stack, 5, edit_leaf(leaf, action="nothing.to.see"))
    assert await _fresh_verdict(auditor, tmp_path, "b") == "root"


async def test_modified_leaf_and_its_stored_hashes(auditor: Auditor, tmp_path: Path) -> None:
    size = await _verified_baseline(auditor, tmp_path)
    await forge_event(auditor.stack, 5, action="nothing.to.see")
    await rebuild_tree(auditor.stack)
    # The signed checkpoint still commits to the old root.
    assert await _fresh_verdict(auditor, tmp_path, "b") == "root"
    # The service does not sign the forged tree: running, its stored root no longer matches the
    # frontier it folded from the leaves; restarted, the leaves no longer hash to its checkpoint.
    await add_events(auditor.stack, 1)
    assert await auditor.stack.app[PUBLISHER].publish() is None
    with pytest.raises(AuditLogDamaged, match="checkpoint of size"):
        await publish_as_restarted(auditor.stack)
    assert await publish(auditor.stack) == size
    # Only a forger who also deletes the checkpoints gets a new one signed: that is a fork,
    # which the auditor's saved state catches (test_rewritten_history_resigned_with_the_real_key).


async def test_deleted_middle_row(auditor: Auditor, tmp_path: Path) -> None:
    await _verified_baseline(auditor, tmp_path)
    async with auditor.stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_events WHERE idx = 6")
    assert await _fresh_verdict(auditor, tmp_path, "b") == "entries"


async def test_truncated_tail(auditor: Auditor, tmp_path: Path, restart: Restart) -> None:
    size = await _verified_baseline(auditor, tmp_path)
    async with auditor.stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_events WHERE idx >= $1", size - 3)
    # The service will not append past the gap, so not even the (logged) export runs.
    with pytest.raises(ExchangeError) as refused:
        await auditor.export(tmp_path / "b")
    assert refused.value.code == "audit-log-damaged"
    # A thorough truncation: the head, the nodes and the checkpoints too, then a restart (the
    # truncated log holds together) and new events.
    async with auditor.stack.db.transaction() as conn:
        await conn.execute("UPDATE audit_head SET size = $1", size - 3)
        await conn.execute("DELETE FROM audit_checkpoints")
    await rebuild_tree(auditor.stack)
    auditor.stack = await restart(auditor.stack)
    await add_events(auditor.stack, 1)
    await publish(auditor.stack)
    assert await _fresh_verdict(auditor, tmp_path, "c") == "ok"
    assert auditor.verdict(await auditor.export(tmp_path / "d")) == "fork"  # size shrank: rollback


async def test_reordered_rows(auditor: Auditor, tmp_path: Path) -> None:
    await _verified_baseline(auditor, tmp_path)
    old = await leaves(auditor.stack)
    await set_leaf(auditor.stack, 3, old[4])
    await set_leaf(auditor.stack, 4, old[3])
    assert await _fresh_verdict(auditor, tmp_path, "b") == "entries"


async def test_inserted_forged_row(auditor: Auditor, tmp_path: Path) -> None:
    await _verified_baseline(auditor, tmp_path)
    old = await leaves(auditor.stack)
    k = 4
    forged = edit_leaf(old[k], idx=k, id=str(uuid.uuid4()), action="artifact.download")
    async with auditor.stack.db.transaction() as conn:
        # Shift the later rows up by one, renumbering their leaves, then slip the forgery in.
        for i in range(len(old) - 1, k - 1, -1):
            await conn.execute(
                "UPDATE audit_events SET idx = $1, leaf = $2 WHERE idx = $3",
                i + 1,
                edit_leaf(old[i], idx=i + 1),
                i,
            )
        await conn.execute(
            "INSERT INTO audit_events (idx, id, time_ms, action, outcome, leaf) VALUES ($1, $2, 0, $3, $4, $5)",
            k,
            json.loads(forged)["id"],
            "artifact.download",
            "allowed",
            forged,
        )
        await conn.execute("UPDATE audit_head SET size = size + 1")
    await rebuild_tree(auditor.stack)  # or the service refuses to append to a damaged tree
    # Indices are continuous and every leaf is canonical: only the root gives it away.
    assert await _fresh_verdict(auditor, tmp_path, "b") == "root"


async def _rewrite_history(stack: Stack, idx: int) -> None:
    """Change a signed event (and its columns), rebuild the tree, drop the checkpoints and let the
    real key re-sign, as a restarted service does: the rewritten log holds together."""
    await forge_event(stack, idx, action="rewritten")
    await rebuild_tree(stack)
    async with stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_checkpoints")
    assert await publish_as_restarted(stack) == await stack.count("audit_events")


async def test_rewritten_history_resigned_with_the_real_key(auditor: Auditor, tmp_path: Path) -> None:
    size = await _verified_baseline(auditor, tmp_path)
    saved = (auditor.state / "checkpoint").read_bytes()
    await _rewrite_history(auditor.stack, 2)
    # Alone, the rewritten log is flawless: same size, valid signature, leaves hash to the root.
    assert await _fresh_verdict(auditor, tmp_path, "alone") == "ok"
    # Against the checkpoint the auditor saved, it is a fork, and both notes are kept.
    with pytest.raises(auditverify.VerifyFailure) as failure:
        auditor.verify(await auditor.export(tmp_path / "b"))
    assert failure.value.kind == "fork" and failure.value.exit_code == 15
    [evidence] = (auditor.state / "evidence").iterdir()
    assert (evidence / "saved.checkpoint").read_bytes() == saved
    new = (evidence / "new.checkpoint").read_bytes()
    assert Checkpoint.parse(parse_note(new).text).size >= size
    assert (
        Checkpoint.parse(parse_note(saved).text).root_hash != Checkpoint.parse(parse_note(new).text).root_hash
    )
    # The state still holds the checkpoint it trusted.
    assert (auditor.state / "checkpoint").read_bytes() == saved


async def test_equivocation_caught_when_checkpoints_meet(
    auditor: Auditor, stack: Stack, tmp_path: Path
) -> None:
    bob_id = await stack.principal("bob", "auditor", org="clearinghouse")
    bob = Auditor(stack, bob_id, tmp_path / "bob-state")
    await add_events(stack, 9)
    await publish(stack)
    alice_bundle = await auditor.export(tmp_path / "alice")
    assert auditor.verdict(alice_bundle) == "ok"
    # The operator shows Bob another history of the same size, signed with the real key.
    await _rewrite_history(stack, 3)
    bob_bundle = await bob.export(tmp_path / "bob")
    assert bob.verdict(bob_bundle) == "ok"
    # Each alone is satisfied; when they compare, each sees the other's signed fork.
    assert auditor.verdict(bob_bundle) == "fork"
    assert bob.verdict(alice_bundle) == "fork"


def _replace_signatures(note: bytes, lines: list[str]) -> bytes:
    text = parse_note(note).text
    return text.encode() + b"\n" + "".join(lines).encode()


async def _set_checkpoint_note(stack: Stack, size: int, note: bytes) -> None:
    async with stack.db.transaction() as conn:
        assert await conn.execute("UPDATE audit_checkpoints SET note = $1 WHERE size = $2", note, size) == 1


async def test_checkpoint_signed_by_an_unknown_key(auditor: Auditor, tmp_path: Path) -> None:
    await add_events(auditor.stack, 4)
    size = await publish(auditor.stack)
    note = bytes(
        (await auditor.stack.db.fetchone("SELECT note FROM audit_checkpoints WHERE size = $1", size))["note"]
    )  # type: ignore[index]
    impostor = Signer(auditor.stack.settings.log_origin, b"\x07" * 32)
    await _set_checkpoint_note(auditor.stack, size, sign_note(parse_note(note).text, [impostor]))
    assert auditor.verdict(await auditor.export(tmp_path / "b")) == "signature"


async def test_corrupted_known_signature(auditor: Auditor, tmp_path: Path) -> None:
    await add_events(auditor.stack, 4)
    size = await publish(auditor.stack)
    note = bytes(
        (await auditor.stack.db.fetchone("SELECT note FROM audit_checkpoints WHERE size = $1", size))["note"]
    )  # type: ignore[index]
    [sig] = parse_note(note).signatures
    broken = type(sig)(sig.name, sig.key_id, bytes([sig.sig[0] ^ 1]) + sig.sig[1:])
    await _set_checkpoint_note(auditor.stack, size, _replace_signatures(note, [broken.to_line()]))
    assert auditor.verdict(await auditor.export(tmp_path / "b")) == "signature"


async def test_extra_unknown_signature_line_is_accepted(auditor: Auditor, tmp_path: Path) -> None:
    await add_events(auditor.stack, 4)
    size = await publish(auditor.stack)
    note = bytes(
        (await auditor.stack.db.fetchone("SELECT note FROM audit_checkpoints WHERE size = $1", size))["note"]
    )  # type: ignore[index]
    stranger = Signer("someone.else/log", b"\x09" * 32).sign(parse_note(note).text)
    await _set_checkpoint_note(auditor.stack, size, note + stranger.to_line().encode())
    assert auditor.verdict(await auditor.export(tmp_path / "b")) == "ok"


async def test_non_canonical_leaf_bytes(auditor: Auditor, tmp_path: Path) -> None:
    await _verified_baseline(auditor, tmp_path)
    leaf = (await leaves(auditor.stack))[2]
    # The same JSON value, spelled with spaces and its keys in another order.
    respelled = (
        json.dumps(dict(reversed(list(json.loads(leaf).items()))), indent=1).replace("\n", " ").encode()
    )
    assert json.loads(respelled) == json.loads(leaf) and respelled != leaf
    await set_leaf(auditor.stack, 2, respelled)
    await rebuild_tree(auditor.stack)
    assert await _fresh_verdict(auditor, tmp_path, "b") == "entries"


async def test_64_byte_leaf_equal_to_two_child_hashes(auditor: Auditor, tmp_path: Path) -> None:
    """The second-preimage trick: pass an interior node off as a leaf. The 0x00/0x01 prefixes stop it."""
    size = await _verified_baseline(auditor, tmp_path)
    old = await leaves(auditor.stack)
    forged = merkle.leaf_hash(old[0]) + merkle.leaf_hash(old[1])
    assert len(forged) == 64
    # Without domain separation SHA-256(l0 || l1) would be the parent's hash; with it, no.
    assert merkle.leaf_hash(forged) != merkle.node_hash(merkle.leaf_hash(old[0]), merkle.leaf_hash(old[1]))
    shorter = [merkle.leaf_hash(forged)] + [merkle.leaf_hash(leaf) for leaf in old[2:size]]
    checkpoint = Checkpoint.parse(parse_note((auditor.state / "checkpoint").read_bytes()).text)
    assert merkle.root(shorter) != checkpoint.root_hash
    async with auditor.stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_events WHERE idx = 1")
        await conn.execute("UPDATE audit_events SET leaf = $1 WHERE idx = 0", forged)
    assert await _fresh_verdict(auditor, tmp_path, "b") == "entries"


@pytest.mark.parametrize("damage", ["empty", "too-long", "wrong-hash"])
async def test_malformed_consistency_proof_in_bundle(auditor: Auditor, tmp_path: Path, damage: str) -> None:
    await _verified_baseline(auditor, tmp_path, n=13)
    await add_events(auditor.stack, 6)
    await publish(auditor.stack)
    bundle = await auditor.export(tmp_path / "b")
    path = bundle / "consistency.json"
    data = json.loads(path.read_text())
    assert data["proof"]
    if damage == "empty":
        data["proof"] = []
    elif damage == "too-long":
        data["proof"].append(data["proof"][0])
    else:
        data["proof"][0] = base64.b64encode(b"\x00" * 32).decode()
    path.write_text(json.dumps(data))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["consistency.json"] = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert auditor.verdict(bundle) == "proof"


async def test_bundle_file_changed_after_export(auditor: Auditor, tmp_path: Path) -> None:
    await add_events(auditor.stack, 3)
    await publish(auditor.stack)
    bundle = await auditor.export(tmp_path / "b")
    with (bundle / "entries.jsonl").open("ab") as fh:
        fh.write(rfc8785.dumps({"x": 1}) + b"\n")
    assert auditor.verdict(bundle) == "bundle"


async def test_the_bundles_own_key_is_never_trusted(auditor: Auditor, tmp_path: Path) -> None:
    await add_events(auditor.stack, 3)
    await publish(auditor.stack)
    bundle = await auditor.export(tmp_path / "b")
    assert (bundle / "log.vkey").read_text().strip() == auditor.stack.app[SIGNER].verifier_key()
    with pytest.raises(auditverify.VerifyFailure) as failure:
        auditverify.run(bundle, tmp_path / "new-state", vkey=None, witness_vkeys=(), quorum=None)
    assert failure.value.kind == "usage"
    other = Signer(auditor.stack.settings.log_origin, b"\x05" * 32).verifier_key()
    assert auditor.verdict(bundle, vkey=other) == "signature"

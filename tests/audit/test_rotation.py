"""Rotating the log signing key: the old log's last event names the new origin and key, the old
key signs that event's checkpoint, and an auditor who pinned the old key follows the change.

The rotation runs the way an operator runs it (`server.rotate_log_key`, what
`exchange admin log-key rotate` calls) beside a running service; the service is then restarted
with the new origin and key, as the procedure says. Verdicts come from the offline verifier.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from exchange import auditverify
from exchange.api.app import create_app
from exchange.api.audit import PUBLISHER, SIGNER
from exchange.cli import main
from exchange.client.audit import AuditClient
from exchange.errors import Conflict, ValidationError
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import Signer, open_note, sign_note
from exchange.server import rotate_log_key
from exchange.services import logrotation
from exchange.services.audit import AuditLog
from exchange.services.auditlog import load_or_create_signer
from tests.audit.conftest import Auditor, Restart, add_events, publish
from tests.conftest import ServedApp, Stack

NEW_ORIGIN = "exchange.local/audit/2027"


async def _rotate(stack: Stack) -> tuple[dict[str, object], Path]:
    key_file = stack.tmp_path / "next" / "log-signing.key"
    done = await rotate_log_key(stack.settings, new_origin=NEW_ORIGIN, new_key_file=key_file)
    return done, key_file


async def _restart_rotated(stack: Stack, restart: Restart, key_file: Path) -> Stack:
    stack.settings = stack.settings.replace(log_origin=NEW_ORIGIN, log_signing_key_file=key_file)
    return await restart(stack)


def _rewrite_manifest(bundle: Path, drop: str | None = None) -> None:
    manifest = json.loads((bundle / auditverify.MANIFEST).read_text())
    if drop is not None:
        manifest["files"].pop(drop)
    (bundle / auditverify.MANIFEST).write_text(json.dumps(manifest))


async def test_rotation_is_followed_by_an_auditor_who_pinned_the_old_key(
    stack: Stack, auditor: Auditor, restart: Restart, tmp_path: Path
) -> None:
    old_vkey = stack.app[SIGNER].verifier_key()
    await add_events(stack, 5)
    await publish(stack)
    assert auditor.verify(await auditor.export(tmp_path / "b1"), vkey=old_vkey).rotations == []

    await add_events(stack, 3)  # not yet in any checkpoint: the old key's last word covers them
    done, key_file = await _rotate(stack)
    assert key_file.stat().st_mode & 0o777 == 0o600
    new_vkey = str(done["new_vkey"])
    assert new_vkey.startswith(NEW_ORIGIN + "+")

    # The old replica goes on serving: its appends carry the new origin, and it signs no more.
    await add_events(stack, 2)
    events = await stack.events()
    rotated = int(str(done["rotated_at_idx"]))
    assert events[rotated]["action"] == "audit.log.rotated"
    assert events[rotated]["origin"] == "exchange.local/audit"
    assert events[rotated]["details"]["next_origin"] == NEW_ORIGIN
    assert events[rotated]["details"]["next_vkey"] == new_vkey
    assert all(e["origin"] == NEW_ORIGIN for e in events[rotated + 1 :])
    assert all(e["origin"] == "exchange.local/audit" for e in events[:rotated])
    assert await stack.app[PUBLISHER].publish() is None
    latest = await stack.db.fetchval("SELECT MAX(size) FROM audit_checkpoints")
    assert latest == rotated + 1  # the old key's last word, and nothing after it

    # An export now ends at the old key's last checkpoint: the auditor follows the rotation.
    report = auditor.verify(await auditor.export(tmp_path / "b2"), vkey=old_vkey)
    assert report.size == rotated + 1
    assert [(r["from_origin"], r["to_origin"]) for r in report.rotations] == [
        ("exchange.local/audit", NEW_ORIGIN)
    ]
    state = auditverify.State.load(auditor.state)
    assert state is not None and state.log_vkey == new_vkey and state.rotated_from == [old_vkey]

    # Restarted with the new key, the service signs under the new origin; the auditor goes on,
    # and may still name the key it first pinned.
    stack = await _restart_rotated(stack, restart, key_file)
    auditor.stack = stack
    await add_events(stack, 4)
    size = await publish(stack)
    assert size == len(await stack.events())
    report = auditor.verify(await auditor.export(tmp_path / "b3"), vkey=old_vkey)
    assert report.origin == NEW_ORIGIN and report.size == size
    assert report.previous_size == rotated + 1
    # A fresh auditor who pins only the first key verifies the whole history too.
    fresh = Auditor(stack, auditor.identity, tmp_path / "fresh-state")
    assert fresh.verify(tmp_path / "b3", vkey=old_vkey).rotations[0]["to_vkey"] == new_vkey
    # Filtered queries verify rows of both origins against the new key's checkpoint.
    async with stack.client(auditor.identity) as c:
        pinned = auditverify.State.load(auditor.state)
        assert pinned is not None
        rows = [r async for r in AuditClient(c).verified_query({}, pinned)]
    assert {r["event"]["origin"] for r in rows} == {"exchange.local/audit", NEW_ORIGIN}


async def test_a_replica_with_the_old_origin_or_a_wrong_key_refuses_to_start(
    stack: Stack, restart: Restart
) -> None:
    await add_events(stack, 2)
    await _rotate(stack)
    old_settings = stack.settings
    # The old origin: the log has moved on.
    stale = load_or_create_signer(old_settings.effective_log_signing_key_file, old_settings.log_origin)
    with pytest.raises(ValidationError, match="rotated to a new key") as refused:
        await logrotation.adopt_origin(stack.db, stale)
    assert refused.value.code == "log-origin-mismatch"
    # The new origin with a key the rotation did not name.
    impostor = Signer(NEW_ORIGIN, b"\x01" * 32)
    with pytest.raises(ValidationError, match="not the key the rotation"):
        await logrotation.adopt_origin(stack.db, impostor)
    # And the real `exchange serve` start path refuses the old settings (nothing served).
    server = ServedApp(create_app(old_settings), old_settings)
    with pytest.raises(ValidationError, match="rotated"):
        await server.start_server()
    await server.close()


async def test_rotation_resumes_and_refuses_what_it_cannot_do(stack: Stack) -> None:
    await add_events(stack, 2)
    first, key_file = await _rotate(stack)
    before = len(await stack.events())
    again = await rotate_log_key(stack.settings, new_origin=NEW_ORIGIN, new_key_file=key_file)
    assert again == first and len(await stack.events()) == before  # nothing appended twice
    # Rotating again from the old key, to anywhere else, is refused and writes nothing.
    other = stack.tmp_path / "other.key"
    with pytest.raises(Conflict):
        await rotate_log_key(stack.settings, new_origin="exchange.local/audit/other", new_key_file=other)
    assert len(await stack.events()) == before
    # The same origin, or the current key file as the new one, is a usage error.
    with pytest.raises(ValidationError):
        await rotate_log_key(
            stack.settings,
            new_origin=stack.settings.log_origin,
            new_key_file=stack.tmp_path / "same.key",
        )
    with pytest.raises(ValidationError):
        await rotate_log_key(
            stack.settings,
            new_origin="elsewhere/audit",
            new_key_file=stack.settings.effective_log_signing_key_file,
        )
    assert len(await stack.events()) == before
    # An append_rotation run directly with a key whose origin is not the head's is refused.
    old = stack.app[SIGNER]
    with pytest.raises(Conflict):
        await logrotation.append_rotation(
            stack.db, AuditLog(origin=old.name, clock=lambda: 0), old, Signer("x.example/audit", b"\x02" * 32)
        )


async def test_a_rotation_the_old_key_did_not_sign_is_not_followed(
    stack: Stack, auditor: Auditor, restart: Restart, tmp_path: Path
) -> None:
    old_signer = stack.app[SIGNER]
    old_vkey = old_signer.verifier_key()
    await add_events(stack, 3)
    _, key_file = await _rotate(stack)
    stack = await _restart_rotated(stack, restart, key_file)
    auditor.stack = stack
    await add_events(stack, 2)
    await publish(stack)
    good = await auditor.export(tmp_path / "good")
    assert auditverify.ROTATIONS_FILE in json.loads((good / auditverify.MANIFEST).read_text())["files"]

    # Without the old key's last checkpoint, the new key's word alone is not enough.
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / auditverify.ROTATIONS_FILE).unlink()
    _rewrite_manifest(missing, drop=auditverify.ROTATIONS_FILE)
    assert auditor.verdict(missing, vkey=old_vkey) == "signature"

    # A "last checkpoint" signed by the new key instead of the old one.
    forged = tmp_path / "forged"
    shutil.copytree(good, forged)
    rotations = json.loads((forged / auditverify.ROTATIONS_FILE).read_text())
    new_signer = load_or_create_signer(key_file, NEW_ORIGIN)
    text = open_note(rotations[0]["note"].encode(), [old_signer.verifier()]).text
    cp = Checkpoint.parse(text)
    rotations[0]["note"] = sign_note(
        Checkpoint(NEW_ORIGIN, cp.size, cp.root_hash).to_text(), [new_signer]
    ).decode()
    (forged / auditverify.ROTATIONS_FILE).write_text(json.dumps(rotations))
    manifest = json.loads((forged / auditverify.MANIFEST).read_text())
    manifest["files"][auditverify.ROTATIONS_FILE] = hashlib.sha256(
        (forged / auditverify.ROTATIONS_FILE).read_bytes()
    ).hexdigest()
    (forged / auditverify.MANIFEST).write_text(json.dumps(manifest))
    assert auditor.verdict(forged, vkey=old_vkey) == "signature"
    assert auditverify.State.load(auditor.state) is None  # nothing was saved by a failed verdict

    # The genuine bundle verifies, and the state now pins the new key.
    assert auditor.verdict(good, vkey=old_vkey) == "ok"


def test_the_command_teaches_the_procedure() -> None:
    helped = CliRunner().invoke(main, ["admin", "log-key", "rotate", "--help"])
    assert helped.exit_code == 0
    for words in ("--new-origin", "--new-key-file", "audit.log.rotated", "EXCHANGE_LOG_ORIGIN", "resumes"):
        assert words in helped.output

"""Witnesses: the tlog-witness protocol, cosignature quorums, and what a witness refuses.

Witnesses run as aiohttp apps on loopback ports (and once as a real `exchange witness serve`
process); the service talks to them over HTTP exactly as it would in production.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from exchange.api.audit import PUBLISHER, SIGNER
from exchange.api.keys import AUDIT, CLOCK
from exchange.dev.seaweed import SeaweedFS
from exchange.format.checkpoint import Checkpoint, verify_cosignature
from exchange.format.note import Signer, parse_note, sign_note
from exchange.services import auditlog
from exchange.witness import (
    SIZE_CONTENT_TYPE,
    AddCheckpointError,
    Witness,
    WitnessKey,
    WitnessState,
    create_witness_app,
    format_add_checkpoint,
)
from tests.audit.conftest import Auditor, add_events, edit_leaf, leaves, rebuild_tree, set_leaf
from tests.conftest import FakeClock, Stack, start_stack


@dataclass
class RunningWitness:
    key: WitnessKey
    state: Path
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


async def start_witness(tmp_path: Path, name: str, log_vkey: str) -> RunningWitness:
    key = WitnessKey.generate(name)
    state = tmp_path / f"{name}-state"
    server = TestServer(create_witness_app(Witness(key, WitnessState(state), [log_vkey])), host="127.0.0.1")
    await server.start_server()
    return RunningWitness(key, state, server)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def witnessed(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[tuple[Stack, RunningWitness]]:
    """A stack whose checkpoints need one cosignature from a witness on loopback."""
    signer = auditlog.load_or_create_signer(tmp_path / "log-signing.key", "exchange.local/audit")
    w = await start_witness(tmp_path, "witness.auditor.example", signer.verifier_key())
    stack = await start_stack(
        tmp_path,
        database_url,
        seaweed,
        clock,
        audit_checkpoint_interval_s=3600.0,
        audit_heartbeat_s=0,
        witness_urls=(w.url,),
        witness_vkeys=(w.key.vkey,),
        witness_quorum=1,
        witness_allow_private=True,  # the witness listens on loopback
    )
    yield stack, w
    await stack.server.close()
    await w.server.close()


async def test_checkpoints_carry_the_witness_cosignature(
    witnessed: tuple[Stack, RunningWitness], tmp_path: Path
) -> None:
    stack, w = witnessed
    await add_events(stack, 5)
    note = await stack.app[PUBLISHER].publish()
    assert note is not None
    parsed = parse_note(note)
    cosig = [s for s in parsed.signatures if s.name == w.key.name]
    assert len(cosig) == 1
    verify_cosignature(parsed.text, cosig[0], w.key.vkey)
    # The next checkpoint goes through with a consistency proof from the size the witness holds.
    await add_events(stack, 7)
    assert await stack.app[PUBLISHER].publish() is not None
    identity = await stack.principal("audra", "auditor", org="ukaisi")
    auditor = Auditor(stack, identity, tmp_path / "audra")
    bundle = await auditor.export(tmp_path / "bundle")
    assert auditor.verdict(bundle, witness_vkeys=(w.key.vkey,), quorum=1) == "ok"
    # A quorum the note cannot meet, and a corrupted cosignature, each fail as "quorum".
    other = WitnessKey.generate("witness.other.example")
    fresh = Auditor(stack, identity, tmp_path / "strict")
    assert fresh.verdict(bundle, witness_vkeys=(w.key.vkey, other.vkey), quorum=2) == "quorum"


async def test_no_checkpoint_without_the_quorum(witnessed: tuple[Stack, RunningWitness]) -> None:
    stack, w = witnessed
    await add_events(stack, 3)
    settings = stack.settings.replace(
        witness_urls=(w.url, closed_port_url()),
        witness_vkeys=(w.key.vkey, WitnessKey.generate("witness.down.example").vkey),
        witness_quorum=2,
    )
    publisher = auditlog.Publisher(stack.db, stack.app[AUDIT], stack.app[SIGNER], settings, stack.app[CLOCK])
    assert await publisher.publish() is None
    assert await stack.count("audit_checkpoints") == 0
    # With the quorum met (one witness answers), the same tree is published.
    assert await stack.app[PUBLISHER].publish() is not None
    assert await stack.count("audit_checkpoints") == 1


async def _post(url: str, body: bytes) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/add-checkpoint", data=body) as resp:
            return resp.status, resp.content_type, await resp.text()


async def _signed(stack: Stack) -> tuple[int, bytes]:
    async with stack.db.read() as conn:
        size = await auditlog.tree_size(conn)
        root = await auditlog.root_at(conn, size)
    return size, sign_note(Checkpoint("exchange.local/audit", size, root).to_text(), [stack.app[SIGNER]])


async def _proof(stack: Stack, old: int, new: int) -> list[bytes]:
    async with stack.db.read() as conn:
        return await auditlog.consistency_proof(conn, old, new)


async def test_witness_refuses_rollback_forks_and_bad_proofs(
    witnessed: tuple[Stack, RunningWitness], tmp_path: Path
) -> None:
    stack, w = witnessed
    await add_events(stack, 10)
    size, note = await _signed(stack)
    assert (await _post(w.url, format_add_checkpoint(0, [], note)))[0] == 200
    # It remembers the size: a client that claims another old size is told the right one.
    status, ctype, text = await _post(w.url, format_add_checkpoint(0, [], note))
    assert (status, ctype, text) == (409, SIZE_CONTENT_TYPE, f"{size}\n")
    # Old size above the checkpoint's size.
    assert (await _post(w.url, format_add_checkpoint(size + 1, [], note)))[0] == 400
    # A rollback: a smaller, validly signed checkpoint.
    small_root = merkle_root_of(stack, size - 2)
    small = sign_note(
        Checkpoint("exchange.local/audit", size - 2, await small_root).to_text(), [stack.app[SIGNER]]
    )
    assert (await _post(w.url, format_add_checkpoint(size, [], small)))[0] == 400
    assert (await _post(w.url, format_add_checkpoint(size - 2, [], small)))[0] == 409
    # A fork at the same size, re-signed with the real key.
    await set_leaf(stack, 4, edit_leaf((await leaves(stack))[4], action="rewritten"))
    await rebuild_tree(stack)
    _, forked = await _signed(stack)
    assert (await _post(w.url, format_add_checkpoint(size, [], forked)))[0] == 422  # same size, another root
    # The forked tree grown: its consistency proof cannot lead from the root the witness holds.
    await add_events(stack, 3)
    grown_size, grown = await _signed(stack)
    proof = await _proof(stack, size, grown_size)
    assert (await _post(w.url, format_add_checkpoint(size, proof, grown)))[0] == 422
    # Malformed proofs: empty, too long, not base64, too many lines.
    assert (await _post(w.url, format_add_checkpoint(size, [], grown)))[0] == 422
    assert (await _post(w.url, format_add_checkpoint(size, [*proof, proof[0]], grown)))[0] == 422
    bad_b64 = f"old {size}\n!!!!\n\n".encode() + grown
    assert (await _post(w.url, bad_b64))[0] == 400
    assert (await _post(w.url, format_add_checkpoint(size, [proof[0]] * 64, grown)))[0] == 400
    # Unknown origin; a log key the witness does not trust.
    stranger = Signer("other.example/log", b"\x01" * 32)
    alien = sign_note(Checkpoint("other.example/log", 1, b"\x00" * 32).to_text(), [stranger])
    assert (await _post(w.url, format_add_checkpoint(0, [], alien)))[0] == 404
    impostor = sign_note(parse_note(grown).text, [Signer("exchange.local/audit", b"\x02" * 32)])
    assert (await _post(w.url, format_add_checkpoint(size, proof, impostor)))[0] == 403
    # The state survives a restart: a new witness on the same directory still holds `size`.
    again = Witness(w.key, WitnessState(w.state), [stack.app[SIGNER].verifier_key()])
    assert WitnessState(w.state).load("exchange.local/audit") is not None
    with pytest.raises(AddCheckpointError) as refused:
        await again.add_checkpoint(format_add_checkpoint(0, [], note))
    assert refused.value.status == 409 and refused.value.known_size == size


async def merkle_root_of(stack: Stack, size: int) -> bytes:
    async with stack.db.read() as conn:
        return await auditlog.root_at(conn, size)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_witness_process(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    """`exchange witness keygen` and `exchange witness serve` as real processes, cosigning for the service."""
    exchange = [sys.executable, "-m", "exchange.cli"]
    signer = auditlog.load_or_create_signer(tmp_path / "log-signing.key", "exchange.local/audit")
    keygen = subprocess.run(
        [*exchange, "witness", "keygen", "--name", "witness.proc.example", "--key", str(tmp_path / "w.key")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert keygen.returncode == 0, keygen.stderr
    vkey = keygen.stdout.strip()
    assert os.stat(tmp_path / "w.key").st_mode & 0o777 == 0o600
    port = _free_port()
    proc = subprocess.Popen(
        [
            *exchange,
            "witness",
            "serve",
            "--port",
            str(port),
            "--state",
            str(tmp_path / "w-state"),
            "--key",
            str(tmp_path / "w.key"),
            "--log-vkey",
            signer.verifier_key(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not _listening(port):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        stack = await start_stack(
            tmp_path,
            database_url,
            seaweed,
            clock,
            audit_checkpoint_interval_s=3600.0,
            audit_heartbeat_s=0,
            witness_urls=(f"http://127.0.0.1:{port}",),
            witness_vkeys=(vkey,),
            witness_quorum=1,
            witness_allow_private=True,  # the witness listens on loopback
        )
        try:
            await add_events(stack, 4)
            note = await stack.app[PUBLISHER].publish()
            assert note is not None and any(
                s.name == "witness.proc.example" for s in parse_note(note).signatures
            )
        finally:
            await stack.server.close()
        [state] = (tmp_path / "w-state").glob("*.json")  # beside it: the .lock file
        assert b'"size": ' in state.read_bytes()
        # Monitors read the same note back: the log's signature and the witness's cosignature.
        origin_hash = hashlib.sha256(b"exchange.local/audit").hexdigest()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/{origin_hash}/checkpoint") as resp:
                assert resp.status == 200
                assert await resp.read() == note
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def test_witness_key_file_round_trip(tmp_path: Path) -> None:
    key = WitnessKey.generate("witness.example")
    key.save(tmp_path / "k")
    assert WitnessKey.load(tmp_path / "k") == key
    assert base64.b64decode(key.vkey.split("+", 2)[2])[0] == 0x04
    with pytest.raises(FileExistsError):
        key.save(tmp_path / "k")

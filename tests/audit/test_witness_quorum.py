"""The publisher's k-of-n witness quorum: witnesses asked at once, a silent one cannot stall it.

Real witnesses (exchange's, on loopback ports), a "silent" one (a TCP server that accepts the
connection, reads the request and never answers) and a refusing one (a closed port). The
publisher asks them all concurrently and waits at most `witness_timeout_s` in all; a
checkpoint goes out with the cosignatures that arrived if they make the quorum, and otherwise
is not stored (a warning says why) and the next tick tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from exchange.api.audit import SIGNER
from exchange.api.keys import AUDIT, CLOCK
from exchange.dev.seaweed import SeaweedFS
from exchange.format.checkpoint import verify_cosignature
from exchange.format.note import parse_note
from exchange.services import auditlog
from exchange.witness import Witness, WitnessKey, WitnessState, create_witness_app
from tests.audit.conftest import add_events
from tests.conftest import FakeClock, Stack, start_stack

TIMEOUT_S = 1.0
ORIGIN = "exchange.local/audit"


@dataclass
class Silent:
    """Accepts connections and reads, but never answers; notes each connection and its close."""

    server: asyncio.Server | None = None
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    received: bytearray = field(default_factory=bytearray)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while chunk := await reader.read(65536):
                self.received += chunk
        finally:
            self.closed.set()  # the client hung up: its request was given up
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@dataclass
class Real:
    key: WitnessKey
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


async def real_witness(
    tmp_path: Path, name: str, log_vkey: str, *, key: WitnessKey | None = None, port: int | None = None
) -> Real:
    key = key if key is not None else WitnessKey.generate(name)
    app = create_witness_app(Witness(key, WitnessState(tmp_path / f"{name}-state"), [log_vkey]))
    server = TestServer(app, host="127.0.0.1", **({"port": port} if port is not None else {}))
    await server.start_server()
    return Real(key, server)


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Setup:
    stack: Stack
    w1: Real
    w2: Real
    silent: Silent


@pytest.fixture
async def setup(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Setup]:
    signer = auditlog.load_or_create_signer(tmp_path / "log-signing.key", ORIGIN)
    w1 = await real_witness(tmp_path, "witness.one.example", signer.verifier_key())
    w2 = await real_witness(tmp_path, "witness.two.example", signer.verifier_key())
    silent = Silent()
    await silent.start()
    stack = await start_stack(
        tmp_path,
        database_url,
        seaweed,
        clock,
        audit_checkpoint_interval_s=3600.0,  # the tests tick the publisher themselves
        audit_heartbeat_s=0,
        witness_allow_private=True,  # the witnesses listen on loopback
    )
    yield Setup(stack, w1, w2, silent)
    await stack.server.close()
    await w1.server.close()
    await w2.server.close()
    if silent.server is not None and silent.server.is_serving():
        await silent.close()


def publisher(s: Setup, urls: tuple[str, ...], vkeys: tuple[str, ...], quorum: int) -> auditlog.Publisher:
    settings = s.stack.settings.replace(
        witness_urls=urls, witness_vkeys=vkeys, witness_quorum=quorum, witness_timeout_s=TIMEOUT_S
    )
    app = s.stack.app
    return auditlog.Publisher(s.stack.db, app[AUDIT], app[SIGNER], settings, app[CLOCK])


def cosigners(note: bytes, *keys: WitnessKey) -> set[str]:
    """The names of `keys` whose cosignature on the note verifies; asserts nothing else cosigned."""
    parsed = parse_note(note)
    found = set()
    for sig in parsed.signatures:
        if sig.name == ORIGIN:
            continue
        key = next(k for k in keys if k.name == sig.name)
        verify_cosignature(parsed.text, sig, key.vkey)
        found.add(key.name)
    assert len(parsed.signatures) == 1 + len(found)
    return found


async def test_a_silent_and_a_refusing_witness_do_not_stall_a_quorum_of_two(setup: Setup) -> None:
    s = setup
    await add_events(s.stack, 6)
    silent_url = f"http://127.0.0.1:{s.silent.port}"
    down = WitnessKey.generate("witness.down.example")
    mute = WitnessKey.generate("witness.silent.example")
    p = publisher(
        s,
        (s.w1.url, silent_url, closed_port_url(), s.w2.url),
        (s.w1.key.vkey, mute.vkey, down.vkey, s.w2.key.vkey),
        quorum=2,
    )
    started = time.monotonic()
    note = await p.publish()
    elapsed = time.monotonic() - started
    assert note is not None
    assert cosigners(note, s.w1.key, s.w2.key) == {s.w1.key.name, s.w2.key.name}
    assert await s.stack.count("audit_checkpoints") == 1
    # The silent witness got the request and the publisher hung up on it (cancelled, not awaited).
    assert s.silent.connections == 1 and b"POST /add-checkpoint" in s.silent.received
    await asyncio.wait_for(s.silent.closed.wait(), timeout=5)
    assert elapsed < TIMEOUT_S + 5  # generous upper bound: the silent one cost at most the timeout


async def test_a_quorum_a_silent_witness_denies_is_not_published_and_retried(
    setup: Setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = setup
    await add_events(s.stack, 4)
    async with s.stack.db.read() as conn:
        size = await auditlog.tree_size(conn)
    port = s.silent.port
    third = WitnessKey.generate("witness.three.example")
    p = publisher(
        s,
        (s.w1.url, f"http://127.0.0.1:{port}", s.w2.url),
        (s.w1.key.vkey, third.vkey, s.w2.key.vkey),
        quorum=3,
    )
    with caplog.at_level(logging.WARNING, logger="exchange.audit"):
        assert await p.publish() is None
    assert await s.stack.count("audit_checkpoints") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"witness http://127.0.0.1:{port} did not answer checkpoint {size} within {TIMEOUT_S} s" in messages
    )
    assert f"checkpoint {size} not published: 2 of 3 witness cosignatures" in messages
    await asyncio.wait_for(s.silent.closed.wait(), timeout=5)
    # The third witness comes back (a real one, the same URL and key) before the next tick: the
    # same checkpoint is published, with all three; the two that cosigned it already cosign it
    # again (old size = checkpoint size, the same root).
    await s.silent.close()
    vkey = s.stack.app[SIGNER].verifier_key()
    w3 = await real_witness(tmp_path, "witness.three.example", vkey, key=third, port=port)
    try:
        note = await p.publish()
    finally:
        await w3.server.close()
    assert note is not None
    assert cosigners(note, s.w1.key, s.w2.key, w3.key) == {
        s.w1.key.name,
        s.w2.key.name,
        w3.key.name,
    }
    assert await s.stack.count("audit_checkpoints") == 1


def test_the_timeout_must_be_positive(tmp_path: Path) -> None:
    from exchange.errors import ValidationError
    from exchange.settings import Settings

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="witness_timeout_s"):
            Settings(witness_timeout_s=bad)

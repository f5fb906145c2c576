"""Storage that is slow, resets connections, or never answers — through a small TCP proxy in
front of the real SeaweedFS. Calls time out within their bound, /readyz says which dependency is
degraded, and after 100 rounds the service holds no more descriptors or connections than before."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from exchange.dev.seaweed import SeaweedFS
from tests.conftest import FakeClock, Stack, start_stack


class FaultyProxy:
    """Forwards TCP to storage; `mode` decides what happens: pass, slow, reset, silent."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.delay_s = 2.0
        self.server: asyncio.Server | None = None
        self.open_connections = 0
        self._transports: set[asyncio.BaseTransport] = set()

    def set_mode(self, mode: str) -> None:
        """Switch behaviour for every connection, kept-alive ones included: drop them all."""
        self.mode = mode
        for transport in list(self._transports):
            transport.abort()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self._transports.add(writer.transport)
        try:
            if self.mode == "silent":
                await reader.read(-1)  # accept, read, never answer, until the client gives up
                return
            if self.mode == "reset":
                await reader.read(1)
                writer.transport.abort()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer, slow=True))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            self._transports.discard(writer.transport)
            writer.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, slow: bool = False
    ) -> None:
        try:
            while data := await src.read(65536):
                if slow and self.mode == "slow":
                    await asyncio.sleep(self.delay_s)
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()


@pytest.fixture
async def proxied(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[tuple[Stack, FaultyProxy]]:
    proxy = FaultyProxy(seaweed.s3_port)
    await proxy.start()
    stack = await start_stack(
        tmp_path,
        database_url,
        seaweed,
        clock,
        s3_endpoint=f"http://127.0.0.1:{proxy.port}",
        storage_timeout_s=1.0,
    )
    yield stack, proxy
    await stack.server.close()
    await proxy.close()


async def readyz(stack: Stack) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(stack.url + "/readyz") as resp:
        return resp.status, await resp.json(content_type=None)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("mode", "check"), [("slow", "timeout"), ("silent", "timeout"), ("reset", "storage-unavailable")]
)
async def test_readyz_degrades_with_bounded_time(
    proxied: tuple[Stack, FaultyProxy], mode: str, check: str
) -> None:
    stack, proxy = proxied
    assert (await readyz(stack))[0] == 200
    proxy.set_mode(mode)
    started = time.monotonic()
    status, body = await readyz(stack)
    elapsed = time.monotonic() - started
    assert status == 503
    assert body["checks"] == {"database": "ok", "storage": check}
    # Bounded by the storage timeout (1 s) — not by the fault, which would last forever.
    assert elapsed < 5, elapsed
    proxy.set_mode("pass")
    for _ in range(50):  # the pool may still hold a dead connection or two
        if (await readyz(stack))[0] == 200:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("readyz did not recover")


@pytest.mark.slow
async def test_descriptors_and_connections_stay_flat_over_100_rounds(
    proxied: tuple[Stack, FaultyProxy],
) -> None:
    stack, proxy = proxied
    assert (await readyz(stack))[0] == 200
    baseline = open_fds()
    for round_ in range(100):
        proxy.set_mode(("reset", "silent", "pass", "slow")[round_ % 4] if round_ % 10 == 0 else "reset")
        await readyz(stack)
    proxy.set_mode("pass")
    # Calls abandoned by /readyz finish within their own timeouts (2 attempts of 1 s, plus slack).
    deadline = time.monotonic() + 15
    while (open_fds() > baseline + 10 or proxy.open_connections > 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert open_fds() <= baseline + 10, (baseline, open_fds())
    assert proxy.open_connections <= 2
    assert (await readyz(stack))[0] == 200

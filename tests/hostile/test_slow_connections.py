"""Slow and hoarding clients (issue 12, item 3): half-sent headers, idle keep-alive connections,
trickled bodies, and more connections from one source than it may hold.

Each test serves the real app through `start_site` (the function `exchange serve` uses) on a free
loopback port, with short timeouts so that it is quick. Waits are bounded, never timed: a test
asserts what happened by a deadline, not how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exchange.api.app import create_app
from exchange.api.connections import source_of, start_site
from exchange.client import Client
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import ValidationError
from exchange.identity import Identity
from exchange.server import bootstrap_with_settings, fit_descriptor_limit
from exchange.settings import Settings
from tests.conftest import ServiceProcess, free_port, make_settings, service_env

#: Slack on top of a timeout before a test gives up waiting for the behaviour.
MARGIN_S = 10.0
HALF_HEADER = b"GET /v1/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"


@dataclass
class Guarded:
    url: str
    host: str
    port: int
    settings: Settings
    admin: Identity

    async def open(self, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw connection from `source` (any 127/8 address is this machine on Linux)."""
        return await asyncio.open_connection(self.host, self.port, local_addr=(source, 0))

    async def healthz(self, source: str = "127.0.0.1") -> int:
        connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=10)) as r:
                return r.status

    async def whoami(self) -> str:
        async with Client(self.url, self.admin) as admin:
            return str((await admin.whoami())["name"])


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, seaweed: SeaweedFS, **overrides: Any) -> AsyncIterator[Guarded]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'exchange.db'}", seaweed, **overrides)
    admin_path = tmp_path / "admin.identity"
    await bootstrap_with_settings(settings, identity_path=admin_path, name="admin", org_name="operators")
    runner, site = await start_site(create_app(settings), settings, host="127.0.0.1", port=0)
    try:
        yield Guarded(
            url=f"http://127.0.0.1:{site.port}",
            host="127.0.0.1",
            port=site.port,
            settings=settings,
            admin=Identity.load(admin_path),
        )
    finally:
        await runner.cleanup()


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """Did the server close the connection (EOF or reset) within `within_s`? Drains what it sent."""
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()


@pytest.fixture
def descriptors() -> None:
    """1,000 client sockets and their 1,000 server ends live in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        if hard != resource.RLIM_INFINITY and hard < 4096:
            pytest.skip(f"the descriptor limit ({hard}) is too low for 1,000 connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))


async def test_a_thousand_half_headers_are_closed_while_the_service_answers(
    tmp_path: Path, seaweed: SeaweedFS, descriptors: None
) -> None:
    header_s = 2.0
    async with serving(
        tmp_path,
        seaweed,
        http_header_timeout_s=header_s,
        http_keepalive_timeout_s=600.0,  # so only the header timeout can close them
        http_max_connections=5000,
        http_max_connections_per_source=5000,
    ) as srv:
        flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(10):
                batch = await asyncio.gather(*(srv.open() for _ in range(100)))
                for _, w in batch:
                    w.write(HALF_HEADER)
                flood += batch
            # With all 1,000 open and stalled, the service still answers, signed requests too.
            assert await srv.healthz() == 200
            assert await srv.whoami() == "admin"
            closing = [
                asyncio.create_task(closed_by_server(r, header_s + MARGIN_S + len(flood) / 100))
                for r, _ in flood
            ]
            answers = 0
            while not all(t.done() for t in closing):
                assert await srv.healthz() == 200
                answers += 1
                await asyncio.sleep(0.2)
            assert await srv.whoami() == "admin"
            closed = sum(t.result() for t in closing)
            assert closed == len(flood) == 1000
            assert answers > 0
        finally:
            close_all([w for _, w in flood])


async def test_a_silent_connection_is_closed_after_the_header_timeout(
    tmp_path: Path, seaweed: SeaweedFS
) -> None:
    async with serving(tmp_path, seaweed, http_header_timeout_s=1.0, http_keepalive_timeout_s=600.0) as srv:
        reader, writer = await srv.open()
        try:
            assert await closed_by_server(reader, 1.0 + MARGIN_S)
        finally:
            writer.close()


async def raw_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    """One keep-alive request on a raw connection; returns the response body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await asyncio.wait_for(reader.readexactly(length), 10)


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    tmp_path: Path, seaweed: SeaweedFS
) -> None:
    idle_s = 2.0
    async with serving(
        tmp_path, seaweed, http_header_timeout_s=600.0, http_keepalive_timeout_s=idle_s
    ) as srv:
        reader, writer = await srv.open()
        try:
            # A request well inside the header timeout: the connection is kept alive for the next.
            assert json.loads(await raw_get(reader, writer, "/healthz")) == {"status": "ok"}
            assert json.loads(await raw_get(reader, writer, "/healthz")) == {"status": "ok"}
            assert await closed_by_server(reader, idle_s + MARGIN_S)
        finally:
            writer.close()


async def test_half_of_a_second_request_on_a_kept_alive_connection_has_the_header_timeout(
    tmp_path: Path, seaweed: SeaweedFS
) -> None:
    header_s = 2.0
    async with serving(
        tmp_path, seaweed, http_header_timeout_s=header_s, http_keepalive_timeout_s=600.0
    ) as srv:
        reader, writer = await srv.open()
        try:
            assert json.loads(await raw_get(reader, writer, "/healthz")) == {"status": "ok"}
            writer.write(HALF_HEADER)
            assert await closed_by_server(reader, header_s + MARGIN_S)
        finally:
            writer.close()


async def test_a_trickled_body_is_answered_408(tmp_path: Path, seaweed: SeaweedFS) -> None:
    body_s = 3.0
    # The header timeout is shorter than the body's: a request under way is not a slow header.
    async with serving(
        tmp_path,
        seaweed,
        http_header_timeout_s=1.0,
        http_body_timeout_s=body_s,
        http_keepalive_timeout_s=600.0,
    ) as srv:
        reader, writer = await srv.open()
        try:
            writer.write(
                b"POST /v1/orgs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )

            async def trickle() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    writer.write(b" ")

            dripping = asyncio.create_task(trickle())
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), body_s + MARGIN_S)
            finally:
                dripping.cancel()
            assert head.startswith(b"HTTP/1.1 408"), head
            assert b"application/problem+json" in head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            problem = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
            assert (problem["status"], problem["code"]) == (408, "body-timeout")
        finally:
            writer.close()
        assert await srv.healthz() == 200


async def test_connections_over_the_per_source_cap_are_closed_at_once(
    tmp_path: Path, seaweed: SeaweedFS
) -> None:
    cap = 20
    async with serving(
        tmp_path,
        seaweed,
        http_header_timeout_s=600.0,  # so only the cap can close them
        http_keepalive_timeout_s=600.0,
        http_max_connections=1000,
        http_max_connections_per_source=cap,
    ) as srv:
        held = [await srv.open("127.0.0.1") for _ in range(cap + 10)]
        try:
            outcome = await asyncio.gather(*(closed_by_server(r, MARGIN_S) for r, _ in held[cap:]))
            assert all(outcome), "the connections over the cap stay open"
            # The first `cap` are still open: a request on one is answered.
            reader, writer = held[0]
            assert json.loads(await raw_get(reader, writer, "/healthz")) == {"status": "ok"}
            # Another source is served while this one is at its cap ...
            assert await srv.healthz("127.0.0.2") == 200
            # ... and this one is not, until it lets a connection go.
            with pytest.raises(aiohttp.ClientError):
                await srv.healthz("127.0.0.1")
            held[1][1].close()
            async with asyncio.timeout(MARGIN_S):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        if await srv.healthz("127.0.0.1") == 200:
                            break
                    await asyncio.sleep(0.1)
        finally:
            close_all([w for _, w in held])


async def test_connections_over_the_total_cap_are_closed_at_once(tmp_path: Path, seaweed: SeaweedFS) -> None:
    total = 12
    async with serving(
        tmp_path,
        seaweed,
        http_header_timeout_s=600.0,
        http_keepalive_timeout_s=600.0,
        http_max_connections=total,
        http_max_connections_per_source=total - 2,
    ) as srv:
        held = [await srv.open("127.0.0.1") for _ in range(total - 2)]
        held += [await srv.open("127.0.0.2") for _ in range(2)]
        try:
            reader, writer = await srv.open("127.0.0.3")
            held.append((reader, writer))
            assert await closed_by_server(reader, MARGIN_S)
        finally:
            close_all([w for _, w in held])


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        (("192.0.2.7", 1234), "192.0.2.7"),
        (("::ffff:192.0.2.7", 1234, 0, 0), "192.0.2.7"),
        (("2001:db8:1:2:aaaa::1", 1234, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9%eth0", 1234, 0, 3), "2001:db8:1:2::/64"),
        (("2001:db8:1:3::1", 1234, 0, 0), "2001:db8:1:3::/64"),
        ("", "-"),
        (None, "-"),
    ],
)
def test_sources_are_addresses_or_ipv6_slash_64s(peer: Any, source: str) -> None:
    assert source_of(peer) == source


@pytest.mark.parametrize(
    "name",
    [
        "http_header_timeout_s",
        "http_keepalive_timeout_s",
        "http_body_timeout_s",
        "http_max_connections",
        "http_max_connections_per_source",
    ],
)
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_connection_settings_must_be_positive_and_finite(name: str, value: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings.from_mapping({f"EXCHANGE_{name.upper()}": value})
    assert name in str(err.value)


def test_a_loopback_alias_is_available() -> None:
    """The tests above bind clients to 127.0.0.2 and 127.0.0.3, as Linux allows out of the box."""
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))


async def test_exchange_serve_closes_half_headers_too(seaweed: SeaweedFS, tmp_path: Path) -> None:
    """The same guard in the real `exchange serve` process (with uvloop), configured by environment."""
    service = ServiceProcess(service_env(tmp_path, free_port(), seaweed, EXCHANGE_HTTP_HEADER_TIMEOUT_S="1s"))
    service.init_admin(tmp_path / "admin.identity")
    service.start()
    try:
        port = int(service.url.rsplit(":", 1)[1])
        flood = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(50)))
        try:
            for _, w in flood:
                w.write(HALF_HEADER)
            closing = [asyncio.create_task(closed_by_server(r, 1.0 + MARGIN_S)) for r, _ in flood]
            async with aiohttp.ClientSession() as session:
                async with session.get(service.url + "/healthz") as r:
                    assert r.status == 200
            assert all(await asyncio.gather(*closing))
        finally:
            close_all([w for _, w in flood])
    finally:
        assert service.stop() == 0


class FakeLimits:
    def __init__(self, soft: int, hard: int) -> None:
        self.limits = (soft, hard)

    def getrlimit(self, _: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, _: int, limits: tuple[int, int]) -> None:
        if limits[0] > self.limits[1]:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


def test_the_descriptor_limit_is_raised_to_fit_the_connection_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = FakeLimits(1024, 1_048_576)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    settings = Settings(http_max_connections=10_000)
    assert fit_descriptor_limit(settings) == settings
    assert limits.limits[0] >= 10_000 and limits.limits[1] == 1_048_576


def test_the_connection_cap_is_lowered_when_the_hard_limit_is_too_low(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = FakeLimits(1024, 4096)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    fitted = fit_descriptor_limit(Settings(http_max_connections=10_000, http_max_connections_per_source=256))
    assert limits.limits == (4096, 4096)
    assert 0 < fitted.http_max_connections < 4096
    assert fitted.http_max_connections_per_source == 256
    assert "serving at most" in caplog.text

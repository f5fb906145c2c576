"""The client's address behind a trusted proxy: `X-Forwarded-For` believed only from a peer in
`trusted_proxies`, read right to left past the trusted hops, refused (400 and its audit event)
when a trusted proxy sends none or garbage; per-source limits and audit events then name the
client, and a trusted proxy's connections are under the total cap only."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exchange.api.app import create_app
from exchange.api.forwarded import TrustedProxies, client_address
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import ValidationError
from exchange.identity import Identity
from exchange.server import bootstrap_with_settings
from exchange.settings import Settings
from tests.conftest import FakeClock, ServedApp, Stack, make_settings, start_stack
from tests.hostile.test_slow_connections import MARGIN_S, close_all, closed_by_server, serving

XFF = "X-Forwarded-For"
PROXY = TrustedProxies(["127.0.0.1/32", "10.0.0.0/8", "2001:db8:feed::/48"])


# -- the decision, alone ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "client"),
    [
        (["198.51.100.7"], "198.51.100.7"),
        # A client may send its own header; the proxy appends what it saw: the rightmost untrusted.
        (["203.0.113.9, 198.51.100.7"], "198.51.100.7"),
        # Several proxies: skip every trusted hop from the right, stop at the first other address.
        (["203.0.113.9, 198.51.100.7, 10.1.2.3, 10.9.9.9"], "198.51.100.7"),
        (["203.0.113.9", "198.51.100.7, 10.1.2.3"], "198.51.100.7"),  # two header lines, in order
        # Only trusted hops (a proxy's own health check): the leftmost.
        (["10.1.2.3, 127.0.0.1"], "10.1.2.3"),
        # IPv6 clients, and an IPv6 proxy hop; spaces and tabs around elements are allowed.
        (["2001:db8::1"], "2001:db8::1"),
        (["2001:DB8:0::5 ,\t2001:db8:feed::2"], "2001:db8::5"),
        # An IPv4-mapped address is the IPv4 address it maps, as a hop and as the client.
        (["198.51.100.7, ::ffff:10.1.2.3"], "198.51.100.7"),
        (["::ffff:198.51.100.7"], "198.51.100.7"),
    ],
)
def test_the_client_is_the_rightmost_address_that_is_not_a_trusted_proxy(
    values: list[str], client: str
) -> None:
    assert client_address(values, PROXY) == client


@pytest.mark.parametrize(
    "values",
    [
        [],  # no header at all
        [""],
        ["198.51.100.7,"],  # an empty element
        ["unknown"],
        ["198.51.100.7:4711"],  # ports
        ["[2001:db8::1]"],
        ["[2001:db8::1]:4711"],
        ["fe80::1%eth0"],  # zones
        ["010.1.2.3"],  # inet_aton forms
        ["127.1"],
        ["198.51.100.7, not-an-ip, 10.1.2.3"],  # garbage anywhere, even left of the client
        ['for="198.51.100.7"'],  # RFC 7239's syntax is not X-Forwarded-For's
    ],
)
def test_a_trusted_proxys_missing_or_malformed_header_is_refused(values: list[str]) -> None:
    with pytest.raises(ValidationError) as caught:
        client_address(values, PROXY)
    assert caught.value.code == "bad-forwarded-for"


def test_trusted_peers() -> None:
    assert "127.0.0.1" in PROXY and "::ffff:127.0.0.1" in PROXY and "10.200.0.1" in PROXY
    assert "2001:db8:feed:1::1" in PROXY
    assert "127.0.0.2" not in PROXY and "2001:db8:fee0::1" not in PROXY and "::1" not in PROXY
    assert "/run/exchange.sock" not in PROXY and None not in PROXY
    assert "127.0.0.1" not in TrustedProxies([])


def test_the_setting_is_a_list_of_strict_networks() -> None:
    env = {"EXCHANGE_TRUSTED_PROXIES": "127.0.0.1/32, 10.0.0.0/8,::1"}
    assert Settings.from_mapping(env).trusted_proxies == ("127.0.0.1/32", "10.0.0.0/8", "::1")
    assert Settings().trusted_proxies == ()  # by default no forwarding header is believed
    for bad in ("10.0.0.1/8", "proxy.internal", "10.0.0.0/33", "*"):
        with pytest.raises(ValidationError, match="trusted_proxies"):
            Settings.from_mapping({"EXCHANGE_TRUSTED_PROXIES": bad})


# -- through the service ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving_stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock, **overrides: Any
) -> AsyncIterator[Stack]:
    stack = await start_stack(tmp_path, database_url, seaweed, clock, **overrides)
    try:
        yield stack
    finally:
        await stack.server.close()


async def unsigned_whoami(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/whoami", headers=headers) as r:
        return r.status, json.loads(await r.read())


async def last_refusal(stack: Stack) -> dict[str, Any]:
    denied = [e for e in await stack.events() if e["outcome"]["result"] == "denied"]
    return denied[-1]


async def test_a_trusted_proxys_header_names_the_client_in_the_log(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    async with serving_stack(
        tmp_path, database_url, seaweed, clock, trusted_proxies=("127.0.0.1/32", "10.0.0.0/8")
    ) as stack:
        status, problem = await unsigned_whoami(stack.url, {XFF: "198.51.100.7"})
        assert (status, problem["code"]) == (401, "missing-signature")
        assert (await last_refusal(stack))["source"]["ip"] == "198.51.100.7"
        # A chain: the client's own claim (leftmost) is ignored, the trusted hops are skipped.
        await unsigned_whoami(stack.url, {XFF: "203.0.113.9, 2001:db8::7, 10.1.2.3"})
        assert (await last_refusal(stack))["source"]["ip"] == "2001:db8::7"


async def test_a_spoofed_header_from_an_untrusted_peer_is_ignored(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    async with serving_stack(
        tmp_path, database_url, seaweed, clock, trusted_proxies=("10.0.0.0/8",)
    ) as stack:
        status, _ = await unsigned_whoami(stack.url, {XFF: "198.51.100.7"})
        assert status == 401
        assert (await last_refusal(stack))["source"]["ip"] == "127.0.0.1"
        # Garbage from an untrusted peer is not even read.
        status, _ = await unsigned_whoami(stack.url, {XFF: "garbage"})
        assert status == 401


@pytest.mark.parametrize("header", [None, "198.51.100.7:80", "198.51.100.7, , 10.1.2.3"])
async def test_a_trusted_proxys_bad_header_is_a_refusal_with_its_event(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock, header: str | None
) -> None:
    async with serving_stack(
        tmp_path, database_url, seaweed, clock, trusted_proxies=("127.0.0.1/32",)
    ) as stack:
        before = len(await stack.events())
        async with aiohttp.ClientSession() as session:
            headers = {XFF: header} if header is not None else {}
            # Even a public route: nothing is served on a request whose client is unknown.
            async with session.get(stack.url + "/healthz", headers=headers) as resp:
                assert resp.status == 400
                assert resp.content_type == "application/problem+json"
                problem = json.loads(await resp.read())
        assert problem["code"] == "bad-forwarded-for"
        assert "X-Forwarded-For" in problem["detail"]
        new = (await stack.events())[before:]
        assert [(e["outcome"]["reason"], e["source"]["ip"]) for e in new] == [
            ("bad-forwarded-for", "127.0.0.1")  # the client is unknown: the peer is named
        ]


async def test_failure_budgets_are_per_client_behind_a_trusted_proxy(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    async with serving_stack(
        tmp_path,
        database_url,
        seaweed,
        clock,
        trusted_proxies=("127.0.0.1/32",),
        auth_failure_burst_requests=2,
        auth_failure_delay_s=0.0,
    ) as stack:
        flooder = {XFF: "198.51.100.7"}
        assert [(await unsigned_whoami(stack.url, flooder))[0] for _ in range(3)] == [401, 401, 429]
        # Another client through the same proxy has a budget of its own; so has an IPv6 /64.
        assert (await unsigned_whoami(stack.url, {XFF: "198.51.100.8"}))[0] == 401
        assert [(await unsigned_whoami(stack.url, {XFF: f"2001:db8::{i}"}))[0] for i in range(3)] == [
            401,
            401,
            429,
        ]
        assert (await unsigned_whoami(stack.url, {XFF: "2001:db8:0:1::1"}))[0] == 401


async def test_an_ipv6_proxy_peer_is_trusted_by_its_network(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    settings = make_settings(tmp_path, database_url, seaweed, trusted_proxies=("::1/128",))
    admin = tmp_path / "admin.identity"
    await bootstrap_with_settings(settings, identity_path=admin, name="admin", org_name="operators")
    server = ServedApp(create_app(settings, clock=clock), settings, host="::1")
    await server.start_server()
    try:
        stack = Stack(server, settings, Identity.load(admin), tmp_path)
        url = f"http://[::1]:{server.port}"
        assert (await unsigned_whoami(url, {XFF: "198.51.100.7, 2001:db8::42"}))[0] == 401
        assert (await last_refusal(stack))["source"]["ip"] == "2001:db8::42"
        status, problem = await unsigned_whoami(url, {})
        assert (status, problem["code"]) == (400, "bad-forwarded-for")
    finally:
        await server.close()


async def test_a_trusted_proxy_is_under_the_total_cap_only(tmp_path: Path, seaweed: SeaweedFS) -> None:
    per_source, total = 3, 8
    async with serving(
        tmp_path,
        seaweed,
        http_header_timeout_s=600.0,  # so only a cap can close them
        http_keepalive_timeout_s=600.0,
        http_max_connections=total,
        http_max_connections_per_source=per_source,
        trusted_proxies=("127.0.0.1/32",),
    ) as srv:
        held = [await srv.open("127.0.0.2") for _ in range(per_source + 1)]  # not a proxy: capped
        try:
            assert await closed_by_server(held[-1][0], MARGIN_S)
            assert not any(await asyncio.gather(*(closed_by_server(r, 0.5) for r, _ in held[:-1])))
            # The proxy holds more than the per-source cap, up to what the total cap leaves.
            proxy = [await srv.open("127.0.0.1") for _ in range(total - per_source)]
            held += proxy
            assert not any(await asyncio.gather(*(closed_by_server(r, 0.5) for r, _ in proxy)))
            reader, writer = proxy[-1]
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7\r\n\r\n")
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            over = await srv.open("127.0.0.1")  # past the total cap: closed, proxy or not
            held.append(over)
            assert await closed_by_server(over[0], MARGIN_S)
        finally:
            close_all([w for _, w in held])

"""Hostile headers (Host, X-Forwarded-For, User-Agent, X-Request-Id) with SQL and control
metacharacters: never a 5xx, never a changed row, recorded harmlessly, and the service stays up."""

from __future__ import annotations

import asyncio
import json

import pytest

from exchange.client.signing import sign_headers
from tests.conftest import Stack

HOSTILE = [
    "' OR '1'='1",
    "x'); DROP TABLE principals; --",
    "\u202eevil\u202c",
    "a" * 8000,
    "%00%0d%0aX-Injected: 1",
    "\t\x01\x7f",  # refused by aiohttp's HTTP parser, answered as a problem like the rest
    "..\\..\\etc\\passwd",
    "ünïcödé",
]


async def raw_request(stack: Stack, head: bytes) -> tuple[int, bytes]:
    """Send bytes as they are: no client library to clean them up first."""
    host, port = stack.server.host, stack.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    status_line = data.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), data


def encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize("header", ["Host", "X-Forwarded-For", "User-Agent", "X-Request-Id"])
async def test_hostile_header_values(stack: Stack, header: str, value: str) -> None:
    before = {t: await stack.count(t) for t in ("orgs", "principals", "invites")}
    head = b"GET /v1/orgs HTTP/1.1\r\n"
    if header != "Host":
        head += b"Host: 127.0.0.1\r\n"
    head += encode(f"{header}: {value}") + b"\r\nConnection: close\r\n\r\n"
    status, data = await raw_request(stack, head)
    assert status < 500, data[:500]
    assert 400 <= status < 500  # unsigned, or refused by the HTTP parser
    assert {t: await stack.count(t) for t in ("orgs", "principals", "invites")} == before
    head_out, _, body_out = data.partition(b"\r\n\r\n")
    assert b"\r\ncontent-type: application/problem+json" in head_out.lower(), data[:500]
    body = json.loads(body_out)
    assert body["status"] == status
    # Unsigned (401), a bad Host (400), or a source over its failure budget (429).
    expected = {401: ("missing-signature",), 400: ("bad-request", "bad-host"), 429: ("rate-limited",)}
    assert body["code"] in expected.get(status, ()), body
    # The service still answers a well-formed, signed request.
    async with stack.client(stack.admin) as c:
        assert (await c.whoami())["name"] == "admin"


async def test_hostile_user_agent_is_recorded_as_data(stack: Stack) -> None:
    ua = "sqlmap/1.0' OR 1=1; -- \u202e"
    headers = sign_headers(
        stack.admin, method="GET", url=stack.url + "/v1/orgs", body=b"", headers={"User-Agent": ua}
    )
    head = b"GET /v1/orgs HTTP/1.1\r\nHost: " + f"{stack.server.host}:{stack.server.port}".encode()
    head += b"\r\n" + b"".join(encode(f"{k}: {v}") + b"\r\n" for k, v in headers.items())
    head += b"Connection: close\r\n\r\n"
    status, data = await raw_request(stack, head)
    assert status == 200, data[:500]
    # Refuse one to get an event, and check the user agent is stored as a plain string.
    status, _ = await raw_request(stack, head)
    assert status == 401
    last = (await stack.events())[-1]
    assert last["source"]["user_agent"] == ua
    assert last["outcome"]["reason"] == "replayed-nonce"

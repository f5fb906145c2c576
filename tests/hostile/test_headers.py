"""Hostile headers (Host, X-Forwarded-For, User-Agent, X-Request-Id) with SQL and control
metacharacters: never a 5xx, never a changed row, recorded harmlessly, and the service stays up."""

from __future__ import annotations

import asyncio
import json

import pytest

from exchange.api import refusals
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


async def test_parser_refusals_are_problems_accounted_for_and_echo_nothing(stack: Stack) -> None:
    """A request aiohttp's parser refuses never reaches a route, yet is answered like any refusal
    (a problem detail that echoes nothing of what was sent) and accounted for like one: the
    allowance as events of their own, the rest in a summary."""
    allowance = stack.settings.refusal_log_allowance_events
    sent = allowance + 3
    marker = "exl1_" + "Q" * 43  # what must not come back: it could be a link token
    for _ in range(sent):
        head = f"GET /l/{marker} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad: \x01{marker}\r\n".encode()
        status, data = await raw_request(stack, head + b"Connection: close\r\n\r\n")
        head_out, _, body_out = data.partition(b"\r\n\r\n")
        assert status == 400 and b"application/problem+json" in head_out.lower(), data[:300]
        assert json.loads(body_out)["code"] == "bad-request"
        assert marker.encode() not in data
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:  # the events of the allowance are appended by tasks of their own
        alone = [e for e in await stack.events() if e["action"] == "http.request"]
        if len(alone) >= allowance or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(alone) == allowance
    assert {e["outcome"]["reason"] for e in alone} == {"bad-request"}
    assert marker not in str(alone)
    await refusals.flush(stack.app, final=True)
    (summary,) = [e for e in await stack.events() if e["action"] == "http.refusals"]
    assert summary["details"]["action"] == "http.request" and summary["details"]["suppressed"] == 3

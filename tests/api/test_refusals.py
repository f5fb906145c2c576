"""Refusals are all accounted for, at a bounded cost: a few events of their own per (source,
route, code) and window, the rest counted into one summary; a source that keeps failing is
answered 429 before any work; sources are IPv4 addresses or IPv6 /64s."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exchange.api.app import create_app
from exchange.client.signing import sign_headers
from exchange.db import connect
from exchange.dev.seaweed import SeaweedFS
from exchange.identity import Identity
from exchange.server import bootstrap_with_settings
from tests.conftest import FakeClock, Stack, make_settings, start_stack

WHOAMI = "/v1/whoami"


async def send(
    session: aiohttp.ClientSession, stack: Stack, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with session.get(stack.url + path, headers=headers or {}) as resp:
        assert resp.content_type in ("application/json", "application/problem+json"), resp.content_type
        return resp.status, dict(resp.headers), json.loads(await resp.read())


def signed(identity: Identity, stack: Stack, path: str) -> dict[str, str]:
    return sign_headers(identity, method="GET", url=stack.url + path, body=b"", headers={})


async def flush_after_window(stack: Stack, clock: FakeClock) -> None:
    """Move past the current window and the grace the other replicas' counts get, and append its
    summaries (the background task may beat us)."""
    from exchange.api import refusals

    clock.advance(stack.settings.refusal_log_window_s + refusals.SUMMARY_GRACE_S)
    await refusals.flush(stack.app)


def summaries(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["action"] == "http.refusals"]


def individual(events: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [e for e in events if e["action"] == action and e["outcome"]["result"] == "denied"]


# -- sources ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped, from a dual-stack socket
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # same /64
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64
        ("2001:DB8:1:2::1", "2001:db8:1:2::/64"),  # one spelling
        ("fe80::1%eth0", "fe80::/64"),  # a zone is not part of the key
        (None, "-"),  # not an IP peer (a Unix socket)
    ],
)
def test_source_key(ip: str | None, key: str) -> None:
    from exchange.api.ratelimit import source_key

    assert source_key(ip) == key


@web.middleware
async def remote_from_header(request: web.Request, handler: Any) -> web.StreamResponse:
    """Test only: take the client's address from X-Test-Remote (a TestServer has one address)."""
    remote = request.headers.get("X-Test-Remote")
    return await handler(request.clone(remote=remote) if remote else request)  # type: ignore[no-any-return]


@pytest.fixture
async def remote_stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    settings = make_settings(
        tmp_path,
        database_url,
        seaweed,
        redeem_ip_burst_requests=3,
        auth_failure_burst_requests=3,
        auth_failure_delay_s=0,
    )
    admin_path = tmp_path / "admin.identity"
    await bootstrap_with_settings(settings, identity_path=admin_path, name="admin", org_name="operators")
    app = create_app(settings, clock=clock)
    app.middlewares.insert(0, remote_from_header)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Stack(server, settings, Identity.load(admin_path), tmp_path)
    await server.close()


def guess() -> str:
    return "/l/exl1_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


async def test_redemption_is_limited_per_ipv6_64(remote_stack: Stack) -> None:
    stack = remote_stack
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, _, _ = await send(s, stack, guess(), {"X-Test-Remote": "2001:db8:1:2::1"})
            assert status == 404
        # Another address of the same /64 is the same source; an IPv4-mapped address is its IPv4.
        status, headers, body = await send(s, stack, guess(), {"X-Test-Remote": "2001:db8:1:2::beef"})
        assert status == 429 and body["code"] == "rate-limited" and int(headers["Retry-After"]) >= 1
        assert (await send(s, stack, guess(), {"X-Test-Remote": "2001:db8:1:3::1"}))[0] == 404
        for _ in range(3):
            assert (await send(s, stack, guess(), {"X-Test-Remote": "::ffff:192.0.2.9"}))[0] == 404
        assert (await send(s, stack, guess(), {"X-Test-Remote": "192.0.2.9"}))[0] == 429


async def test_failed_authentication_is_limited_per_ipv6_64(remote_stack: Stack, clock: FakeClock) -> None:
    stack = remote_stack
    async with aiohttp.ClientSession() as s:
        for n in range(3):
            status, _, _ = await send(s, stack, WHOAMI, {"X-Test-Remote": f"2001:db8:1:2::{n + 1}"})
            assert status == 401
        status, headers, body = await send(s, stack, WHOAMI, {"X-Test-Remote": "2001:db8:1:2::99"})
        assert status == 429 and body["code"] == "rate-limited" and int(headers["Retry-After"]) >= 1
        assert (await send(s, stack, WHOAMI, {"X-Test-Remote": "2001:db8:1:3::1"}))[0] == 401
    await flush_after_window(stack, clock)
    events = await stack.events()
    # The individual events keep the full address; the summary names the /64 it counted.
    assert {e["source"]["ip"] for e in individual(events, "whoami")} == {
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2::3",
        "2001:db8:1:3::1",
    }
    [summary] = summaries(events)
    assert summary["outcome"] == {"result": "denied", "reason": "rate-limited"}
    assert summary["details"]["source"] == "2001:db8:1:2::/64" and summary["details"]["suppressed"] == 1


# -- the flood --------------------------------------------------------------------------------------


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    """The default settings, but a 429 for a spent budget is answered at once (see the last test)."""
    s = await start_stack(tmp_path, database_url, seaweed, clock, auth_failure_delay_s=0)
    yield s
    await s.server.close()


async def test_a_flood_of_unsigned_requests_is_accounted_for_in_a_few_events(
    stack: Stack, clock: FakeClock
) -> None:
    settings = stack.settings
    allowance, burst = settings.refusal_log_allowance_events, settings.auth_failure_burst_requests
    flood = 500
    before = await stack.count("audit_events")
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession() as s:
        for _ in range(flood):
            status, headers, body = await send(s, stack, WHOAMI)
            assert status in (401, 429) and body["status"] == status, body
            assert body["code"] == ("missing-signature" if status == 401 else "rate-limited")
            if status == 429:
                assert int(headers["Retry-After"]) >= 1
            statuses[status] += 1
    # The source's failure budget answered the rest 429 before any work.
    assert statuses == {401: burst, 429: flood - burst}
    during = await stack.count("audit_events") - before
    assert during <= allowance + 2, during  # a 429 appends nothing of its own
    assert during == allowance

    await flush_after_window(stack, clock)
    events = (await stack.events())[before:]
    alone = individual(events, "whoami")
    assert len(alone) == allowance
    assert all(e["source"]["ip"] == "127.0.0.1" for e in alone)
    by_code = {e["outcome"]["reason"]: e for e in summaries(events)}
    assert set(by_code) == {"missing-signature", "rate-limited"}  # one summary per key
    unsigned, limited = by_code["missing-signature"]["details"], by_code["rate-limited"]["details"]
    assert unsigned == {
        "source": "127.0.0.1",
        "action": "whoami",
        "route": WHOAMI,
        "status": 401,
        "recorded": allowance,
        "suppressed": burst - allowance,
        "window_start_ms": unsigned["window_start_ms"],
        "window_end_ms": unsigned["window_start_ms"] + settings.refusal_log_window_s * 1000,
    }
    assert limited["status"] == 429 and limited["recorded"] == 0
    assert by_code["rate-limited"]["actor"] == {"type": "system"}
    # Every refusal accounted for: events of their own plus the summaries' counts.
    assert len(alone) + unsigned["suppressed"] + limited["suppressed"] == flood
    # And once written, a summary is not written again.
    await flush_after_window(stack, clock)
    assert len(summaries(await stack.events())) == 2


async def test_a_limited_source_adds_nothing_and_other_sources_are_untouched(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    stack = await start_stack(
        tmp_path, database_url, seaweed, clock, auth_failure_burst_requests=5, auth_failure_delay_s=0
    )
    try:
        tester = await stack.principal("tess", "tester")
        async with aiohttp.ClientSession() as a:
            assert (await send(a, stack, WHOAMI, signed(tester, stack, WHOAMI)))[0] == 200
            for _ in range(5):
                assert (await send(a, stack, WHOAMI))[0] == 401
            before = await stack.count("audit_events")
            for _ in range(50):
                assert (await send(a, stack, WHOAMI))[0] == 429
            # Unknown routes and keys that never signed from the spent source wait too...
            assert (await send(a, stack, "/v1/nowhere"))[0] == 429
            stranger = Identity.generate()
            assert (await send(a, stack, WHOAMI, signed(stranger, stack, WHOAMI)))[0] == 429
            assert await stack.count("audit_events") == before  # rate-limited: nothing of its own
            # ...but not a key that signed from it before (a shared NAT), nor public routes.
            for _ in range(5):
                assert (await send(a, stack, WHOAMI, signed(tester, stack, WHOAMI)))[0] == 200
            assert (await send(a, stack, "/healthz"))[0] == 200

            other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with aiohttp.ClientSession(connector=other) as b:
                for _ in range(20):
                    status, _, body = await send(b, stack, WHOAMI, signed(tester, stack, WHOAMI))
                    assert status == 200 and body["name"] == "tess"
                status, _, body = await send(b, stack, WHOAMI)
                assert status == 401 and body["code"] == "missing-signature"
                # A principal's refusals name the principal: each is an event of its own.
                for _ in range(15):
                    assert (await send(b, stack, "/v1/orgs", signed(tester, stack, "/v1/orgs")))[0] == 403
        events = (await stack.events())[before:]
        [unsigned] = individual(events, "whoami")
        assert unsigned["source"]["ip"] == "127.0.0.2"
        refused = individual(events, "org.list")
        assert len(refused) == 15 and {e["actor"]["name"] for e in refused} == {"tess"}
    finally:
        await stack.server.close()


async def test_counts_pending_at_shutdown_are_summarised(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    stack = await start_stack(
        tmp_path, database_url, seaweed, clock, auth_failure_burst_requests=1, auth_failure_delay_s=0
    )
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(30):
                await send(s, stack, "/nowhere")
    finally:
        await stack.server.close()  # the window has not ended: the shutdown flushes it
    db = await connect(database_url)
    try:
        rows = await db.fetchall("SELECT leaf FROM audit_events WHERE action = $1", "http.refusals")
    finally:
        await db.close()
    [summary] = [json.loads(bytes(r["leaf"])) for r in rows]
    assert summary["outcome"]["reason"] == "rate-limited" and summary["details"]["suppressed"] == 29


# -- the ledger alone --------------------------------------------------------------------------------


def key(source: str, code: str = "missing-signature", status: int = 401) -> Any:
    from exchange.api.refusals import RefusalKey

    return RefusalKey(source, "whoami", WHOAMI, code, status)


def test_the_ledger_bounds_its_keys_and_loses_no_count() -> None:
    from exchange.api.refusals import OTHER, RefusalLedger

    clock = FakeClock(start_ms=1_200_000_030_000)  # windows align to the clock
    window = 1_200_000_000_000
    ledger = RefusalLedger(window_s=60, allowance=2, max_keys=3, clock=clock)
    asks = [ledger.admit(key(f"192.0.2.{n % 5}"), alone=True) for n in range(50)]
    # Three keys fit: two refusals each may stand alone (the shared allowance decides); the two
    # keys beyond are folded into `other`, never asked about.
    assert [a for a in asks if a is not None] == [window] * 6
    assert ledger.admit(key("192.0.2.0", "rate-limited", 429), alone=False) is None
    counts = ledger.take_counts()
    assert {k.source: n for (_, k), n in counts.items()} == {
        "192.0.2.0": 8,
        "192.0.2.1": 8,
        "192.0.2.2": 8,
        OTHER.source: 21,  # 192.0.2.3 and .4, ten each, and the 429 that came when full
    }
    assert {w for w, _ in counts} == {window}
    assert sum(counts.values()) + 6 == 51
    assert ledger.take_counts() == {} and ledger.pending == 0


def test_the_ledger_asks_no_more_once_the_shared_allowance_is_spent() -> None:
    from exchange.api.refusals import OTHER, RefusalLedger

    clock = FakeClock(start_ms=0)
    ledger = RefusalLedger(window_s=10, allowance=3, max_keys=10, clock=clock)
    first = ledger.admit(key("192.0.2.1"), alone=True)
    assert first == 0
    # Other replicas used the allowance: the shared row says so, and this replica asks no more.
    ledger.settle(first, key("192.0.2.1"), "counted")
    assert ledger.admit(key("192.0.2.1"), alone=True) is None
    # A window with no place left for a key: new keys fold into `other` without asking.
    second = ledger.admit(key("192.0.2.2"), alone=True)
    assert second == 0
    ledger.settle(second, key("192.0.2.2"), "folded")
    assert ledger.admit(key("192.0.2.3"), alone=True) is None
    assert ledger.take_counts() == {(0, key("192.0.2.1")): 2, (0, OTHER): 2}
    # The next window starts afresh.
    clock.advance(10)
    assert ledger.admit(key("192.0.2.1"), alone=True) == 10_000


def test_an_event_that_could_not_be_written_is_counted_instead() -> None:
    from exchange.api.refusals import RefusalLedger

    clock = FakeClock(start_ms=0)
    ledger = RefusalLedger(window_s=10, allowance=1, max_keys=10, clock=clock)
    window = ledger.admit(key("192.0.2.1"), alone=True)
    assert window == 0
    ledger.rescind(window, key("192.0.2.1"))  # the database was down
    assert ledger.take_counts() == {(0, key("192.0.2.1")): 1}
    assert ledger.admit(key("192.0.2.1"), alone=True) == 0  # its place in the allowance is back


def test_counts_waiting_for_the_database_stay_bounded() -> None:
    from exchange.api.refusals import OTHER, RefusalLedger

    clock = FakeClock(start_ms=0)
    ledger = RefusalLedger(window_s=10, allowance=0, max_keys=4, clock=clock)
    for _ in range(5):
        for n in range(4):
            assert ledger.admit(key(f"192.0.2.{n}"), alone=True) is None
        clock.advance(10)
        ledger.restore_counts(ledger.take_counts())  # every flush failed
    waiting = ledger.take_counts()
    assert len(waiting) == 4 and (0, OTHER) in waiting
    assert sum(waiting.values()) == 20


async def test_a_spent_source_is_answered_late_and_others_at_once(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    delay_s = 2.0
    stack = await start_stack(
        tmp_path, database_url, seaweed, clock, auth_failure_burst_requests=1, auth_failure_delay_s=delay_s
    )
    try:
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession() as a, aiohttp.ClientSession(connector=other) as b:
            # The other source's first signed request pays the one-time costs (connections, caches).
            assert (await send(b, stack, WHOAMI, signed(stack.admin, stack, WHOAMI)))[0] == 200
            assert (await send(a, stack, WHOAMI))[0] == 401
            started = time.monotonic()
            # Four at once from the spent source: each waits, together (the wait holds no lock)...
            flood = [asyncio.ensure_future(send(a, stack, WHOAMI)) for _ in range(4)]
            # ...while another source is answered before any of them: the order shows it, not a clock.
            status, _, _ = await send(b, stack, WHOAMI, signed(stack.admin, stack, WHOAMI))
            assert status == 200 and not any(f.done() for f in flood)
            assert {(await answer)[0] for answer in flood} == {429}
            # Each was answered only after the delay, and the four waited together, not in turn
            # (in turn would take four delays; the margin is for a loaded machine).
            assert delay_s <= time.monotonic() - started < 3 * delay_s
    finally:
        await stack.server.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"auth_failure_requests_per_min": 0},
        {"auth_failure_burst_requests": 0},
        {"auth_failure_delay_s": float("nan")},
        {"auth_failure_delay_s": 3600.0},
        {"refusal_log_window_s": 0},
        {"refusal_log_allowance_events": -1},
        {"refusal_log_max_keys": 0},
    ],
)
def test_refusal_settings_are_checked(bad: dict[str, Any]) -> None:
    from exchange.errors import ValidationError
    from exchange.settings import Settings

    with pytest.raises(ValidationError):
        Settings(**bad)

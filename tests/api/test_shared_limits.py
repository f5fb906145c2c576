"""Limits shared by every replica: the token buckets and the refusal counts live in the database.

A replica here is a `Database` (for the statements alone), an app served on a port of its own
(two on one database: SQLite, one file with two writers taking turns, and PostgreSQL), or, last,
an `exchange serve` process (two on one PostgreSQL database). What must hold across them: a
source's budget spent through one is spent for the other; the allowance of events standing alone
is counted once for all; every window's counts are summarised exactly once, and the sum of
events and summaries is the number of refusals answered.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exchange.api import refusals
from exchange.api.ratelimit import SharedBuckets, take_each
from exchange.db import Database, connect, migrate
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import RateLimited
from exchange.identity import Identity
from exchange.services import ratebuckets, refusalcounts
from exchange.services.audit import AuditLog, Context, Entry
from exchange.services.refusalcounts import OTHER, RefusalKey
from tests.api.test_refusals import WHOAMI, guess, individual, send, signed, summaries
from tests.conftest import (
    POSTGRES_DSN,
    FakeClock,
    PostgresDatabases,
    ServiceProcess,
    Stack,
    free_port,
    service_env,
    start_stack,
)

WINDOW_MS = 60_000


@pytest.fixture
async def two_dbs(database_url: str) -> AsyncIterator[tuple[Database, Database]]:
    """Two replicas' connections to one database."""
    a = await connect(database_url)
    await migrate(a)
    b = await connect(database_url)
    yield a, b
    await b.close()
    await a.close()


def key(source: str, code: str = "missing-signature", status: int = 401) -> RefusalKey:
    return RefusalKey(source, "whoami", WHOAMI, code, status)


async def leaves(db: Database, action: str) -> list[dict[str, Any]]:
    rows = await db.fetchall("SELECT leaf FROM audit_events WHERE action = $1 ORDER BY idx", action)
    return [json.loads(bytes(r["leaf"])) for r in rows]


# -- the buckets ---------------------------------------------------------------------------------------


async def test_buckets_refill_with_the_clock(db: Database) -> None:
    clock = FakeClock(start_ms=1_700_000_000_000)
    buckets = SharedBuckets(db, kind="test", per_min=60, burst=3, clock=clock)
    for _ in range(3):
        await buckets.take("10.0.0.1", "from this address")
    with pytest.raises(RateLimited) as limited:
        await buckets.take("10.0.0.1", "from this address")
    assert limited.value.status == 429 and limited.value.extra["retry_after_s"] == 1
    await buckets.take("10.0.0.2", "from this address")  # another key has its own bucket
    clock.advance(1)
    await buckets.take("10.0.0.1", "from this address")  # one token a second
    with pytest.raises(RateLimited):
        await buckets.take("10.0.0.1", "from this address")
    assert await db.fetchval("SELECT COUNT(*) FROM rate_buckets") == 2


async def test_one_statement_takes_from_a_source_and_a_link(db: Database) -> None:
    clock = FakeClock(start_ms=1_700_000_000_000)
    sources = SharedBuckets(db, kind="redeem-ip", per_min=60, burst=3, clock=clock)
    links = SharedBuckets(db, kind="redeem-link", per_min=60, burst=2, clock=clock)
    token_hash = bytes(range(32))
    for _ in range(2):
        await take_each([(sources, "192.0.2.1", "from this address"), (links, token_hash, "for this link")])
    # The link has no token left; the source gives its last with the refused request (as when
    # they were two statements). Both are empty now: the first is named, and the wait is for both.
    with pytest.raises(RateLimited, match="from this address") as limited:
        await take_each([(sources, "192.0.2.1", "from this address"), (links, token_hash, "for this link")])
    assert limited.value.extra["retry_after_s"] == 1
    with pytest.raises(RateLimited, match="for this link"):
        await links.take(token_hash, "for this link")
    # On its own the link refuses: said from this replica's memory, without a statement.
    await db.execute("DELETE FROM rate_buckets")
    with pytest.raises(RateLimited, match="for this link"):
        await links.take(token_hash, "for this link")
    clock.advance(1)
    await take_each([(sources, "192.0.2.2", "from this address"), (links, token_hash, "for this link")])
    rows = await db.fetchall("SELECT key FROM rate_buckets ORDER BY key")
    assert [r["key"] for r in rows] == ["redeem-ip:192.0.2.2", "redeem-link:" + token_hash.hex()]


async def test_concurrent_takes_from_two_replicas_get_exactly_the_burst(
    two_dbs: tuple[Database, Database],
) -> None:
    clock = FakeClock()
    burst = 20
    replicas = [SharedBuckets(db, kind="redeem-ip", per_min=1, burst=burst, clock=clock) for db in two_dbs]

    async def take(n: int) -> bool:
        try:
            await replicas[n % 2].take("198.51.100.7", "from this address")
        except RateLimited:
            return False
        return True

    taken = await asyncio.gather(*(take(n) for n in range(3 * burst)))
    assert taken.count(True) == burst
    # And a replica that had none of them finds the bucket as empty as the one that emptied it.
    for replica in replicas:
        with pytest.raises(RateLimited):
            await replica.take("198.51.100.7", "from this address")


async def test_spending_never_goes_below_empty_and_is_remembered(two_dbs: tuple[Database, Database]) -> None:
    clock = FakeClock(start_ms=1_700_000_000_000)
    a, b, c = (
        SharedBuckets(db, kind="auth-failure", per_min=60, burst=3, clock=clock)
        for db in (*two_dbs, two_dbs[0])
    )
    for _ in range(3):
        await a.spend("192.0.2.1")
    # The replica that spent the last token knows at once: `check` answers from memory.
    assert a.known_empty("192.0.2.1")
    with pytest.raises(RateLimited):
        a.check("192.0.2.1", "refused from this address")
    # Another replica passes `check` until it spends for the source once and finds it empty.
    b.check("192.0.2.1", "refused from this address")
    for _ in range(5):
        await b.spend("192.0.2.1")
    assert b.known_empty("192.0.2.1")
    # Spending an empty bucket left it empty, not in debt: a second later one token is back.
    clock.advance(1)
    assert not a.known_empty("192.0.2.1")
    await c.take("192.0.2.1", "x")
    with pytest.raises(RateLimited):
        await c.take("192.0.2.1", "x")


async def test_full_buckets_are_purged_and_the_memory_stays_bounded(db: Database) -> None:
    clock = FakeClock(start_ms=1_700_000_000_000)
    buckets = SharedBuckets(db, kind="test", per_min=60, burst=2, clock=clock, max_known=100)
    for i in range(150):
        for _ in range(2):
            await buckets.take(f"k{i}", "x")
        with pytest.raises(RateLimited):
            await buckets.take(f"k{i}", "x")
    assert len(buckets) == 100  # the oldest forgotten: asking the database again costs a statement
    assert await db.fetchval("SELECT COUNT(*) FROM rate_buckets") == 150
    clock.advance(1)  # one token back of two: not full, kept
    assert await ratebuckets.purge(db, clock()) == 0
    clock.advance(1)
    assert await ratebuckets.purge(db, clock()) == 150
    assert await db.fetchval("SELECT COUNT(*) FROM rate_buckets") == 0


# -- the refusal counts ----------------------------------------------------------------------------------


async def test_the_allowance_is_counted_once_across_concurrent_replicas(
    two_dbs: tuple[Database, Database],
) -> None:
    clock = FakeClock()
    audits = [AuditLog(origin="exchange.test", clock=clock) for _ in two_dbs]
    window = clock() - clock() % WINDOW_MS
    entry = Entry("whoami", "denied", "missing-signature", None, {"status": 401})

    async def ask(n: int) -> str:
        db, audit = two_dbs[n % 2], audits[n % 2]
        return await refusalcounts.record_within_allowance(
            db,
            audit,
            Context(),
            entry,
            window_start_ms=window,
            key=key("192.0.2.1"),
            allowance=5,
            max_keys=10,
        )

    answers = await asyncio.gather(*(ask(n) for n in range(30)))
    assert sorted(answers) == ["alone"] * 5 + ["counted"] * 25
    assert len(await leaves(two_dbs[0], "whoami")) == 5
    row = await two_dbs[1].fetchone("SELECT recorded, suppressed FROM refusal_counts")
    assert row == {"recorded": 5, "suppressed": 0}


async def test_summaries_are_written_once_when_replicas_flush_at_once(
    two_dbs: tuple[Database, Database],
) -> None:
    clock = FakeClock()
    window = clock() - clock() % WINDOW_MS
    audits = [AuditLog(origin="exchange.test", clock=clock) for _ in two_dbs]
    keys = [key(f"192.0.2.{n}") for n in range(40)]
    # Both replicas add counts for every key, at once: the deltas sum.
    await asyncio.gather(
        *(
            refusalcounts.add_suppressed(db, {(window, k): i + 1 for i, k in enumerate(keys)}, max_keys=100)
            for db in two_dbs
        )
    )
    clock.advance(WINDOW_MS / 1000)

    async def summarise(n: int) -> list[refusalcounts.Summary]:
        return await refusalcounts.summarise(
            two_dbs[n % 2], audits[n % 2], window_ms=WINDOW_MS, ended_by_ms=clock(), now_ms=clock()
        )

    done = await asyncio.gather(*(summarise(n) for n in range(6)))
    written = [s for batch in done for s in batch]
    assert sorted(s.key for s in written) == sorted(keys)  # each key once, by whichever replica
    assert {s.key: s.suppressed for s in written} == {k: 2 * (i + 1) for i, k in enumerate(keys)}
    assert {(s.window_start_ms, s.window_end_ms) for s in written} == {(window, window + WINDOW_MS)}
    assert len(await leaves(two_dbs[0], "http.refusals")) == 40
    assert await two_dbs[0].fetchval("SELECT COUNT(*) FROM refusal_counts") == 0
    assert await two_dbs[0].fetchval("SELECT COUNT(*) FROM refusal_windows") == 0
    # A replica's count that arrives late makes a row of its own, summarised in turn: the sum holds.
    await refusalcounts.add_suppressed(two_dbs[1], {(window, keys[0]): 3}, max_keys=100)
    [late] = await summarise(1)
    assert (late.key, late.suppressed, late.window_start_ms) == (keys[0], 3, window)


async def test_a_window_keeps_to_its_bound_of_keys(db: Database) -> None:
    clock = FakeClock()
    window = clock() - clock() % WINDOW_MS
    audit = AuditLog(origin="exchange.test", clock=clock)
    first = await refusalcounts.add_suppressed(
        db, {(window, key(f"192.0.2.{n}")): 2 for n in range(10)}, max_keys=3
    )
    assert first.full == {window} and len(first.rows) == 3
    rows = await db.fetchall("SELECT source, suppressed FROM refusal_counts ORDER BY source")
    assert {r["source"]: r["suppressed"] for r in rows} == {
        "192.0.2.0": 2,
        "192.0.2.1": 2,
        "192.0.2.2": 2,
        OTHER.source: 14,
    }
    # Keys with a row keep it; a new key finds no place and is folded.
    entry = Entry("whoami", "denied", "missing-signature", None, {"status": 401})
    again = await refusalcounts.add_suppressed(db, {(window, key("192.0.2.1")): 1}, max_keys=3)
    assert again.full == set()
    folded = await refusalcounts.record_within_allowance(
        db, audit, Context(), entry, window_start_ms=window, key=key("192.0.2.99"), allowance=3, max_keys=3
    )
    assert folded == "folded"
    assert await db.fetchval("SELECT COUNT(*) FROM refusal_counts") == 4
    [summary] = [
        s
        for s in await refusalcounts.summarise(
            db, audit, window_ms=WINDOW_MS, ended_by_ms=window + WINDOW_MS, now_ms=window + WINDOW_MS
        )
        if s.key == OTHER
    ]
    assert summary.suppressed == 14 and summary.to_entry().details is not None


# -- two apps on one database ------------------------------------------------------------------------


async def start_two(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock, **overrides: Any
) -> tuple[Stack, Stack]:
    """Two replicas: two apps on one database, sharing the log key (as replicas do)."""
    a = await start_stack(tmp_path, database_url, seaweed, clock, auth_failure_delay_s=0, **overrides)
    try:
        b = await start_stack(tmp_path, database_url, seaweed, clock, auth_failure_delay_s=0, **overrides)
    except BaseException:
        await a.server.close()
        raise
    return a, b


@pytest.fixture
async def replicas(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[tuple[Stack, Stack]]:
    overrides = getattr(request, "param", {})
    a, b = await start_two(tmp_path, database_url, seaweed, clock, **overrides)
    yield a, b
    await b.server.close()
    await a.server.close()


@pytest.mark.parametrize("replicas", [{"redeem_ip_burst_requests": 3}], indirect=True)
async def test_a_redemption_budget_spent_through_one_replica_holds_on_the_other(
    replicas: tuple[Stack, Stack],
) -> None:
    a, b = replicas
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            assert (await send(s, a, guess()))[0] == 404
        status, headers, body = await send(s, b, guess())
        assert status == 429 and body["code"] == "rate-limited" and int(headers["Retry-After"]) >= 1
        assert (await send(s, a, guess()))[0] == 429
        # Another source has its own budget, on either replica.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=other) as t:
            assert (await send(t, b, guess()))[0] == 404


@pytest.mark.parametrize("replicas", [{"auth_failure_burst_requests": 3}], indirect=True)
async def test_a_failure_budget_spent_through_one_replica_holds_on_the_other(
    replicas: tuple[Stack, Stack],
) -> None:
    a, b = replicas
    async with aiohttp.ClientSession() as s:
        assert (await send(s, b, WHOAMI, signed(b.admin, b, WHOAMI)))[0] == 200  # b saw this key sign
        for _ in range(3):
            assert (await send(s, a, WHOAMI))[0] == 401
        assert (await send(s, a, WHOAMI))[0] == 429
        # b learns that the source is spent the first time it spends a token for it and finds the
        # shared bucket empty: one refusal more than one process would give, then 429 up front.
        statuses = [(await send(s, b, WHOAMI))[0] for _ in range(5)]
        assert statuses == [401, 429, 429, 429, 429]
        assert (await send(s, b, "/v1/nowhere"))[0] == 429
        stranger = Identity.generate()
        assert (await send(s, b, WHOAMI, signed(stranger, b, WHOAMI)))[0] == 429
        # The exemption of a key that signed from the source is each replica's own memory.
        assert (await send(s, b, WHOAMI, signed(b.admin, b, WHOAMI)))[0] == 200
    # The refusal that taught b spent nothing: the bucket was empty, and stays no emptier.
    full_at = await a.db.fetchval(
        "SELECT full_at_us FROM rate_buckets WHERE key = $1", "auth-failure:127.0.0.1"
    )
    assert full_at is not None


@pytest.mark.parametrize("replicas", [{"refusal_log_allowance_events": 3}], indirect=True)
async def test_the_allowance_and_the_summaries_are_counted_across_replicas(
    replicas: tuple[Stack, Stack], clock: FakeClock
) -> None:
    a, b = replicas
    before = await a.count("audit_events")
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*(send(s, stack, WHOAMI) for stack in (a, b) * 5))
    assert [status for status, _, _ in answers] == [401] * 10
    events = (await a.events())[before:]
    alone = individual(events, "whoami")
    assert len(alone) == 3  # the allowance, once for both replicas
    # Each replica adds what it counted; once the window and its grace are over, both flush at
    # once and one of them writes the summary.
    await refusals.flush(a.app)
    await refusals.flush(b.app)
    clock.advance(a.settings.refusal_log_window_s + refusals.SUMMARY_GRACE_S)
    written = await asyncio.gather(refusals.flush(a.app), refusals.flush(b.app))
    assert sorted(written) == [0, 1]
    [summary] = summaries((await a.events())[before:])
    details = summary["details"]
    assert (details["source"], details["route"], details["status"]) == ("127.0.0.1", WHOAMI, 401)
    assert details["recorded"] == 3 and details["suppressed"] == 7
    assert len(alone) + details["suppressed"] == 10
    assert await a.count("refusal_counts") == 0


# -- two processes on one PostgreSQL database ---------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    pg = PostgresDatabases(POSTGRES_DSN)
    url = asyncio.run(pg.create())
    try:
        yield url
    finally:
        asyncio.run(pg.drop(url))


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10):  # noqa: S310 - loopback
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_two_processes_share_a_failure_budget(seaweed: SeaweedFS, tmp_path: Path, postgres_url: str) -> None:
    shared = {
        "EXCHANGE_DATABASE_URL": postgres_url,
        "EXCHANGE_LOG_SIGNING_KEY_FILE": str(tmp_path / "log-signing.key"),  # replicas share it
        "EXCHANGE_AUTH_FAILURE_BURST_REQUESTS": "5",
        "EXCHANGE_AUTH_FAILURE_DELAY_S": "0",
    }
    services = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        services.append(ServiceProcess(service_env(tmp_path / name, free_port(), seaweed, **shared)))
    one, two = services
    one.init_admin(tmp_path / "admin.identity")
    one.start()
    try:
        two.start()
        try:
            assert [get_status(one.url + WHOAMI) for _ in range(6)] == [401] * 5 + [429]
            # The other process: one refusal to learn the bucket is empty, then 429 up front.
            assert [get_status(two.url + WHOAMI) for _ in range(4)] == [401, 429, 429, 429]
        finally:
            assert two.stop() == 0
    finally:
        assert one.stop() == 0

    async def counted() -> tuple[int, int]:
        db = await connect(postgres_url)
        try:
            alone = await leaves(db, "whoami")
            limited = [
                e for e in await leaves(db, "http.refusals") if e["outcome"]["reason"] == "rate-limited"
            ]
        finally:
            await db.close()
        return len(alone), sum(e["details"]["suppressed"] for e in limited)

    # Both stopped: every refusal is an event of its own or in a summary, whichever process wrote it.
    assert asyncio.run(counted()) == (6, 4)

"""One checkpoint signer at a time: the signer lease, its fence, and a takeover between processes.

The lease tests run on both databases with the FakeClock bound into the lease's statements (so
expiry needs no sleeping), and once with the database's own clock, the one `exchange serve`
uses. A "replica" in-process is a `Publisher` with its own `AuditLog` and its own holder id over
one database; the last test runs three `exchange serve` processes on one PostgreSQL database and
kills the signer with SIGKILL.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exchange.api.audit import PUBLISHER
from exchange.api.metrics import start_metrics_site
from exchange.client import Client
from exchange.db import Database, connect, migrate
from exchange.dev.seaweed import SeaweedFS
from exchange.format import merkle
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import Signer, open_note, sign_note
from exchange.identity import Identity
from exchange.services.audit import AuditLog, Context, Entry
from exchange.services.auditlog import Publisher, consistency_proof, latest_checkpoint, load_or_create_signer
from exchange.services.leases import SIGNER_LEASE, Lease, read_lease
from exchange.settings import Settings
from tests.conftest import (
    EXCHANGE,
    POSTGRES_DSN,
    FakeClock,
    PostgresDatabases,
    ServiceProcess,
    Stack,
    free_port,
    service_env,
)

ORIGIN = "exchange.local/audit"
TTL_S = 10.0


@pytest.fixture
def signer() -> Signer:
    return Signer(ORIGIN, os.urandom(32))


def settings_for(tmp_path: Path, **changes: object) -> Settings:
    return Settings(home=tmp_path, audit_signer_lease_s=TTL_S, audit_heartbeat_s=0).replace(**changes)


class Replica(Publisher):
    """A replica's publisher; `pause`, if set, runs where its note would go to the witnesses:
    the moment a signer can be paused (GC, SIGSTOP, a VM migration) after its last lease check."""

    pause: Callable[[], Awaitable[None]] | None = None
    cosign_calls = 0

    async def _cosign(self, note: bytes, size: int, published: int) -> list[str]:
        self.cosign_calls += 1
        if self.pause is not None:
            await self.pause()
        return await super()._cosign(note, size, published)


async def replica(
    db: Database, signer: Signer, settings: Settings, clock: FakeClock, holder: str, *, started: bool = True
) -> Replica:
    lease = Lease(db, SIGNER_LEASE, ttl_s=settings.audit_signer_lease_s, holder=holder, clock=clock)
    publisher = Replica(db, AuditLog(origin=ORIGIN, clock=clock), signer, settings, clock, lease=lease)
    if started:
        await publisher.check_at_start()
    return publisher


async def add_events(db: Database, n: int) -> int:
    """Append `n` events; the log's size afterwards."""
    async with db.transaction() as conn:
        indices = await AuditLog(origin=ORIGIN, clock=lambda: 0).append_many(
            conn, Context(), [Entry("test.event") for _ in range(n)]
        )
    return indices[-1] + 1


async def stored(db: Database) -> list[tuple[int, int | None]]:
    """(size, fence) of every stored checkpoint, by size."""
    rows = await db.fetchall("SELECT size, fence FROM audit_checkpoints ORDER BY size")
    return [(int(r["size"]), None if r["fence"] is None else int(r["fence"])) for r in rows]


# -- the lease --------------------------------------------------------------------------------------


async def test_acquire_renew_expire_and_take_over(db: Database, clock: FakeClock) -> None:
    a = Lease(db, SIGNER_LEASE, ttl_s=TTL_S, holder="host-a/1/aa", clock=clock)
    b = Lease(db, SIGNER_LEASE, ttl_s=TTL_S, holder="host-b/2/bb", clock=clock)
    first = await a.acquire()
    assert first is not None and first.fence == 1 and first.expires_at_ms == clock() + 10_000
    assert a.held and a.fence == 1
    assert await b.acquire() is None and not b.held and b.fence is None

    clock.advance(6)  # a renews within its term: same fence, later expiry
    renewed = await a.acquire()
    assert renewed is not None and renewed.fence == 1 and renewed.expires_at_ms == clock() + 10_000
    clock.advance(6)  # past the first expiry, not the renewed one
    assert await b.acquire() is None

    clock.advance(10)  # a stopped renewing: its own view lapses, and b takes a new term
    assert not a.held and a.fence is None
    taken = await b.acquire()
    assert taken is not None and taken.fence == 2 and taken.holder == "host-b/2/bb"
    assert await a.acquire() is None
    assert await read_lease(db, SIGNER_LEASE) == taken

    # The fence: a's old term changes nothing, and writes nothing, in a transaction of its own.
    async with db.transaction() as conn:
        assert not await a.check(conn, 1)
        assert await b.check(conn, 2)
    assert (await read_lease(db, SIGNER_LEASE)) == taken  # renewed to the same instant: clock unmoved


async def test_an_expired_lease_nobody_took_stays_in_its_term(db: Database, clock: FakeClock) -> None:
    a = Lease(db, SIGNER_LEASE, ttl_s=TTL_S, holder="a", clock=clock)
    assert (await a.acquire()) is not None
    clock.advance(60)  # paused far past its TTL, and nobody else wanted the lease
    assert not a.held
    again = await a.acquire()
    assert again is not None and again.fence == 1  # no other term came between: no new one
    # A second Lease object of the same process joins the term instead of waiting it out.
    same_process = Lease(db, SIGNER_LEASE, ttl_s=TTL_S, holder="a", clock=clock)
    joined = await same_process.acquire()
    assert joined is not None and joined.fence == 1


async def test_release_hands_over_at_once(db: Database, clock: FakeClock) -> None:
    a = Lease(db, SIGNER_LEASE, ttl_s=TTL_S, holder="a", clock=clock)
    b = Lease(db, SIGNER_LEASE, ttl_s=TTL_S, holder="b", clock=clock)
    assert (await a.acquire()) is not None
    assert await b.acquire() is None
    await a.release()
    assert not a.held
    taken = await b.acquire()  # the clock has not moved
    assert taken is not None and taken.fence == 2
    await a.release()  # holds nothing: no statement, and b keeps the lease
    assert await read_lease(db, SIGNER_LEASE) == taken


async def test_the_database_clock_judges_expiry(db: Database) -> None:
    """Without a clock the lease is judged by the database's: the path `exchange serve` takes."""
    a = Lease(db, SIGNER_LEASE, ttl_s=0.3, holder="a")
    b = Lease(db, SIGNER_LEASE, ttl_s=0.3, holder="b")
    first = await a.acquire()
    assert first is not None and first.fence == 1
    assert abs(first.expires_at_ms - 300 - time.time_ns() // 1_000_000) < 60_000  # the same epoch and unit
    assert await b.acquire() is None
    await asyncio.sleep(0.4)
    assert not a.held  # by its own monotonic clock
    taken = await b.acquire()
    assert taken is not None and taken.fence == 2 and taken.expires_at_ms > first.expires_at_ms
    assert await a.acquire() is None


async def test_two_contenders_racing_exactly_one_wins(database_url: str, clock: FakeClock) -> None:
    """Two replicas (two connections, two pools) ask at the same moment, for a free lease and for an
    expired one, round after round: one term each time, never two."""
    dbs = [await connect(database_url) for _ in range(2)]
    try:
        await migrate(dbs[0])
        for round_ in range(15):
            name = f"race-{round_}"
            contenders = [
                Lease(db, name, ttl_s=TTL_S, holder=f"r{i}", clock=clock) for i, db in enumerate(dbs)
            ]
            won = await asyncio.gather(*(c.acquire() for c in contenders))
            assert sum(t is not None for t in won) == 1, won
            assert [t.fence for t in won if t is not None] == [1]
            clock.advance(TTL_S)  # expired: both ask again for the next term
            others = [Lease(db, name, ttl_s=TTL_S, holder=f"s{i}", clock=clock) for i, db in enumerate(dbs)]
            won = await asyncio.gather(*(c.acquire() for c in others))
            assert sum(t is not None for t in won) == 1, won
            winner = next(t for t in won if t is not None)
            assert winner.fence == 2 and await read_lease(dbs[0], name) == winner
    finally:
        for db in dbs:
            await db.close()


# -- the publisher under the lease ------------------------------------------------------------------


async def test_only_the_holder_signs_and_its_checkpoints_carry_its_term(
    db: Database, clock: FakeClock, signer: Signer, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    size = await add_events(db, 5)
    a = await replica(db, signer, settings, clock, "a")
    b = await replica(db, signer, settings, clock, "b")
    assert await a.publish() is not None
    assert await b.publish() is None and b.cosign_calls == 0  # b never even signs
    size = await add_events(db, 3)
    assert await b.publish() is None
    assert await a.publish() is not None
    assert await stored(db) == [(5, 1), (size, 1)]


async def test_a_paused_signer_that_lost_the_lease_stores_nothing(
    db: Database, clock: FakeClock, signer: Signer, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    await add_events(db, 4)
    a = await replica(db, signer, settings, clock, "a")
    b = await replica(db, signer, settings, clock, "b")
    assert await a.publish() is not None
    size = await add_events(db, 6)

    async def paused_past_its_term() -> None:
        clock.advance(TTL_S + 1)
        assert await b.lease.acquire() is not None  # b takes over and has stored nothing yet

    a.pause = paused_past_its_term
    assert await a.publish() is None
    assert a.cosign_calls == 2 and not a.lease.held and a.lease.term is None  # stepped down
    assert await stored(db) == [(4, 1)]  # the size was new: only the fence refused it
    lease = await read_lease(db, SIGNER_LEASE)
    assert lease is not None and (lease.holder, lease.fence) == ("b", 2)
    # The new signer publishes the same tree in its own term.
    assert await b.publish() is not None
    assert await stored(db) == [(4, 1), (size, 2)]


async def test_a_signer_that_lost_the_lease_asks_no_witness(
    db: Database, clock: FakeClock, signer: Signer, tmp_path: Path
) -> None:
    """Its own clock says it still holds the lease (it was paused, or its clock lags); the check
    right before the witnesses finds another term, and the note never leaves the process."""
    settings = settings_for(tmp_path)
    await add_events(db, 2)
    a_clock = FakeClock(clock())  # stands still while a is paused
    a = await replica(db, signer, settings, a_clock, "a")
    b = await replica(db, signer, settings, clock, "b")
    assert await a.publish() is not None and a.cosign_calls == 1
    clock.advance(TTL_S + 1)
    assert await b.lease.acquire() is not None
    await add_events(db, 2)
    assert a.lease.held  # by its own clock
    assert await a.publish() is None
    assert a.cosign_calls == 1  # not asked again
    assert await stored(db) == [(2, 1)]


async def test_a_new_signer_checks_and_extends_the_last_checkpoint(
    db: Database, clock: FakeClock, signer: Signer, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    await add_events(db, 3)
    a = await replica(db, signer, settings, clock, "a")
    b = await replica(db, signer, settings, clock, "b")  # checked the log at size 3, then only waited
    for n in (5, 1, 9):
        await add_events(db, n)
        assert await a.publish() is not None
    clock.advance(TTL_S + 1)  # a died
    size = await add_events(db, 2)
    note = await b.publish()
    assert note is not None and b.check.size == size  # b checked every event a's terms added
    checkpoints = await stored(db)
    assert checkpoints == [(8, 1), (9, 1), (18, 1), (size, 2)]
    async with db.read() as conn:
        roots = {}
        for cp_size, _ in checkpoints:
            row = await conn.fetchone("SELECT note FROM audit_checkpoints WHERE size = $1", cp_size)
            assert row is not None
            roots[cp_size] = Checkpoint.parse(
                open_note(bytes(row["note"]), [signer.verifier()]).text
            ).root_hash
        for (old, _), (new, _) in itertools.pairwise(checkpoints):
            merkle.verify_consistency(
                old, new, roots[old], roots[new], await consistency_proof(conn, old, new)
            )


async def test_a_new_signer_refuses_a_stored_checkpoint_its_leaves_contradict(
    db: Database, clock: FakeClock, signer: Signer, tmp_path: Path
) -> None:
    """The last stored checkpoint (from before the lease: no term) is signed with the log's key but
    for another history (a signer with a bug, or the key used behind the service's back): the new
    signer fails closed and signs nothing after it."""
    settings = settings_for(tmp_path)
    size = await add_events(db, 6)
    b = await replica(db, signer, settings, clock, "b")
    forged = sign_note(Checkpoint(ORIGIN, size, b"\x07" * 32).to_text(), [signer])
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO audit_checkpoints (size, note, created_at_ms, fence) VALUES ($1, $2, $3, $4)",
            size,
            forged,
            clock(),
            None,
        )
    await add_events(db, 1)
    assert await b.publish() is None
    assert b.audit.damage is not None and "does not extend" in b.audit.damage
    assert b.cosign_calls == 0 and await stored(db) == [(size, None)]


async def test_only_the_holder_appends_heartbeats(
    db: Database, clock: FakeClock, signer: Signer, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, audit_heartbeat_s=1)
    size = await add_events(db, 1)
    a_clock = FakeClock(clock())  # a's own clock: it will miss the end of its term
    a = await replica(db, signer, settings, a_clock, "a")
    b = await replica(db, signer, settings, clock, "b")
    assert await a.lease.acquire() is not None
    for p in (a, b):
        assert await p.heartbeat_if_idle() is None  # first look: remembers the size
    await asyncio.sleep(1.05)
    assert await b.heartbeat_if_idle() is None  # idle, but not the signer
    assert await a.heartbeat_if_idle() == size
    # A holder whose term ended while it was idle appends nothing: the fence is in the append.
    clock.advance(TTL_S + 1)
    assert await b.lease.acquire() is not None
    await asyncio.sleep(1.05)
    assert a.lease.held  # by its own clock
    assert await a.heartbeat_if_idle() is None and a.lease.term is None  # stepped down
    assert int(await db.fetchval("SELECT size FROM audit_head")) == size + 1
    assert await b.heartbeat_if_idle() is None  # a's heartbeat was activity, seen by every replica
    await asyncio.sleep(1.05)
    assert await b.heartbeat_if_idle() == size + 1  # the new signer's


async def test_metrics_say_whether_this_replica_signs(stack: Stack) -> None:
    runner, port = await start_metrics_site(stack.app, host="127.0.0.1", port=0)
    try:

        async def gauges() -> tuple[float, float]:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
            values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
            return values["exchange_audit_signer"], values["exchange_audit_signer_fence"]

        publisher = stack.app[PUBLISHER]
        assert await publisher.lease.acquire() is not None  # (the app's task took it at start too)
        assert await gauges() == (1.0, 1.0)
        await publisher.release()
        held, fence = await gauges()
        assert held == 0.0 and math.isnan(fence)
    finally:
        await runner.cleanup()


# -- three processes, one signer, a SIGKILL ---------------------------------------------------------

LEASE_S = 2
#: How long past the lease bound (TTL + one renew interval) a loaded machine may take to notice.
MARGIN_S = 15.0


class Replicas:
    """`exchange serve` processes sharing one PostgreSQL database and one log key."""

    def __init__(self, services: list[ServiceProcess], admin: Path) -> None:
        self.services = services
        self.admin = admin
        self.live = list(services)
        self.events = 0

    def by_pid(self, pid: int) -> ServiceProcess:
        return next(s for s in self.services if s.proc is not None and s.proc.pid == pid)

    async def make_events(self, n: int) -> None:
        """`n` signed requests, each appending an event, spread over the live replicas."""
        identity = Identity.load(self.admin)
        for i in range(n):
            service = self.live[i % len(self.live)]
            async with Client(service.url, identity, timeout_s=30) as client:
                await client.create_org(f"org-{self.events}")
            self.events += 1


async def wait_for(what: str, deadline_s: float, probe: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + deadline_s
    while not await probe():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def holder_pid(holder: str) -> int:
    return int(holder.split("/")[1])


async def scrape(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    pg = PostgresDatabases(POSTGRES_DSN)
    url = await pg.create()
    try:
        yield url
    finally:
        await pg.drop(url)


@pytest.mark.postgres
@pytest.mark.slow
async def test_three_replicas_one_signer_and_a_takeover(
    tmp_path: Path, seaweed: SeaweedFS, pg_url: str
) -> None:
    key_file = tmp_path / "log-signing.key"
    services = []
    for i in range(3):
        home = tmp_path / f"replica-{i}"
        home.mkdir()
        services.append(
            ServiceProcess(
                service_env(
                    home,
                    free_port(),
                    seaweed,
                    EXCHANGE_DATABASE_URL=pg_url,
                    EXCHANGE_LOG_SIGNING_KEY_FILE=str(key_file),
                    EXCHANGE_AUDIT_CHECKPOINT_INTERVAL_S="1",
                    EXCHANGE_AUDIT_SIGNER_LEASE_S=str(LEASE_S),  # whole seconds in the environment
                    EXCHANGE_METRICS_PORT=str(free_port()),
                )
            )
        )
    admin = tmp_path / "admin.identity"
    services[0].init_admin(admin)
    db = await connect(pg_url)
    replicas = Replicas(services, admin)
    try:
        for service in services:
            await asyncio.to_thread(service.start)

        async def checkpoint_in_term(fence: int) -> None:
            """Wait until the whole log so far is signed, by the term `fence`."""
            head = int(await db.fetchval("SELECT size FROM audit_head"))

            async def signed() -> bool:
                row = await db.fetchone(
                    "SELECT size, fence FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
                )
                return row is not None and int(row["size"]) >= head and int(row["fence"]) == fence

            await wait_for(f"a checkpoint of size {head} in term {fence}", 30, signed)

        async def new_holder(than: int, among: list[ServiceProcess]) -> int:
            pids = {s.proc.pid for s in among if s.proc is not None}

            async def taken() -> bool:
                lease = await read_lease(db, SIGNER_LEASE)
                return lease is not None and lease.fence > than and holder_pid(lease.holder) in pids

            await wait_for(f"a term after {than}", LEASE_S * 4 / 3 + MARGIN_S, taken)
            lease = await read_lease(db, SIGNER_LEASE)
            assert lease is not None
            return lease.fence

        # 1. One of the three holds the lease and signs.
        await replicas.make_events(9)
        first = await read_lease(db, SIGNER_LEASE)
        assert first is not None
        await checkpoint_in_term(first.fence)
        holder = replicas.by_pid(holder_pid(first.holder))
        for service in services:
            metrics = await scrape(int(service.env["EXCHANGE_METRICS_PORT"]))
            assert metrics["exchange_audit_signer"] == (1.0 if service is holder else 0.0)
            assert math.isfinite(metrics["exchange_checkpoint_age_seconds"])  # every replica follows

        # 2. SIGKILL the signer while events keep coming: another replica takes over in a new term.
        holder.kill()
        replicas.live.remove(holder)
        making = asyncio.create_task(replicas.make_events(12))
        second = await new_holder(first.fence, replicas.live)
        await making
        await checkpoint_in_term(second)
        lease = await read_lease(db, SIGNER_LEASE)
        assert lease is not None and lease.fence == second
        holder = replicas.by_pid(holder_pid(lease.holder))
        for service in replicas.live:
            metrics = await scrape(int(service.env["EXCHANGE_METRICS_PORT"]))
            assert metrics["exchange_audit_signer"] == (1.0 if service is holder else 0.0)
            if service is holder:
                assert metrics["exchange_audit_signer_fence"] == second

        # 3. A graceful stop of the new signer hands the lease over (released, not expired).
        assert holder.stop() == 0
        replicas.live.remove(holder)
        third = await new_holder(second, replicas.live)
        await replicas.make_events(5)
        await checkpoint_in_term(third)

        # Every checkpoint: signed by the log key, stored by one term, terms in order, each
        # consistent with the next, the last one the root of the leaves.
        log_key = load_or_create_signer(key_file, ORIGIN)
        verifier = log_key.verifier()
        rows = await db.fetchall("SELECT size, note, fence FROM audit_checkpoints ORDER BY size")
        sizes = [int(r["size"]) for r in rows]
        fences = [r["fence"] for r in rows]
        assert None not in fences and fences == sorted(fences)
        assert {first.fence, second, third} <= set(fences) and first.fence < second < third
        assert sizes == sorted(set(sizes))
        checkpoints = [Checkpoint.parse(open_note(bytes(r["note"]), [verifier]).text) for r in rows]
        assert [c.size for c in checkpoints] == sizes and {c.origin for c in checkpoints} == {ORIGIN}
        async with db.read() as conn:
            for old, new in itertools.pairwise(checkpoints):
                proof = await consistency_proof(conn, old.size, new.size)
                merkle.verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)
        leaves = [bytes(r["leaf"]) for r in await db.fetchall("SELECT leaf FROM audit_events ORDER BY idx")]
        last = checkpoints[-1]
        assert last.root_hash == merkle.root([merkle.leaf_hash(leaf) for leaf in leaves[: last.size]])
        latest = await latest_checkpoint(db)
        assert latest is not None and latest[0] == last.size

        # The auditor's own tool accepts the log the three of them signed.
        survivor = replicas.live[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")} | {"HOME": str(tmp_path)}
        verify = await asyncio.to_thread(
            subprocess.run,
            [
                *EXCHANGE,
                "--server",
                survivor.url,
                "--identity",
                str(admin),
                "--json",
                "audit",
                "verify",
                "--state",
                str(tmp_path / "audit-state"),
                "--vkey",
                log_key.verifier_key(),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        report = json.loads(verify.stdout)
        assert report["verdict"] == "ok" and report["size"] >= last.size
        assert survivor.stop() == 0
    finally:
        await db.close()
        for service in services:
            if service.proc is not None and service.proc.poll() is None:
                service.proc.send_signal(signal.SIGKILL)
                service.proc.wait(timeout=15)

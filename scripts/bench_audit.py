"""Benchmark of the audit log: appends/s, proof latency and filtered-query latency at size.

Run through `scripts/bench-audit` (which makes .venv). For each database it appends `--events`
events (default 1,000,000) in durable transactions of `--batch` events (SQLite: WAL with
synchronous=FULL, so every commit is fsynced) from `--writers` concurrent appenders (the service
appends one event per request, from as many requests as are in flight), then measures, at that
size:

- inclusion proofs of random leaves and consistency proofs between random sizes, each one
  query of O(log n) stored nodes plus the fold (p50/p99 over `--samples`);
- the service's start check of the whole log (seconds);
- one page of 100 events (`services.auditlog.query`, pinned to the tree size, from a random
  cursor in the first half of the log) for every filter the API documents (actor, org, action,
  outcome, resource type, resource type and id, since, until, a since..until window) alone and in
  the conjunctions auditors use (org+action, org+action+outcome, org+outcome, action+outcome,
  actor+action, actor+since, org+since), each once with a value that matches often and once with
  one that matches a handful of events in the whole log (p50/p99, and how many events match);
- one page of 100 events of one actor with and without per-row inclusion proofs (p50/p99).

Events look like the service's: principal actors in 20 organisations, a dozen actions with the
skew of real traffic (downloads dominate), artifact and link resources, request ids, one event
every 60 ms on average with a few seconds of clock skew between replicas (so time is not quite
in index order). The "rare" values (one actor and its organisation, one action, the `error`
outcome, one resource type and one resource, denied uploads, org1 granting) are drawn with
probability `RARE` each, a few events in a million; the rare conjunctions combine values that
are common alone. Nothing here is mocked: it is the service's own code
(`AuditLog.append_many`, `services.auditlog`) on a real database. `--sqlite-path` and
`--postgres-database` keep the databases between runs (the workload is deterministic: a run on
a kept database appends only what is missing, then migrates and measures).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from exchange.db import Connection, Database, connect, migrate
from exchange.format import merkle
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import Signer, sign_note
from exchange.services import auditlog
from exchange.services.audit import Actor, AuditLog, Context, Entry, Outcome
from exchange.services.auditcheck import TreeCheck

#: Probability of each rare value per event: a few events in a million.
RARE = 5e-6
#: Actions with the skew of real traffic: downloads dominate, `invite.create` is the rare one.
ACTION_WEIGHTS = {
    "artifact.download": 40.0,
    "link.redeem": 15.0,
    "artifact.upload": 10.0,
    "receipt.create": 10.0,
    "link.create": 5.0,
    "grant.create": 5.0,
    "whoami": 5.0,
    "principal.list": 3.0,
    "request.refused": 3.0,
    "finding.create": 2.0,
    "finding.update": 2.0,
}
ACTIONS = list(ACTION_WEIGHTS)
_CUM_WEIGHTS = list(itertools.accumulate(ACTION_WEIGHTS.values()))
ACTORS = [
    Actor(
        type="principal",
        id=f"prn_{i:020x}",
        name=f"user{i}",
        org=f"org{i % 20}",
        role="tester",
        key_id=f"k{i}",
    )
    for i in range(1000)
]
ORG0 = [a for a in ACTORS if a.org == "org0"]
RARE_ACTOR = Actor(
    type="principal", id="prn_rare", name="rare", org="org-rare", role="tester", key_id="krare"
)
RARE_ACTION = "invite.create"
RARE_RESOURCE = "art_rare"
#: Milliseconds: the synthetic clock's start, its mean step, and the replicas' clock skew.
T0_MS = 1_780_000_000_000
STEP_MS = 60
SKEW_MS = 2000


def _time_at(idx: int) -> int:
    """About when event `idx` was appended (without the skew)."""
    return T0_MS + idx * STEP_MS


def _clock(start: int) -> Callable[[], int]:
    """One event every STEP_MS, seen through clocks up to SKEW_MS apart; deterministic."""
    rng = random.Random(2)  # noqa: S311 - reproducible workload, not secrets
    counter = itertools.count(start)
    return lambda: _time_at(next(counter)) + rng.randrange(-SKEW_MS, SKEW_MS)


def _entry(rng: random.Random) -> Entry:
    action = RARE_ACTION if rng.random() < RARE else rng.choices(ACTIONS, cum_weights=_CUM_WEIGHTS)[0]
    if rng.random() < RARE:
        actor = RARE_ACTOR
    elif action == "grant.create" and rng.random() >= 1e-3:
        actor = rng.choice(ORG0)  # org0's admins grant; another org, rarely
    else:
        actor = rng.choice(ACTORS)
    x = rng.random()
    outcome: Outcome
    if x < RARE:
        outcome = "error"
    elif x < (1e-3 if action == "artifact.upload" else 0.05):
        outcome = "denied"  # uploads are rarely refused
    else:
        outcome = "allowed"
    x = rng.random()
    if x < RARE:
        resource = {"type": "principal", "id": RARE_ACTOR.id}
    elif x < 0.15:
        resource = {"type": "link", "id": f"lnk_{rng.randrange(20000):08x}"}
    else:
        rid = RARE_RESOURCE if rng.random() < RARE else f"art_{rng.randrange(5000):08x}"
        resource = {"type": "artifact", "id": rid, "sha256": "ab" * 32}
    return Entry(
        action=action,
        outcome=outcome,
        reason="no-grant" if outcome == "denied" else None,
        resource=resource,
        details={"bytes_out": rng.randrange(1 << 40)},
        actor=actor,
    )


def _entries(rng: random.Random, n: int) -> list[Entry]:
    return [_entry(rng) for _ in range(n)]


def _pct(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


#: (name, the filter given a random source and the log's size): each documented filter and the
#: usual conjunctions, with a value that matches often and one that matches a handful of events.
CASES: list[tuple[str, Callable[[random.Random, int], auditlog.Filter]]] = [
    ("actor, common", lambda r, n: auditlog.Filter(actor_id=r.choice(ACTORS).id)),
    ("actor, rare", lambda r, n: auditlog.Filter(actor_id=RARE_ACTOR.id)),
    ("org, common", lambda r, n: auditlog.Filter(org=f"org{r.randrange(20)}")),
    ("org, rare", lambda r, n: auditlog.Filter(org=RARE_ACTOR.org)),
    ("action, common", lambda r, n: auditlog.Filter(action="artifact.download")),
    ("action, rare", lambda r, n: auditlog.Filter(action=RARE_ACTION)),
    ("outcome, common", lambda r, n: auditlog.Filter(outcome="denied")),
    ("outcome, rare", lambda r, n: auditlog.Filter(outcome="error")),
    ("resource type, common", lambda r, n: auditlog.Filter(resource_type="link")),
    ("resource type, rare", lambda r, n: auditlog.Filter(resource_type="principal")),
    (
        "resource, common",
        lambda r, n: auditlog.Filter(resource_type="artifact", resource_id=f"art_{r.randrange(5000):08x}"),
    ),
    ("resource, rare", lambda r, n: auditlog.Filter(resource_type="artifact", resource_id=RARE_RESOURCE)),
    ("since, common", lambda r, n: auditlog.Filter(since_ms=_time_at(n // 10))),
    ("since (last 5%), common", lambda r, n: auditlog.Filter(since_ms=_time_at(n - n // 20))),
    ("since, rare", lambda r, n: auditlog.Filter(since_ms=_time_at(n) + SKEW_MS - 5 * STEP_MS)),
    ("until, common", lambda r, n: auditlog.Filter(until_ms=_time_at(n - n // 10))),
    ("until, rare", lambda r, n: auditlog.Filter(until_ms=T0_MS - SKEW_MS + 5 * STEP_MS)),
    (
        "since..until (1 h), common",
        lambda r, n: auditlog.Filter(since_ms=_time_at(n // 2), until_ms=_time_at(n // 2) + 3_600_000),
    ),
    (
        "since..until (300 ms), rare",
        lambda r, n: auditlog.Filter(since_ms=_time_at(n // 2), until_ms=_time_at(n // 2) + 300),
    ),
    (
        "org+action, common",
        lambda r, n: auditlog.Filter(org=f"org{r.randrange(20)}", action="artifact.download"),
    ),
    ("org+action, rare", lambda r, n: auditlog.Filter(org="org1", action="grant.create")),
    (
        "org+action+outcome, common",
        lambda r, n: auditlog.Filter(
            org=f"org{r.randrange(20)}", action="artifact.download", outcome="denied"
        ),
    ),
    (
        "org+action+outcome, rare",
        lambda r, n: auditlog.Filter(org=f"org{r.randrange(20)}", action="artifact.upload", outcome="denied"),
    ),
    ("org+outcome, common", lambda r, n: auditlog.Filter(org=f"org{r.randrange(20)}", outcome="denied")),
    ("org+outcome, rare", lambda r, n: auditlog.Filter(org=f"org{r.randrange(20)}", outcome="error")),
    ("action+outcome, common", lambda r, n: auditlog.Filter(action="artifact.download", outcome="denied")),
    ("action+outcome, rare", lambda r, n: auditlog.Filter(action=RARE_ACTION, outcome="allowed")),
    (
        "actor+action, common",
        lambda r, n: auditlog.Filter(actor_id=r.choice(ACTORS).id, action="artifact.download"),
    ),
    ("actor+action, rare", lambda r, n: auditlog.Filter(actor_id=r.choice(ACTORS).id, action=RARE_ACTION)),
    (
        "actor+since, common",
        lambda r, n: auditlog.Filter(actor_id=r.choice(ACTORS).id, since_ms=_time_at(n // 10)),
    ),
    (
        "actor+since, rare",
        lambda r, n: auditlog.Filter(actor_id=r.choice(ACTORS).id, since_ms=_time_at(n - n // 200)),
    ),
    (
        "org+since, common",
        lambda r, n: auditlog.Filter(org=f"org{r.randrange(20)}", since_ms=_time_at(n // 10)),
    ),
    (
        "org+since, rare",
        lambda r, n: auditlog.Filter(
            org=f"org{r.randrange(20)}", since_ms=_time_at(n) + SKEW_MS - 100 * STEP_MS
        ),
    ),
]

_COUNT_SQL = {
    "actor_id": "actor_id = ${}",
    "org": "actor_org = ${}",
    "action": "action = ${}",
    "resource_type": "resource_type = ${}",
    "resource_id": "resource_id = ${}",
    "outcome": "outcome = ${}",
    "since_ms": "time_ms >= ${}",
    "until_ms": "time_ms < ${}",
}


async def _count(conn: Connection, where: auditlog.Filter) -> int:
    """How many events match `where` in the whole log (to show what "rare" means)."""
    args = list(where.to_json().values())
    clauses = [_COUNT_SQL[name].format(i) for i, name in enumerate(where.to_json(), start=1)]
    sql = "SELECT COUNT(*) FROM audit_events WHERE " + " AND ".join(clauses)  # noqa: S608 - placeholders only
    return int(await conn.fetchval(sql, *args))


async def bench(
    db: Database, name: str, events: int, batch: int, samples: int, writers: int = 1, check: bool = True
) -> None:
    async with db.read() as conn:
        start_size = await auditlog.tree_size(conn)
    rng = random.Random(start_size)  # noqa: S311 - reproducible workload, not secrets
    log = AuditLog(origin="bench.example/audit", clock=_clock(start_size))
    ctx = Context(ip="203.0.113.7", user_agent="exchange-bench/1", request_id="bench")
    todo = max(0, events - start_size)
    t0 = time.perf_counter()
    last = t0
    done = 0

    async def writer() -> None:
        # Each writer takes its share in turn; all append to the one log, so they queue on its
        # head (SQLite: the one writer, grouped commits; PostgreSQL: the head row's lock).
        nonlocal done, last
        while done < todo:
            n = min(batch, todo - done)
            done += n
            items = _entries(rng, n)
            async with db.transaction() as conn:
                await log.append_many(conn, ctx, items)
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                print(
                    f"  {name}: {start_size + done:,} events, {done / (last - t0):,.0f} appends/s", flush=True
                )

    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - t0
    if todo:
        print(
            f"{name}: appended {todo:,} events in {elapsed:.1f} s: {todo / elapsed:,.0f} appends/s "
            f"(durable commits of {batch}, {writers} concurrent writer{'s' if writers > 1 else ''}; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})"
        )
    async with db.read() as conn:
        size = await auditlog.tree_size(conn)
        t = time.perf_counter()
        root = await auditlog.root_at(conn, size)
        print(f"{name}: size {size:,}; root in {(time.perf_counter() - t) * 1000:.2f} ms")

        inclusion: list[float] = []
        for _ in range(samples):
            index = rng.randrange(size)
            t = time.perf_counter()
            proof = (await auditlog.inclusion_proofs(conn, [index], size))[index]
            inclusion.append(time.perf_counter() - t)
        row = await conn.fetchone("SELECT leaf FROM audit_events WHERE idx = $1", index)
        assert row is not None
        merkle.verify_inclusion(merkle.leaf_hash(bytes(row["leaf"])), index, size, proof, root)
        print(f"{name}: inclusion proof ({len(proof)} hashes): {_pct(inclusion)}")

        consistency: list[float] = []
        for _ in range(samples):
            old = rng.randrange(1, size)
            t = time.perf_counter()
            cproof = await auditlog.consistency_proof(conn, old, size)
            consistency.append(time.perf_counter() - t)
        merkle.verify_consistency(old, size, await auditlog.root_at(conn, old), root, cproof)
        print(f"{name}: consistency proof ({len(cproof)} hashes): {_pct(consistency)}")

        for with_proofs in (False, True):
            pages: list[float] = []
            for _ in range(samples):
                actor = rng.choice(ACTORS)
                after = rng.randrange(size // 2)
                t = time.perf_counter()
                rows = await auditlog.query(
                    conn, auditlog.Filter(actor_id=actor.id), size=size, after=after, limit=100
                )
                if with_proofs:
                    await auditlog.inclusion_proofs(conn, [i for i, _ in rows], size)
                pages.append(time.perf_counter() - t)
            what = "with inclusion proofs" if with_proofs else "leaves only"
            print(f"{name}: page of {len(rows)} events by actor, {what}: {_pct(pages)} ({_load()})")

        print(f"{name}: pages of 100 events from a random cursor in the first half ({_load()}):")
        for case, make in CASES:
            pages = []
            returned = 0
            for _ in range(samples):
                where = make(rng, size)
                after = rng.randrange(-1, size // 2)
                t = time.perf_counter()
                rows = await auditlog.query(conn, where, size=size, after=after, limit=100)
                pages.append(time.perf_counter() - t)
                returned += len(rows)
            matches = await _count(conn, make(random.Random(0), size))  # noqa: S311 - not secrets
            print(
                f"{name}:   {case:<30} {_pct(pages)}; {matches:,} matches, "
                f"{returned / samples:.1f} rows per page"
            )
        print(f"{name}: ({_load()})")

    # What the service's start check (services/auditcheck.py) costs at this size: every leaf
    # re-hashed, every column and stored node compared, the checkpoint's root recomputed.
    if not check:
        return
    signer = Signer(log.origin, os.urandom(32))
    note = sign_note(Checkpoint(log.origin, size, root).to_text(), [signer])
    load = os.getloadavg()[0]
    t = time.perf_counter()
    await TreeCheck(log).start(db, (size, note), signer.verifier())
    print(
        f"{name}: the service's start check over {size:,} events: {time.perf_counter() - t:.1f} s"
        f" (load average {load:.2f})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="log size to reach (default 1,000,000)")
    parser.add_argument("--batch", type=int, default=1000, help="events per durable transaction")
    parser.add_argument("--samples", type=int, default=1000, help="latency samples per measure")
    parser.add_argument(
        "--writers",
        type=int,
        default=1,
        help="concurrent appenders (each request of the service is one; default 1)",
    )
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--sqlite-path", help="reuse this SQLite file (default: a temporary one)")
    parser.add_argument(
        "--postgres-dsn",
        default=os.environ.get("EXCHANGE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
        help="server to create a throwaway database on",
    )
    parser.add_argument(
        "--postgres-database",
        help="reuse (or create) this database on that server and keep it (default: a throwaway one)",
    )
    parser.add_argument("--no-start-check", action="store_true", help="skip timing the start check")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.events:,} events", flush=True)
    check = not args.no_start_check

    if args.database in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
            path = args.sqlite_path or str(Path(tmp) / "bench.db")
            db = await connect(f"sqlite:///{path}")
            try:
                await migrate(db)
                await bench(db, "sqlite", args.events, args.batch, args.samples, args.writers, check)
            finally:
                await db.close()
    if args.database in ("postgresql", "both"):
        name = args.postgres_database or f"exchange_bench_{os.getpid()}"
        admin = await asyncpg.connect(args.postgres_dsn)
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            db = await connect(args.postgres_dsn.rpartition("/")[0] + "/" + name)
            try:
                await migrate(db)
                await bench(db, "postgresql", args.events, args.batch, args.samples, args.writers, check)
            finally:
                await db.close()
        finally:
            if not args.postgres_database:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())

"""Benchmark of the audit log: appends/s, proof latency and filtered-query latency at size.

Run through `scripts/bench-audit` (which makes .venv). For each database it appends `--events`
events (default 1,000,000) in durable transactions of `--batch` events (SQLite: WAL with
synchronous=FULL, so every commit is fsynced) from `--writers` concurrent appenders (the service
appends one event per request, from as many requests as are in flight), then measures, at that
size:

- inclusion proofs of random leaves and consistency proofs between random sizes, each one
  query of O(log n) stored nodes plus the fold (p50/p99 over `--samples`);
- the service's start check of the whole log (seconds);
- one page of 100 events of one actor (of 1,000), pinned to the tree size, from a random
  cursor, with and without per-row inclusion proofs (p50/p99).

Events look like the service's: principal actors in 20 organisations, a dozen actions,
artifact resources, request ids. Nothing here is mocked: it is the service's own code
(`AuditLog.append_many`, `services.auditlog`) on a real database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from exchange.db import Database, connect, migrate
from exchange.format import merkle
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import Signer, sign_note
from exchange.services import auditlog
from exchange.services.audit import Actor, AuditLog, Context, Entry
from exchange.services.auditcheck import TreeCheck

ACTIONS = [
    "artifact.download",
    "artifact.upload",
    "link.redeem",
    "link.create",
    "grant.create",
    "finding.create",
    "finding.update",
    "receipt.create",
    "whoami",
    "principal.list",
    "invite.create",
    "request.refused",
]
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


def _entries(rng: random.Random, n: int) -> list[Entry]:
    out = []
    for _ in range(n):
        denied = rng.random() < 0.05
        out.append(
            Entry(
                action=rng.choice(ACTIONS),
                outcome="denied" if denied else "allowed",
                reason="no-grant" if denied else None,
                resource={"type": "artifact", "id": f"art_{rng.randrange(5000):08x}", "sha256": "ab" * 32},
                details={"bytes_out": rng.randrange(1 << 40)},
                actor=rng.choice(ACTORS),
            )
        )
    return out


def _pct(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


async def bench(db: Database, name: str, events: int, batch: int, samples: int, writers: int = 1) -> None:
    rng = random.Random(1)  # noqa: S311 - reproducible workload, not secrets
    log = AuditLog(origin="bench.example/audit", clock=lambda: time.time_ns() // 1_000_000)
    ctx = Context(ip="203.0.113.7", user_agent="exchange-bench/1", request_id="bench")
    async with db.read() as conn:
        start_size = await auditlog.tree_size(conn)
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
            print(f"{name}: filtered page of {len(rows)} events by actor, {what}: {_pct(pages)}")
        pages = []
        for _ in range(samples):
            actor = rng.choice(ACTORS)
            t = time.perf_counter()
            rows = await auditlog.query(
                conn,
                auditlog.Filter(org=actor.org, action="artifact.download", outcome="denied"),
                size=size,
                after=rng.randrange(size // 2),
                limit=100,
            )
            pages.append(time.perf_counter() - t)
        print(f"{name}: filtered page of {len(rows)} events by org+action+outcome: {_pct(pages)}")

    # What the service's start check (services/auditcheck.py) costs at this size: every leaf
    # re-hashed, every column and stored node compared, the checkpoint's root recomputed.
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
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.events:,} events", flush=True)

    if args.database in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
            path = args.sqlite_path or str(Path(tmp) / "bench.db")
            db = await connect(f"sqlite:///{path}")
            try:
                await migrate(db)
                await bench(db, "sqlite", args.events, args.batch, args.samples, args.writers)
            finally:
                await db.close()
    if args.database in ("postgresql", "both"):
        name = f"exchange_bench_{os.getpid()}"
        admin = await asyncpg.connect(args.postgres_dsn)
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            db = await connect(args.postgres_dsn.rpartition("/")[0] + "/" + name)
            try:
                await migrate(db)
                await bench(db, "postgresql", args.events, args.batch, args.samples, args.writers)
            finally:
                await db.close()
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())

"""The database layer on both engines: migrations, transactions, errors, gap-free audit appends."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import rfc8785

from exchange.db import Database, connect, migrate
from exchange.db.migrate import migrations
from exchange.errors import Conflict, DatabaseUnavailable
from exchange.services.audit import SYSTEM, AuditLog, Context
from tests.conftest import POSTGRES_DSN

NOW = 1_790_000_000_000


def audit_log() -> AuditLog:
    return AuditLog(origin="test.example/log", clock=lambda: NOW)


async def test_migrate_is_idempotent(database_url: str) -> None:
    db = await connect(database_url)
    try:
        assert await migrate(db) == len(migrations())
        assert await migrate(db) == len(migrations())
        assert await db.fetchval("SELECT COUNT(*) FROM schema_migrations") == len(migrations())
        assert await db.fetchval("SELECT size FROM audit_head WHERE id = 1") == 0
    finally:
        await db.close()


async def test_concurrent_migrations_apply_once(database_url: str) -> None:
    dbs = [await connect(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate(d) for d in dbs))
        assert await dbs[0].fetchval("SELECT COUNT(*) FROM schema_migrations") == len(migrations())
    finally:
        for d in dbs:
            await d.close()


async def test_transaction_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await conn.execute(
                "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", "o1", "a", NOW
            )
            raise RuntimeError("boom")
    assert await db.fetchval("SELECT COUNT(*) FROM orgs") == 0


async def test_unique_violation_is_conflict_and_rolls_back(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", "o1", "a", NOW)
    with pytest.raises(Conflict):
        async with db.transaction() as conn:
            await conn.execute(
                "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", "o2", "b", NOW
            )
            await conn.execute(
                "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", "o3", "a", NOW
            )
    assert [r["id"] for r in await db.fetchall("SELECT id FROM orgs ORDER BY id")] == ["o1"]
    # The connection is usable afterwards.
    async with db.transaction() as conn:
        assert await conn.execute("UPDATE orgs SET name = $1 WHERE id = $2", "c", "o1") == 1


async def test_parameters_are_bound_not_formatted(db: Database) -> None:
    hostile = "x'); DROP TABLE orgs; --"
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", "o1", hostile, NOW
        )
    assert await db.fetchval("SELECT name FROM orgs WHERE id = $1", "o1") == hostile


async def test_audit_appends_are_gap_free_under_concurrency_and_rollback(db: Database) -> None:
    log = audit_log()
    ctx = Context(actor=SYSTEM, request_id="r")

    async def append(i: int) -> None:
        try:
            async with db.transaction() as conn:
                await log.append(conn, ctx, action="test.append", details={"i": i})
                if i % 5 == 0:
                    raise RuntimeError("roll this one back")
        except RuntimeError:
            pass

    await asyncio.gather(*(append(i) for i in range(60)))
    rows = await db.fetchall("SELECT idx, leaf FROM audit_events ORDER BY idx")
    assert [r["idx"] for r in rows] == list(range(48))
    assert await db.fetchval("SELECT size FROM audit_head") == 48
    kept = sorted(json.loads(bytes(r["leaf"]))["details"]["i"] for r in rows)
    assert kept == [i for i in range(60) if i % 5]
    for r in rows:
        leaf = bytes(r["leaf"])
        event = json.loads(leaf)
        assert rfc8785.dumps(event) == leaf  # stored canonical, byte for byte
        assert event["idx"] == r["idx"] and event["origin"] == "test.example/log"


async def test_two_pools_appending_at_once_make_one_log(database_url: str) -> None:
    """Two independent connections (two service processes) serialise on the head row."""
    first = await connect(database_url)
    await migrate(first)
    second = await connect(database_url)
    log = audit_log()
    try:

        async def burst(db: Database, tag: str) -> None:
            for i in range(25):
                async with db.transaction() as conn:
                    await log.append(
                        conn, Context(actor=SYSTEM), action="test.append", details={"who": tag, "i": i}
                    )

        await asyncio.gather(burst(first, "a"), burst(second, "b"))
        rows = await first.fetchall("SELECT idx FROM audit_events ORDER BY idx")
        assert [r["idx"] for r in rows] == list(range(50))
    finally:
        await first.close()
        await second.close()


async def test_audit_events_refuse_floats_and_oversize(db: Database) -> None:
    log = audit_log()
    # Refused inside a transaction that goes on and commits: the refused event takes no index.
    async with db.transaction() as conn:
        with pytest.raises(TypeError):
            await log.append(conn, Context(), action="x", details={"ratio": 0.5})
        with pytest.raises(ValueError):
            await log.append(conn, Context(), action="x", details={f"k{i}": "v" * 500 for i in range(200)})
    assert await db.fetchval("SELECT COUNT(*) FROM audit_events") == 0
    assert await db.fetchval("SELECT size FROM audit_head") == 0


async def test_unreachable_postgres_is_database_unavailable() -> None:
    with pytest.raises(DatabaseUnavailable):
        await connect("postgresql://postgres@127.0.0.1:1/none")


async def test_sqlite_pragmas(tmp_path: object) -> None:
    from pathlib import Path

    db = await connect(f"sqlite:///{Path(str(tmp_path)) / 'p.db'}")
    try:
        async with db.transaction() as conn:
            assert (await conn.fetchval("PRAGMA journal_mode")).lower() == "wal"
            assert await conn.fetchval("PRAGMA synchronous") == 2  # FULL
            assert await conn.fetchval("PRAGMA foreign_keys") == 1
    finally:
        await db.close()


async def test_execute_is_a_transaction_of_its_own(db: Database) -> None:
    assert (
        await db.execute("INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", "o1", "a", NOW)
        == 1
    )
    with pytest.raises(Conflict):
        await db.execute("INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", "o2", "a", NOW)
    assert await db.execute("UPDATE orgs SET name = $1 WHERE id = $2", "b", "o1") == 1
    assert [r["name"] for r in await db.fetchall("SELECT name FROM orgs")] == ["b"]


async def test_concurrent_transactions_each_return_committed_and_fail_alone(db: Database) -> None:
    """Group commit (SQLite) must not change what one transaction sees: each that returns is
    durable and visible to every reader, and one that fails is undone alone."""

    async def insert(i: int) -> str:
        try:
            async with db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", f"o{i}", f"n{i}", NOW
                )
                if i % 3 == 0:
                    raise RuntimeError("roll this one back")
                if i % 3 == 1:  # a constraint violation after a write of its own
                    await conn.execute(
                        "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)",
                        f"x{i}",
                        "taken",
                        NOW,
                    )
        except (RuntimeError, Conflict):
            return "refused"
        # Committed before the transaction returned: a reader connection sees it at once.
        assert await db.fetchval("SELECT name FROM orgs WHERE id = $1", f"o{i}") == f"n{i}"
        return "ok"

    await db.execute("INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", "t", "taken", NOW)
    outcomes = await asyncio.gather(*(insert(i) for i in range(30)))
    assert outcomes == ["refused" if i % 3 != 2 else "ok" for i in range(30)]
    rows = await db.fetchall("SELECT id FROM orgs WHERE id <> 't'")
    assert sorted(r["id"] for r in rows) == sorted(f"o{i}" for i in range(30) if i % 3 == 2)


async def test_a_failed_commit_fails_every_transaction_it_held(tmp_path: Path) -> None:
    """SQLite (group commit is that backend's): when the COMMIT shared by concurrent transactions
    fails, none of them is written and each caller gets DatabaseUnavailable, not a success."""
    db = await connect(f"sqlite:///{tmp_path / 'exchange.db'}")
    try:
        await migrate(db)
        async with db.transaction() as conn:
            # A deferred foreign key is checked at COMMIT: a way to make one COMMIT fail.
            await conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
            await conn.execute(
                "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
            )

        async def bad() -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO child (p) VALUES (42)")

        async def good(i: int) -> None:
            await db.execute(
                "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", f"o{i}", f"n{i}", NOW
            )

        outcomes = await asyncio.gather(bad(), *(good(i) for i in range(5)), return_exceptions=True)
        assert all(isinstance(o, DatabaseUnavailable) for o in outcomes), outcomes
        assert await db.fetchval("SELECT COUNT(*) FROM orgs") == 0
        assert await db.fetchval("SELECT COUNT(*) FROM child") == 0
        await good(99)  # and the writer goes on
        assert await db.fetchval("SELECT COUNT(*) FROM orgs") == 1
    finally:
        await db.close()


async def test_sqlite_waits_for_another_writer_without_blocking_the_loop(tmp_path: Path) -> None:
    """SQLite statements run on the event loop, but BEGIN IMMEDIATE, which waits for another
    process's write lock, does not: the loop goes on meanwhile. A caller cancelled while it waits
    leaves no transaction open behind it, and the next write goes through."""
    import sqlite3

    path = tmp_path / "exchange.db"
    db = await connect(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await migrate(db)
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        insert = "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)"
        waiting = asyncio.ensure_future(db.execute(insert, "o1", "first", NOW))
        ticks = 0
        for _ in range(20):  # the loop runs while the write waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not waiting.done()
        waiting.cancel()
        # The lock comes free while the cancelled write's BEGIN still waits for it on the thread.
        asyncio.get_running_loop().call_later(0.1, other.execute, "ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await db.execute(insert, "o2", "second", NOW)
        assert [r["name"] for r in await db.fetchall("SELECT name FROM orgs")] == ["second"]
        # Nothing left holding the lock: another connection can write at once.
        other.execute("PRAGMA busy_timeout=1000")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
        await db.close()


async def test_postgres_plans_each_query_for_its_values() -> None:
    """A generic plan ignores the values: for a rare audit filter it walks the whole log. Every
    pooled connection runs with custom plans (and the queries are written to need them)."""
    db = await connect(POSTGRES_DSN)
    try:
        for _ in range(3):  # whichever connection of the pool answers
            assert await db.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    finally:
        await db.close()

"""Two service processes appending to one PostgreSQL log at once still make one consistent log."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exchange.db import connect, migrate
from exchange.format import merkle
from exchange.services import auditlog
from tests.conftest import POSTGRES_DSN, PostgresDatabases

_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from exchange.db import connect
    from exchange.services.audit import Actor, AuditLog, Context

    async def main(url, name, n):
        db = await connect(url)
        log = AuditLog(origin="exchange.local/audit", clock=lambda: 0)
        ctx = Context(actor=Actor(type="principal", id=name, name=name))
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        sys.stdin.readline()  # both start appending at the same moment
        for i in range(n):
            async with db.transaction() as conn:  # one event per transaction, as requests do
                await log.append(conn, ctx, action="race", details={"i": i})
        await db.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)

N = 150


@pytest.mark.postgres
async def test_two_processes_append_to_one_postgresql_log(tmp_path: Path) -> None:
    pg = PostgresDatabases(POSTGRES_DSN)
    url = await pg.create()
    try:
        db = await connect(url)
        await migrate(db)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WRITER, url, name, str(N)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=Path(__file__).parents[2],
            )
            for name in ("replica-a", "replica-b")
        ]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.close()
        for p in procs:
            assert await asyncio.to_thread(p.wait, 120) == 0
            assert p.stdout is not None
            p.stdout.close()

        rows = await db.fetchall("SELECT idx, actor_id, leaf FROM audit_events ORDER BY idx")
        assert [r["idx"] for r in rows] == list(range(2 * N))  # no gap, no duplicate
        assert [json.loads(bytes(r["leaf"]))["idx"] for r in rows] == list(range(2 * N))
        writers = [r["actor_id"] for r in rows]
        assert writers.count("replica-a") == writers.count("replica-b") == N
        # Interleaved, not one after the other: the appends really raced.
        assert any(writers[i] != writers[i + 1] for i in range(2 * N - 1) if i != N - 1)
        async with db.read() as conn:
            size = await auditlog.tree_size(conn)
            stored_root = await auditlog.root_at(conn, size)
        assert size == 2 * N
        assert stored_root == merkle.root([merkle.leaf_hash(bytes(r["leaf"])) for r in rows])
        assert await db.fetchval("SELECT COUNT(*) FROM audit_tree_nodes") == 2 * (2 * N) - bin(2 * N).count(
            "1"
        )
        await db.close()
    finally:
        await pg.drop(url)

"""Versioned schema migrations: numbered SQL files applied once each, in order.

`migrations/NNNN_name.sql` holds statements separated by `;` at the end of a line. The same file
serves both engines; the few type names that differ are translated here (BLOB → BYTEA).
Each file runs in its own transaction with its row in `schema_migrations`, so a failed
migration leaves no trace. On PostgreSQL an advisory lock keeps two replicas starting at once
from migrating twice; on SQLite the single writer does the same.
"""

from __future__ import annotations

import re
import time
from importlib import resources

from ._base import Database

__all__ = ["migrate", "migrations"]

_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
# Any constant would do; it only has to be the same in every replica.
_PG_LOCK_KEY = 0x65786368  # "exch"


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration files are not numbered 1..n without gaps: {versions}")
    return found


def _statements(sql: str, dialect: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    text = "\n".join(lines)
    if dialect == "postgresql":
        text = re.sub(r"\bBLOB\b", "BYTEA", text)
    return [s.strip() for s in re.split(r";\s*$", text, flags=re.MULTILINE) if s.strip()]


async def migrate(db: Database) -> int:
    """Bring the schema up to date; return the version it is at."""
    async with db.transaction() as conn:
        if db.dialect == "postgresql":
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PG_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)"
        )
    version = 0
    for number, name, sql in migrations():
        async with db.transaction() as conn:
            if db.dialect == "postgresql":
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _PG_LOCK_KEY)
            done = await conn.fetchval("SELECT version FROM schema_migrations WHERE version = $1", number)
            if done is None:
                for statement in _statements(sql, db.dialect):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3)",
                    number,
                    name,
                    time.time_ns() // 1_000_000,
                )
        version = number
    return version

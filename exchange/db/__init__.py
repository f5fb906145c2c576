"""The database: SQLite (embedded default) or PostgreSQL (several replicas), one schema.

SQL is written once, with PostgreSQL-style numbered parameters (`$1`, `$2`, …) that are always
bound, never formatted into the text; the SQLite backend rewrites them to SQLite's own numbered
form (`?1`, `?2`, …), which means the same thing. Column types are limited to those both engines
understand alike: TEXT, BIGINT, INTEGER and BLOB (BYTEA on PostgreSQL). Times are integer
milliseconds since the epoch, UTC.

Callers see `Database` and `Connection` only. Every write happens inside `db.transaction()`, so a
change and the audit event that records it commit together or not at all. Driver exceptions do
not leave this package: a unique-constraint violation becomes `Conflict`, anything else that
means the database is unreachable, full or read-only becomes `DatabaseUnavailable`.

This package does not know about principals, links or audit events; `services/` does.
"""

from __future__ import annotations

from ._base import Connection, Database, Row, placeholders
from .migrate import migrate

__all__ = ["Connection", "Database", "Row", "connect", "migrate", "placeholders"]


async def connect(url: str) -> Database:
    """Open the database named by `url` (`sqlite:///path` or `postgresql://…`), unmigrated."""
    if url.startswith("sqlite:///"):
        from ._sqlite import SQLiteDatabase

        return await SQLiteDatabase.open(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        from ._postgres import PostgresDatabase

        return await PostgresDatabase.open(url)
    raise ValueError("database URL must start with sqlite:/// or postgresql://")

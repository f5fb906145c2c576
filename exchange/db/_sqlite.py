"""SQLite backend: WAL, synchronous=FULL, one writer connection and a few readers.

SQLite allows one writer at a time; rather than let connections fight over the lock (and
retry on SQLITE_BUSY), writes queue on an asyncio lock in front of a single writer connection
and run as `BEGIN IMMEDIATE` transactions. Readers use their own connections and, in WAL mode,
never wait for the writer.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from ..errors import Conflict, DatabaseUnavailable
from ._base import Connection, Database, Row

_PARAM = re.compile(r"\$(\d+)")
_READERS = 4
T = TypeVar("T")


def _sql(sql: str) -> str:
    return _PARAM.sub(r"?\1", sql)


async def _guard(call: Awaitable[T]) -> T:
    try:
        return await call
    except sqlite3.IntegrityError as exc:
        raise Conflict("the change conflicts with an existing record") from exc
    except (sqlite3.Error, OSError, ValueError) as exc:
        # ValueError: aiosqlite on a closed connection.
        raise DatabaseUnavailable(_describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    """A sentence for the operator; SQLite's own messages name no paths or values."""
    text = str(exc).lower()
    if "full" in text or getattr(exc, "errno", None) == 28:
        return "the database's disk is full; nothing was written (free space, then retry)"
    if "readonly" in text or "read-only" in text:
        return "the database is read-only; nothing was written"
    if "locked" in text or "busy" in text:
        return "the database is busy; nothing was written (retry)"
    return f"the database failed ({exc.__class__.__name__}); nothing was written"


class _SQLiteConnection(Connection):
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await _guard(self._conn.execute(_sql(sql), args))
        return cursor.rowcount

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        cursor = await _guard(self._conn.execute(_sql(sql), args))
        row = await _guard(cursor.fetchone())
        # Drain the cursor so that statements with RETURNING finish before the next one.
        await _guard(cursor.close())
        return None if row is None else dict(row)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        cursor = await _guard(self._conn.execute(_sql(sql), args))
        rows = await _guard(cursor.fetchall())
        return [dict(r) for r in rows]


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, writer: aiosqlite.Connection, readers: list[aiosqlite.Connection]) -> None:
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all = [writer, *readers]
        for r in readers:
            self._readers.put_nowait(r)

    @classmethod
    async def open(cls, path: str) -> SQLiteDatabase:
        if path != ":memory:":
            folder = Path(path).parent
            folder.mkdir(parents=True, exist_ok=True)
            # WAL needs to write beside the database even to read it: say so plainly.
            if not os.access(folder, os.W_OK):
                raise DatabaseUnavailable(f"the database folder {folder} is read-only")

        async def one(setup: Callable[[aiosqlite.Connection], Awaitable[None]]) -> aiosqlite.Connection:
            conn = await _guard(aiosqlite.connect(path, isolation_level=None))
            conn.row_factory = sqlite3.Row
            await setup(conn)
            return conn

        async def writer_setup(conn: aiosqlite.Connection) -> None:
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=FULL",
                "PRAGMA foreign_keys=ON",
                "PRAGMA busy_timeout=5000",
            ):
                await _guard(conn.execute(pragma))

        async def reader_setup(conn: aiosqlite.Connection) -> None:
            await _guard(conn.execute("PRAGMA busy_timeout=5000"))
            await _guard(conn.execute("PRAGMA query_only=ON"))

        writer = await one(writer_setup)
        readers = [await one(reader_setup) for _ in range(_READERS)]
        return cls(writer, readers)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._write_lock:
            await _guard(self._writer.execute("BEGIN IMMEDIATE"))
            try:
                yield _SQLiteConnection(self._writer)
                await _guard(self._writer.execute("COMMIT"))
            except BaseException:
                # A failed COMMIT (disk full, read-only file) can leave the transaction open.
                if self._writer.in_transaction:
                    with suppress(DatabaseUnavailable):
                        await _guard(self._writer.execute("ROLLBACK"))
                raise

    async def execute(self, sql: str, *args: Any) -> int:
        # The writer runs in autocommit mode: a lone statement is its own durable transaction,
        # and costs one trip to the database thread instead of three (BEGIN, statement, COMMIT).
        async with self._write_lock:
            cursor = await _guard(self._writer.execute(_sql(sql), args))
            return cursor.rowcount

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Connection]:
        conn = await self._readers.get()
        try:
            await _guard(conn.execute("BEGIN"))
            try:
                yield _SQLiteConnection(conn)
            finally:
                await _guard(conn.execute("COMMIT"))
        finally:
            self._readers.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._all:
            with suppress(sqlite3.Error, ValueError):
                await conn.close()

"""SQLite backend: WAL, synchronous=FULL, one writer connection and a few readers.

SQLite allows one writer at a time; rather than let connections fight over the lock (and
retry on SQLITE_BUSY), writes queue on an asyncio lock in front of a single writer connection.
Readers use their own connections and, in WAL mode, never wait for the writer.

Group commit. A durable COMMIT costs one fsync (milliseconds on real disks), and one writer
committing each request alone is bounded by the disk's fsync rate. So the transactions that
queue for the writer while one COMMIT runs share the next: each runs, in turn and alone on the
writer, as a SAVEPOINT inside one `BEGIN IMMEDIATE` transaction (rolled back to its savepoint if
it fails, leaving the others' work intact), and the first of them to finish queues a COMMIT
behind the others that were already waiting. Nobody is answered early: `transaction()` returns
only once the COMMIT holding its work is durable, and raises DatabaseUnavailable if that COMMIT
fails (then none of the batch's work was written). Transactions still run one after another
and see each other's writes in that order, exactly as if each had committed alone.
"""

from __future__ import annotations

import asyncio
import functools
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


@functools.lru_cache(maxsize=1024)
def _sql(sql: str) -> str:
    # Cached: the same few statements run on every request, and the rewrite is a regex pass.
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
    """Each call is one trip to the database thread (aiosqlite has no public call for running a
    function there; `_execute` does): a trip costs tens of microseconds of thread hand-over, and
    a redemption makes a dozen. `opening` (a transaction's SAVEPOINT) rides along with the first
    statement, so a transaction that writes nothing never opens one."""

    def __init__(self, conn: aiosqlite.Connection, opening: str | None = None) -> None:
        self._conn = conn
        self._opening = opening
        self.opened = False

    async def _run(self, mode: str, sql: str, args: tuple[Any, ...]) -> Any:
        opening, self._opening = self._opening, None
        self.opened = self.opened or opening is not None

        async def call() -> Any:  # `_conn` raises ValueError once closed: inside the guard
            return await self._conn._execute(_run, self._conn._conn, opening, _sql(sql), args, mode)  # type: ignore[no-untyped-call]

        return await _guard(call())

    async def execute(self, sql: str, *args: Any) -> int:
        return int(await self._run("rowcount", sql, args))

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        row = await self._run("one", sql, args)
        return None if row is None else dict(row)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in await self._run("all", sql, args)]


def _run(conn: sqlite3.Connection, opening: str | None, sql: str, args: tuple[Any, ...], mode: str) -> Any:
    """On the database thread: one statement (after `opening`, if any), its rows or rowcount,
    and the cursor closed so that a statement with RETURNING finishes before the next one."""
    if opening is not None:
        conn.execute(opening)
    cursor = conn.execute(sql, args)
    try:
        if mode == "rowcount":
            return cursor.rowcount
        return cursor.fetchone() if mode == "one" else cursor.fetchall()
    finally:
        cursor.close()


class _Batch:
    """Transactions made durable by one COMMIT: each waits for it before it is answered."""

    def __init__(self) -> None:
        self._committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieve a failure even if every member had failed on its own and nobody waits.
        self._committed.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._commit: asyncio.Task[None] | None = None
        self._savepoints = 0

    def next_savepoint(self) -> str:
        self._savepoints += 1
        return f"tx{self._savepoints}"

    def schedule_commit(self, db: SQLiteDatabase) -> None:
        """Queue the COMMIT once, behind every transaction already waiting for the writer: those
        join this batch, later ones the next. A task, so that no cancelled caller can drop it."""
        if self._commit is None:
            self._commit = asyncio.ensure_future(db._commit(self))

    async def wait_committed(self, db: SQLiteDatabase) -> None:
        self.schedule_commit(db)
        try:
            await asyncio.shield(self._committed)
        except DatabaseUnavailable as exc:
            raise DatabaseUnavailable(exc.message) from exc.__cause__  # one instance per waiter

    def done(self) -> None:
        if not self._committed.done():
            self._committed.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, DatabaseUnavailable):
            failure = DatabaseUnavailable(_describe(exc))
            failure.__cause__ = exc
            exc = failure
        if not self._committed.done():
            self._committed.set_exception(exc)


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, writer: aiosqlite.Connection, readers: list[aiosqlite.Connection]) -> None:
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._batch: _Batch | None = None
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
            batch = await self._join()
            # A savepoint of its own, named uniquely: ROLLBACK TO can never reach an earlier
            # member's. Savepoints are not released (the COMMIT releases them all): one trip less.
            savepoint = batch.next_savepoint()
            conn = _SQLiteConnection(self._writer, opening=f"SAVEPOINT {savepoint}")
            try:
                yield conn
            except BaseException:
                if conn.opened:
                    await self._undo(batch, savepoint)
                else:
                    batch.schedule_commit(self)  # nothing of its own to undo
                raise
        await batch.wait_committed(self)

    async def execute(self, sql: str, *args: Any) -> int:
        # A lone statement needs no savepoint: a failing statement is undone by SQLite itself
        # (or, on a full disk, the whole transaction is, which `_undo` notices).
        async with self._write_lock:
            batch = await self._join()
            try:
                rowcount = await _SQLiteConnection(self._writer).execute(sql, *args)
            except BaseException:
                await self._undo(batch, None)
                raise
        await batch.wait_committed(self)
        return rowcount

    # -- group commit (every method below runs holding the write lock) ------------------------------

    async def _join(self) -> _Batch:
        """The open batch, or a new one (`BEGIN IMMEDIATE`)."""
        if self._batch is None:
            await _guard(self._writer.execute("BEGIN IMMEDIATE"))
            self._batch = _Batch()
        return self._batch

    async def _undo(self, batch: _Batch, savepoint: str | None) -> None:
        """Undo the failed transaction alone; if SQLite already rolled everything back (a full
        disk) or the undo fails, the whole batch fails. Either way the batch still commits."""
        if self._writer.in_transaction:
            try:
                if savepoint is not None:
                    await _guard(self._writer.execute(f"ROLLBACK TO {savepoint}"))
                batch.schedule_commit(self)
                return
            except DatabaseUnavailable as exc:
                await self._abort(batch, exc)
                return
        await self._abort(batch, DatabaseUnavailable("the database rolled the transaction back"))

    async def _abort(self, batch: _Batch, exc: BaseException) -> None:
        if self._batch is batch:
            self._batch = None
        if self._writer.in_transaction:
            with suppress(DatabaseUnavailable):
                await _guard(self._writer.execute("ROLLBACK"))
        batch.fail(exc)

    async def _commit(self, batch: _Batch) -> None:
        async with self._write_lock:
            if self._batch is not batch:
                return  # committed or aborted already
            self._batch = None
            try:
                await _guard(self._writer.execute("COMMIT"))
            except BaseException as exc:
                # A failed COMMIT (disk full, read-only file) can leave the transaction open.
                await self._abort(batch, exc)
                return
            batch.done()

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

    # A lone read is a consistent snapshot by itself: no BEGIN and COMMIT around it.
    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[_SQLiteConnection]:
        conn = await self._readers.get()
        try:
            yield _SQLiteConnection(conn)
        finally:
            self._readers.put_nowait(conn)

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self._reader() as conn:
            return await conn.fetchone(sql, *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self._reader() as conn:
            return await conn.fetchall(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self._reader() as conn:
            return await conn.fetchval(sql, *args)

    async def close(self) -> None:
        if self._batch is not None:
            await self._commit(self._batch)
        for conn in self._all:
            with suppress(sqlite3.Error, ValueError):
                await conn.close()

"""SQLite backend: WAL, synchronous=FULL, one writer connection and a few readers.

SQLite allows one writer at a time; rather than let connections fight over the lock (and
retry on SQLITE_BUSY), writes queue on an asyncio lock in front of a single writer connection.
Readers use their own connections and, in WAL mode, never wait for the writer.

Statements run on the event loop. Against the page cache a statement takes microseconds, less
than handing it to a thread and back (and a handed-over statement holds the single writer for
the whole round trip: a redemption's eight statements were most of its latency). What can wait
goes to one database thread: `BEGIN IMMEDIATE` (it may wait for another process's write lock)
and `COMMIT` (its fsync), so the loop never sleeps on a lock or the disk. Once BEGIN IMMEDIATE
holds the write lock, no statement of the batch can wait for one: in WAL mode readers never
block the writer, and SQLite writes the log only at COMMIT (or when a transaction outgrows the
page cache).

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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from ..errors import Conflict, DatabaseUnavailable
from ._base import Connection, Database, Row

_PARAM = re.compile(r"\$(\d+)")
_READERS = 4
T = TypeVar("T")


@functools.lru_cache(maxsize=1024)
def _sql(sql: str) -> str:
    # Cached: the same few statements run on every request, and the rewrite is a regex pass.
    return _PARAM.sub(r"?\1", sql)


def _guard(call: Callable[[], T]) -> T:
    try:
        return call()
    except sqlite3.IntegrityError as exc:
        raise Conflict("the change conflicts with an existing record") from exc
    except (sqlite3.Error, OSError) as exc:
        # sqlite3.ProgrammingError (a closed connection) is an sqlite3.Error too.
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
    """Statements on the event loop (see the module's docstring). `opening` (a transaction's
    SAVEPOINT) runs just before the first statement, so a transaction that writes nothing never
    opens one."""

    def __init__(self, conn: sqlite3.Connection, opening: str | None = None) -> None:
        self._conn = conn
        self._opening = opening
        self.opened = False

    def _run(self, mode: str, sql: str, args: tuple[Any, ...]) -> Any:
        opening, self._opening = self._opening, None
        self.opened = self.opened or opening is not None
        return _guard(lambda: _statement(self._conn, opening, _sql(sql), args, mode))

    async def execute(self, sql: str, *args: Any) -> int:
        return int(self._run("rowcount", sql, args))

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        row = self._run("one", sql, args)
        return None if row is None else dict(row)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in self._run("all", sql, args)]


def _statement(
    conn: sqlite3.Connection, opening: str | None, sql: str, args: tuple[Any, ...], mode: str
) -> Any:
    """One statement (after `opening`, if any), its rows or rowcount, and the cursor closed so
    that a statement with RETURNING finishes before the next one."""
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

    def __init__(self, writer: sqlite3.Connection, readers: list[sqlite3.Connection]) -> None:
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._batch: _Batch | None = None
        # One thread for what may wait (BEGIN IMMEDIATE, COMMIT): the writer's, in order.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exchange-sqlite")
        self._readers: asyncio.Queue[sqlite3.Connection] = asyncio.Queue()
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

        def one(pragmas: tuple[str, ...]) -> sqlite3.Connection:
            # Used from the loop and from the database thread, never from both at once (the
            # write lock): hence check_same_thread=False.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                conn.row_factory = sqlite3.Row
                for pragma in pragmas:
                    conn.execute(pragma)
            except BaseException:
                conn.close()
                raise
            return conn

        def connect_all() -> tuple[sqlite3.Connection, list[sqlite3.Connection]]:
            writer = one(
                (
                    "PRAGMA journal_mode=WAL",
                    "PRAGMA synchronous=FULL",
                    "PRAGMA foreign_keys=ON",
                    "PRAGMA busy_timeout=5000",
                )
            )
            try:
                readers = [one(("PRAGMA busy_timeout=5000", "PRAGMA query_only=ON")) for _ in range(_READERS)]
            except BaseException:
                writer.close()
                raise
            return writer, readers

        # Opening may wait for another process's lock (WAL recovery): off the loop.
        writer, readers = await asyncio.to_thread(_guard, connect_all)
        return cls(writer, readers)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """`fn` on the database thread. Not abandoned if the caller is cancelled: the caller
        holds the write lock, and must not let it go while the writer is still in use."""
        future = asyncio.get_running_loop().run_in_executor(self._thread, _guard, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            raise

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._write_lock:
            batch = await self._join()
            # A savepoint of its own, named uniquely: ROLLBACK TO can never reach an earlier
            # member's. Savepoints are not released (the COMMIT releases them all).
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
            try:
                if not self._writer.in_transaction:
                    await self._in_thread(lambda: self._writer.execute("BEGIN IMMEDIATE"))
            except asyncio.CancelledError:
                if self._writer.in_transaction:  # begun all the same: the batch must end
                    self._batch = _Batch()
                    self._batch.schedule_commit(self)
                raise
            self._batch = _Batch()
        return self._batch

    async def _undo(self, batch: _Batch, savepoint: str | None) -> None:
        """Undo the failed transaction alone; if SQLite already rolled everything back (a full
        disk) or the undo fails, the whole batch fails. Either way the batch still commits."""
        if self._writer.in_transaction:
            try:
                if savepoint is not None:
                    _guard(lambda: self._writer.execute(f"ROLLBACK TO {savepoint}"))
                batch.schedule_commit(self)
                return
            except DatabaseUnavailable as exc:
                self._abort(batch, exc)
                return
        self._abort(batch, DatabaseUnavailable("the database rolled the transaction back"))

    def _abort(self, batch: _Batch, exc: BaseException) -> None:
        if self._batch is batch:
            self._batch = None
        if self._writer.in_transaction:
            with suppress(DatabaseUnavailable):
                _guard(lambda: self._writer.execute("ROLLBACK"))
        batch.fail(exc)

    async def _commit(self, batch: _Batch) -> None:
        async with self._write_lock:
            if self._batch is not batch:
                return  # committed or aborted already
            self._batch = None
            try:
                await self._in_thread(lambda: self._writer.execute("COMMIT"))
            except BaseException as exc:
                # A failed COMMIT (disk full, read-only file) can leave the transaction open.
                self._abort(batch, exc)
                return
            batch.done()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Connection]:
        conn = await self._readers.get()
        try:
            _guard(lambda: conn.execute("BEGIN"))
            try:
                yield _SQLiteConnection(conn)
            finally:
                _guard(lambda: conn.execute("COMMIT"))
        finally:
            self._readers.put_nowait(conn)

    # A lone read is a consistent snapshot by itself: no BEGIN and COMMIT around it, and no
    # connection borrowed for longer than the statement.
    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self._reader() as conn:
            return await conn.fetchone(sql, *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self._reader() as conn:
            return await conn.fetchall(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self._reader() as conn:
            return await conn.fetchval(sql, *args)

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[_SQLiteConnection]:
        conn = await self._readers.get()
        try:
            yield _SQLiteConnection(conn)
        finally:
            self._readers.put_nowait(conn)

    async def close(self) -> None:
        if self._batch is not None:
            await self._commit(self._batch)
        async with self._write_lock:  # not under a COMMIT still running on the thread
            for conn in self._all:
                with suppress(sqlite3.Error):
                    conn.close()
        self._thread.shutdown(wait=True)

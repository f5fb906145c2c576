"""PostgreSQL backend on asyncpg: a connection pool, one transaction per `transaction()`, and
custom query plans always (`plan_cache_mode`: see `open`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import asyncpg

from ..errors import Conflict, DatabaseUnavailable
from ._base import Connection, Database, Row

T = TypeVar("T")


async def _guard(call: Awaitable[T]) -> T:
    try:
        return await call
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise Conflict("the change conflicts with an existing record") from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"PostgreSQL error: {exc.__class__.__name__}") from exc


class _PostgresConnection(Connection):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await _guard(self._conn.execute(sql, *args))
        # asyncpg answers with the command tag, e.g. "UPDATE 3" or "INSERT 0 1".
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        row = await _guard(self._conn.fetchrow(sql, *args))
        return None if row is None else dict(row)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        rows = await _guard(self._conn.fetch(sql, *args))
        return [dict(r) for r in rows]


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 10) -> PostgresDatabase:
        pool = await _guard(
            asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=30,
                # asyncpg prepares every statement, and after five runs PostgreSQL may switch one
                # to a generic plan that ignores the values: for an audit filter on a rare value
                # that plan walks the whole log (~300 ms at 10^6 events instead of under 1 ms).
                # A custom plan per execution costs one planning step, far less.
                server_settings={"plan_cache_mode": "force_custom_plan"},
            )
        )
        return cls(pool)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._acquire() as conn:
            tx = conn.transaction()
            await _guard(tx.start())
            try:
                yield _PostgresConnection(conn)
            except BaseException:
                # If the connection is gone, the server rolls back on its own.
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await tx.rollback()
                raise
            await _guard(tx.commit())

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._acquire() as conn:
            return await _PostgresConnection(conn).execute(sql, *args)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Connection]:
        async with self._acquire() as conn:
            yield _PostgresConnection(conn)

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:  # asyncpg's pool proxy of a Connection
        try:
            conn = await self._pool.acquire(timeout=10)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"PostgreSQL unavailable: {exc.__class__.__name__}") from exc
        try:
            yield conn
        finally:
            with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await self._pool.release(conn)

    async def close(self) -> None:
        await self._pool.close()

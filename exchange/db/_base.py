"""The two interfaces every backend implements."""

from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager
from typing import Any

Row = dict[str, Any]


def placeholders(first: int, count: int) -> str:
    """`$first, $first+1, …`: `count` numbered parameters, for an `IN (…)` list of bound values."""
    return ", ".join(f"${n}" for n in range(first, first + count))


class Connection(abc.ABC):
    """One connection, inside a transaction (writes) or a read snapshot (reads)."""

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; return the number of rows it changed."""

    @abc.abstractmethod
    async def fetchone(self, sql: str, *args: Any) -> Row | None: ...

    @abc.abstractmethod
    async def fetchall(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchone(sql, *args)
        return None if row is None else next(iter(row.values()))


class Database(abc.ABC):
    #: "sqlite" or "postgresql": for the few statements that differ (locks, DDL types).
    dialect: str

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        """A write transaction: committed on normal exit, rolled back on any exception."""

    @abc.abstractmethod
    def read(self) -> AbstractAsyncContextManager[Connection]:
        """A connection for reads; may run beside writes."""

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """One write statement as its own transaction (one round trip); rows changed."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless the database answers a query now."""
        async with self.read() as conn:
            await conn.fetchval("SELECT 1")

    # Convenience for single reads outside an explicit connection.
    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self.read() as conn:
            return await conn.fetchone(sql, *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self.read() as conn:
            return await conn.fetchall(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.read() as conn:
            return await conn.fetchval(sql, *args)

"""Backing up the database to one engine-neutral file, and restoring it with the log checked.

The file is JSON Lines, UTF-8, one JSON value a line:

- line 1, the manifest: `{"format": "exchange-backup", "version": 1, "schema_version": N,
  "created_at_ms": T, "source": "sqlite" | "postgresql", "tables": [{"name", "columns", "rows",
  "sha256"}, …], "checkpoint": {"size": S, "note": "…"} | null}`;
- then every table's rows, table after table in the manifest's order, each row a JSON array of
  its values in the table's `columns` order, in primary-key order. Values are integers, strings,
  null, or `{"b64": "…"}` (canonical, padded base64) for BLOB/BYTEA. A table's `sha256` is the
  SHA-256 of its row lines exactly as written, each with its newline.

The types both engines share (see `exchange.db`) are all a row holds, so a SQLite backup restores
into PostgreSQL and back. `schema_migrations` is not copied: the target is migrated by this code,
and the manifest's `schema_version` must be this code's (an older or newer backup is refused; a
restore across versions is: restore with the version that wrote it, then upgrade).

`backup` reads inside one snapshot (SQLite: one read transaction; PostgreSQL: one REPEATABLE
READ, READ ONLY transaction), builds the file in memory and writes it with `write_atomic`.

`restore` checks everything it can before touching the target: the manifest, every row count and
hash, every value's type. Then, in one write transaction: the target must be empty (a migrated,
never-used database); every row is inserted; and the restored audit log is checked by
`TreeCheck.start`, on the same uncommitted transaction, against itself and against its latest
checkpoint with the log's verifier key, and that checkpoint must be the manifest's. Any failure
rolls the whole transaction back: nothing is restored.

Errors, by who is at fault: a file that is not a backup, truncated, or of another version is
`ValidationError` (exit 2); rows that do not match their manifest hash, or a restored log that
fails its check, are `IntegrityFailure` (exit 8: the bytes are not what was backed up/signed); a
non-empty target is `Conflict` (exit 6).

What this module does not do: back up object storage (the encrypted artifacts live in S3; back
the bucket up with the store's own tools, after the database, so every object the backup names
exists), stream (the whole backup is held in memory: fine for metadata and a log of a few million
events, not more), lock out a running service (stop it, or back up a replica), or record the
restore in the audit log: appending an event would change the log right after it was checked,
with a key this command may not hold. The restore is the operator's action, reported by the CLI;
the service started on the restored database checks the log again and carries on from it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..db import Connection, Database, connect, migrate, placeholders
from ..db.migrate import migrations
from ..errors import AuditLogDamaged, Conflict, IntegrityFailure, LocalFileError, NoteError, ValidationError
from ..files import write_atomic
from ..format.note import Verifier, b64decode_canonical
from .audit import AuditLog
from .auditcheck import TreeCheck
from .auditlog import latest_checkpoint

__all__ = ["FORMAT", "VERSION", "backup", "restore"]

FORMAT = "exchange-backup"
VERSION = 1
_IDENT = re.compile(r"[a-z_][a-z0-9_]*")
_CREATE = re.compile(r"CREATE TABLE (\w+)", re.IGNORECASE)
#: Columns that reference their own table: such rows are inserted parents first.
_SELF_REFERENCES = {"artifacts": ("id", "subject_id")}


# -- the schema, as this code knows it and as the database has it -------------------------------------


def known_tables() -> list[str]:
    """Every table the migrations create, in creation order: a table's foreign keys point only to
    tables created before it (or to itself), so inserting in this order satisfies them."""
    return [name for _, _, sql in migrations() for name in _CREATE.findall(sql)]


def schema_version() -> int:
    return len(migrations())


@dataclass(frozen=True)
class _Table:
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]


async def _describe(conn: Connection, dialect: str) -> dict[str, _Table]:
    if dialect == "sqlite":
        names = [
            r["name"]
            for r in await conn.fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
    else:
        names = [
            r["table_name"]
            for r in await conn.fetchall(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
        ]
    tables = {}
    for name in names:
        if name == "schema_migrations":
            continue
        if dialect == "sqlite":
            info = await conn.fetchall("SELECT name, pk FROM pragma_table_info($1) ORDER BY cid", name)
            columns = tuple(str(r["name"]) for r in info)
            key = tuple(str(r["name"]) for r in sorted(info, key=lambda r: r["pk"]) if r["pk"])
        else:
            columns = tuple(
                str(r["column_name"])
                for r in await conn.fetchall(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                    name,
                )
            )
            key = tuple(
                str(r["column_name"])
                for r in await conn.fetchall(
                    "SELECT k.column_name FROM information_schema.table_constraints c"
                    " JOIN information_schema.key_column_usage k ON k.constraint_name = c.constraint_name"
                    " AND k.table_schema = c.table_schema AND k.table_name = c.table_name"
                    " WHERE c.constraint_type = 'PRIMARY KEY' AND c.table_schema = current_schema()"
                    " AND c.table_name = $1 ORDER BY k.ordinal_position",
                    name,
                )
            )
        tables[name] = _Table(name, columns, key or columns)
    known = known_tables()
    if set(tables) != set(known):
        raise ValidationError(
            "the database's tables are not the ones this version of exchange creates "
            f"(unexpected: {sorted(set(tables) - set(known))}, missing: {sorted(set(known) - set(tables))})"
        )
    for table in tables.values():  # the names go into SQL text: only plain identifiers do
        if not all(_IDENT.fullmatch(n) for n in (table.name, *table.columns)):
            raise ValidationError(f"the table {table.name!r} has a name exchange does not use")
    return {name: tables[name] for name in known}


async def _version(conn: Connection) -> int:
    found = await conn.fetchval("SELECT MAX(version) FROM schema_migrations")
    version = int(found or 0)
    if version != schema_version():
        raise ValidationError(
            f"the database is at schema version {version} and this exchange knows version "
            f"{schema_version()}: use the exchange version that matches the database"
        )
    return version


# -- encoding ------------------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    raise ValidationError(f"a stored value of type {type(value).__name__} has no backup form")


def _decode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            return b64decode_canonical(value["b64"], what=f"value in {where}")
        except NoteError as exc:
            raise ValidationError(f"the backup is malformed: {exc.message}") from None
    raise ValidationError(f"the backup is malformed: {where} holds a value of no stored type")


def _line(data: Any) -> bytes:
    return (
        json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
    )


# -- backup --------------------------------------------------------------------------------------------


@asynccontextmanager
async def _snapshot(db: Database) -> AsyncIterator[Connection]:
    """One connection whose reads all see the same committed state."""
    if db.dialect == "sqlite":
        async with db.read() as conn:  # BEGIN … COMMIT on a reader: one WAL snapshot
            yield conn
        return
    # `Database.read()` on PostgreSQL runs each statement in its own snapshot; a transaction
    # whose first statement sets REPEATABLE READ reads one snapshot throughout. READ ONLY: a
    # backup that wrote would be a bug.
    async with db.transaction() as conn:
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield conn


async def backup(database_url: str, out: Path, *, now_ms: int) -> dict[str, Any]:
    """Write a backup of the database at `database_url` to `out` (refused if `out` exists)."""
    db = await connect(database_url)
    try:
        async with _snapshot(db) as conn:
            version = await _version(conn)
            tables = await _describe(conn, db.dialect)
            bodies: list[bytes] = []
            entries = []
            for table in tables.values():
                rows = await conn.fetchall(
                    f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {', '.join(table.key)}"  # noqa: S608 - checked identifiers
                )
                body = b"".join(_line([_encode(r[c]) for c in table.columns]) for r in rows)
                bodies.append(body)
                entries.append(
                    {
                        "name": table.name,
                        "columns": list(table.columns),
                        "rows": len(rows),
                        "sha256": hashlib.sha256(body).hexdigest(),
                    }
                )
            latest = await conn.fetchone(
                "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
            )
    finally:
        await db.close()
    checkpoint = (
        None
        if latest is None
        else {"size": int(latest["size"]), "note": bytes(latest["note"]).decode("utf-8")}
    )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "schema_version": version,
        "created_at_ms": now_ms,
        "source": db.dialect,
        "tables": entries,
        "checkpoint": checkpoint,
    }
    data = _line(manifest) + b"".join(bodies)
    try:
        write_atomic(out, data, overwrite=False)
    except FileExistsError:
        raise LocalFileError(f"{out} exists already: a backup never overwrites a file") from None
    except OSError as exc:
        raise LocalFileError(f"cannot write {out}: {exc.strerror or exc.__class__.__name__}") from None
    return {
        "out": str(out),
        "bytes": len(data),
        "schema_version": version,
        "tables": {e["name"]: e["rows"] for e in entries},
        "checkpoint_size": None if checkpoint is None else checkpoint["size"],
    }


# -- reading a backup ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    """A backup file, parsed and checked against its own manifest."""

    manifest: dict[str, Any]
    rows: dict[str, tuple[tuple[str, ...], list[list[Any]]]]  # table -> (columns, rows)

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.manifest["checkpoint"]
        return found


def _malformed(what: str) -> ValidationError:
    return ValidationError(
        f"the file is not an exchange backup, or is damaged: {what}", code="backup-malformed"
    )


def _json(line: bytes, number: int) -> Any:
    try:
        return json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        raise _malformed(f"line {number} is not JSON") from None


def _check_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _malformed("the first line is not a backup manifest")
    if manifest.get("version") != VERSION:
        raise ValidationError(
            f"the backup is of format version {manifest.get('version')!r}; this exchange reads {VERSION}"
        )
    version = manifest.get("schema_version")
    if type(version) is not int:
        raise _malformed("the manifest has no schema version")
    if version != schema_version():
        newer = "newer" if version > schema_version() else "older"
        raise ValidationError(
            f"the backup is of schema version {version}, {newer} than this exchange's "
            f"{schema_version()}: restore it with the exchange version that wrote it",
            code="backup-schema-version",
        )
    tables = manifest.get("tables")
    if (
        not isinstance(tables, list)
        or [t.get("name") if isinstance(t, dict) else None for t in tables] != known_tables()
    ):
        raise _malformed("the manifest's tables are not this schema's")
    for t in tables:
        columns = t.get("columns")
        if (
            not isinstance(columns, list)
            or not columns
            or not all(isinstance(c, str) and _IDENT.fullmatch(c) for c in columns)
            or len(set(columns)) != len(columns)
            or type(t.get("rows")) is not int
            or t["rows"] < 0
            or not isinstance(t.get("sha256"), str)
        ):
            raise _malformed(f"the manifest's entry for {t['name']} is malformed")
    checkpoint = manifest.get("checkpoint")
    if checkpoint is not None and (
        not isinstance(checkpoint, dict)
        or type(checkpoint.get("size")) is not int
        or not isinstance(checkpoint.get("note"), str)
    ):
        raise _malformed("the manifest's checkpoint is malformed")
    return manifest


def _lines(data: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            raise _malformed("the last line is cut short (the file is truncated)")
        yield data[start : end + 1]
        start = end + 1


def parse(data: bytes) -> Backup:
    """Parse a backup and check every table's row count and SHA-256 against its manifest."""
    lines = _lines(data)
    first = next(lines, None)
    if first is None:
        raise _malformed("the file is empty")
    manifest = _check_manifest(_json(first, 1))
    rows: dict[str, tuple[tuple[str, ...], list[list[Any]]]] = {}
    number = 1
    for entry in manifest["tables"]:
        name, columns = entry["name"], tuple(entry["columns"])
        digest = hashlib.sha256()
        table_rows = []
        for _ in range(entry["rows"]):
            line = next(lines, None)
            if line is None:
                raise _malformed(f"the rows of {name} end early (the file is truncated)")
            number += 1
            digest.update(line)
            row = _json(line, number)
            if not isinstance(row, list) or len(row) != len(columns):
                raise _malformed(f"line {number} is not a row of {name}")
            table_rows.append([_decode(v, f"line {number}") for v in row])
        if digest.hexdigest() != entry["sha256"]:
            raise IntegrityFailure(
                f"the rows of {name} do not match the backup's manifest (SHA-256): the file was "
                "changed or damaged after it was written; nothing was restored",
                code="backup-hash-mismatch",
            )
        rows[name] = (columns, table_rows)
    if next(lines, None) is not None:
        raise _malformed(f"there is data after the last table's rows (line {number + 1})")
    return Backup(manifest, rows)


# -- restore -------------------------------------------------------------------------------------------


class _Within(Database):
    """The open restore transaction, seen as a database: `TreeCheck` reads through `read()`, and
    must read the rows this transaction inserted, which no other connection can see yet."""

    def __init__(self, conn: Connection, dialect: str) -> None:
        self._conn = conn
        self.dialect = dialect

    @asynccontextmanager
    async def _same(self) -> AsyncIterator[Connection]:
        yield self._conn

    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        return self._same()

    def read(self) -> AbstractAsyncContextManager[Connection]:
        return self._same()

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._conn.execute(sql, *args)

    async def close(self) -> None:
        return None


def _parents_first(columns: tuple[str, ...], rows: list[list[Any]], key: str, ref: str) -> list[list[Any]]:
    """Rows ordered so that a row referencing another of the same table comes after it."""
    k, r = columns.index(key), columns.index(ref)
    ids = {row[k] for row in rows}
    placed: set[Any] = set()
    ordered: list[list[Any]] = []
    pending = rows
    while pending:
        ready = [row for row in pending if row[r] is None or row[r] in placed or row[r] not in ids]
        if not ready:  # a cycle: let the database refuse it
            ready = pending
        ordered += ready
        placed.update(row[k] for row in ready)
        pending = [row for row in pending if row[k] not in placed]
    return ordered


async def _is_empty(conn: Connection, tables: dict[str, _Table]) -> bool:
    for name in tables:
        if name == "audit_head":
            size = await conn.fetchval("SELECT size FROM audit_head WHERE id = 1")
            if await conn.fetchval("SELECT COUNT(*) FROM audit_head") != 1 or size != 0:
                return False
        elif await conn.fetchval(f"SELECT 1 FROM {name} LIMIT 1") is not None:  # noqa: S608 - checked identifiers
            return False
    return True


async def restore(database_url: str, data: bytes, *, verifier: Verifier | None) -> dict[str, Any]:
    """Restore the backup `data` into the empty database at `database_url` and check its log.

    `verifier` checks the latest checkpoint's signature; it may be None only for a backup with
    no checkpoint. Raises before writing anything for a bad file; rolls back on a failed check.
    """
    parsed = parse(data)
    checkpoint = parsed.checkpoint
    if checkpoint is not None and verifier is None:
        raise ValidationError("the backup holds a checkpoint: give the log's verifier key to check it")
    db = await connect(database_url)
    try:
        await migrate(db)
        async with db.read() as conn:
            tables = await _describe(conn, db.dialect)
        for name, (columns, _) in parsed.rows.items():
            if set(columns) != set(tables[name].columns):
                raise ValidationError(f"the backup's columns of {name} are not this schema's")
        async with db.transaction() as conn:
            if not await _is_empty(conn, tables):
                raise Conflict(
                    "the target database is not empty: restore only into a new database "
                    "(nothing was changed)",
                    code="restore-target-not-empty",
                )
            await conn.execute("DELETE FROM audit_head")  # the migration's (1, 0), replaced below
            for name, (columns, rows) in parsed.rows.items():
                if name in _SELF_REFERENCES:
                    rows = _parents_first(columns, rows, *_SELF_REFERENCES[name])
                sql = f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({placeholders(1, len(columns))})"  # noqa: S608 - checked identifiers
                for row in rows:
                    await conn.execute(sql, *row)
            within = _Within(conn, db.dialect)
            latest = await latest_checkpoint(within)
            found = (
                None if latest is None else {"size": latest[0], "note": latest[1].decode("utf-8", "replace")}
            )
            if found != checkpoint:
                raise IntegrityFailure(
                    "the restored latest checkpoint is not the one the backup's manifest names; "
                    "nothing was restored",
                    code="restore-log-check",
                )
            check = TreeCheck(AuditLog(origin=verifier.name if verifier else "", clock=lambda: 0))
            try:
                if latest is None:  # no checkpoint (nor, then, a verifier): the log against itself
                    await check.advance(within, await check.head(within))
                else:
                    assert verifier is not None  # a checkpoint in the manifest asked for one
                    await check.start(within, latest, verifier)
            except AuditLogDamaged as exc:
                raise IntegrityFailure(
                    f"the restored audit log fails its check: {exc.message}; nothing was restored",
                    code="restore-log-check",
                ) from None
            log_size = check.size
    finally:
        await db.close()
    return {
        "tables": {name: len(rows) for name, (_, rows) in parsed.rows.items()},
        "schema_version": parsed.manifest["schema_version"],
        "log_size": log_size,
        "checkpoint_size": None if checkpoint is None else checkpoint["size"],
    }

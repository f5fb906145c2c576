"""`exchange admin backup` / `restore`: engine-neutral, checked against the log's checkpoint.

Each test builds a stack with real activity (principals enrolled through invites, orgs, audit
events, a published checkpoint), backs it up, and restores it into a fresh database — of the
other engine in the cross-engine tests (SQLite → PostgreSQL and PostgreSQL → SQLite). The bad
inputs go through the real CLI, as an operator runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import rfc8785

from exchange.api.app import create_app
from exchange.api.audit import SIGNER
from exchange.client.audit import AuditClient
from exchange.db import connect, migrate
from exchange.dev.seaweed import SeaweedFS
from exchange.services import backup
from exchange.services.audit import EVENT_COLUMNS, event_columns
from exchange.services.auditlog import latest_checkpoint
from tests.audit.conftest import add_events, publish
from tests.conftest import EXCHANGE, POSTGRES_DSN, FakeClock, PostgresDatabases, ServedApp, Stack, start_stack


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    """A stack with a publisher that waits for the test, and some real activity logged."""
    s = await start_stack(
        tmp_path, database_url, seaweed, clock, audit_checkpoint_interval_s=3600.0, audit_heartbeat_s=0
    )
    await s.principal("tess", "tester", org="ukaisi")
    await s.principal("devi", "developer", org="lab")
    await add_events(s, 40)
    await publish(s)
    await add_events(s, 3)  # events past the checkpoint are restored and checked too
    yield s
    await s.server.close()


@pytest.fixture
async def fresh_url(tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    """Make new, empty databases of either engine; PostgreSQL ones are dropped at the end."""
    pg = PostgresDatabases(POSTGRES_DSN)
    made: list[str] = []

    async def make(engine: str) -> str:
        if engine == "sqlite":
            return f"sqlite:///{tmp_path / f'target{len(made)}-{os.urandom(3).hex()}.db'}"
        made.append(await pg.create())
        return made[-1]

    yield make
    for url in made:
        await pg.drop(url)


def _other(url: str) -> str:
    return "postgresql" if url.startswith("sqlite") else "sqlite"


async def _counts(url: str) -> dict[str, int]:
    db = await connect(url)
    try:
        await migrate(db)
        return {
            t: int(await db.fetchval(f"SELECT COUNT(*) FROM {t}"))  # noqa: S608 - fixed names
            for t in backup.known_tables()
        }
    finally:
        await db.close()


def _empty(counts: dict[str, int]) -> bool:
    return all(n == (1 if t == "audit_head" else 0) for t, n in counts.items())


async def test_backup_restores_into_the_other_engine_and_serves_the_same_checkpoint(
    stack: Stack, database_url: str, fresh_url: Callable[[str], Any], tmp_path: Path
) -> None:
    out = tmp_path / "exchange.backup"
    made = await backup.backup(database_url, out, now_ms=1)
    assert made["checkpoint_size"] is not None and made["tables"]["principals"] == 3
    target = await fresh_url(_other(database_url))
    restored = await backup.restore(target, out.read_bytes(), verifier=stack.app[SIGNER].verifier())
    assert restored["log_size"] == made["tables"]["audit_events"]

    source_counts = await _counts(database_url)
    assert await _counts(target) == source_counts
    assert source_counts["principals"] == 3 and source_counts["invites"] == 2
    # Backing the restored database up again gives the same rows, table by table.
    again = await backup.backup(target, tmp_path / "again.backup", now_ms=1)
    assert again["tables"] == made["tables"]

    source_db = await connect(database_url)
    try:
        source_checkpoint = await latest_checkpoint(source_db)
    finally:
        await source_db.close()
    # A service on the restored database (same home, so the same log signing key) is ready and
    # serves the checkpoint that was published before the backup.
    served = ServedApp(
        create_app(stack.settings.replace(database_url=target), clock=FakeClock()), stack.settings
    )
    await served.start_server()
    try:
        url = str(served.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as resp:
            assert resp.status == 200, await resp.text()
        restored_stack = Stack(served, stack.settings, stack.admin, tmp_path)
        async with restored_stack.client(stack.admin) as c:
            checkpoint = await AuditClient(c).checkpoint()
        assert source_checkpoint is not None
        assert checkpoint["size"] == source_checkpoint[0]
        assert checkpoint["note"] == source_checkpoint[1].decode()
    finally:
        await served.close()


# -- the CLI, with bad input --------------------------------------------------------------------------


def _cli(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    env |= {"EXCHANGE_HOME": str(home), "EXCHANGE_DATABASE_URL": url}
    return subprocess.run(
        [*EXCHANGE, "--json", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def _code(result: subprocess.CompletedProcess[str]) -> str:
    return str(json.loads(result.stderr.strip().splitlines()[-1])["error"]["code"])


def _rewrite(data: bytes, table: str, edit: Callable[[list[str], list[Any]], bool], *, rehash: bool) -> bytes:
    """The backup with rows of `table` edited in place (`edit` returns True for the rows it
    changed); with `rehash`, the manifest's SHA-256 recomputed as a careful forger would."""
    lines = data.split(b"\n")[:-1]
    manifest = json.loads(lines[0])
    at = 1
    for entry in manifest["tables"]:
        if entry["name"] == table:
            changed = False
            for i in range(at, at + entry["rows"]):
                row = json.loads(lines[i])
                if not changed and edit(entry["columns"], row):
                    lines[i] = json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode()
                    changed = True
            assert changed
            if rehash:
                body = b"".join(line + b"\n" for line in lines[at : at + entry["rows"]])
                entry["sha256"] = hashlib.sha256(body).hexdigest()
        at += entry["rows"]
    lines[0] = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False).encode()
    return b"".join(line + b"\n" for line in lines)


def _rename_principal(columns: list[str], row: list[Any]) -> bool:
    if row[columns.index("name")] != "tess":
        return False
    row[columns.index("name")] = "mallory"
    return True


def _forge_event(columns: list[str], row: list[Any]) -> bool:
    """Change an event's leaf and every column copied from it alike."""
    import base64

    leaf_at = columns.index("leaf")
    event = json.loads(base64.b64decode(row[leaf_at]["b64"]))
    if event.get("action") != "test.event":
        return False
    leaf = bytes(rfc8785.dumps(event | {"action": "forged.event"}))
    row[leaf_at] = {"b64": base64.b64encode(leaf).decode()}
    for name, value in zip(EVENT_COLUMNS, event_columns(json.loads(leaf)), strict=True):
        row[columns.index(name)] = value
    return True


async def test_cli_backup_and_restore_refuse_bad_input_and_change_nothing(
    stack: Stack, database_url: str, fresh_url: Callable[[str], Any], tmp_path: Path
) -> None:
    home = stack.settings.home  # holds the log signing key the restore verifies with
    out = tmp_path / "exchange.backup"
    made = _cli(home, database_url, "admin", "backup", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["checkpoint_size"] is not None
    again = _cli(home, database_url, "admin", "backup", "--out", str(out))
    assert again.returncode == 2 and _code(again) == "local-file"  # never overwrites
    data = out.read_bytes()

    def attempt(name: str, content: bytes, target: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / name
        path.write_bytes(content)
        return _cli(home, target, "admin", "restore", str(path))

    target = await fresh_url(_other(database_url))
    # Garbage and a truncated file: a clear error, exit 2, nothing written.
    for name, content in [
        ("garbage", b"\x00not a backup\n"),
        ("cut-mid-line", data[: len(data) // 2]),
        ("cut-at-line", data[: data.rindex(b"\n", 0, len(data) - 1) + 1]),
        ("empty", b""),
    ]:
        result = attempt(name, content, target)
        assert result.returncode == 2, (name, result.stderr)
        assert _code(result) == "backup-malformed", name
    # One row edited: the manifest's hash refuses it before anything is written (exit 8).
    result = attempt("edited", _rewrite(data, "principals", _rename_principal, rehash=False), target)
    assert result.returncode == 8 and _code(result) == "backup-hash-mismatch", result.stderr
    assert _empty(await _counts(target))
    # A leaf forged and the manifest recomputed: the log check fails, the restore rolls back.
    result = attempt("forged", _rewrite(data, "audit_events", _forge_event, rehash=True), target)
    assert result.returncode == 8 and _code(result) == "restore-log-check", result.stderr
    assert "does not match the leaves" in result.stderr
    assert _empty(await _counts(target))
    # A checkpoint verified with a pinned key that is not the log's: refused (exit 8).
    from exchange.format.note import Signer

    stranger = Signer(stack.settings.log_origin, os.urandom(32)).verifier_key()
    wrong = _cli(home, target, "admin", "restore", str(out), "--vkey", stranger)
    assert wrong.returncode == 8 and _code(wrong) == "restore-log-check", wrong.stderr
    assert _empty(await _counts(target))

    # The real thing restores (with the pinned key, too), once; a second time the target is not empty.
    vkey = stack.app[SIGNER].verifier_key()
    good = _cli(home, target, "admin", "restore", str(out), "--vkey", vkey)
    assert good.returncode == 0, good.stderr
    assert await _counts(target) == await _counts(database_url)
    before = await _counts(target)
    twice = _cli(home, target, "admin", "restore", str(out))
    assert twice.returncode == 6 and _code(twice) == "restore-target-not-empty", twice.stderr
    assert await _counts(target) == before

"""A full disk or a read-only database under the service: 503 with a clear message, nothing
half-written, and the service recovers by itself once the disk is writable again."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.dev.seaweed import SeaweedFS
from exchange.errors import DatabaseUnavailable, DependencyError
from tests.conftest import FakeClock, start_stack


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own (the tests run as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], check=False)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("cannot mount a tmpfs for the disk-fault tests")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> Path:
    filler = path / "filler"
    with filler.open("wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    return filler


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


async def test_disk_full_then_space_again(
    small_disk: Path, tmp_path: Path, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    db_file = small_disk / "exchange.db"
    stack = await start_stack(tmp_path, f"sqlite:///{db_file}", seaweed, clock)
    try:
        created, refused = [], []
        async with stack.client(stack.admin) as admin:
            filler = fill(small_disk)
            for i in range(40):
                try:
                    await admin.create_org(f"org-{i}")
                    created.append(f"org-{i}")
                except DependencyError as exc:
                    assert exc.code == "database-unavailable"
                    assert "disk is full" in exc.message
                    refused.append(f"org-{i}")
            assert refused, "the disk never filled up"
            filler.unlink()
            await admin.create_org("after")
            created.append("after")
        names = {r["name"] for r in await stack.db.fetchall("SELECT name FROM orgs")}
        assert set(created) <= names and not set(refused) & names
        # Every org that exists has its event; nothing refused left one.
        events = [e for e in await stack.events() if e["action"] == "org.create"]
        assert sorted(e["details"]["name"] for e in events) == sorted(created)
    finally:
        await stack.server.close()
    assert integrity(db_file) == "ok"


async def test_read_only_database(
    small_disk: Path, tmp_path: Path, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    """A database on a read-only volume: the service refuses to start, saying why, and starts
    once the volume is writable. (A volume cannot be remounted read-only under a process that has
    files open for writing, so the fault comes before the start; a disk that stops taking writes
    at run time is the disk-full case above.)"""
    db_file = small_disk / "exchange.db"
    first = await start_stack(tmp_path, f"sqlite:///{db_file}", seaweed, clock)
    await first.server.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        with pytest.raises(DatabaseUnavailable, match="read-only"):
            await start_stack(tmp_path, f"sqlite:///{db_file}", seaweed, clock)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    stack = await start_stack(tmp_path, f"sqlite:///{db_file}", seaweed, clock)
    try:
        async with stack.client(stack.admin) as admin:
            await admin.create_org("writable-again")
    finally:
        await stack.server.close()
    assert integrity(db_file) == "ok"

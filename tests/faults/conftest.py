"""A PostgreSQL server of the test's own, to stop and start for real without disturbing the
shared one: initdb into a temporary folder, trust auth, loopback, a free port."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or (
        [shutil.which(name)] if shutil.which(name) else []
    )
    if not found:
        pytest.fail(f"{name} not found: install the Debian package postgresql")
    return str(found[-1])


@dataclass
class PrivatePostgres:
    data: Path
    port: int
    log: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        cmd = [_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._ctl(
            "-w", "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"
        )

    def stop_immediate(self) -> None:
        self._ctl("-m", "immediate", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    # Not under pytest's tmp_path: that is private to root, and PostgreSQL runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="exchange-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cmd = [_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    pg = PrivatePostgres(data=data, port=free_port(), log=root / "postgres.log")
    pg.start()
    yield pg
    with contextlib.suppress(subprocess.CalledProcessError):
        pg.stop_immediate()  # unless the test stopped it already
    shutil.rmtree(root, ignore_errors=True)

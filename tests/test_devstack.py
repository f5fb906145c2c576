"""README's first command: `scripts/run` brings the whole stack up, twice side by side, stops
everything it started on SIGTERM, and reuses its data on a second run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Run:
    def __init__(self, home: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
        env |= {"EXCHANGE_HOME": str(home), "EXCHANGE_PORT": str(port)}
        self.home, self.port = home, port
        home.parent.mkdir(parents=True, exist_ok=True)
        self.log = home.parent / f"run-{port}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(ROOT / "scripts" / "run")], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if "listening on" in text:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"scripts/run did not come up:\n{self.log.read_text()}")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def whoami(text: str) -> dict[str, str]:
    exports = re.search(r"export (EXCHANGE_SERVER=\S+) (EXCHANGE_IDENTITY=\S+)", text)
    assert exports, text
    env = dict(os.environ) | dict(part.split("=", 1) for part in exports.groups())
    out = subprocess.run(
        [sys.executable, "-m", "exchange.cli", "--json", "whoami"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_two_stacks_side_by_side_stop_cleanly_and_restart_on_their_data(tmp_path: Path) -> None:
    first = Run(tmp_path / "a" / "home", free_port())
    second = Run(tmp_path / "b" / "home", free_port())
    try:
        text_a, text_b = first.wait_ready(), second.wait_ready()
        me_a, me_b = whoami(text_a), whoami(text_b)
        assert me_a["name"] == me_b["name"] == "admin"
        assert me_a["key_id"] != me_b["key_id"]  # two independent stacks
        assert "created the first admin" in text_a
        weeds = [p for p in first.children() if "weed" in p.name()]
        assert weeds, "scripts/run should have started SeaweedFS"
        creds = first.home / "s3-credentials.json"
        assert oct(creds.stat().st_mode & 0o777) == "0o600"
    finally:
        codes = (first.stop(), second.stop())
    assert codes == (0, 0)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in weeds)

    again = Run(first.home, first.port)
    try:
        text = again.wait_ready()
        assert "created the first admin" not in text
        assert whoami(text)["key_id"] == me_a["key_id"]
    finally:
        assert again.stop() == 0


def test_help_teaches_the_options() -> None:
    out = subprocess.run(
        [str(ROOT / "scripts" / "run"), "--help"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    for words in ("--replicas N", "--database", "postgresql", "HAProxy", "EXCHANGE_HOME", "SQLite"):
        assert words in out.stdout


@pytest.mark.parametrize("args", [["--replicas", "3"], ["--replicas", "2", "--database", "sqlite"]])
def test_replicas_need_postgresql(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    out = subprocess.run(
        [str(ROOT / "scripts" / "run"), *args], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 2
    assert "needs PostgreSQL" in out.stderr and "--database postgresql" in out.stderr


@pytest.mark.slow
def test_replicas_behind_haproxy_stop_cleanly(tmp_path: Path) -> None:
    """`scripts/run --replicas 2 --database URL`: the proxy's URL works, each replica's port is
    printed, and SIGTERM stops replicas, proxy and storage."""
    import asyncio

    from tests.conftest import POSTGRES_DSN, PostgresDatabases

    pg = PostgresDatabases(POSTGRES_DSN)
    database = asyncio.run(pg.create())
    asyncio.run(pg.drop(database))  # scripts/run must create it
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    port = free_port()
    env |= {"EXCHANGE_HOME": str(tmp_path / "home"), "EXCHANGE_PORT": str(port)}
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(ROOT / "scripts" / "run"), "--replicas", "2", "--database", database],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        text = log.read_text()
        assert f"HAProxy listening on http://127.0.0.1:{port}" in text
        assert len(re.findall(r"replica \d: http://127\.0\.0\.1:\d+", text)) == 2
        assert whoami(text)["name"] == "admin"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("haproxy" in p.name() for p in children) and any("weed" in p.name() for p in children)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        asyncio.run(pg.drop(database))
    assert code == 0, log.read_text()[-3000:]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)

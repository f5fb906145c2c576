"""scripts/bench-transfer --pin runs end to end on a tiny file: storage really on a CPU of its
own, the client and API on the other, every figure and the "bound by" verdict in its output.
What it measures is not checked here (a benchmark asserts no speed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_transfer_pin_runs_and_names_the_figures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    ran = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "_bench_transfer.py"),
            "--size",
            "8MiB",
            "--pin",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    out = ran.stdout
    cpus = sorted(os.sched_getaffinity(0))
    storage = cpus[: max(1, len(cpus) // 3)]
    assert f"CPUs: storage {storage}, client and API {cpus[len(storage) :]} (pinned)" in out
    assert "client CPU s/GiB" in out and "storage CPU s/GiB" in out and "API CPU s/GiB" in out
    rows = [line for line in out.splitlines() if re.match(r"(boto3|exchange) (upload|download)", line)]
    assert len(rows) == 5
    for row in rows:
        assert re.search(r"(storage|client\+API) \d+%|waiting \((storage|client\+API) \d+%\)$", row), row
    assert "load average" in out
    assert not any(tmp_path.iterdir())  # the work directory is removed


def test_pinning_moves_every_thread_of_a_process() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import _bench_transfer as bench  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    cpus = sorted(os.sched_getaffinity(0))
    target = {cpus[0]}
    # A process with several threads, as SeaweedFS has.
    code = "import threading, time\nfor _ in range(3): threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\ntime.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(100):
            if len(list(Path(f"/proc/{proc.pid}/task").iterdir())) >= 4:
                break
            time.sleep(0.05)
        bench.pin(proc.pid, target)
        tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
        assert len(tasks) >= 4
        assert all(os.sched_getaffinity(int(t.name)) == target for t in tasks)
    finally:
        proc.kill()
        proc.wait()

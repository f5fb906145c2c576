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
    if Path("/sys/module/page_reporting/parameters/page_reporting_order").exists():
        assert (
            "memory: the kernel reports freed pages to the hypervisor (page_reporting); each transfer"
            " starts 10 s after the last so every one finds memory in the same state"
        ) in out
    else:
        assert "memory: freed pages are not reported to a hypervisor; each transfer starts 0 s" in out
    assert "of which sys" in out
    # The crypto an encrypted transfer must add, measured on this machine: the floor under the ratios.
    crypto = re.search(
        r"crypto on one core here: SHA-256 (\d+\.\d\d) s/GiB, ChaCha20-Poly1305 (\d+\.\d\d) s/GiB;"
        r".*\((\d+\.\d\d) client CPU s/GiB more\)",
        out,
    )
    assert crypto, out
    sha, seal, both = (float(g) for g in crypto.groups())
    assert sha > 0 and seal > 0 and abs(sha + seal - both) <= 0.011
    assert not any(tmp_path.iterdir())  # the work directory is removed


def run_bench(tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    ran = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "_bench_transfer.py"), *args, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert not any(tmp_path.iterdir())  # the work directory is removed
    return ran.stdout


def rows(out: str) -> dict[str, list[str]]:
    """The table's rows by transfer name: the figures after the name."""
    found = {}
    for line in out.splitlines():
        m = re.match(
            r"((?:boto3|exchange) (?:upload|download)"
            r"(?: SHA-256| \(\d+ workers?\)|, stopped at \d+%|, resumed)?)\s+(\d.*)$",
            line,
        )
        if m:
            found[m.group(1).strip()] = m.group(2).split()
    return found


def test_bench_transfer_small_files_counts_files_per_second(tmp_path: Path) -> None:
    out = run_bench(tmp_path, "--files", "30", "--settle", "0")
    assert re.search(r"^files: 30 in model/ \(.*\), \d+ bytes in all", out, re.M), out
    assert "memory: " in out and "each transfer starts 0 s after the last" in out
    header = next(line for line in out.splitlines() if line.startswith("transfer"))
    assert "files/s" in header and "MB/s" in header and "of which sys" in header
    found = rows(out)
    assert set(found) == {"boto3 upload", "exchange upload", "boto3 download", "exchange download"}, out
    for figures in found.values():
        # seconds, files/s, MB/s, client CPU, of which sys, storage CPU, API CPU, peak RSS, bound by
        assert all(re.fullmatch(r"\d+\.\d+", f) for f in figures[:8]), figures
    for what in ("upload", "download"):
        assert re.search(
            rf"^{what}: exchange \(one artifact\) / boto3 \(30 objects, \d+ at a time\) = "
            r"\d+\.\d\dx in files per second$",
            out,
            re.M,
        ), out


def test_bench_transfer_workers_and_resume(tmp_path: Path) -> None:
    # One part at a time: the stop comes right after the first part, the second never sent.
    args = (
        "--size",
        "16MiB",
        "--settle",
        "0",
        "--workers",
        "1,2",
        "--resume-at",
        "0.5",
        "--concurrency",
        "1",
    )
    out = run_bench(tmp_path, *args)
    found = rows(out)
    expected = {"boto3 upload", "boto3 upload SHA-256", "boto3 download"}
    for what in ("upload", "download"):
        expected |= {f"exchange {what} (1 worker)", f"exchange {what} (2 workers)"}
        expected |= {f"exchange {what}, stopped at 50%", f"exchange {what}, resumed"}
    assert set(found) == expected, out
    for label in ("(1 worker)", "(2 workers)"):
        assert f"upload {label}: exchange (encrypted, verified) / plain boto3 = " in out
        assert f"download {label}: exchange (encrypted, verified) / plain boto3 = " in out
        assert f"upload {label}: exchange / boto3 with SHA-256 part checksums = " in out
    for what in ("upload", "download"):
        m = re.search(
            rf"^{what} resume: moved (\d+\.\d)% of the bytes in \d+\.\d s; the stopped run moved"
            r" (\d+\.\d)% in \d+\.\d s \(resume cost \d+\.\d\dx the remainder's share\)$",
            out,
            re.M,
        )
        assert m, out
        resumed, stopped = float(m.group(1)), float(m.group(2))
        # 16 MiB is two parts of 8 MiB (the service's smallest): the resume moves only the second.
        assert 0 < resumed < 100 and stopped >= 50, out


def test_bench_transfer_without_baseline_has_no_boto3_rows(tmp_path: Path) -> None:
    out = run_bench(tmp_path, "--size", "8MiB", "--settle", "0", "--no-baseline")
    assert set(rows(out)) == {"exchange upload", "exchange download"}, out
    assert "boto3" not in out and " = " not in out  # no boto3 row, no ratio
    assert re.search(
        r"^crypto on one core here: SHA-256 \d+\.\d\d s/GiB, ChaCha20-Poly1305 \d+\.\d\d s/GiB$", out, re.M
    )


def test_pinning_moves_every_thread_of_a_process() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import _bench_transfer as bench  # type: ignore[import-not-found,unused-ignore]
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

"""scripts/bench-pull runs end to end on tiny inputs: the real stack, two testers, every figure
named in its output. What it measures is not checked here (a benchmark asserts no speed); that
the counts it prints agree with one another is (URLs against sessions and renewals)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_DSN

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_bench_pull_runs_and_names_the_figures(database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "_bench_pull.py"),
        "--testers",
        "2",
        "--size",
        "1MiB",
        "--files",
        "2",
        "--renewal-probe",
        "5",
        "--database",
        database,
        "--postgres-dsn",
        POSTGRES_DSN,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for figure in (
        "2 verified, each with its receipt",
        "GET /l/{token}/challenge 200",
        "POST /l/{token}/session 200",
        "POST /l/{token}/receipt 201",
        "link.challenge",
        "link.session",
        "artifact.receipt",
        "rows added per table",
        "link_sessions",
        "database bytes: +",
        "presigned URLs: 4 in the session answers",
        "files 2 x (sessions 2 + renewals 0) = 4: equal",
        "service CPU:",
        "storage: 4 GETs",
        "one renewal, measured alone (5 renewals",
        "link.renew",
        "fixed per download",
        "extrapolation: T = 1,000 testers x S = 400 GB",
        "service requests   = T x (3 + n x 1)",
        "storage GETs",
        "storage bytes",
        "service bytes / storage bytes",
    ):
        assert figure in out, f"{figure!r} is missing from:\n{out}"

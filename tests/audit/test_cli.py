"""`exchange audit` and its exit codes against a real `exchange serve` process.

The export runs as a separate process, the way an auditor runs it; the other commands run
in-process through click's runner (no event loop is running in these tests), which is the
same code at a fraction of the start-up cost.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import rfc8785
from click.testing import CliRunner, Result

from exchange.cli import main
from tests.conftest import Served


def _cli(served: Served, *args: str, identity: Path | None = None) -> Result:
    prefix = ["--server", served.url] + (["--identity", str(identity)] if identity else [])
    return CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)


def _wait_for_checkpoint(served: Served, *, above: int = 0) -> int:
    deadline = time.monotonic() + 15
    while True:
        got = _cli(served, "--json", "audit", "checkpoint", identity=served.admin)
        if got.exit_code == 0 and json.loads(got.stdout)["size"] > above:
            return int(json.loads(got.stdout)["size"])
        assert time.monotonic() < deadline, got.output
        time.sleep(0.2)


def test_query_export_verify_and_tamper(served: Served) -> None:
    admin, state = served.admin, served.home / "audit-state"
    vkey = _cli(served, "audit", "vkey")
    assert vkey.exit_code == 0 and vkey.stdout.startswith("exchange.local/audit+")
    vkey_text = vkey.stdout.strip()
    size = _wait_for_checkpoint(served)

    # A query prints only what it verified, so it needs the log's key: none pinned, none given.
    unkeyed = _cli(served, "audit", "query", "--state", str(state), identity=admin)
    assert unkeyed.exit_code == 2 and "--vkey" in unkeyed.stderr and not unkeyed.stdout
    pinned = ("--state", str(state), "--vkey", vkey_text)
    table = _cli(served, "audit", "query", *pinned, "--action", "principal.bootstrap", identity=admin)
    assert table.exit_code == 0, table.output
    assert "principal.bootstrap" in table.stdout and "cannot prove completeness" in table.stderr
    rows = _cli(
        served,
        "audit",
        "query",
        *pinned,
        "--outcome",
        "allowed",
        "--since",
        "1h",
        "--format",
        "jsonl",
        "--proofs",
        identity=admin,
    )
    assert rows.exit_code == 0, rows.output
    first = json.loads(rows.stdout.splitlines()[0])
    assert first["event"]["action"] == "principal.bootstrap" and first["proof"] is not None
    csv = _cli(served, "audit", "query", *pinned, "--format", "csv", identity=admin)
    assert csv.stdout.startswith("idx,time_ms,action,outcome")
    assert _cli(served, "audit", "query", *pinned, "--since", "yesterday", identity=admin).exit_code == 2

    bundle = served.home / "bundle-1"
    export = served.run("audit", "export", "--out", str(bundle), "--state", str(state), identity=admin)
    assert export.returncode == 0, export.stderr
    assert sorted(p.name for p in bundle.iterdir()) == [
        "checkpoint",
        "consistency.json",
        "entries.jsonl",
        "events.csv",
        "log.vkey",
        "manifest.json",
    ]
    # No key pinned and none given: usage error, never the bundle's own log.vkey.
    unpinned = _cli(served, "audit", "verify", "--bundle", str(bundle), "--state", str(state))
    assert unpinned.exit_code == 2 and "--vkey" in unpinned.stderr
    ok = _cli(
        served,
        "--json",
        "audit",
        "verify",
        "--bundle",
        str(bundle),
        "--state",
        str(state),
        "--vkey",
        vkey_text,
    )
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["verdict"] == "ok" and report["size"] >= size and report["previous_size"] is None

    # Online: export and verify in one go; it must extend the saved checkpoint.
    _wait_for_checkpoint(served, above=report["size"])
    online = _cli(served, "--json", "audit", "verify", "--state", str(state), identity=admin)
    assert online.exit_code == 0, online.output
    assert json.loads(online.stdout)["previous_size"] == report["size"]

    # Behind the service's back: change the first event in the database.
    with sqlite3.connect(served.home / "exchange.db") as conn:
        (leaf,) = conn.execute("SELECT leaf FROM audit_events WHERE idx = 0").fetchone()
        forged = rfc8785.dumps(json.loads(leaf) | {"action": "principal.nothing"})
        conn.execute("UPDATE audit_events SET leaf = ? WHERE idx = 0", (forged,))
    try:
        tampered = served.home / "bundle-2"
        assert (
            _cli(
                served, "audit", "export", "--out", str(tampered), "--state", str(state), identity=admin
            ).exit_code
            == 0
        )
        verdict = _cli(served, "--json", "audit", "verify", "--bundle", str(tampered), "--state", str(state))
        assert verdict.exit_code == 14, verdict.output
        assert json.loads(verdict.stdout) | {"detail": ""} == {
            "verdict": "root",
            "detail": "",
            "exit_code": 14,
        }
        human = _cli(served, "audit", "verify", "--bundle", str(tampered), "--state", str(state))
        assert human.exit_code == 14 and "verify failed (root)" in human.stderr
    finally:
        with sqlite3.connect(served.home / "exchange.db") as conn:
            conn.execute("UPDATE audit_events SET leaf = ? WHERE idx = 0", (leaf,))


def test_verify_help_lists_the_exit_codes() -> None:
    helped = CliRunner().invoke(main, ["audit", "verify", "--help"])
    assert helped.exit_code == 0
    for code in (
        "10  bundle",
        "11  signature",
        "12  quorum",
        "13  entries",
        "14  root",
        "15  fork",
        "16  proof",
    ):
        assert code in helped.stdout

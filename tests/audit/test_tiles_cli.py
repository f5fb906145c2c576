"""`exchange audit verify --tiles` and `exchange audit monitor` against a real `exchange serve`
process, in-process through click's runner (as tests/audit/test_cli.py does)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from exchange import auditverify
from exchange.cli import main
from exchange.cli.audit import _monitor_line
from tests.audit.test_cli import _cli, _wait_for_checkpoint
from tests.conftest import Served


def test_verify_tiles_and_monitor_alerts(served: Served) -> None:
    admin, state = served.admin, served.home / "tiles-state"
    vkey = _cli(served, "audit", "vkey").stdout.strip()
    size = _wait_for_checkpoint(served)
    pinned = ("--state", str(state), "--vkey", vkey)

    first = _cli(served, "--json", "audit", "verify", "--tiles", *pinned, identity=admin)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["verdict"] == "ok" and report["size"] >= size and report["previous_size"] is None

    # The bundle read is recorded, so the log grows: the next round sees new events.
    _wait_for_checkpoint(served, above=report["size"])
    once = _cli(served, "audit", "monitor", "--once", *pinned, identity=admin)
    assert once.exit_code == 0, once.output
    assert f"size {report['size']} -> " in once.stdout and "audit.export" in once.stdout

    saved = auditverify.State.load(state)
    assert saved is not None and saved.size is not None and saved.root is not None
    # The state claims another root for its size: whatever the log signs next is a fork.
    saved.root = bytes(32)
    saved.save(state)
    forked = _cli(served, "audit", "monitor", "--once", *pinned, identity=admin)
    assert forked.exit_code == 15, forked.output
    assert "ALERT" in forked.stderr and "(fork)" in forked.stderr
    # The state remembers a larger log than the one now signed: a rollback.
    saved.size, saved.root = 10**9, bytes(32)
    saved.save(state)
    rolled = _cli(served, "--json", "audit", "monitor", "--once", *pinned, identity=admin)
    assert rolled.exit_code == 17, rolled.output
    assert json.loads(rolled.stdout)["verdict"] == "rollback"

    both = _cli(served, "audit", "verify", "--tiles", "--bundle", str(served.home), *pinned, identity=admin)
    assert both.exit_code == 2


def test_monitor_help_lists_its_alerts() -> None:
    helped = CliRunner().invoke(main, ["audit", "monitor", "--help"])
    assert helped.exit_code == 0
    for code in ("15  fork", "17  rollback", "18  gap", "--interval", "--once"):
        assert code in helped.output
    assert auditverify.EXIT_CODES["rollback"] == 17 and auditverify.EXIT_CODES["gap"] == 18


def test_the_monitor_shows_what_the_watched_log_says_inert() -> None:
    """The monitor distrusts the log's operator: an action or origin carrying terminal escapes or
    line breaks is shown escaped, on one line."""
    report = auditverify.Report(
        origin="evil\x1b]0;pwned\x07.example/audit",
        size=12,
        root="",
        witnesses=[],
        previous_size=10,
        entries=2,
    )
    line = _monitor_line(report, {"link.session\x1b[2J": 1, "x\nALERT: none": 1})
    assert "\x1b" not in line and "\x07" not in line and "\n" not in line
    assert "\\x1b[2J" in line and "x\\x0aALERT" in line

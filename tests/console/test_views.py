"""What the console shows, against a real `exchange serve` and the real `exchange audit console`:
its state, filtered and paged events (each row's proof checked here again, independently),
an artifact's custody timeline, the charts, the exports, one event's tlog-proof, and the
refusal of bad input."""

from __future__ import annotations

import base64
import csv
import io
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from exchange import auditverify
from exchange.format import merkle
from tests.conftest import Served
from tests.console.conftest import (
    ConsoleProcess,
    Custody,
    log_vkey,
    seed_custody,
    start_console,
    unknown_link,
    wait_until_published,
)


@pytest.fixture(scope="module")
def seeded(served: Served, tmp_path_factory: pytest.TempPathFactory) -> tuple[Custody, int]:
    """One artifact's custody, and the time (ms) just before it began."""
    started = int(time.time() * 1000) - 1
    custody = seed_custody(served, tmp_path_factory.mktemp("seed"), "cv")
    unknown_link(served, 3)
    wait_until_published(served)
    return custody, started


@pytest.fixture(scope="module")
def live(
    served: Served, auditor: Path, seeded: tuple[Custody, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleProcess]:
    """One console for the module, logged in."""
    process = start_console(served, auditor, tmp_path_factory.mktemp("c") / "state", vkey=log_vkey(served))
    process.login()
    yield process
    assert process.stop() == 0


def _leaves(served: Served, size: int) -> list[bytes]:
    """The log's first `size` leaves, straight from the database (what the console must match)."""
    with sqlite3.connect(served.home / "exchange.db") as db:
        rows = db.execute("SELECT leaf FROM audit_events WHERE idx < ? ORDER BY idx", (size,)).fetchall()
    return [bytes(r[0]) for r in rows]


def _independently_proven(page: dict[str, Any]) -> None:
    """Each row's proof leads to the page's root: checked here with the format code alone."""
    size, root = page["checkpoint"]["size"], base64.b64decode(page["checkpoint"]["root"])
    for item in page["items"]:
        assert item["verified"] is True and json.loads(item["leaf"]) == item["event"]
        proof = [base64.b64decode(h) for h in item["proof"]]
        merkle.verify_inclusion(merkle.leaf_hash(item["leaf"].encode()), item["idx"], size, proof, root)


def test_state_is_green_and_saved(live: ConsoleProcess, served: Served, tmp_path: Path) -> None:
    first = live.api("/api/state")
    assert first["ok"] is True and first["failure"] is None
    assert first["server"] == served.url and first["auditor"] == {"name": "audrey", "org": "aisi"}
    checkpoint = first["checkpoint"]
    assert checkpoint["origin"] == "exchange.local/audit" and checkpoint["size"] == first["verified_size"]
    assert checkpoint["note"].startswith("exchange.local/audit\n" + str(checkpoint["size"]) + "\n")
    assert first["previous_size"] is None and checkpoint["witnesses"] == []
    leaves = _leaves(served, checkpoint["size"])
    assert base64.b64decode(checkpoint["root"]) == merkle.root([merkle.leaf_hash(leaf) for leaf in leaves])
    wait_until_published(served)
    second = live.api("/api/state")
    assert second["ok"] is True and second["previous_size"] == first["verified_size"]
    assert (
        second["verified_size"] >= first["verified_size"]
        and second["verified_at_ms"] >= first["verified_at_ms"]
    )
    saved = auditverify.State.load(Path(str(live.proc.args[live.proc.args.index("--state") + 1])))
    assert saved is not None and saved.size == second["verified_size"]


def _page(live: ConsoleProcess, **params: Any) -> dict[str, Any]:
    page = live.api("/api/events?" + urlencode(params))
    _independently_proven(page)
    return page


def _matching(served: Served, size: int, keep: Any) -> list[int]:
    return [e["idx"] for e in map(json.loads, _leaves(served, size)) if keep(e)]


def test_each_filter_returns_exactly_the_matching_rows(
    live: ConsoleProcess, served: Served, seeded: tuple[Custody, int]
) -> None:
    custody, started = seeded
    tess = custody.names["tester"]
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"actor": tess}, lambda e: e["actor"].get("name") == tess or e["actor"].get("id") == tess),
        ({"org": custody.names["testers"]}, lambda e: e["actor"].get("org") == custody.names["testers"]),
        ({"action": "artifact.download"}, lambda e: e["action"] == "artifact.download"),
        ({"resource": "link"}, lambda e: (e.get("resource") or {}).get("type") == "link"),
        (
            {"resource": f"artifact:{custody.artifact}"},
            lambda e: (
                (e.get("resource") or {}).get("type") == "artifact"
                and e["resource"].get("id") == custody.artifact
            ),
        ),
        ({"outcome": "denied"}, lambda e: e["outcome"]["result"] == "denied"),
        ({"since": started}, lambda e: e["time_ms"] >= started),
        ({"until": started}, lambda e: e["time_ms"] < started),
        (
            {"since": started, "action": "artifact.download", "actor": tess},
            lambda e: e["time_ms"] >= started and e["action"] == "artifact.download",
        ),
    ]
    for params, keep in cases:
        page = _page(live, limit=500, **params)
        size = page["checkpoint"]["size"]
        got = [item["idx"] for item in page["items"]]
        assert got == _matching(served, size, keep), params
        assert got, params  # every case matches something
        assert page["next_cursor"] is None


def test_paging_covers_every_row_once(live: ConsoleProcess, seeded: tuple[Custody, int]) -> None:
    _, started = seeded
    whole = _page(live, since=started, limit=500)
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"since": started, "limit": 3} | ({"cursor": cursor} if cursor else {})
        page = _page(live, **params)
        assert len(page["items"]) <= 3
        seen += [item["idx"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages > 2
    # Pinned to the first page's checkpoint: later events (these queries' own) are not in it.
    assert seen == [item["idx"] for item in whole["items"]][: len(seen)] and len(seen) == len(set(seen))
    assert set(seen) >= {i["idx"] for i in whole["items"] if i["idx"] < page["checkpoint"]["size"]}


def test_timeline_tells_the_custody_in_order(live: ConsoleProcess, seeded: tuple[Custody, int]) -> None:
    custody, _ = seeded
    got = live.api(f"/api/artifacts/{custody.artifact}/timeline")
    assert got["artifact"] == {
        "id": custody.artifact,
        "name": custody.artifact_name,
        "org": custody.names["lab"],
    }
    events = got["events"]
    idxs = [e["idx"] for e in events]
    assert idxs == sorted(set(idxs))
    actions = [e["action"] for e in events]

    def first(action: str) -> int:
        return actions.index(action)

    story = [
        "artifact.create",
        "artifact.grant",
        "artifact.download",
        "link.create",
        "link.session",
        "link.revoke",
        "artifact.revoke",
        "finding.submit",
        "finding.move",
    ]
    assert [first(a) for a in story] == sorted(first(a) for a in story), actions
    assert actions.count("artifact.download") == 2 and actions.count("artifact.grant") == 2, actions
    # Every download ends with the tester's signed receipt: two by grant, one through the link.
    assert actions.count("artifact.receipt") == 3, actions
    assert actions.index("link.session") < len(actions) - 1 - actions[::-1].index("artifact.receipt")
    kinds = {e["action"]: e["kind"] for e in events}
    assert kinds["artifact.create"] == "upload" and kinds["artifact.grant"] == "grant"
    assert kinds["link.create"] == "link" and kinds["link.session"] == "redemption"
    assert kinds["artifact.receipt"] == "receipt" and kinds["link.revoke"] == "revocation"
    assert kinds["artifact.revoke"] == "revocation" and kinds["finding.move"] == "finding"
    for e in events:
        assert isinstance(e["summary"], str) and e["summary"] and e["event"]["idx"] == e["idx"]
    assert any(custody.finding_title in e["summary"] for e in events)
    missing = live.get("/api/artifacts/art_nothing_here/timeline")
    assert missing.status == 404 and missing.headers.get_content_type() == "application/problem+json"


def test_charts_count_what_was_done(live: ConsoleProcess, seeded: tuple[Custody, int]) -> None:
    custody, started = seeded
    charts = live.api(f"/api/charts?since={started}")
    downloads = charts["downloads"]
    assert charts["bucket_ms"] > 0 and downloads["buckets"][0] <= started
    testers = {t["name"]: t for t in downloads["testers"]}
    tess = testers[custody.names["tester"]]
    # Two downloads with the grant, one through the link (a link session counts one download);
    # no event carries bytes moved, so each counts the artifact's size.
    assert sum(tess["downloads"]) == 3 and sum(tess["bytes"]) == 3 * custody.size
    assert len(tess["downloads"]) == len(downloads["buckets"]) == len(tess["bytes"])
    assert custody.names["other"] not in testers
    refusals = {r["reason"]: r["count"] for r in charts["refusals"]}
    assert refusals.get("link-unknown") == 3, refusals
    assert charts["findings"] == {"by_severity": {"high": 1}, "by_status": {"acknowledged": 1}}
    before = live.api(f"/api/charts?until={started}")
    assert custody.names["tester"] not in {t["name"] for t in before["downloads"]["testers"]}


def test_exports_equal_the_query(live: ConsoleProcess, served: Served, seeded: tuple[Custody, int]) -> None:
    custody, _ = seeded
    query = {"resource": f"artifact:{custody.artifact}"}
    page = _page(live, limit=500, **query)
    jsonl = live.get("/api/export?" + urlencode(query | {"format": "jsonl"}))
    assert jsonl.status == 200
    assert jsonl.headers["Content-Disposition"] == 'attachment; filename="exchange-events.jsonl"'
    rows = [json.loads(line) for line in jsonl.body.decode().splitlines()]
    assert [(r["idx"], r["event"], r["proof"]) for r in rows] == [
        (i["idx"], i["event"], i["proof"]) for i in page["items"]
    ]
    assert all(r["checkpoint_size"] >= page["checkpoint"]["size"] for r in rows)
    csv_reply = live.get("/api/export?" + urlencode(query | {"format": "csv"}))
    assert csv_reply.status == 200
    assert csv_reply.headers["Content-Disposition"] == 'attachment; filename="exchange-events.csv"'
    table = list(csv.DictReader(io.StringIO(csv_reply.body.decode())))
    assert [(int(r["idx"]), r["action"]) for r in table] == [
        (i["idx"], i["event"]["action"]) for i in page["items"]
    ]
    # The same as `exchange audit query --format csv` prints.
    cli = served.run(
        "audit",
        "query",
        "--state",
        str(served.home / "cli-state"),
        "--vkey",
        log_vkey(served),
        "--resource",
        f"artifact:{custody.artifact}",
        "--format",
        "csv",
        identity=served.admin,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.replace("\r\n", "\n") == csv_reply.body.decode().replace("\r\n", "\n")


def test_proof_file_is_accepted_by_check_proof(
    live: ConsoleProcess, served: Served, seeded: tuple[Custody, int], tmp_path: Path
) -> None:
    custody, _ = seeded
    (item,) = _page(live, action="finding.move", actor=custody.names["dev"])["items"]
    reply = live.get(f"/api/proof/{item['idx']}")
    assert reply.status == 200 and reply.headers.get_content_type() == "text/plain"
    assert reply.headers["Content-Disposition"] == f'attachment; filename="event-{item["idx"]}.tlog-proof"'
    proof = tmp_path / "event.tlog-proof"
    proof.write_bytes(reply.body)
    checked = served.run("--json", "audit", "check-proof", str(proof), "--vkey", log_vkey(served))
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["event"]["idx"] == item["idx"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/events?outcome=maybe",
        "/api/events?limit=0",
        "/api/events?limit=501",
        "/api/events?limit=ten",
        "/api/events?since=yesterday",
        "/api/events?since=-5",
        "/api/events?since=20&until=10",
        "/api/events?resource=ARTIFACT%3Ax",
        "/api/events?resource=",
        "/api/events?actor=",
        "/api/events?actor=a%0Ab",
        "/api/events?cursor=abc",
        "/api/events?colour=blue",
        "/api/events?action=a&action=b",
        "/api/events?size=3",
        "/api/export?format=xml",
        "/api/export",
        "/api/export?format=csv&cursor=1.2",
        "/api/charts?since=now",
        "/api/charts?actor=tess",
        "/api/state?x=1",
        "/api/proof/abc",
        "/api/proof/-1",
        "/api/artifacts/a%2Fb/timeline",
        "/api/artifacts/..%2F..%2Fx/timeline",
    ],
)
def test_bad_input_is_a_problem(live: ConsoleProcess, served: Served, path: str) -> None:
    with sqlite3.connect(served.home / "exchange.db") as db:
        before = db.execute("SELECT COUNT(*) FROM audit_events WHERE action = 'audit.query'").fetchone()[0]
    reply = live.get(path)
    assert reply.status in (400, 404), (path, reply.status, reply.body)
    assert reply.headers.get_content_type() == "application/problem+json"
    body = reply.json()
    assert {"type", "title", "status", "detail"} <= body.keys() and body["status"] == reply.status
    if reply.status == 400:
        with sqlite3.connect(served.home / "exchange.db") as db:
            after = db.execute("SELECT COUNT(*) FROM audit_events WHERE action = 'audit.query'").fetchone()[0]
        assert after == before, "a refused filter reached the service"
    assert live.api("/api/state")["ok"] is True


def test_no_secret_in_the_console_log(live: ConsoleProcess) -> None:
    assert live.key not in live.log.read_text()
    assert live.cookie is not None and live.cookie not in live.log.read_text()


HOSTILE = [
    "<script>alert(1)</script>",
    "\"'; rm -rf ~ #",
    "$(touch /tmp/pwned)",
    "evil\u202etxt.exe",
    "two\nlines\x1b[31m red",
]


@pytest.mark.parametrize("n", range(len(HOSTILE)))
def test_hostile_names_come_back_exactly_as_text(
    live: ConsoleProcess, served: Served, tmp_path: Path, n: int
) -> None:
    """What an uploader or a tester typed reaches the page as JSON strings, byte for byte (the
    page inserts them as text); the summary line carries them as they are, never interpreted here."""
    title = HOSTILE[n]
    # An artifact's name is a path: no separator, no control character (the service refuses them).
    name = "".join(c for c in title if c != "/" and ord(c) >= 0x20)
    custody = seed_custody(served, tmp_path, f"ch{n}", artifact_name=name, finding_title=title, size=100)
    wait_until_published(served)
    reply = live.get(f"/api/artifacts/{custody.artifact}/timeline")
    assert reply.status == 200 and reply.headers.get_content_type() == "application/json"
    got = reply.json()
    assert got["artifact"]["name"] == name
    summaries = [e["summary"] for e in got["events"]]
    assert any(name in s for s in summaries) and any(s.endswith(title) for s in summaries)
    page = _page(live, action="finding.submit", actor=custody.names["tester"])
    assert [item["event"]["details"]["title"] for item in page["items"]] == [title]
    assert not Path("/tmp/pwned").exists()


def test_a_fork_from_the_saved_checkpoint_turns_the_state_red(
    served: Served, auditor: Path, seeded: tuple[Custody, int], tmp_path: Path
) -> None:
    """The auditor's state remembers another root for its size: whatever the log signs next
    does not extend it. /api/state says `fork`, keeps both checkpoints as evidence, and stays red."""
    state = tmp_path / "state"
    green = start_console(served, auditor, state, vkey=log_vkey(served))
    green.login()
    assert green.api("/api/state")["ok"] is True
    assert green.stop() == 0
    saved = auditverify.State.load(state)
    assert saved is not None
    saved.root = bytes(32)
    saved.save(state)
    wait_until_published(served)
    red = start_console(served, auditor, state)
    try:
        red.login()
        got = red.api("/api/state")
        assert got["ok"] is False and got["failure"]["class"] == "fork" and got["failure"]["idx"] is None
        assert list((state / "evidence").iterdir())
        assert red.api("/api/state")["failure"] == got["failure"]
        assert auditverify.State.load(state) == saved  # the saved state is left as it was
    finally:
        assert red.stop() == 0

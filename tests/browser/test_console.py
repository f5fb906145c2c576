"""The auditors' console page in Debian's Chromium, against the real `exchange audit console`
process and a real `exchange serve` (the `served` stack, seeded through the real CLI).

What a person sees: the verification banner (green, then red after a forgery), the events
table with its filters, pages, proofs and exports, an artifact's custody timeline, and the
charts; every hostile string shown as text; no CSP violation and no script error on the way.
The last test forges an event, which spoils this module's `served` stack: keep it last.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import ConsoleMessage, Dialog, Locator, Page

from exchange.format import merkle
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import parse_note
from exchange.format.tlogproof import HEADER, TlogProof
from tests.browser.conftest import screenshot
from tests.conftest import Served
from tests.console.conftest import (
    ConsoleProcess,
    Custody,
    auditor,
    console,
    forge_leaf,
    seed_custody,
    unknown_link,
    wait_until_published,
)

__all__ = ["auditor", "console"]  # the fixtures, imported for pytest

#: Hostile spellings: an artifact's name may hold neither "/" nor control characters (it is a
#: path in the manifest), a finding's title may.
NAME = "<img src=x onerror=alert(1)> \"'; rm -rf ~ # $(touch pwned) evil\u202etxt.exe"
TITLE = "<script>alert(1)</script> \u202eRole-play\njailbreak \x1b[31m red"
#: What the page does with characters that are invisible or reorder text (console.js HIDDEN_CHARS).
HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\xad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def visible(text: str) -> str:
    """`text` as the page shows it: hidden characters spelt ⟨U+XXXX⟩."""
    return HIDDEN.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", text)


@pytest.fixture(scope="module")
def seeded(served: Served, auditor: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Custody, int]:
    """One artifact's whole custody under a hostile name, three refusals, all published; and
    the size of the checkpoint that covers them. (The auditor first: `Served.enrol` makes an
    organisation only when its name is not already inside the listing, and "aisi" is inside
    "bc-aisi".)"""
    custody = seed_custody(
        served, tmp_path_factory.mktemp("seed"), "bc", artifact_name=NAME, finding_title=TITLE, size=54_321
    )
    unknown_link(served, 3)
    return custody, wait_until_published(served)


@dataclass
class Console:
    """The console page, logged in, and what the browser said on the way."""

    page: Page
    process: ConsoleProcess
    messages: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def api(self, path: str) -> Any:
        """Ask the console's API from the page (its session cookie), as the page does."""
        return self.page.evaluate(
            """async (path) => {
                 const r = await fetch(path);
                 return {status: r.status, body: await r.json()};
               }""",
            path,
        )

    def loads(self, section: str) -> int:
        return int(self.page.locator(f"#{section}").get_attribute("data-loads") or 0)

    def wait_loaded(self, section: str, after: int) -> None:
        """Wait until `section` has drawn an answer newer than load number `after`."""
        self.page.wait_for_function(
            "([id, n]) => { const s = document.getElementById(id);"
            " return Number(s.dataset.loads || 0) > n && s.getAttribute('aria-busy') === 'false'; }",
            arg=[section, after],
        )

    def apply(self, **filters: str) -> None:
        """Fill the filter form (others emptied) and apply it; return once the table is drawn."""
        form = self.page.locator("#filters")
        for name in ("actor", "org", "action", "resource", "since", "until"):
            form.locator(f"[name={name}]").fill(filters.pop(name, ""))
        form.locator("[name=outcome]").select_option(filters.pop("outcome", ""))
        form.locator("[name=limit]").select_option(filters.pop("limit", "50"))
        assert not filters, filters
        before = self.loads("events")
        form.get_by_role("button", name="Apply").click()
        self.wait_loaded("events", before)

    def rows(self) -> Locator:
        return self.page.locator("#events-body tr.event")

    def row_idxs(self) -> list[int]:
        return [int(i) for i in self.rows().evaluate_all("rows => rows.map(r => r.dataset.idx)")]

    def column(self, name: str) -> list[str]:
        return self.page.locator(f"#events-body tr.event td.{name}").all_text_contents()

    def assert_quiet(self) -> None:
        """No script error, no CSP violation, no failed load, no dialog (no hostile script ran)."""
        assert self.messages == [] and self.dialogs == []


@pytest.fixture
def ui(page: Page, console: ConsoleProcess, seeded: tuple[Custody, int]) -> Iterator[Console]:
    """The console opened as its owner opens it: the printed address, its one-time key."""
    ui = Console(page, console)

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            ui.messages.append(f"{msg.type}: {msg.text}")

    def on_dialog(dialog: Dialog) -> None:
        ui.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("console", on_console)
    page.on("pageerror", lambda exc: ui.messages.append(f"pageerror: {exc}"))
    page.on("dialog", on_dialog)
    page.goto(console.url)
    for section in ("state", "events", "charts"):
        ui.wait_loaded(section, 0)
    yield ui


def test_opens_on_a_green_verified_state(ui: Console, seeded: tuple[Custody, int]) -> None:
    _, published = seeded
    page = ui.page
    # The one-time key was spent and left the address bar: the page is at "/".
    assert page.url == ui.process.base + "/"
    banner = page.locator("#state")
    assert banner.get_attribute("class") == "banner banner-ok"
    assert "Verified" in banner.locator("#state-summary").inner_text()
    state = ui.api("/api/state")
    assert state["status"] == 200 and state["body"]["ok"] is True
    # The checkpoint the console verified on opening: at least the seeded one, at most the
    # latest (the console's own queries are logged too, so the log keeps growing).
    size = int(page.locator("#state-size").inner_text())
    assert published <= size <= state["body"]["checkpoint"]["size"]
    root = page.locator("#state-root")
    whole = root.get_attribute("title")
    assert whole is not None and len(whole) == 44 and root.inner_text() == whole[:16] + "…"
    assert int(page.locator("#state-verified-size").inner_text()) == size
    assert "audrey (aisi)" in page.locator("#who").inner_text()
    # The key is spent: a second visit with it is refused.
    second = page.context.new_page()
    refused = second.goto(ui.process.url)
    assert refused is not None and refused.status == 401
    second.close()
    ui.assert_quiet()
    screenshot(page, "console-state")


def test_filters_and_pages_show_exactly_the_matching_rows(ui: Console, seeded: tuple[Custody, int]) -> None:
    custody, _ = seeded
    tess = custody.names["tester"]
    ui.apply(actor=tess)
    expected = ui.api("/api/events?" + urlencode({"actor": tess, "limit": 500}))["body"]["items"]
    assert len(expected) > 5
    assert ui.row_idxs() == [item["idx"] for item in expected]
    assert set(ui.column("actor")) == {tess}

    ui.apply(actor=tess, action="artifact.receipt")
    # Three receipts: two downloads with the grant, one through the link.
    assert len(ui.rows().all()) == 3 and set(ui.column("action")) == {"artifact.receipt"}
    assert ui.row_idxs() == [i["idx"] for i in expected if i["event"]["action"] == "artifact.receipt"]

    # Since / until: the form's UTC times, sent as milliseconds (and carried to the exports).
    (submitted,) = [i for i in expected if i["event"]["action"] == "finding.submit"]
    second = submitted["event"]["time_ms"] // 1000 * 1000
    utc = datetime.fromtimestamp(second / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    ui.apply(actor=tess, action="finding.submit", since=utc)
    assert ui.row_idxs() == [submitted["idx"]]
    href = ui.page.locator("#export-csv").get_attribute("href") or ""
    assert f"since={second}" in href.split("?")[1].split("&")
    before_it = datetime.fromtimestamp(second / 1000 - 1, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    ui.apply(actor=tess, action="finding.submit", until=before_it)
    assert ui.rows().count() == 0
    assert ui.page.locator("#events-body td.empty").inner_text() == "No event matches."

    ui.apply(action="artifact.grant", outcome="allowed")
    grants = ui.api("/api/events?action=artifact.grant&outcome=allowed")["body"]["items"]
    assert ui.row_idxs() == [i["idx"] for i in grants] and len(grants) == 2

    # Pages of ten: Next walks the whole artifact once, Previous comes back to the same rows.
    resource = f"artifact:{custody.artifact}"
    whole = [
        i["idx"]
        for i in ui.api("/api/events?" + urlencode({"resource": resource, "limit": 500}))["body"]["items"]
    ]
    assert len(whole) > 10
    ui.apply(resource=resource, limit="10")
    page = ui.page
    assert page.locator("#prev").is_disabled()
    first = ui.row_idxs()
    seen, last = list(first), 0
    while page.locator("#next").is_enabled():
        before = ui.loads("events")
        page.locator("#next").click()
        ui.wait_loaded("events", before)
        seen += ui.row_idxs()
        last += 1
    assert seen == whole and last >= 1
    before = ui.loads("events")
    page.locator("#prev").click()
    ui.wait_loaded("events", before)
    assert ui.row_idxs() == whole[10 * (last - 1) : 10 * last]
    while page.locator("#prev").is_enabled():
        before = ui.loads("events")
        page.locator("#prev").click()
        ui.wait_loaded("events", before)
    assert ui.row_idxs() == first
    ui.assert_quiet()


def test_a_row_opens_on_its_exact_leaf_and_proof(ui: Console, seeded: tuple[Custody, int]) -> None:
    custody, _ = seeded
    page = ui.page
    ui.apply(actor=custody.names["tester"], action="finding.submit")
    answer = ui.api(
        "/api/events?" + urlencode({"actor": custody.names["tester"], "action": "finding.submit"})
    )["body"]
    (item,) = answer["items"]
    assert ui.row_idxs() == [item["idx"]]
    row = ui.rows().first
    row.get_by_role("button", name="Proof").click()
    detail = page.locator("#events-body tr.detail").first
    assert detail.is_visible()
    # The exact leaf (its hidden characters marked), the hashes, and where they lead.
    assert detail.locator("pre.leaf").text_content() == visible(item["leaf"])
    assert "<script>alert(1)</script>" in (detail.locator("pre.leaf").text_content() or "")
    head = detail.locator(".proof-head").inner_text()
    assert head.startswith("✔ verified"), head
    leads_to = re.search(r"checkpoint of size (\d+)", head)
    assert leads_to is not None and int(leads_to.group(1)) > item["idx"]
    assert f"checkpoint size {leads_to.group(1)}" in page.locator("#page-info").inner_text()
    root = detail.locator(".proof-head code").get_attribute("title") or ""
    assert len(root) == 44
    # The hashes shown lead from this leaf to the root shown, at the size shown (checked here
    # independently; the log may have grown since, so a later API answer may be another proof).
    merkle.verify_inclusion(
        merkle.leaf_hash(item["leaf"].encode()),
        item["idx"],
        int(leads_to.group(1)),
        [base64.b64decode(h) for h in detail.locator("ol.hashes li").all_text_contents()],
        base64.b64decode(root),
    )
    if int(leads_to.group(1)) == answer["checkpoint"]["size"]:  # the same checkpoint: the same proof
        assert detail.locator("ol.hashes li").all_text_contents() == item["proof"]
    # The title shows as text: no element was made from it.
    assert page.locator("#events-body script, #events-body img").count() == 0
    screenshot(page, "console-events")

    link = detail.get_by_role("link", name="Download proof")
    assert link.get_attribute("href") == f"/api/proof/{item['idx']}"
    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == f"event-{item['idx']}.tlog-proof"
    raw = Path(download.path()).read_bytes()
    assert raw.startswith(HEADER.encode() + b"\n") and HEADER == "c2sp.org/tlog-proof@v1"
    # It carries this very leaf, and its proof leads to the root of the checkpoint it holds.
    proof = TlogProof.parse(raw)
    assert proof.index == item["idx"] and proof.extra == item["leaf"].encode()
    checkpoint = Checkpoint.parse(parse_note(proof.checkpoint).text)
    merkle.verify_inclusion(
        merkle.leaf_hash(item["leaf"].encode()),
        proof.index,
        checkpoint.size,
        proof.proof,
        checkpoint.root_hash,
    )
    row.get_by_role("button", name="Hide").click()
    assert not detail.is_visible()
    ui.assert_quiet()


def test_an_artifact_link_opens_its_custody_timeline(ui: Console, seeded: tuple[Custody, int]) -> None:
    custody, _ = seeded
    page = ui.page
    ui.apply(action="artifact.create", actor=custody.names["dev"])
    assert page.locator("#timeline").is_hidden()
    before = ui.loads("timeline")
    page.locator("#events-body a.artifact-link").first.click()
    ui.wait_loaded("timeline", before)
    assert page.url.endswith(f"#artifact={custody.artifact}")
    timeline = ui.api(f"/api/artifacts/{custody.artifact}/timeline")["body"]
    entries = page.locator("#timeline-list li.entry")
    assert [int(i) for i in entries.evaluate_all("es => es.map(e => e.dataset.idx)")] == [
        e["idx"] for e in timeline["events"]
    ]
    kinds = entries.evaluate_all("es => es.map(e => e.dataset.kind)")
    assert kinds == [e["kind"] for e in timeline["events"]]
    # The custody as it was done, oldest first: the upload, the grant, the link, its redemption
    # and the receipt for it, the revocation, the finding and its move; each with its kind.
    actions = [e["action"] for e in timeline["events"]]
    story = [
        ("artifact.create", "upload"),
        ("artifact.grant", "grant"),
        ("link.create", "link"),
        ("link.session", "redemption"),
        ("artifact.receipt", "receipt"),
        ("link.revoke", "revocation"),
        ("finding.submit", "finding"),
        ("finding.move", "finding"),
    ]
    at = [actions.index(action) for action, _ in story[:4]]
    at += [actions.index("artifact.receipt", at[-1]), *(actions.index(action) for action, _ in story[5:])]
    assert at == sorted(at), list(zip(actions, kinds, strict=True))
    assert [kinds[i] for i in at] == [kind for _, kind in story]
    assert entries.locator(".summary").all_text_contents() == [
        visible(e["summary"]) for e in timeline["events"]
    ]
    times = entries.locator("time").all_text_contents()
    assert times == sorted(times)
    # The hostile name, literally: as text, hidden characters marked, nothing made of it.
    assert page.locator("#timeline-name").text_content() == visible(NAME)
    assert "⟨U+202E⟩" in visible(NAME) and "<img src=x onerror=alert(1)>" in visible(NAME)
    assert page.locator("#timeline img, #timeline script").count() == 0
    assert any(visible(TITLE) in s for s in entries.locator(".summary").all_text_contents())
    screenshot(page, "console-timeline")
    # The address can be shared, and Back closes the timeline.
    page.go_back()
    page.wait_for_function("() => document.getElementById('timeline').hidden")
    assert page.url == ui.process.base + "/"
    page.go_forward()
    page.wait_for_function("() => !document.getElementById('timeline').hidden")
    ui.assert_quiet()


def test_charts_draw_the_numbers_of_what_was_done(ui: Console, seeded: tuple[Custody, int]) -> None:
    custody, _ = seeded
    page = ui.page
    charts = ui.api("/api/charts")["body"]
    got = page.evaluate(
        """() => Object.fromEntries(["downloads", "bytes", "refusals", "severity", "status"].map((name) => {
             const canvas = document.getElementById("chart-" + name);
             const chart = Chart.getChart(canvas);
             const blank = document.createElement("canvas");
             blank.width = canvas.width;
             blank.height = canvas.height;
             return [name, {
               type: chart.config.type,
               labels: chart.data.labels,
               datasets: chart.data.datasets.map((d) => ({tester: d.tester ?? null, data: d.data})),
               drawn: canvas.width > 0 && canvas.height > 0 && canvas.toDataURL() !== blank.toDataURL(),
             }];
           }))"""
    )
    assert all(chart["drawn"] for chart in got.values()), got
    testers = charts["downloads"]["testers"]
    assert got["downloads"]["datasets"] == [{"tester": t["name"], "data": t["downloads"]} for t in testers]
    assert got["bytes"]["datasets"] == [{"tester": t["name"], "data": t["bytes"]} for t in testers]
    assert len(got["downloads"]["labels"]) == len(charts["downloads"]["buckets"])
    tess = next(d for d in got["downloads"]["datasets"] if d["tester"] == custody.names["tester"])
    assert sum(tess["data"]) == 3
    tess_bytes = next(d for d in got["bytes"]["datasets"] if d["tester"] == custody.names["tester"])
    assert sum(tess_bytes["data"]) == 3 * custody.size
    refusals = dict(zip(got["refusals"]["labels"], got["refusals"]["datasets"][0]["data"], strict=True))
    assert refusals == {r["reason"]: r["count"] for r in charts["refusals"]}
    assert refusals["link-unknown"] == 3
    assert dict(zip(got["severity"]["labels"], got["severity"]["datasets"][0]["data"], strict=True)) == {
        "high": 1
    }
    assert dict(zip(got["status"]["labels"], got["status"]["datasets"][0]["data"], strict=True)) == {
        "acknowledged": 1
    }
    assert (got["downloads"]["type"], got["status"]["type"]) == ("line", "doughnut")
    page.locator("#charts").scroll_into_view_if_needed()
    screenshot(page, "console-charts")
    ui.assert_quiet()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_links_download_the_tables_rows(ui: Console, seeded: tuple[Custody, int], fmt: str) -> None:
    custody, _ = seeded
    page = ui.page
    resource = f"artifact:{custody.artifact}"
    ui.apply(resource=resource, limit="500")
    table = ui.row_idxs()
    actions = ui.column("action")
    assert len(table) > 10
    link = page.locator(f"#export-{fmt}")
    assert link.get_attribute("href") == "/api/export?" + urlencode({"resource": resource, "format": fmt})
    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == f"exchange-events.{fmt}"
    body = Path(download.path()).read_text()
    if fmt == "jsonl":
        rows = [json.loads(line) for line in body.splitlines()]
        assert [r["idx"] for r in rows] == table
        assert [r["event"]["action"] for r in rows] == actions
        assert all(r["proof"] is not None for r in rows)
    else:
        rows = list(csv.DictReader(io.StringIO(body)))
        assert [int(r["idx"]) for r in rows] == table
        assert [r["action"] for r in rows] == actions
    ui.assert_quiet()


def test_a_forged_event_turns_the_banner_red(
    ui: Console, served: Served, seeded: tuple[Custody, int]
) -> None:
    """Last in the module: the forgery spoils this `served` stack."""
    custody, _ = seeded
    page = ui.page
    (item,) = ui.api(
        "/api/events?" + urlencode({"actor": custody.names["tester"], "action": "finding.submit"})
    )["body"]["items"]
    assert page.locator("#state").get_attribute("class") == "banner banner-ok"

    forge_leaf(served, item["idx"], details=item["event"]["details"] | {"severity": "low"})

    # Asking for the forged row is refused (409): the page says why and the banner turns red at once.
    ui.apply(action="finding.submit")
    page.wait_for_selector("#state.banner-fail")
    error = page.locator("#error")
    assert (
        error.is_visible()
        and "[proof]" in error.inner_text()
        and f"(entry {item['idx']})" in error.inner_text()
    )
    assert ui.rows().count() == 0
    banner = page.locator("#state")
    assert banner.get_attribute("class") == "banner banner-fail"
    assert banner.locator(".failure-class").inner_text() == "proof"
    assert "Verification failed" in banner.inner_text() and str(item["idx"]) in banner.inner_text()
    # Figures built on rows that no longer verify are taken down, not left standing.
    page.wait_for_selector("#charts-info .unverified")
    assert page.evaluate("() => Chart.getChart(document.getElementById('chart-downloads')) === undefined")
    # Sticky: a reload (any later poll) stays red.
    page.reload()
    for section in ("state", "events"):
        ui.wait_loaded(section, 0)
    assert page.locator("#state").get_attribute("class") == "banner banner-fail"
    assert page.locator("#state .failure-class").inner_text() == "proof"
    screenshot(page, "console-tampered")
    # The only complaints are the refused loads themselves (409), never a script error.
    assert ui.dialogs == []
    assert ui.messages and all("409" in m for m in ui.messages), ui.messages
    assert not any(m.startswith("pageerror") for m in ui.messages)

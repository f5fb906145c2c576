"""Refusals in the console's charts include what a flood's summary counted (`http.refusals`
events carry the suppressed count), on a stack that summarises every second after two alone."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.dev.seaweed import SeaweedFS
from tests.conftest import Served, serve_process
from tests.console.conftest import log_vkey, start_console, unknown_link, wait_until_published


@pytest.fixture(scope="module")
def served(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve_process(
        seaweed,
        tmp_path_factory,
        EXCHANGE_REFUSAL_LOG_WINDOW_S="1",
        EXCHANGE_REFUSAL_LOG_ALLOWANCE_EVENTS="2",
    )


def _counted(served: Served) -> tuple[int, int]:
    """(refusals logged alone, refusals only counted in summaries) of unknown links, from the database."""
    with sqlite3.connect(served.home / "exchange.db") as db:
        rows = db.execute("SELECT action, leaf FROM audit_events WHERE reason = 'link-unknown'").fetchall()
    alone = sum(1 for action, _ in rows if action != "http.refusals")
    summed = sum(
        json.loads(bytes(leaf))["details"]["suppressed"] for action, leaf in rows if action == "http.refusals"
    )
    return alone, summed


def test_flood_summaries_count(served: Served, auditor: Path, tmp_path: Path) -> None:
    started = int(time.time() * 1000) - 1
    unknown_link(served, 9)
    while sum(_counted(served)) < 9:  # the window ends, then its summary is appended
        time.sleep(0.2)
    wait_until_published(served)
    alone, summed = _counted(served)
    assert alone + summed == 9 and 2 <= alone < 9  # some stood alone, the rest were only counted
    console = start_console(served, auditor, tmp_path / "state", vkey=log_vkey(served))
    try:
        console.login()
        charts = console.api(f"/api/charts?since={started}")
        assert {r["reason"]: r["count"] for r in charts["refusals"]}["link-unknown"] == 9
    finally:
        assert console.stop() == 0

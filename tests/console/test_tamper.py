"""A forged event behind the service's back: the console refuses the rows, turns red, and stays
red (a module of its own: the forgery spoils its `served` stack for anything after it)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Served
from tests.console.conftest import forge_leaf, log_vkey, seed_custody, start_console, wait_until_published


def test_a_forged_event_turns_the_console_red_for_good(served: Served, auditor: Path, tmp_path: Path) -> None:
    custody = seed_custody(served, tmp_path, "ct")
    wait_until_published(served)
    console = start_console(served, auditor, tmp_path / "state", vkey=log_vkey(served))
    try:
        console.login()
        assert console.api("/api/state")["ok"] is True
        (submitted,) = console.api("/api/events?action=finding.submit")["items"]
        idx = submitted["idx"]
        assert console.api(f"/api/artifacts/{custody.artifact}/timeline")["events"]

        forge_leaf(served, idx, details=submitted["event"]["details"] | {"severity": "low"})

        # A range without the forged event still verifies, and the state is still green.
        assert console.api("/api/events?action=principal.bootstrap")["items"]
        assert console.api("/api/state")["ok"] is True

        refused = console.get("/api/events?action=finding.submit")
        assert refused.status == 409 and refused.headers.get_content_type() == "application/problem+json"
        problem = refused.json()
        assert (problem["class"], problem["idx"], problem["status"]) == ("proof", idx, 409)
        assert f"event {idx} is not in the checkpoint" in problem["detail"]

        red = console.api("/api/state")
        assert red["ok"] is False
        failure = red["failure"]
        assert (failure["class"], failure["idx"]) == ("proof", idx) and failure["at_ms"] > 0

        # Every view that reads the forged row refuses it too.
        for path in (
            f"/api/artifacts/{custody.artifact}/timeline",
            "/api/export?format=jsonl&action=finding.submit",
            "/api/export?format=csv",
            f"/api/proof/{idx}",
            "/api/charts",
        ):
            reply = console.get(path)
            assert reply.status == 409, (path, reply.status, reply.body[:300])
            assert reply.json()["class"] == "proof", path
        # Sticky: rows that verify are still served, but the state stays red with the first failure.
        assert console.api("/api/events?action=principal.bootstrap")["items"]
        assert console.api("/api/state")["failure"] == failure
    finally:
        assert console.stop() == 0

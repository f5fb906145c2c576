"""Offboarding and membership as an admin runs them: `exchange principals disable/enable` and
`exchange org members`, through the real CLI against `exchange serve`.

Disabling takes effect on the next request (the status is read from the shared database on
each one), kills the links issued to the principal and blocks new grants to it, keeps all it
did, and is undone exactly by enabling; each change is an audit event with its reason, and a
disabled principal's attempt is a refusal that names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.artifacts.conftest import write
from tests.conftest import Served


def _events(served: Served, auditor: Path, action: str, outcome: str) -> list[dict[str, Any]]:
    out = served.run(
        "--json",
        "audit",
        "query",
        "--action",
        action,
        "--outcome",
        outcome,
        "--format",
        "jsonl",
        identity=auditor,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["event"] for line in out.stdout.splitlines()]


def test_disable_and_enable_a_tester(served: Served, tmp_path: Path) -> None:
    dev, tess, audrey = tmp_path / "dev.json", tmp_path / "tess.json", tmp_path / "audrey.json"
    served.enrol("developer", "off-lab", "off-dev", dev)
    served.enrol("tester", "off-aisi", "off-tess", tess)
    served.enrol("auditor", "off-aisi", "off-audrey", audrey)
    # The auditor pins the log key first, so its later queries verify each row.
    vkey = served.run("audit", "vkey", identity=audrey).stdout.strip()
    pinned = served.run("audit", "verify", "--vkey", vkey, identity=audrey)
    assert pinned.returncode == 0, pinned.stderr

    data = write(tmp_path / "src" / "weights.bin", 50_000, seed=4)
    up = served.run("upload", str(tmp_path / "src" / "weights.bin"), "--to", "off-tess", identity=dev)
    assert up.returncode == 0, up.stderr
    artifact = up.stdout.strip()
    made = served.run("link", "create", artifact, "--for", "off-tess", identity=dev)
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()

    members = served.run("org", "members", "off-aisi", identity=served.admin)
    assert members.returncode == 0, members.stderr
    header, *rows = members.stdout.splitlines()
    assert header.split() == ["NAME", "ROLE", "ORG", "STATUS", "KEY", "ID"]
    assert sorted(r.split()[:4] for r in rows) == [
        ["off-audrey", "auditor", "off-aisi", "active"],
        ["off-tess", "tester", "off-aisi", "active"],
    ]

    # Only an admin may; an unknown name is 5; an admin cannot lock itself out.
    assert served.run("principals", "disable", "off-tess", identity=dev).returncode == 4
    assert served.run("principals", "disable", "nobody-here", identity=served.admin).returncode == 5
    self_off = served.run("principals", "disable", "admin", identity=served.admin)
    assert self_off.returncode == 6 and ("disable-self" in self_off.stderr or "last" in self_off.stderr), (
        self_off.stderr
    )

    off = served.run(
        "--json", "principals", "disable", "off-tess", "--reason", "contract ended", identity=served.admin
    )
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout)["status"] == "disabled"
    again = served.run("principals", "disable", "off-tess", identity=served.admin)
    assert again.returncode == 6 and "principal-already-disabled" in again.stderr, again.stderr

    # Refused at once: its own signatures, the link issued to it, a new grant to it.
    who = served.run("whoami", identity=tess)
    assert who.returncode == 4 and "principal-disabled" in who.stderr, who.stderr
    dead = served.run("download", url, "-o", str(tmp_path / "dead"), identity=tess, server=False)
    assert dead.returncode == 5 and "link-unavailable" in dead.stderr, dead.stderr
    assert not (tmp_path / "dead" / "weights.bin").exists()
    regrant = served.run("grant", artifact, "off-tess", identity=dev)
    assert regrant.returncode != 0, regrant.stdout
    listed = json.loads(served.run("--json", "principals", "ls", "--org", "off-aisi", identity=audrey).stdout)
    assert {p["name"]: p["status"] for p in listed} == {"off-audrey": "active", "off-tess": "disabled"}

    on = served.run("principals", "enable", "off-tess", "--reason", "renewed", identity=served.admin)
    assert on.returncode == 0 and "enabled off-tess" in on.stdout, on.stderr
    assert served.run("whoami", identity=tess).returncode == 0
    down = served.run("download", url, "-o", str(tmp_path / "back"), identity=tess, server=False)
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "back" / "weights.bin").read_bytes() == data

    (disabled,) = _events(served, audrey, "principal.disable", "allowed")
    (enabled,) = _events(served, audrey, "principal.enable", "allowed")
    assert disabled["details"] | {} == {
        "name": "off-tess",
        "org": "off-aisi",
        "role": "tester",
        "reason": "contract ended",
    }
    assert disabled["actor"]["name"] == "admin" and enabled["details"]["reason"] == "renewed"
    assert disabled["idx"] < enabled["idx"]
    refusals = [
        e
        for e in _events(served, audrey, "whoami", "denied")
        if e["outcome"].get("reason") == "principal-disabled"
    ]
    assert [e["actor"].get("name") for e in refusals] == ["off-tess"]
    # The refused attempts to disable are in the log too, each with its reason.
    reasons = sorted(e["outcome"]["reason"] for e in _events(served, audrey, "principal.disable", "denied"))
    assert reasons == ["disable-self", "not-found", "principal-already-disabled", "role-required"], reasons

    # The human table: one column each, aligned under its header whatever the widths.
    shown = served.run("audit", "query", "--action", "principal.disable", identity=audrey)
    assert shown.returncode == 0, shown.stderr
    header, *lines = shown.stdout.splitlines()
    names = ["IDX", "TIME (UTC)", "ACTION", "OUTCOME", "ACTOR", "ORG", "RESOURCE"]
    starts = [header.index(n) for n in names]
    assert starts == sorted(starts) and len(lines) == 5
    for line in lines:
        for start in starts[1:]:
            assert line[start - 2 : start] == "  " and line[start] != " ", (line, start)
    cells = [line[starts[3] : starts[4]].strip() for line in lines]
    assert sorted(cells) == sorted(["allowed"] + [f"denied: {r}" for r in reasons])
    assert all(line[starts[4] : starts[5]].strip() in {"admin", "off-dev"} for line in lines)

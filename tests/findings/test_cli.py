"""Findings as people run them: separate processes against `exchange serve`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tests.artifacts.conftest import write
from tests.conftest import Served
from tests.links.test_cli import enrol


def test_finding_round_trip(served: Served, tmp_path: Path) -> None:
    for org in ("f-lab", "f-aisi"):
        assert served.run("org", "create", org, identity=served.admin).returncode == 0
    dev = enrol(served, tmp_path, "f-dev", "developer", "f-lab")
    tester = enrol(served, tmp_path, "f-tester", "tester", "f-aisi")
    write(tmp_path / "model.bin", 20_000, seed=1)
    up = served.run("upload", str(tmp_path / "model.bin"), "--to", "f-tester", identity=dev)
    assert up.returncode == 0, up.stderr
    artifact_id = up.stdout.strip()

    body = tmp_path / "report.md"
    body.write_text("# Jailbreak\n\nRole-play prompt defeats the refusal.\n\x1b[31mred\x1b[0m\n")
    attachment = tmp_path / "transcript.txt"
    write(attachment, 30_000, seed=2)
    bad = served.run(
        "finding",
        "submit",
        artifact_id,
        "--title",
        "t",
        "--severity",
        "urgent",
        "--body",
        str(body),
        identity=tester,
    )
    assert bad.returncode == 2 and "critical" in bad.stderr
    made = served.run(
        "finding",
        "submit",
        artifact_id,
        "--title",
        "Role-play jailbreak",
        "--severity",
        "high",
        "--category",
        "safeguard bypass",
        "--body",
        str(body),
        "--attach",
        str(attachment),
        identity=tester,
    )
    assert made.returncode == 0, made.stderr
    finding_id = made.stdout.strip()
    assert finding_id.startswith("fnd_")

    listed = served.run("--json", "finding", "ls", "--severity", "high", identity=dev)
    assert [f["id"] for f in json.loads(listed.stdout)] == [finding_id]
    assert json.loads(served.run("--json", "finding", "ls", "--status", "closed", identity=dev).stdout) == []

    moved = served.run("finding", "status", finding_id, "acknowledged", "--note", "Reproduced.", identity=dev)
    assert moved.returncode == 0, moved.stderr
    skipped = served.run("finding", "status", finding_id, "remediated", identity=dev)
    assert skipped.returncode == 6 and "validated" in skipped.stderr
    not_theirs = served.run("finding", "status", finding_id, "validated", identity=tester)
    assert not_theirs.returncode == 6

    shown = served.run("finding", "show", finding_id, identity=tester)
    assert shown.returncode == 0, shown.stderr
    assert "Role-play prompt defeats the refusal." in shown.stdout
    assert "submitted -> acknowledged  by f-dev: Reproduced." in shown.stdout
    assert "\x1b" not in shown.stdout  # the reporter's escape codes are shown, not obeyed

    out = tmp_path / "out"
    fetched = served.run("finding", "fetch", finding_id, "-o", str(out), identity=dev)
    assert fetched.returncode == 0, fetched.stderr
    assert (out / finding_id / "transcript.txt").read_bytes() == attachment.read_bytes()
    assert (out / finding_id / "body.md").read_bytes() == body.read_bytes()

    exported = served.run("finding", "export", "--format", "csv", identity=dev)
    assert exported.returncode == 0, exported.stderr
    (row,) = csv.DictReader(io.StringIO(exported.stdout))
    assert (row["id"], row["status"], row["severity"]) == (finding_id, "acknowledged", "high")
    assert row["body"].startswith("# Jailbreak")

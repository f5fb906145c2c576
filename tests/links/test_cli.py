"""Grants and links as a person runs them: separate processes against `exchange serve`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.artifacts.conftest import write
from tests.conftest import Served


def enrol(served: Served, tmp_path: Path, name: str, role: str, org: str) -> Path:
    invite = served.run("--json", "invite", "--role", role, "--org", org, identity=served.admin)
    assert invite.returncode == 0, invite.stderr
    identity = tmp_path / f"{name}.json"
    enrolled = served.run("enroll", json.loads(invite.stdout)["code"], "--name", name, identity=identity)
    assert enrolled.returncode == 0, enrolled.stderr
    return identity


def test_upload_to_link_download_revoke(served: Served, tmp_path: Path) -> None:
    for org in ("link-lab", "link-aisi"):
        assert served.run("org", "create", org, identity=served.admin).returncode == 0
    dev = enrol(served, tmp_path, "link-dev", "developer", "link-lab")
    tester = enrol(served, tmp_path, "link-tester", "tester", "link-aisi")
    data = write(tmp_path / "src" / "eval.bin", 90_000, seed=3)

    up = served.run("upload", str(tmp_path / "src" / "eval.bin"), "--to", "link-tester", identity=dev)
    assert up.returncode == 0, up.stderr
    artifact_id = up.stdout.strip()

    bad = served.run("link", "create", artifact_id, "--for", "link-tester", "--expires", "soon", identity=dev)
    assert bad.returncode == 2 and "90s" in bad.stderr
    too_long = served.run(
        "link", "create", artifact_id, "--for", "link-tester", "--expires", "8d", identity=dev
    )
    assert too_long.returncode == 2, too_long.stderr
    made = served.run(
        "link",
        "create",
        artifact_id,
        "--for",
        "link-tester",
        "--expires",
        "24h",
        "--max-downloads",
        "1",
        identity=dev,
    )
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert url.startswith(served.url + "/l/exl1_")

    out = tmp_path / "out"
    down = served.run("--json", "download", url, "-o", str(out), identity=tester, server=False)
    assert down.returncode == 0, down.stderr
    assert (out / "eval.bin").read_bytes() == data
    assert json.loads(down.stdout)["receipt"]["recipient"] == "link-tester"
    used = served.run("download", url, "-o", str(tmp_path / "again"), identity=tester, server=False)
    assert used.returncode == 5 and "link-unavailable" in used.stderr

    listed = served.run("--json", "link", "ls", artifact_id, identity=dev)
    (link,) = json.loads(listed.stdout)
    assert (link["state"], link["downloads"]) == ("used", 1)
    assert served.run("link", "revoke", link["id"], identity=dev).returncode == 0
    assert served.run("link", "revoke", link["id"], identity=dev).returncode == 6

    revoked = served.run("revoke", artifact_id, "link-tester", identity=dev)
    assert revoked.returncode == 0, revoked.stderr
    assert served.run("revoke", artifact_id, "link-tester", identity=dev).returncode == 5
    regrant = served.run("grant", artifact_id, "link-tester", "--until", "30d", identity=dev)
    assert regrant.returncode == 0 and "until" in regrant.stdout

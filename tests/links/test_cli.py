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

    # The tester sees the artifact it was granted, but may not share it: a permission error (4),
    # not "no such artifact" (5).
    mine = served.run("link", "create", artifact_id, "--for", "link-tester", identity=tester)
    assert mine.returncode == 4 and "role-required" in mine.stderr, mine.stderr
    regrant_own = served.run("grant", artifact_id, "link-tester", identity=tester)
    assert regrant_own.returncode == 4, regrant_own.stderr

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

    listed_grants = served.run("--json", "grants", artifact_id, identity=dev)
    assert listed_grants.returncode == 0, listed_grants.stderr
    (g,) = json.loads(listed_grants.stdout)
    assert (g["principal"], g["revoked_at_ms"]) == ("link-tester", None)
    shown = served.run("grants", artifact_id, identity=dev)
    assert shown.stdout.startswith("link-tester\tgranted ") and "until" in shown.stdout


def test_upload_link_round_trip(served: Served, tmp_path: Path) -> None:
    for org in ("ul-lab", "ul-aisi"):
        assert served.run("org", "create", org, identity=served.admin).returncode == 0
    dev = enrol(served, tmp_path, "ul-dev", "developer", "ul-lab")
    tester = enrol(served, tmp_path, "ul-tester", "tester", "ul-aisi")
    bad_size = served.run("upload-link", "create", "--for", "ul-tester", "--max-size", "12XB", identity=dev)
    assert bad_size.returncode == 2 and "10GiB" in bad_size.stderr
    made = served.run(
        "upload-link",
        "create",
        "--for",
        "ul-tester",
        "--kind",
        "report",
        "--max-size",
        "1MiB",
        "--expires",
        "1h",
        "--note",
        "transcripts",
        identity=dev,
    )
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert url.startswith(served.url + "/u/exu1_")

    data = write(tmp_path / "src" / "transcript.txt", 5_000, seed=9)
    write(tmp_path / "big" / "too-big.bin", 2 * 1024 * 1024, seed=10)
    too_big = served.run(
        "upload", str(tmp_path / "big" / "too-big.bin"), "--link", url, identity=tester, server=False
    )
    assert too_big.returncode == 2 and "upload-too-large" in too_big.stderr
    up = served.run(
        "--json",
        "upload",
        str(tmp_path / "src" / "transcript.txt"),
        "--link",
        url,
        identity=tester,
        server=False,
    )
    assert up.returncode == 0, up.stderr
    artifact_id = json.loads(up.stdout)["id"]
    again = served.run(
        "upload", str(tmp_path / "src" / "transcript.txt"), "--link", url, identity=tester, server=False
    )
    assert again.returncode == 6 and "already used" in again.stderr
    stranger = served.run(
        "upload", str(tmp_path / "src" / "transcript.txt"), "--link", url, identity=dev, server=False
    )
    assert stranger.returncode == 5 and "link-unavailable" in stranger.stderr

    listed = served.run("--json", "upload-link", "ls", identity=dev)
    (link,) = json.loads(listed.stdout)
    assert (link["state"], link["artifact"], link["note"]) == ("used", artifact_id, "transcripts")
    human = served.run("upload-link", "ls", identity=dev)
    assert "used\tul-tester\treport\t<= 1.0 MiB" in human.stdout
    out = tmp_path / "out"
    down = served.run("download", artifact_id, "-o", str(out), identity=dev)
    assert down.returncode == 0, down.stderr
    assert (out / "transcript.txt").read_bytes() == data
    assert served.run("upload-link", "revoke", link["id"], identity=tester).returncode == 5
    assert served.run("upload-link", "revoke", link["id"], identity=dev).returncode == 0

"""The artifact commands as a person runs them: separate processes against `exchange serve`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.artifacts.conftest import write
from tests.conftest import Served


def test_upload_list_show_download(served: Served, tmp_path: Path) -> None:
    admin = served.admin
    assert served.run("org", "create", "cli-lab", identity=admin).returncode == 0
    invite = served.run("--json", "invite", "--role", "developer", "--org", "cli-lab", identity=admin)
    code = json.loads(invite.stdout)["code"]
    dev = tmp_path / "dev.json"
    assert served.run("enroll", code, "--name", "cli-dev", identity=dev).returncode == 0

    data = write(tmp_path / "src" / "weights" / "model.bin", 70_000)
    up = served.run("upload", str(tmp_path / "src" / "weights"), "--kind", "model-weights", identity=dev)
    assert up.returncode == 0, up.stderr
    artifact_id = up.stdout.strip()
    assert artifact_id.startswith("art_")
    assert up.stderr == ""  # stderr is not a terminal: no progress bar

    listed = served.run("--json", "artifacts", "ls", identity=dev)
    assert [(a["id"], a["status"], a["name"]) for a in json.loads(listed.stdout)] == [
        (artifact_id, "complete", "weights")
    ]
    shown = served.run("artifacts", "show", artifact_id, identity=dev)
    assert shown.returncode == 0 and "weights/model.bin" in shown.stdout and "model-weights" in shown.stdout

    out = tmp_path / "out"
    down = served.run("download", artifact_id, "-o", str(out), identity=dev)
    assert down.returncode == 0, down.stderr
    assert (out / "weights" / "model.bin").read_bytes() == data
    assert down.stdout.strip() == str(out / "weights")

    again = served.run("download", artifact_id, "-o", str(out), identity=dev)
    assert again.returncode == 2 and "not overwriting" in again.stderr
    missing = served.run("download", "art_nope", "-o", str(out), identity=dev)
    assert missing.returncode == 5
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "src")
    refused = served.run("upload", str(link), identity=dev)
    assert refused.returncode == 2 and "symbolic link" in refused.stderr

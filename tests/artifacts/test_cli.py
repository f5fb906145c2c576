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


def test_workers_flag(served: Served, tmp_path: Path) -> None:
    admin = served.admin
    assert served.run("org", "create", "cli-workers", identity=admin).returncode == 0
    invite = served.run("--json", "invite", "--role", "developer", "--org", "cli-workers", identity=admin)
    dev = tmp_path / "dev.json"
    enrolled = served.run("enroll", json.loads(invite.stdout)["code"], "--name", "w-dev", identity=dev)
    assert enrolled.returncode == 0
    data = write(tmp_path / "w.bin", 200_001)

    refused = served.run("upload", str(tmp_path / "w.bin"), "--workers", "0", identity=dev)
    assert refused.returncode == 2 and "--workers" in refused.stderr
    listed = served.run("--json", "artifacts", "ls", identity=dev)
    assert json.loads(listed.stdout) == []  # refused before anything was started

    up = served.run("upload", str(tmp_path / "w.bin"), "--workers", "1", identity=dev)
    assert up.returncode == 0, up.stderr
    out = tmp_path / "out"
    down = served.run("download", up.stdout.strip(), "-o", str(out), "--workers", "1", identity=dev)
    assert down.returncode == 0, down.stderr
    assert (out / "w.bin").read_bytes() == data
    assert served.run("download", "art_x", "--workers", "-3", identity=dev).returncode == 2

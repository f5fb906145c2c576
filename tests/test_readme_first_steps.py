"""README's "First steps" run as written: the block after `<!-- first-steps -->`, extracted and
run by bash, in an empty directory and an empty home, against a real `exchange serve`, with only
what README says to set: the two variables `scripts/run` prints (EXCHANGE_SERVER and
EXCHANGE_IDENTITY, the first admin) and the CLI on PATH."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import Served

README = Path(__file__).resolve().parent.parent / "README.md"


def first_steps() -> str:
    match = re.search(r"<!-- first-steps -->\n```sh\n(.*?)\n```", README.read_text(), re.DOTALL)
    assert match is not None, "README's first steps (after <!-- first-steps -->) are missing"
    return match.group(1)


def test_readme_first_steps_run_as_written(served: Served, tmp_path: Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    script = work / "first-steps.sh"
    script.write_text("set -euo pipefail\n" + first_steps() + "\n")
    env = served.client_env() | {
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "EXCHANGE_SERVER": served.url,
        "EXCHANGE_IDENTITY": str(served.admin),
    }
    ran = subprocess.run(
        ["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}"
    # What it says it did, it did: three profiles, the file received intact, a verified log whose
    # query of the artifact shows the upload, the grant, the link's session, the receipt.
    profiles = home / ".config" / "exchange" / "profiles"
    assert sorted(p.name for p in profiles.iterdir()) == ["audrey", "dana", "tess"]
    assert (work / "received" / "weights" / "model.bin").read_bytes() == (
        work / "weights" / "model.bin"
    ).read_bytes()
    assert "verified: " in ran.stdout and "\nfnd_" in ran.stdout  # the log verified; the finding's id
    rows = ran.stdout[ran.stdout.index("IDX") :].splitlines()[1:]
    actions = {line.split()[3] for line in rows if line.strip()}
    for action in (
        "artifact.create",
        "artifact.complete",
        "artifact.grant",
        "link.session",
        "artifact.receipt",
    ):
        assert action in actions, (action, sorted(actions))
    who = subprocess.run(
        [sys.executable, "-m", "exchange.cli", "--json", "--profile", "tess", "whoami"],
        env=env | {"EXCHANGE_IDENTITY": ""}
        if False
        else {k: v for k, v in env.items() if k != "EXCHANGE_IDENTITY"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(who.stdout)["role"] == "tester", who.stderr

"""The client install stands alone: `pip install exchange` (no extras) into a fresh virtual
environment gives a tester everything to download, decrypt and verify, and an auditor everything
to verify the log, and none of the server's packages; `exchange serve` there names the extra it
lacks.

The fresh environment is real (its own interpreter prefix, the project installed from this tree as
a wheel, its dependencies from the package index), and its CLI talks to a real `exchange serve`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.artifacts.conftest import write
from tests.conftest import Served
from tests.links.test_cli import enrol

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("boto3", "minio", "asyncpg", "jsonschema", "uvloop", "seaweedfs")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    venv = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # A copy of the tree without the developer's .venv and caches: what `pip install .` sees.
    install = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    yield venv


def run(
    venv: Path, served: Served, *args: str, identity: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [str(venv / "bin" / "exchange"), "--server", served.url]
    if identity is not None:
        cmd += ["--identity", str(identity)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "PYTHON", "VIRTUAL_ENV"))}
    env["HOME"] = str(served.home)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_the_client_install_has_no_server_packages(client_venv: Path) -> None:
    python = str(client_venv / "bin" / "python")
    for name in SERVER_ONLY:
        probe = subprocess.run([python, "-c", f"import {name}"], capture_output=True, text=True, check=False)
        assert probe.returncode != 0, f"{name} is importable in the client install"
    # Every client module imports there (a stray server import anywhere would fail here).
    modules = [
        "exchange.cli",
        "exchange.client.transfer",
        "exchange.client.links",
        "exchange.client.findings",
    ]
    modules += ["exchange.client.audit", "exchange.auditverify", "exchange.witness"]
    probe = subprocess.run(
        [python, "-c", "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]", *modules],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr


def test_serve_names_the_missing_extra(client_venv: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    env |= {"EXCHANGE_HOME": str(tmp_path), "EXCHANGE_S3_ENDPOINT": "http://127.0.0.1:9"}
    for command in (["serve"], ["--json", "init"]):
        answer = subprocess.run(
            [str(client_venv / "bin" / "exchange"), *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert answer.returncode == 2, answer.stderr
        assert "exchange[server]" in answer.stderr and "Traceback" not in answer.stderr
    assert json.loads(answer.stderr)["error"]["code"] == "server-extra-missing"


def test_a_tester_and_an_auditor_with_the_client_install(
    client_venv: Path, served: Served, tmp_path: Path
) -> None:
    for org in ("ci-lab", "ci-aisi"):
        assert served.run("org", "create", org, identity=served.admin).returncode == 0
    dev = enrol(served, tmp_path, "ci-dev", "developer", "ci-lab")
    data = write(tmp_path / "src" / "weights.bin", 300_000, seed=9)
    up = served.run("upload", str(tmp_path / "src" / "weights.bin"), "--to", "ci-tester", identity=dev)
    assert up.returncode != 0  # no such tester yet: refused, nothing uploaded
    # The tester enrols with the client install, on "another machine".
    invite = served.run("--json", "invite", "--role", "tester", "--org", "ci-aisi", identity=served.admin)
    tester = tmp_path / "tester.identity"
    enrolled = run(
        client_venv,
        served,
        "enroll",
        json.loads(invite.stdout)["code"],
        "--name",
        "ci-tester",
        identity=tester,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    up = served.run("upload", str(tmp_path / "src" / "weights.bin"), "--to", "ci-tester", identity=dev)
    assert up.returncode == 0, up.stderr
    made = served.run(
        "link", "create", up.stdout.strip(), "--for", "ci-tester", "--max-downloads", "1", identity=dev
    )
    assert made.returncode == 0, made.stderr

    out = tmp_path / "out"
    down = run(
        client_venv, served, "--json", "download", made.stdout.strip(), "-o", str(out), identity=tester
    )
    assert down.returncode == 0, down.stderr
    assert (out / "weights.bin").read_bytes() == data  # decrypted, size and SHA-256 verified
    assert json.loads(down.stdout)["receipt"]["recipient"] == "ci-tester"

    # An auditor verifies the whole log with the client install alone.
    invite = served.run("--json", "invite", "--role", "auditor", "--org", "ci-aisi", identity=served.admin)
    auditor = tmp_path / "auditor.identity"
    enrolled = run(
        client_venv,
        served,
        "enroll",
        json.loads(invite.stdout)["code"],
        "--name",
        "ci-auditor",
        identity=auditor,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    vkey = run(client_venv, served, "audit", "vkey", identity=auditor)
    assert vkey.returncode == 0, vkey.stderr
    state = tmp_path / "audit-state"
    verified = run(
        client_venv,
        served,
        "--json",
        "audit",
        "verify",
        "--vkey",
        vkey.stdout.strip(),
        "--state",
        str(state),
        identity=auditor,
    )
    assert verified.returncode == 0, verified.stderr

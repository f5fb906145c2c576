"""Named profiles (`--profile NAME`, EXCHANGE_PROFILE), as aws, rclone and gh have them: several
identities on one machine, each with its own identity file and audit state, through the real CLI
against `exchange serve`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import EXCHANGE, Served


def _run(served: Served, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXCHANGE, *args],
        capture_output=True,
        text=True,
        env=served.client_env() | env,
        timeout=60,
        check=False,
    )


def _invite(served: Served, role: str, org: str) -> str:
    if org not in {
        o["name"] for o in json.loads(served.run("--json", "org", "ls", identity=served.admin).stdout)
    }:
        served.run("org", "create", org, identity=served.admin)
    out = served.run("--json", "invite", "--role", role, "--org", org, identity=served.admin)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["code"])


def test_two_profiles_side_by_side(served: Served) -> None:
    home = Path(served.client_env()["HOME"])
    config = home / ".config" / "exchange"
    lab = _run(
        served,
        "--server",
        served.url,
        "--profile",
        "lab",
        "enroll",
        _invite(served, "developer", "prof-lab"),
        "--name",
        "prof-dev",
    )
    assert lab.returncode == 0, lab.stderr
    aisi = _run(
        served,
        "--server",
        served.url,
        "enroll",
        _invite(served, "auditor", "prof-aisi"),
        "--name",
        "prof-aud",
        EXCHANGE_PROFILE="aisi",
    )
    assert aisi.returncode == 0, aisi.stderr
    assert (config / "profiles" / "lab" / "identity.json").exists()
    assert (config / "profiles" / "aisi" / "identity.json").exists()
    assert oct(os.stat(config / "profiles" / "lab" / "identity.json").st_mode & 0o777) == "0o600"

    # Each profile remembers its server: no --server from here on.
    who_lab = _run(served, "--json", "--profile", "lab", "whoami")
    assert who_lab.returncode == 0, who_lab.stderr
    assert json.loads(who_lab.stdout)["name"] == "prof-dev"
    who_aisi = _run(served, "--json", "whoami", EXCHANGE_PROFILE="aisi")
    assert json.loads(who_aisi.stdout)["name"] == "prof-aud"
    # The flag wins over the environment, as for every other option.
    flag = _run(served, "--json", "--profile", "lab", "whoami", EXCHANGE_PROFILE="aisi")
    assert json.loads(flag.stdout)["name"] == "prof-dev"

    # Each profile's audit state is its own.
    vkey = _run(served, "--profile", "aisi", "audit", "vkey").stdout.strip()
    pinned = _run(served, "--profile", "aisi", "audit", "verify", "--vkey", vkey)
    assert pinned.returncode == 0, pinned.stderr
    assert (config / "profiles" / "aisi" / "audit-state").is_dir()
    assert (
        not (config / "audit-state").exists() and not (config / "profiles" / "lab" / "audit-state").exists()
    )

    listed = _run(served, "--json", "--profile", "aisi", "profiles")
    assert listed.returncode == 0, listed.stderr
    rows = {r["profile"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {None, "lab", "aisi"}
    assert (rows["aisi"]["current"], rows["lab"]["current"], rows[None]["exists"]) == (True, False, False)
    assert (rows["lab"]["principal"], rows["lab"]["server"]) == ("prof-dev", served.url)
    table = _run(served, "profiles", EXCHANGE_PROFILE="lab").stdout.splitlines()
    assert table[0].split()[:3] == ["PROFILE", "PRINCIPAL", "SERVER"]
    assert any(line.startswith("*") and "lab" in line and "prof-dev" in line for line in table)


def test_bad_profile_use_is_a_usage_error(served: Served, tmp_path: Path) -> None:
    for bad in ("../etc", "a/b", ".hidden", "", "x" * 65):
        out = _run(served, "--profile", bad, "whoami")
        assert out.returncode == 2 and "profile name" in out.stderr, (bad, out.stderr)
    both = _run(served, "--profile", "lab", "--identity", str(tmp_path / "id.json"), "whoami")
    assert both.returncode == 2 and "give one" in both.stderr
    env_both = _run(served, "--profile", "lab", "whoami", EXCHANGE_IDENTITY=str(tmp_path / "id.json"))
    assert env_both.returncode == 2
    missing = _run(served, "--server", served.url, "--profile", "nobody", "whoami")
    assert missing.returncode != 0 and "profiles/nobody/identity.json" in missing.stderr, missing.stderr
    assert not (tmp_path / "id.json").exists()

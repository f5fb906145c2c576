"""The CLI end to end, as a person runs it: `exchange init`, `exchange serve`, and the client
commands as separate processes against the real service, with their exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import EXCHANGE, Served, free_port


def test_init_refuses_a_second_admin(served: Served) -> None:
    again = subprocess.run(
        [*EXCHANGE, "--identity", str(served.home / "other.identity"), "init"],
        env=served.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 6, again.stderr
    assert "already has principals" in again.stderr


def test_the_whole_enrolment_story(served: Served) -> None:
    admin = served.admin
    assert served.run("whoami", identity=admin).stdout.startswith("admin (admin, org operators)")
    assert served.run("org", "create", "lab", identity=admin).returncode == 0
    inv = served.run(
        "--json", "invite", "--role", "tester", "--org", "lab", "--expires", "1h", identity=admin
    )
    assert inv.returncode == 0, inv.stderr
    code = json.loads(inv.stdout)["code"]

    tester = served.home / "tester" / "identity.json"
    keygen = served.run("keygen", identity=tester, server=False)
    assert keygen.returncode == 0 and "age recipient:  age1" in keygen.stdout
    assert oct(tester.stat().st_mode & 0o777) == "0o600"
    assert served.run("keygen", identity=tester, server=False).returncode == 2  # refuses to overwrite

    enrolled = served.run("enroll", code, "--name", "alice", identity=tester)
    assert enrolled.returncode == 0, enrolled.stderr
    assert "enrolled alice as tester of lab" in enrolled.stdout
    # The identity file now remembers the server: no --server needed.
    me = served.run("--json", "whoami", identity=tester, server=False)
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout)["name"] == "alice"

    listed = served.run("--json", "principals", "ls", "--org", "lab", identity=tester)
    assert [p["name"] for p in json.loads(listed.stdout)] == ["alice"]
    secret = served.run("identity", "--age-secret", identity=tester, server=False)
    assert secret.stdout.splitlines()[-1].startswith("AGE-SECRET-KEY-1")
    # --out writes the same key file, private, and never over another file.
    key = served.home / "tester" / "key.txt"
    wrote = served.run("identity", "--age-secret", "--out", str(key), identity=tester, server=False)
    assert wrote.returncode == 0, wrote.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600" and key.read_text() == secret.stdout
    again = served.run("identity", "--age-secret", "--out", str(key), identity=tester, server=False)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    alone = served.run("identity", "--out", str(served.home / "k2.txt"), identity=tester, server=False)
    assert alone.returncode == 2 and not (served.home / "k2.txt").exists()
    auditor_invite = served.run("invite", "--role", "auditor", "--org", "lab", identity=admin)
    assert "one-time invite for an auditor of lab" in auditor_invite.stdout
    # The invite prints the whole command, server included: run as printed on "another machine"
    # (its own HOME, nothing set but PATH), with a name for NAME, it enrols.
    printed = auditor_invite.stdout.strip().splitlines()[-1].strip()
    assert printed.startswith("exchange --server ") and printed.endswith(" --name NAME")
    elsewhere = served.home / "elsewhere"
    elsewhere.mkdir()
    env = {"HOME": str(elsewhere), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", printed.replace("NAME", "audrey")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert "enrolled audrey as auditor of lab" in ran.stdout
    assert sorted(p.name for p in elsewhere.iterdir()) == [".config"]  # nothing else was made

    # Exit codes say what happened.
    denied = served.run("invite", "--role", "admin", "--org", "lab", identity=tester)
    assert denied.returncode == 4 and "role" in denied.stderr
    reused = served.run("enroll", code, "--name", "mallory", identity=served.home / "m.json")
    assert reused.returncode == 4 and "already been used" in reused.stderr
    assert served.run("org", "create", "lab", identity=admin).returncode == 6
    assert served.run("principals", "show", "nobody", identity=admin).returncode == 5
    stranger = served.home / "stranger.json"
    assert served.run("keygen", identity=stranger, server=False).returncode == 0
    unknown = served.run("whoami", identity=stranger)
    assert unknown.returncode == 3 and "unknown-key" in unknown.stderr


def test_usage_errors_exit_2(served: Served) -> None:
    bad = served.run("invite", "--role", "tester", "--org", "lab", "--expires", "soon", identity=served.admin)
    assert bad.returncode == 2 and "90s" in bad.stderr
    missing = served.run("whoami", identity=served.home / "absent.json")
    assert missing.returncode == 2 and "exchange keygen" in missing.stderr
    fresh = served.home / "fresh.json"
    assert served.run("keygen", identity=fresh, server=False).returncode == 0
    no_server = served.run("whoami", identity=fresh, server=False)
    assert no_server.returncode == 2 and "--server" in no_server.stderr


def test_unreachable_service_exits_7(served: Served) -> None:
    cmd = [
        *EXCHANGE,
        "--server",
        f"http://127.0.0.1:{free_port()}",
        "--identity",
        str(served.admin),
        "whoami",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=served.env, check=False)
    assert result.returncode == 7 and "cannot reach" in result.stderr


def test_json_errors_are_json(served: Served) -> None:
    result = served.run("--json", "principals", "show", "nobody", identity=served.admin)
    assert result.returncode == 5
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "not-found" and "nobody" in error["detail"]


def test_help_teaches(served: Served) -> None:
    text = served.run("--help", server=False).stdout
    for word in ("keygen", "enroll", "whoami", "Exit codes", "EXCHANGE_SERVER"):
        assert word in text
    assert "90s, 15m, 24h, 7d" in served.run("invite", "--help", server=False).stdout

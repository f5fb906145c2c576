"""One rule for which server a command talks to, signed or not: `--server` (or EXCHANGE_SERVER),
else the server remembered in the identity file at enrolment (issue 18). Run through the real
CLI against `exchange serve`."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Served


def test_unsigned_commands_use_the_remembered_server_too(served: Served, tmp_path: Path) -> None:
    ada = tmp_path / "ada.json"
    served.enrol("auditor", "operators", "ada", ada)

    # No --server: the signed and the unsigned command alike reach the server ada enrolled with.
    whoami = served.run("whoami", identity=ada, server=False)
    assert whoami.returncode == 0 and "ada" in whoami.stdout, whoami.stderr
    vkey = served.run("audit", "vkey", identity=ada, server=False)
    assert vkey.returncode == 0, vkey.stderr
    assert vkey.stdout.strip() == served.run("audit", "vkey").stdout.strip()  # same answer as --server

    # No server anywhere: a usage error that says where a server comes from; a signed command
    # first says it has no identity to sign with.
    nobody = tmp_path / "nobody.json"
    refused = served.run("audit", "vkey", identity=nobody, server=False)
    assert refused.returncode == 2 and "--server" in refused.stderr and "Traceback" not in refused.stderr
    unsigned = served.run("whoami", identity=nobody, server=False)
    assert unsigned.returncode == 2 and "no identity file" in unsigned.stderr

"""The auditors' console as people run it: `exchange audit console`, a process of its own, against
a real `exchange serve` (the `served` fixture), and what to put in the log for it to show.

* `start_console(served, identity, state_dir, vkey=...)` starts the command and reads the one
  line it prints (the address with its one-time key); `ConsoleProcess.login()` spends the key
  the way a browser does and keeps the session cookie; `.get(path)` / `.api(path)` then ask
  with it (raw HTTP through http.client, so tests choose the Host header, the method and the
  cookie); `.stop()` sends Ctrl-C (SIGINT) and returns the exit code.
* `console` (a fixture) is a fresh console per test for the auditor `audrey` (org `aisi`),
  not logged in: its `.url` is what the browser opens.
* `seed_custody(served, tmp_path, prefix)` does what the timeline and charts show: a
  developer uploads an artifact for a tester, grants a second tester, the tester downloads
  it twice, is sent a link and redeems it (a receipt), the link and the grant are revoked, the
  tester reports a finding and the developer moves it.
* `forge_leaf(served, idx, **changes)` rewrites one event behind the service's back (the leaf
  and the columns copied from it, as tests/audit/conftest.py `forge_event` does), so the
  service still serves it and only the auditor's proof check can tell.
"""

from __future__ import annotations

import http.client
import json
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import rfc8785

from exchange.services.audit import EVENT_COLUMNS, event_columns
from tests.conftest import EXCHANGE, Served

AUDITOR_NAME, AUDITOR_ORG = "audrey", "aisi"


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ConsoleProcess:
    proc: subprocess.Popen[str]
    url: str
    log: Path
    cookie: str | None = None
    port: int = field(init=False)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        assert parts.hostname == "127.0.0.1" and parts.path == "/" and parts.query.startswith("key=")
        self.port = int(parts.port or 0)
        self.key = parts.query.removeprefix("key=")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        cookie: str | None = None,
        host: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host if host is not None else f"127.0.0.1:{self.port}")
            if cookie is not None:
                conn.putheader("Cookie", f"exchange_console={cookie}")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def login(self) -> str:
        """Spend the one-time key as the browser does; keep and return the session cookie."""
        reply = self.request(f"/?key={self.key}")
        assert reply.status == 303 and reply.headers["Location"] == "/", reply
        morsel = reply.headers["Set-Cookie"]
        name, _, rest = morsel.partition("=")
        assert name == "exchange_console"
        self.cookie = rest.split(";", 1)[0]
        return self.cookie

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request(path, cookie=kwargs.pop("cookie", self.cookie), **kwargs)

    def api(self, path: str) -> Any:
        reply = self.get(path)
        assert reply.status == 200, (reply.status, reply.body[:2000])
        return reply.json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def log_vkey(served: Served) -> str:
    got = served.run("audit", "vkey")
    assert got.returncode == 0, got.stderr
    return got.stdout.strip()


def wait_for_checkpoint(served: Served, *, above: int = 0) -> int:
    """The size of the latest checkpoint once it is above `above` (the service publishes every second)."""
    while True:
        got = served.run("--json", "audit", "checkpoint", identity=served.admin)
        if got.returncode == 0 and json.loads(got.stdout)["size"] > above:
            return int(json.loads(got.stdout)["size"])
        time.sleep(0.2)


def log_size(served: Served) -> int:
    """How many events the log holds now (published or not), read from the database."""
    with sqlite3.connect(served.home / "exchange.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0])


def wait_until_published(served: Served) -> int:
    """Wait until a checkpoint covers every event appended so far; return its size."""
    return wait_for_checkpoint(served, above=log_size(served) - 1)


def start_console(
    served: Served,
    identity: Path,
    state: Path,
    *,
    vkey: str | None = None,
    args: tuple[str, ...] = (),
) -> ConsoleProcess:
    """`exchange audit console` for `identity`, as its own process; returns once it printed its address."""
    log = state.parent / f"{state.name}-console.log"
    state.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*EXCHANGE, "--server", served.url, "--identity", str(identity), "audit", "console"]
    cmd += ["--state", str(state), *(["--vkey", vkey] if vkey else []), *args]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=served.client_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the console prints its address, or exits
    if not line:
        proc.wait(timeout=60)
        proc.stdout.close()
        raise AssertionError(f"the console exited {proc.returncode}: {log.read_text()}")
    return ConsoleProcess(proc, line.strip(), log)


def enrol_once(served: Served, role: str, org: str, name: str) -> Path:
    """`name`'s identity file, enrolled as `role` of `org` the first time it is asked for. The
    organisation is made when no organisation has exactly that name (`Served.enrol` looks for
    the name inside the listing's text, which "aisi" is once "cv-aisi" exists)."""
    identity = served.home / f"{name}.identity"
    if identity.exists():
        return identity
    orgs = json.loads(_ok(served.run("--json", "org", "ls", identity=served.admin)))
    if org not in {o["name"] for o in orgs}:
        _ok(served.run("org", "create", org, identity=served.admin))
    invite = json.loads(
        _ok(served.run("--json", "invite", "--role", role, "--org", org, identity=served.admin))
    )
    _ok(served.run("enroll", invite["code"], "--name", name, identity=identity))
    return identity


@pytest.fixture(scope="module")
def auditor(served: Served) -> Path:
    """The identity file of `audrey`, an auditor of `aisi`."""
    return enrol_once(served, "auditor", AUDITOR_ORG, AUDITOR_NAME)


@pytest.fixture
def console(served: Served, auditor: Path, tmp_path: Path) -> Iterator[ConsoleProcess]:
    """A console for audrey with a fresh verify state (the log key pinned with --vkey), not
    logged in: `console.url` holds the one-time key."""
    process = start_console(served, auditor, tmp_path / "audit-state", vkey=log_vkey(served))
    yield process
    assert process.stop() == 0, process.log.read_text()


# -- what the console shows ------------------------------------------------------------------------


@dataclass
class Custody:
    dev: Path
    tester: Path
    other: Path
    names: dict[str, str]
    artifact: str
    artifact_name: str
    size: int
    link: str
    finding: str
    finding_title: str


def _ok(got: subprocess.CompletedProcess[str]) -> str:
    assert got.returncode == 0, got.stderr
    return got.stdout.strip()


def seed_custody(
    served: Served,
    tmp_path: Path,
    prefix: str,
    *,
    artifact_name: str | None = None,
    finding_title: str = "Role-play jailbreak",
    size: int = 12_345,
) -> Custody:
    """An artifact's whole custody, every step through the real CLI (see the module docstring).
    `prefix` keeps principal and org names apart between tests on one `served`."""
    names = {
        "dev": f"{prefix}-dev",
        "tester": f"{prefix}-tess",
        "other": f"{prefix}-ross",
        "lab": f"{prefix}-lab",
        "testers": f"{prefix}-aisi",
    }
    dev = enrol_once(served, "developer", names["lab"], names["dev"])
    tester = enrol_once(served, "tester", names["testers"], names["tester"])
    other = enrol_once(served, "tester", names["testers"], names["other"])
    src = tmp_path / f"{prefix}-src" / "weights.bin"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(bytes(i % 251 for i in range(size)))
    name = artifact_name if artifact_name is not None else f"{prefix}-weights"
    artifact = _ok(served.run("upload", str(src), "--name", name, "--to", names["tester"], identity=dev))
    _ok(served.run("grant", artifact, names["other"], identity=dev))
    for n in (1, 2):
        _ok(served.run("download", artifact, "-o", str(tmp_path / f"{prefix}-down{n}"), identity=tester))
    url = _ok(served.run("link", "create", artifact, "--for", names["tester"], identity=dev))
    _ok(served.run("download", url, "-o", str(tmp_path / f"{prefix}-vialink"), identity=tester, server=False))
    (link,) = json.loads(_ok(served.run("--json", "link", "ls", artifact, identity=dev)))
    _ok(served.run("link", "revoke", link["id"], identity=dev))
    _ok(served.run("revoke", artifact, names["other"], identity=dev))
    body = tmp_path / f"{prefix}-report.md"
    body.write_text("# Finding\n\nThe refusal gives way.\n")
    finding = _ok(
        served.run(
            "finding",
            "submit",
            artifact,
            "--title",
            finding_title,
            "--severity",
            "high",
            "--body",
            str(body),
            identity=tester,
        )
    )
    _ok(served.run("finding", "status", finding, "acknowledged", identity=dev))
    return Custody(dev, tester, other, names, artifact, name, size, link["id"], finding, finding_title)


def unknown_link(served: Served, n: int = 1) -> None:
    """Ask for a link that does not exist `n` times: refusals the log counts (`link-unknown`)."""
    for _ in range(n):
        try:
            urllib.request.urlopen(served.url + "/l/exl1_" + "A" * 43, timeout=30)  # noqa: S310 - loopback
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        else:
            raise AssertionError("an unknown link was served")


# -- tampering -----------------------------------------------------------------------------------


def forge_leaf(served: Served, idx: int, **changes: Any) -> bytes:
    """Rewrite event `idx` in the served stack's SQLite database, its columns alike (a careful
    forger: the service's own row check still passes, so it serves the forged row)."""
    with sqlite3.connect(served.home / "exchange.db", timeout=30) as db:
        (leaf,) = db.execute("SELECT leaf FROM audit_events WHERE idx = ?", (idx,)).fetchone()
        forged = bytes(rfc8785.dumps(json.loads(bytes(leaf)) | changes))
        values = event_columns(json.loads(forged))
        sets = ", ".join(f"{name} = ?" for name in EVENT_COLUMNS)
        done = db.execute(
            f"UPDATE audit_events SET leaf = ?, {sets} WHERE idx = ?",  # noqa: S608 - fixed column names
            (forged, *values, idx),
        )
        assert done.rowcount == 1
    return forged

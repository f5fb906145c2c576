"""Who may talk to the console: its one-time key, its cookie, its Host check, its methods, its
headers, its loopback address, and how the command starts and stops (a real process each)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from exchange.console.server import STATIC
from tests.conftest import EXCHANGE, Served
from tests.console.conftest import ConsoleProcess, log_vkey, start_console

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _secured(reply: object) -> None:
    headers = reply.headers  # type: ignore[attr-defined]
    for name, value in HEADERS.items():
        assert headers.get_all(name) == [value], (name, headers.get_all(name))


def test_the_key_works_once_and_the_cookie_is_needed(console: ConsoleProcess) -> None:
    assert console.url.startswith(f"http://127.0.0.1:{console.port}/?key=") and len(console.key) == 43
    replies = []
    nothing = console.request("/api/state")
    assert nothing.status == 401 and nothing.headers.get_content_type() == "application/problem+json"
    page = console.request("/")
    assert page.status == 401 and page.headers.get_content_type() == "text/html"
    assert b"Open the address the console printed" in page.body
    wrong = console.request("/?key=" + "A" * 43)
    assert wrong.status == 401
    replies += [nothing, page, wrong]

    first = console.request(f"/?key={console.key}")
    assert first.status == 303 and first.headers["Location"] == "/"
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith("exchange_console=")
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert attributes == {"httponly", "samesite=strict", "path=/"}
    session = cookie.split(";")[0].removeprefix("exchange_console=")
    assert len(session) == 43 and session != console.key
    second = console.request(f"/?key={console.key}")
    assert second.status == 401 and "Set-Cookie" not in second.headers
    replies += [first, second]

    ok = console.request("/api/state", cookie=session)
    assert ok.status == 200 and ok.json()["auditor"] == {"name": "audrey", "org": "aisi"}
    forged = console.request("/api/state", cookie=session[:-1] + ("A" if session[-1] != "A" else "B"))
    assert forged.status == 401
    keyed = console.request("/api/state", cookie=console.key)  # the key is not a session
    assert keyed.status == 401
    replies += [ok, forged, keyed]
    for reply in replies:
        _secured(reply)


def test_host_method_and_paths(console: ConsoleProcess) -> None:
    console.login()
    for host in (
        "evil.example",
        f"evil.example:{console.port}",
        "127.0.0.1",
        f"127.0.0.1:{console.port + 1}",
    ):
        misdirected = console.get("/api/state", host=host)
        assert misdirected.status == 421, host
        assert misdirected.json()["status"] == 421
        _secured(misdirected)
    assert console.get("/api/state", host=f"localhost:{console.port}").status == 200
    # The key too is refused with a foreign Host: a rebinding page cannot spend it.
    assert console.request(f"/?key={console.key}", host="evil.example").status == 421
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        refused = console.get("/api/state", method=method)
        assert refused.status == 405, method
        assert refused.headers["Allow"] == "GET, HEAD"
        _secured(refused)
    head = console.get("/api/state", method="HEAD")
    assert head.status == 200 and head.body == b""
    for path in (
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/",
        "/static/.hidden",
        "/api/nope",
    ):
        missing = console.get(path)
        assert missing.status == 404, path
        assert missing.headers.get_content_type() == "application/problem+json"
        _secured(missing)
    assert console.get("/static/../../data.py").status == 404


def test_page_and_static_files(console: ConsoleProcess) -> None:
    console.login()
    page = console.get("/")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.body == (STATIC / "index.html").read_bytes()
    _secured(page)
    served_files = [p for p in STATIC.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert served_files
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
    for path in served_files:
        reply = console.get("/static/" + path.relative_to(STATIC).as_posix())
        if path.suffix in types:
            assert reply.status == 200 and reply.body == path.read_bytes(), path
            assert reply.headers.get_content_type() == types[path.suffix]
            _secured(reply)


def test_binds_loopback_only(console: ConsoleProcess) -> None:
    listening = _listening_addresses(console.proc.pid)
    assert listening == {("127.0.0.1", console.port)}, listening
    for address in _local_addresses():  # not on another address of this machine
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((address, console.port)) != 0, address


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process `pid` listens on, from /proc (IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            host_hex, port_hex = local.split(":")
            assert len(host_hex) == width
            host = socket.inet_ntoa(bytes.fromhex(host_hex)[::-1]) if width == 8 else host_hex
            found.add((host, int(port_hex, 16)))
    return found


def _local_addresses() -> list[str]:
    """This machine's other IPv4 addresses."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout
    return [a for a in out.split() if "." in a and a != "127.0.0.1"]


def test_stop_port_in_use_and_no_key(served: Served, auditor: Path, tmp_path: Path) -> None:
    vkey = log_vkey(served)
    first = start_console(served, auditor, tmp_path / "a", vkey=vkey)
    busy = start_console_expecting_exit(served, auditor, tmp_path / "b", vkey, "--port", str(first.port))
    assert busy.returncode == 2 and f"127.0.0.1:{first.port}" in busy.stderr and busy.stdout == ""
    first.proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, and nothing more on stdout
    assert first.proc.stdout is not None and first.proc.stdout.read() == ""
    assert first.stop() == 0
    assert "stopped" in first.log.read_text() and first.key not in first.log.read_text()

    unpinned = start_console_expecting_exit(served, auditor, tmp_path / "c", None)
    assert unpinned.returncode == 2 and unpinned.stdout == ""
    assert "--vkey" in unpinned.stderr and "exchange audit verify --vkey KEY" in unpinned.stderr

    tester = served.home / "console-tester.identity"
    served.enrol("tester", "console-lab", "console-tester", tester)
    not_auditor = start_console_expecting_exit(served, tester, tmp_path / "d", vkey)
    assert not_auditor.returncode == 4 and "auditor" in not_auditor.stderr


def start_console_expecting_exit(
    served: Served, identity: Path, state: Path, vkey: str | None, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = [*EXCHANGE, "--server", served.url, "--identity", str(identity), "audit", "console"]
    cmd += ["--state", str(state), *(["--vkey", vkey] if vkey else []), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=served.client_env(), timeout=60, check=False
    )


def test_help_teaches() -> None:
    got = subprocess.run(
        [*EXCHANGE, "audit", "console", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(got.stdout.split())
    for phrase in ("127.0.0.1 only", "one-time key", "spends the key", "private key stays in this process"):
        assert phrase in text, phrase
    for phrase in (
        "Ctrl-C",
        "Exit codes",
        "0 stopped",
        "2 bad usage",
        "--vkey",
        "--state",
        "--port",
        "--open",
    ):
        assert phrase in text, phrase

"""`exchange serve` as people run it: JSON logs with request ids and no token, metrics on their
own port, and a SIGTERM that lets requests in flight finish (bounded) before the process exits 0."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exchange.dev.seaweed import SeaweedFS
from tests.conftest import ServiceProcess, free_port, service_env

TOKEN = "exl1_" + secrets.token_urlsafe(32)  # 43 base64url characters, like a real link token


@pytest.fixture
def service(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    home = tmp_path_factory.mktemp("serve")
    process = ServiceProcess(
        service_env(
            home,
            free_port(),
            seaweed,
            EXCHANGE_LOG_FORMAT="json",
            EXCHANGE_METRICS_PORT=str(free_port()),
            EXCHANGE_SHUTDOWN_GRACE_S="3",
        )
    )
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.kill()


def port_of(service: ServiceProcess) -> int:
    return int(service.env["EXCHANGE_PORT"])


def exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection; return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        return read_all(conn)


def read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def log_lines(service: ServiceProcess) -> list[dict[str, object]]:
    text = (service.home / "serve.log").read_text()
    assert TOKEN not in text and TOKEN[5:] not in text
    return [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON


def test_json_logs_carry_request_ids_and_no_token(service: ServiceProcess) -> None:
    service.start()
    port = port_of(service)
    assert get(service.url + "/healthz", {"X-Request-Id": "probe-1"}) == 200
    assert (
        get(f"{service.url}/l/{TOKEN}", {"X-Request-Id": "probe-2", "Referer": f"{service.url}/l/{TOKEN}"})
        == 404
    )
    assert get(f"{service.url}/nowhere/{TOKEN}", {"X-Request-Id": "probe-3"}) == 404
    # A request aiohttp's parser refuses, with the token in its offending line: logged at ERROR.
    answer = exchange(port, f"GET /l/{TOKEN} HTTP/1.1\r\nHost: x\r\nBad{TOKEN} : y\r\n\r\n".encode())
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    metrics_url = f"http://127.0.0.1:{service.env['EXCHANGE_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        scraped = resp.read().decode()
    assert service.stop() == 0

    assert TOKEN not in scraped and TOKEN[5:] not in scraped
    families = {f.name: f for f in text_string_to_metric_families(scraped)}
    routes = {s.labels["route"] for s in families["exchange_http_requests"].samples if "route" in s.labels}
    assert {"/healthz", "/l/{token}", "unmatched"} <= routes

    lines = log_lines(service)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    access = {line["request_id"]: line["message"] for line in lines if line["logger"] == "exchange.access"}
    assert str(access["probe-1"]).startswith("GET /healthz 200")
    # The route's template, which redaction (deliberately over-eager) rewrites too.
    assert str(access["probe-2"]).startswith("GET /l/[redacted] 404")
    assert str(access["probe-3"]).startswith("GET (unmatched) 404")
    refused = [
        line
        for line in lines
        if line["level"] == "ERROR" and "Error handling request" in str(line["message"])
    ]
    assert refused and "request_id" not in refused[0]  # no request was being handled yet
    assert "exc" in refused[0]  # the parser's complaint (redacted) is kept


def wait_refused(port: int, deadline_s: float) -> bool:
    """True once a new connection to `port` is refused, within `deadline_s`."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_lets_a_request_in_flight_finish(service: ServiceProcess) -> None:
    service.start()
    port = port_of(service)
    assert service.proc is not None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        # Headers and half the body: the request is inside the app, reading its body.
        conn.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow-1\r\nContent-Length: 10\r\n\r\n12345"
        )
        time.sleep(0.5)
        service.proc.send_signal(signal.SIGTERM)
        assert wait_refused(port, 5)  # no new connections while it finishes
        assert service.proc.poll() is None  # still serving the one in flight
        conn.sendall(b"67890")
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"X-Request-Id: slow-1" in answer
    assert service.proc.wait(timeout=15) == 0
    messages = [str(line["message"]) for line in log_lines(service)]
    assert any(m.startswith("stopping: waiting up to 3 s for 1 requests in flight") for m in messages)


def test_sigterm_cancels_what_outlives_the_grace_period(service: ServiceProcess) -> None:
    service.start()
    port = port_of(service)
    assert service.proc is not None
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")  # never finished
        time.sleep(0.5)
        started = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=20) == 0
        took = time.monotonic() - started
        read_all(conn)  # the connection was closed, not left open
    assert 2.5 <= took < 10, took  # the 3 s grace, not aiohttp's 60 s nor the 60 s body timeout
    messages = [str(line["message"]) for line in log_lines(service)]
    assert any("cancelled 1 requests still running after 3 s" in m for m in messages)

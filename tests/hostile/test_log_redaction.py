"""Link tokens stay out of the logs (issue 12, item 7): aiohttp logs a request it cannot parse
at ERROR with the offending line, which may be the request line of a link URL or a `Referer`
naming one. The real `exchange serve` process is sent such requests; its log must show that it
logged them, and must not hold a token."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Iterator

import pytest

from exchange.dev.seaweed import SeaweedFS
from exchange.redaction import RedactingFilter, install_redaction, redact
from tests.conftest import ServiceProcess, free_port, service_env


def token(prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def service(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    home = tmp_path_factory.mktemp("redaction")
    process = ServiceProcess(service_env(home, free_port(), seaweed))
    process.init_admin(home / "admin.identity")
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def send(url: str, raw: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


async def test_unparseable_requests_are_logged_without_their_tokens(service: ServiceProcess) -> None:
    link, other, upload = token("exl1_"), token("exl1_"), token("exu1_")
    host = service.url.removeprefix("http://").encode()
    unparseable = [
        # A control character in the path: aiohttp logs the whole request line.
        b"GET /l/" + link.encode() + b"/files/0\x01 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
        # A control character in the Referer: aiohttp logs that header line.
        b"GET /healthz HTTP/1.1\r\nHost: "
        + host
        + b"\r\nReferer: http://elsewhere.example/l/"
        + other.encode()
        + b"\x01\r\n\r\n",
        # An invalid method in front of an upload link.
        b"G\x01T /u/" + upload.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
    ]
    for raw in unparseable:
        assert (await send(service.url, raw)).startswith(b"HTTP/1.")  # answered 400, not dropped
    # Logging happens before the answer; the process writes its log unbuffered (stderr).
    log = (service.home / "serve.log").read_text()
    assert "Error handling request" in log  # the unparseable requests were logged
    assert "[redacted]" in log
    for secret in (link, other, upload):
        assert secret not in log
        assert secret[5:] not in log
        assert secret[5:25] not in log


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("GET /l/exl1_{t} HTTP/1.1", "GET /l/[redacted] HTTP/1.1"),
        ("GET /l/exl1_{t}/files/3 HTTP/1.1", "GET /l/[redacted]/files/3 HTTP/1.1"),
        ("PUT /u/exu1_{t}?part=1", "PUT /u/[redacted]?part=1"),
        ("b'GET /l/exl1_{t}\\x00 HTTP/1.1'", "b'GET /l/[redacted] HTTP/1.1'"),
        ("b'Referer: https://mail.example/read?id=7\\x01'", "b'Referer: [redacted]\\x01'"),
        ('{{"referer": "https://x.example/?t=exl1_{t}"}}', '{{"referer": "[redacted]"}}'),
        ("invite exinv1_{t} accepted", "invite exinv1_[redacted] accepted"),
        ("proof exp1_{t}", "proof exp1_[redacted]"),
        ("/l/short-or-mangled", "/l/[redacted]"),
        ("GET /v1/whoami HTTP/1.1 200", "GET /v1/whoami HTTP/1.1 200"),
    ],
)
def test_redact(text: str, kept: str) -> None:
    t = "A" * 43
    assert redact(text.format(t=t)) == kept.format(t=t)


def test_the_filter_redacts_arguments_tracebacks_and_extras(caplog: pytest.LogCaptureFixture) -> None:
    link = token("exl1_")
    install_redaction(caplog.handler)
    logger = logging.getLogger("aiohttp.server")
    try:
        raise ValueError(f"bad line b'GET /l/{link} HTTP/1.1'")
    except ValueError:
        logger.exception(
            "Error handling request to %s", f"/l/{link}", extra={"referer": f"http://h/l/{link}"}
        )
    (record,) = caplog.records
    assert link not in caplog.text and link[5:] not in caplog.text
    assert "Error handling request to /l/[redacted]" in caplog.text
    assert "ValueError: bad line b'GET /l/[redacted] HTTP/1.1'" in caplog.text
    assert getattr(record, "referer") == "http://h/l/[redacted]"  # noqa: B009 - an extra field
    assert any(isinstance(f, RedactingFilter) for f in caplog.handler.filters)
    install_redaction(caplog.handler)
    assert sum(isinstance(f, RedactingFilter) for f in caplog.handler.filters) == 1

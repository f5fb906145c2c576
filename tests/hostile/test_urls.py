"""URLs the service is given cannot be turned against internal addresses.

Witness URLs point the service's own HTTP client at another organisation's service: their form
is checked when settings are built (http or https, a host, no credentials, no query or
fragment), internal address literals and names for this machine are refused unless
`witness_allow_private` says the witnesses are local, every resolved name is checked again at
each connection, and redirects are never followed. The storage endpoint is the operator's own
and usually local: its form is checked as strictly, private addresses allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exchange.api.audit import SIGNER
from exchange.api.keys import AUDIT, CLOCK
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import ValidationError
from exchange.services import auditlog
from exchange.settings import Settings, is_internal_address
from exchange.witness import PublicResolver, request_cosignature, witness_session
from tests.audit.conftest import add_events
from tests.audit.test_witness import RunningWitness, start_witness
from tests.conftest import FakeClock, Stack, start_stack

# -- configuration time --------------------------------------------------------------------------------

INTERNAL = [
    "http://127.0.0.1:8090",
    "http://127.8.9.10",
    "http://10.1.2.3",
    "http://172.16.0.1",
    "http://172.31.255.254",
    "http://192.168.1.20",
    "http://169.254.169.254/latest/meta-data",  # the cloud metadata service
    "http://0.0.0.0:80",
    "http://[::1]:8090",
    "http://[fd00::1]",
    "http://[fd00:ec2::254]",  # AWS's IPv6 metadata address
    "http://[fe80::1]",
    "http://[::ffff:169.254.169.254]",  # IPv4-mapped
    "http://[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
    "http://100.64.0.1",
    "http://localhost:8090",
    "http://LocalHost.",
    "http://witness.localhost",
]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_witness_urls_are_refused_by_default(url: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings.from_mapping({"EXCHANGE_WITNESS_URLS": f"https://witness.example, {url}"})
    message = err.value.message
    assert message.startswith("setting witness_urls:") and "private" in message
    assert "EXCHANGE_WITNESS_ALLOW_PRIVATE" in message  # says how to allow it, on purpose
    # The explicit allowance, and only it, lets the same URL through.
    allowed = Settings.from_mapping({"EXCHANGE_WITNESS_URLS": url, "EXCHANGE_WITNESS_ALLOW_PRIVATE": "1"})
    assert allowed.witness_urls == (url,)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://witness.example", "must be an http(s) URL with a host"),
        ("file:///etc/passwd", "must be an http(s) URL with a host"),
        ("gopher://witness.example:70/", "must be an http(s) URL with a host"),
        ("https://", "must be an http(s) URL with a host"),
        ("https://user:secret@witness.example", "must not carry credentials"),
        ("https://token@witness.example", "must not carry credentials"),
        ("https://witness.example/#frag", "must not have a query or fragment"),
        ("https://witness.example/?to=http://169.254.169.254", "must not have a query or fragment"),
        ("https://witness.example:99999", "invalid port"),
        ("https://witness.example/a b", "spaces or control characters"),
        ("https://witness.example/\r\nHost: evil", "spaces or control characters"),
        ("http://127.1", "non-standard form"),
        ("http://2130706433", "non-standard form"),
        ("http://0x7f.0.0.1", "non-standard form"),
    ],
)
def test_malformed_witness_urls_are_refused_naming_the_setting(url: str, says: str) -> None:
    for allow in ("0", "1"):  # the form is checked whether or not private targets are allowed
        with pytest.raises(ValidationError) as err:
            Settings.from_mapping({"EXCHANGE_WITNESS_URLS": url, "EXCHANGE_WITNESS_ALLOW_PRIVATE": allow})
        assert "witness_urls" in err.value.message and says in err.value.message, err.value.message


@pytest.mark.parametrize(
    ("name", "url", "says"),
    [
        ("s3_endpoint", "ftp://storage.internal", "must be an http(s) URL with a host"),
        ("s3_endpoint", "http://key:secret@127.0.0.1:8333", "must not carry credentials"),
        ("s3_endpoint", "http://127.0.0.1:8333/#x", "must not have a query or fragment"),
        ("s3_endpoint", "http://127.0.0.1:8333/?x-id=1", "must not have a query or fragment"),
        ("s3_endpoint", "http://127.0.0.1:123456", "invalid port"),
        ("s3_endpoint", "http://127.0.0.1:8333\n", "spaces or control characters"),
        ("s3_public_endpoint", "https://u@s3.example", "must not carry credentials"),
        ("public_url", "https://exchange.example/#x", "must not have a query or fragment"),
    ],
)
def test_malformed_service_urls_are_refused_naming_the_setting(name: str, url: str, says: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings.from_mapping({f"EXCHANGE_{name.upper()}": url})
    assert f"setting {name}" in err.value.message and says in err.value.message


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8333", "http://10.0.0.5:9000", "http://[::1]:8333", "https://s3.internal"]
)
def test_the_storage_endpoint_may_be_private(url: str) -> None:
    assert Settings.from_mapping({"EXCHANGE_S3_ENDPOINT": url}).s3_endpoint == url


def test_the_allowance_is_a_boolean_setting(tmp_path: Path) -> None:
    assert Settings().witness_allow_private is False
    for text, value in (("1", True), ("true", True), ("yes", True), ("0", False), ("off", False)):
        assert Settings.from_mapping({"EXCHANGE_WITNESS_ALLOW_PRIVATE": text}).witness_allow_private is value
    with pytest.raises(ValidationError) as err:
        Settings.from_mapping({"EXCHANGE_WITNESS_ALLOW_PRIVATE": "sometimes"})
    assert "witness_allow_private" in err.value.message
    config = tmp_path / "exchange.toml"
    config.write_text('witness_urls = "http://127.0.0.1:8090"\nwitness_allow_private = true\n')
    assert Settings.from_mapping({"EXCHANGE_CONFIG": str(config)}).witness_allow_private is True


@pytest.mark.parametrize(
    ("address", "internal"),
    [
        ("169.254.169.254", True),
        ("127.0.0.1", True),
        ("10.255.0.1", True),
        ("172.20.1.1", True),
        ("192.168.0.1", True),
        ("0.0.0.0", True),  # noqa: S104 - an address to refuse, not to bind
        ("::1", True),
        ("fd00::1", True),
        ("fe80::1", True),
        ("::ffff:10.0.0.1", True),
        ("2002:a9fe:a9fe::1", True),  # 6to4 of 169.254.169.254
        ("224.0.0.1", True),
        ("8.8.8.8", False),
        ("172.32.0.1", False),
        ("2606:4700:4700::1111", False),
    ],
)
def test_internal_addresses(address: str, internal: bool) -> None:
    assert is_internal_address(ipaddress.ip_address(address)) is internal


# -- at connection time ------------------------------------------------------------------------------


class Counter:
    """A real local HTTP server that counts what reaches it (and optionally redirects)."""

    def __init__(self, status: int = 200, location: str = "") -> None:
        self.hits: list[str] = []
        self.status, self.location = status, location

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(f"{request.method} {request.path}")
        if self.location:
            return web.Response(status=self.status, headers={"Location": self.location + request.path})
        return web.Response(status=self.status, text="ok")

    async def serve(self) -> TestServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        return server


async def test_a_name_that_resolves_to_an_internal_address_is_not_connected_to() -> None:
    target = Counter()
    server = await target.serve()
    try:
        async with witness_session(timeout_s=5, allow_private=False) as session:
            result = await request_cosignature(
                session, f"http://localhost:{server.port}", b"note", 0, [], ["unused"]
            )
        assert result.signature is None and result.problem is not None
        assert result.problem.startswith("refused: localhost resolves to") and "internal" in result.problem
        assert target.hits == []
        # The resolver on its own: a name for this machine is refused, whatever the family.
        with pytest.raises(OSError, match="internal address"):
            await PublicResolver().resolve("localhost", 80, 0)
    finally:
        await server.close()


@pytest.fixture
async def witnessed(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[tuple[Stack, RunningWitness]]:
    signer = auditlog.load_or_create_signer(tmp_path / "log-signing.key", "exchange.local/audit")
    w = await start_witness(tmp_path, "witness.auditor.example", signer.verifier_key())
    stack = await start_stack(
        tmp_path, database_url, seaweed, clock, audit_checkpoint_interval_s=3600.0, audit_heartbeat_s=0
    )
    yield stack, w
    await stack.server.close()
    await w.server.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_witness_redirect_is_not_followed(
    witnessed: tuple[Stack, RunningWitness], status: int
) -> None:
    """A witness URL answering with a redirect to a real, working witness: had the service
    followed it, the checkpoint would be cosigned and published. It is not, and the target never
    hears from the service."""
    stack, w = witnessed
    await add_events(stack, 3)
    redirector = Counter(status, location=w.url)
    server = await redirector.serve()
    try:
        url = str(server.make_url("")).rstrip("/")
        settings = stack.settings.replace(
            witness_urls=(url,), witness_vkeys=(w.key.vkey,), witness_quorum=1, witness_allow_private=True
        )
        publisher = auditlog.Publisher(
            stack.db, stack.app[AUDIT], stack.app[SIGNER], settings, stack.app[CLOCK]
        )
        assert await publisher.publish() is None
        assert redirector.hits == ["POST /add-checkpoint"]
        assert await stack.count("audit_checkpoints") == 0
        assert list(w.state.iterdir()) == []  # the witness never cosigned anything
        async with witness_session(timeout_s=5, allow_private=True) as session:
            result = await request_cosignature(session, url, b"x", 0, [], [w.key.vkey])
        assert result.problem == f"HTTP {status}: a redirect, not followed"

        # The control: the same witness, named directly, cosigns and the checkpoint is published.
        direct = auditlog.Publisher(
            stack.db,
            stack.app[AUDIT],
            stack.app[SIGNER],
            settings.replace(witness_urls=(w.url,)),
            stack.app[CLOCK],
        )
        assert await direct.publish() is not None
    finally:
        await server.close()

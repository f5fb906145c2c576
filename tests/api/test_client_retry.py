"""The SDK sends a lost read again, signed anew, and never re-sends a write.

Between the SDK and the service stands a relay (a real aiohttp server forwarding to the real
service) that misbehaves the way a proxy in front of a dying replica can look from the client:
it delivers the first request it gets twice, with the same headers, so that the service sees a
replayed nonce; or it drops the connection without an answer. A read must come back right
(one fresh signature more); a write must not be sent again (the caller is told the answer was
lost, and the service holds exactly what was sent once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from exchange.errors import ServiceUnreachable
from tests.conftest import Stack


class Relay:
    """Forwards every request to `target`; its first request is mishandled as `mode` says."""

    def __init__(self, target: str, mode: str) -> None:
        self.target = target
        self.mode = mode
        self.seen: list[tuple[str, str, str]] = []  # (method, path, signature nonce header)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _send(self, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, self.target + request.path_qs, data=body, headers=headers
            ) as resp,
        ):
            return resp.status, await resp.read(), resp.headers.get("Content-Type", "")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        first = not self.seen
        self.seen.append((request.method, request.path, request.headers.get("Signature-Input", "")))
        if first and self.mode == "replay":
            await self._send(request, body)  # delivered once here ...
        if first and self.mode == "drop":
            await self._send(request, body)  # delivered, then the answer is lost
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # never reaches the client: the connection is gone
        status, data, content_type = await self._send(request, body)  # ... and once more
        return web.Response(status=status, body=data, headers={"Content-Type": content_type})


@pytest.fixture(params=["replay", "drop"])
async def relay(request: pytest.FixtureRequest, stack: Stack) -> AsyncIterator[Relay]:
    r = Relay(stack.url, request.param)
    await r.start()
    yield r
    await r.close()


async def test_a_lost_read_is_sent_again_signed_anew(stack: Stack, relay: Relay) -> None:
    async with stack.client(stack.admin) as direct:
        direct.server = relay.url
        me = await direct.whoami()
    assert me["name"] == "admin"
    nonces = [sig for method, path, sig in relay.seen if path == "/v1/whoami"]
    # aiohttp itself may re-send the lost copy as it was (the service refuses it as a replay);
    # what answered was a copy the SDK signed anew.
    assert 2 <= len(nonces) <= 3 and nonces[-1] != nonces[0]


async def test_a_lost_write_is_not_sent_again(stack: Stack, relay: Relay) -> None:
    before = await stack.count("orgs")
    async with stack.client(stack.admin) as c:
        c.server = relay.url
        if relay.mode == "drop":
            with pytest.raises(ServiceUnreachable):
                await c.create_org("relayed")
        else:  # the relay's second copy is refused as a replay; the first one made the org
            with pytest.raises(Exception, match=r"nonce|replay") as refused:
                await c.create_org("relayed")
            assert getattr(refused.value, "code", None) == "replayed-nonce"
    assert [p for _, p, _ in relay.seen] == ["/v1/orgs"]  # sent once by the SDK
    assert await stack.count("orgs") == before + 1  # made exactly once

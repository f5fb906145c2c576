"""Liveness, readiness (real storage stopped and started again), and the problem format."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from exchange.dev.seaweed import S3Credentials, SeaweedFS
from tests.conftest import BUCKET, FakeClock, Stack, start_stack


async def get(url: str) -> tuple[int, CIMultiDict[str], dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, resp.headers.copy(), json.loads(await resp.read())


async def test_healthz_needs_no_signature(stack: Stack) -> None:
    status, headers, body = await get(stack.url + "/healthz")
    assert status == 200 and body == {"status": "ok"}
    assert headers["X-Request-Id"]


async def test_readyz_ok(stack: Stack) -> None:
    status, _, body = await get(stack.url + "/readyz")
    assert status == 200
    assert body == {"status": "ready", "checks": {"database": "ok", "storage": "ok"}}


async def test_readyz_fails_while_storage_is_down_and_recovers(
    tmp_path: Path, database_url: str, clock: FakeClock
) -> None:
    store = SeaweedFS(
        tmp_path / "own-store",
        credentials=S3Credentials.generate(),
        service_credentials=S3Credentials.generate(),
        bucket=BUCKET,
    )
    store.start()
    try:
        store.ensure_bucket(BUCKET)
        stack = await start_stack(tmp_path, database_url, store, clock, storage_timeout_s=2.0)
        try:
            assert (await get(stack.url + "/readyz"))[0] == 200
            store.kill()
            status, headers, body = await get(stack.url + "/readyz")
            assert status == 503
            assert headers["Content-Type"].startswith("application/problem+json")
            assert body["code"] == "not-ready"
            assert body["checks"] == {"database": "ok", "storage": "storage-unavailable"}
            assert str(store.s3_port) not in json.dumps(body)  # no internal address in the answer
            store.restart()
            assert (await get(stack.url + "/readyz"))[0] == 200
        finally:
            await stack.server.close()
    finally:
        store.stop()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not-found"),
        ("DELETE", "/v1/whoami", 405, "method-not-allowed"),
    ],
)
async def test_router_refusals_are_problems(
    stack: Stack, method: str, path: str, status: int, code: str
) -> None:
    async with aiohttp.ClientSession() as session, session.request(method, stack.url + path) as resp:
        assert resp.status == status
        assert resp.content_type == "application/problem+json"
        if status == 405:
            assert resp.headers["Allow"] == "GET"  # RFC 9110
        body = json.loads(await resp.read())
    assert body["code"] == code and body["status"] == status and body["request_id"]
    last = (await stack.events())[-1]
    assert last["action"] == "http.request" and last["outcome"] == {"result": "denied", "reason": code}
    assert last["details"] == {"method": method, "status": status}


async def test_unexpected_errors_are_a_bare_500(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from exchange.api import principals as handlers

    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals at http://10.1.2.3:9000/bucket")

    monkeypatch.setattr(handlers.svc, "list_orgs", explode)
    async with stack.client(stack.admin) as c:
        with pytest.raises(Exception) as err:
            await c.list_orgs()
    text = str(err.value) + repr(getattr(err.value, "extra", {}))
    assert "secret" not in text and "10.1.2.3" not in text and "Traceback" not in text
    assert "request id" in str(err.value).lower() or getattr(err.value, "extra", {}).get("request_id")


async def test_request_id_from_the_client_is_echoed_when_plain(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.url + "/healthz", headers={"X-Request-Id": "abc-123"}) as resp:
            assert resp.headers["X-Request-Id"] == "abc-123"
        async with session.get(stack.url + "/healthz", headers={"X-Request-Id": "a\u202eb' OR 1=1"}) as resp:
            assert resp.headers["X-Request-Id"] != "a\u202eb' OR 1=1"

"""Each RFC 9421 refusal is its own 401 problem, leaves a denial event, and changes nothing else."""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

import aiohttp
import pytest

from exchange.client.signing import sign_headers
from exchange.identity import Identity
from tests.conftest import FakeClock, Stack


async def send(
    stack: Stack, method: str, path: str, *, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, stack.url + path, data=body, headers=headers) as resp:
            assert resp.content_type in ("application/json", "application/problem+json")
            return resp.status, json.loads(await resp.read())


def signed(
    identity: Identity, stack: Stack, method: str, path: str, body: bytes = b"", **kw: Any
) -> dict[str, str]:
    headers = {"Content-Type": "application/json"} if body else {}
    return sign_headers(identity, method=method, url=stack.url + path, body=body, headers=headers, **kw)


async def assert_refused(stack: Stack, status: int, body: dict[str, Any], code: str) -> None:
    assert status == 401, body
    assert body["code"] == code
    assert body["type"] == f"urn:exchange:problem:{code}"
    assert body["status"] == 401 and body["detail"] and body["request_id"]
    last = (await stack.events())[-1]
    assert last["outcome"] == {"result": "denied", "reason": code}
    assert last["action"] == "whoami"


async def test_a_correct_signature_is_accepted(stack: Stack) -> None:
    status, body = await send(
        stack, "GET", "/v1/whoami", headers=signed(stack.admin, stack, "GET", "/v1/whoami")
    )
    assert status == 200 and body["name"] == "admin"


async def test_missing_signature(stack: Stack) -> None:
    status, body = await send(stack, "GET", "/v1/whoami", headers={})
    await assert_refused(stack, status, body, "missing-signature")


async def test_unknown_key(stack: Stack) -> None:
    stranger = Identity.generate()
    status, body = await send(
        stack, "GET", "/v1/whoami", headers=signed(stranger, stack, "GET", "/v1/whoami")
    )
    await assert_refused(stack, status, body, "unknown-key")


async def test_signature_for_another_target_is_bad(stack: Stack) -> None:
    headers = signed(stack.admin, stack, "GET", "/v1/orgs")
    status, body = await send(stack, "GET", "/v1/whoami", headers=headers)
    await assert_refused(stack, status, body, "bad-signature")


async def test_tampered_signature_bytes_are_bad(stack: Stack) -> None:
    headers = signed(stack.admin, stack, "GET", "/v1/whoami")
    label, _, value = headers["Signature"].partition("=:")
    raw = bytearray(base64.b64decode(value.rstrip(":")))
    raw[0] ^= 1
    headers["Signature"] = f"{label}=:{base64.b64encode(bytes(raw)).decode()}:"
    status, body = await send(stack, "GET", "/v1/whoami", headers=headers)
    await assert_refused(stack, status, body, "bad-signature")


async def test_signature_not_covering_the_digest_is_bad(stack: Stack) -> None:
    headers = sign_headers(
        stack.admin,
        method="GET",
        url=stack.url + "/v1/whoami",
        body=None,
        covered_components=("@method", "@target-uri"),
    )
    status, body = await send(stack, "GET", "/v1/whoami", headers=headers)
    await assert_refused(stack, status, body, "bad-signature")
    assert "content-digest" in body["detail"]


@pytest.mark.parametrize("offset_s", [-301, 301])
async def test_clock_skew(stack: Stack, clock: FakeClock, offset_s: int) -> None:
    clock.advance(offset_s)  # the server's clock moves; the client's does not
    status, body = await send(
        stack, "GET", "/v1/whoami", headers=signed(stack.admin, stack, "GET", "/v1/whoami")
    )
    await assert_refused(stack, status, body, "clock-skew")


async def test_skew_within_the_window_is_accepted(stack: Stack, clock: FakeClock) -> None:
    clock.advance(-290)
    status, _ = await send(
        stack, "GET", "/v1/whoami", headers=signed(stack.admin, stack, "GET", "/v1/whoami")
    )
    assert status == 200


async def test_reused_nonce(stack: Stack) -> None:
    headers = signed(stack.admin, stack, "GET", "/v1/whoami")
    first, _ = await send(stack, "GET", "/v1/whoami", headers=headers)
    assert first == 200
    status, body = await send(stack, "GET", "/v1/whoami", headers=headers)
    await assert_refused(stack, status, body, "replayed-nonce")


async def test_digest_mismatch(stack: Stack) -> None:
    headers = signed(stack.admin, stack, "GET", "/v1/whoami", body=b'{"a": 1}')
    status, body = await send(stack, "GET", "/v1/whoami", headers=headers, body=b'{"a": 2}')
    await assert_refused(stack, status, body, "digest-mismatch")


async def test_a_refused_request_does_not_burn_its_nonce(stack: Stack) -> None:
    nonce = "n" * 24
    bad = signed(stack.admin, stack, "GET", "/v1/whoami", body=b"{}", nonce=nonce)
    status, _ = await send(stack, "GET", "/v1/whoami", headers=bad, body=b"[]")
    assert status == 401
    good = signed(stack.admin, stack, "GET", "/v1/whoami", nonce=nonce)
    status, _ = await send(stack, "GET", "/v1/whoami", headers=good)
    assert status == 200


async def test_short_nonce_is_refused(stack: Stack) -> None:
    headers = signed(stack.admin, stack, "GET", "/v1/whoami", nonce="short")
    status, body = await send(stack, "GET", "/v1/whoami", headers=headers)
    await assert_refused(stack, status, body, "bad-signature")


async def test_garbage_signature_input(stack: Stack) -> None:
    headers = {"Signature-Input": "exchange=(((", "Signature": "exchange=:AAAA:"}
    status, body = await send(stack, "GET", "/v1/whoami", headers=headers)
    await assert_refused(stack, status, body, "bad-signature")


async def test_signature_created_long_ago_is_skew_even_with_fresh_nonce(stack: Stack) -> None:
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=6)
    status, body = await send(
        stack, "GET", "/v1/whoami", headers=signed(stack.admin, stack, "GET", "/v1/whoami", created=old)
    )
    await assert_refused(stack, status, body, "clock-skew")


async def test_disabled_principal_is_refused_by_name_once_its_signature_verifies(stack: Stack) -> None:
    """A disabled principal's valid signature: 403 `principal-disabled`, its refusal naming it in
    the log. Its key signing the wrong bytes is still a bad signature (401): the status is told
    only to the holder of the key."""
    tester = await stack.principal("t1", "tester")
    async with stack.db.transaction() as conn:
        await conn.execute("UPDATE principals SET status = 'disabled' WHERE name = $1", "t1")
    status, body = await send(stack, "GET", "/v1/whoami", headers=signed(tester, stack, "GET", "/v1/whoami"))
    assert (status, body["code"]) == (403, "principal-disabled"), body
    last = (await stack.events())[-1]
    assert last["outcome"] == {"result": "denied", "reason": "principal-disabled"}
    assert (last["action"], last["actor"]["name"]) == ("whoami", "t1")
    forged = signed(tester, stack, "GET", "/v1/whoami")
    status, body = await send(stack, "GET", "/v1/principals", headers=forged)
    assert status == 401 and body["code"] != "principal-disabled", body

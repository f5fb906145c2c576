"""The log served as C2SP tlog-tiles: contents against RFC 6962 hashes, what exists, who may read,
caching headers, and how reads are recorded."""

from __future__ import annotations

import aiohttp
import pytest

from exchange.api.keys import AUDIT
from exchange.client.signing import sign_headers
from exchange.errors import ExchangeError, NotFound, PermissionDenied, ValidationError
from exchange.format import tiles
from exchange.identity import Identity
from tests.audit.conftest import Auditor, add_events, leaves, publish
from tests.conftest import Stack
from tests.format.test_tiles import _leaf, _mth  # RFC 6962 by its definition, not our merkle code


async def _get(stack: Stack, who: Identity | None, path: str) -> tuple[int, dict[str, str], bytes]:
    url = stack.url + path
    headers = sign_headers(who, method="GET", url=url, body=b"", headers={}) if who else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_tiles_and_bundles_match_rfc6962_hashes(auditor: Auditor) -> None:
    stack = auditor.stack
    await add_events(stack, 300)
    size = await publish(stack)
    assert 257 < size < 512
    stored = await leaves(stack)
    hashes = [_leaf(x) for x in stored[:size]]
    async with stack.client(auditor.identity) as c:
        full = await c.request("GET", "/v1/audit/log/tile/0/000", raw=True)
        partial = await c.request("GET", f"/v1/audit/log/tile/0/001.p/{size - 256}", raw=True)
        level1 = await c.request("GET", "/v1/audit/log/tile/1/000.p/1", raw=True)
        bundle = await c.request("GET", f"/v1/audit/log/tile/entries/001.p/{size - 256}", raw=True)
        first = await c.request("GET", "/v1/audit/log/tile/entries/000", raw=True)
    assert full == b"".join(hashes[:256])
    assert partial == b"".join(hashes[256:size])
    assert level1 == _mth(hashes[:256])
    assert tiles.split_bundle(first) == stored[:256]
    assert tiles.split_bundle(bundle) == stored[256:size]
    # The tiles alone give the checkpoint's root.
    served = {(0, 0, 256): full, (0, 1, size - 256): partial, (1, 0, 1): level1}
    assert tiles.TileTree(size, lambda lv, n, w: served[lv, n, w]).root() == _mth(hashes)


async def test_nothing_past_the_latest_checkpoint(auditor: Auditor) -> None:
    stack = auditor.stack
    await add_events(stack, 20)
    size = await publish(stack)
    await add_events(stack, 5)  # stored, not yet signed
    async with stack.client(auditor.identity) as c:
        assert len(await c.request("GET", f"/v1/audit/log/tile/0/000.p/{size}", raw=True)) == 32 * size
        # An older checkpoint's edge is a prefix: still served.
        assert len(await c.request("GET", "/v1/audit/log/tile/0/000.p/3", raw=True)) == 96
        for path in (f"0/000.p/{size + 1}", "0/000", "0/001.p/1", "1/000.p/1", f"entries/000.p/{size + 1}"):
            with pytest.raises(NotFound):
                await c.request("GET", f"/v1/audit/log/tile/{path}", raw=True)
        for path in ("0/0", "0/x000/000", "0/000.p/256", "0/000.p/0", "64/000", "entries/01"):
            with pytest.raises(ValidationError):
                await c.request("GET", f"/v1/audit/log/tile/{path}", raw=True)


async def test_auditors_only_and_caching_headers(auditor: Auditor) -> None:
    stack = auditor.stack
    await add_events(stack, 260)
    size = await publish(stack)
    status, headers, body = await _get(stack, auditor.identity, "/v1/audit/log/checkpoint")
    assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert body.decode().split("\n")[1] == str(size)
    status, headers, _ = await _get(stack, auditor.identity, "/v1/audit/log/tile/0/000")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    assert headers["Cache-Control"] == "private, max-age=31536000, immutable"
    status, headers, _ = await _get(stack, auditor.identity, f"/v1/audit/log/tile/0/001.p/{size - 256}")
    assert status == 200 and headers["Cache-Control"] == "private, max-age=60"
    # Unsigned: refused; signed by someone who is not an auditor: refused.
    for path in ("/v1/audit/log/checkpoint", "/v1/audit/log/tile/0/000", "/v1/audit/log/tile/entries/000"):
        status, _, _ = await _get(stack, None, path)
        assert status == 401
    member = await stack.principal("mo", "developer", org="lab")
    async with stack.client(member) as c:
        for path in (
            "/v1/audit/log/checkpoint",
            "/v1/audit/log/tile/0/000",
            "/v1/audit/log/tile/entries/000",
        ):
            with pytest.raises(PermissionDenied):
                await c.request("GET", path, raw=True)


async def test_bundle_reads_are_recorded_once_per_checkpoint(auditor: Auditor) -> None:
    stack = auditor.stack
    await add_events(stack, 600)
    size = await publish(stack)

    async def exports() -> list[str]:
        rows = await stack.db.fetchall("SELECT leaf FROM audit_events WHERE action = 'audit.export'")
        return [bytes(r["leaf"]).decode() for r in rows]

    async with stack.client(auditor.identity) as c:
        for _ in range(2):
            for n in range(size // 256):
                await c.request("GET", f"/v1/audit/log/tile/entries/{n:03d}", raw=True)
            await c.request("GET", "/v1/audit/log/tile/0/000", raw=True)  # hashes: not recorded
        [recorded] = await exports()
        assert '"via":"tiles"' in recorded and f'"size":{size}' in recorded
        await publish(stack)  # the recorded read grew the log: a new checkpoint, a new record
        await c.request("GET", "/v1/audit/log/tile/entries/000", raw=True)
        assert len(await exports()) == 2


async def test_a_missing_stored_node_fails_closed(auditor: Auditor) -> None:
    stack = auditor.stack
    await add_events(stack, 20)
    size = await publish(stack)
    async with stack.db.transaction() as conn:
        await conn.execute("DELETE FROM audit_tree_nodes WHERE level = 0 AND idx = 7")
    async with stack.client(auditor.identity) as c:
        with pytest.raises(ExchangeError) as refused:
            await c.request("GET", f"/v1/audit/log/tile/0/000.p/{size}", raw=True)
    assert refused.value.code == "audit-log-damaged"
    assert stack.app[AUDIT].damage is not None  # no more appends, no more checkpoints

"""Presigned URLs tampered with at the storage: a flipped signature, another key, a longer expiry,
another method, a body of the wrong size or digest. Storage refuses each; the object is unchanged."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator

import pytest

from exchange.dev.seaweed import SeaweedFS
from exchange.storage import Storage, new_object_key
from tests.conftest import BUCKET


def http(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def with_query(url: str, **changes: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def with_path(url: str, path: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=path))


@pytest.fixture
async def stored(seaweed: SeaweedFS) -> AsyncIterator[tuple[Storage, str, bytes]]:
    storage = Storage(
        endpoint=seaweed.endpoint,
        region="us-east-1",
        bucket=BUCKET,
        access_key_id=seaweed.service_credentials.access_key_id,  # the service's own rights
        secret_access_key=seaweed.service_credentials.secret_access_key,
    )
    data = os.urandom(4096)
    key = new_object_key("tamper")
    req = storage.presign_put(key, ttl_s=60, content_length=len(data), checksum_sha256=b64sha256(data))
    status, _ = await asyncio.to_thread(
        http, "PUT", req.url, data, {"x-amz-checksum-sha256": b64sha256(data)}
    )
    assert status == 200
    yield storage, key, data
    await storage.close()


async def unchanged(storage: Storage, key: str, data: bytes) -> None:
    status, body = await asyncio.to_thread(http, "GET", storage.presign_get(key, ttl_s=60))
    assert (status, body) == (200, data)


def flip_last_hex(signature: str) -> str:
    return signature[:-1] + ("0" if signature[-1] != "0" else "1")


async def test_get_with_flipped_signature(stored: tuple[Storage, str, bytes]) -> None:
    storage, key, data = stored
    url = storage.presign_get(key, ttl_s=60)
    sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["X-Amz-Signature"]
    status, _ = await asyncio.to_thread(
        http, "GET", with_query(url, **{"X-Amz-Signature": flip_last_hex(sig)})
    )
    assert status == 403
    await unchanged(storage, key, data)


async def test_get_for_another_key(stored: tuple[Storage, str, bytes]) -> None:
    storage, key, data = stored
    other = await _put(storage, b"someone else's object")
    url = storage.presign_get(key, ttl_s=60)
    status, body = await asyncio.to_thread(http, "GET", with_path(url, f"/{BUCKET}/{other}"))
    assert status == 403 and body != b"someone else's object"
    await unchanged(storage, key, data)


async def test_extended_expiry(stored: tuple[Storage, str, bytes]) -> None:
    storage, key, data = stored
    url = storage.presign_get(key, ttl_s=60)
    status, _ = await asyncio.to_thread(http, "GET", with_query(url, **{"X-Amz-Expires": "604800"}))
    assert status == 403
    await unchanged(storage, key, data)


async def test_changed_method(stored: tuple[Storage, str, bytes]) -> None:
    storage, key, data = stored
    url = storage.presign_get(key, ttl_s=60)
    for method, body in (("PUT", b"overwrite"), ("DELETE", None)):
        status, _ = await asyncio.to_thread(http, method, url, body)
        assert status == 403, method
    await unchanged(storage, key, data)


async def test_put_url_cannot_overwrite_with_other_bytes(stored: tuple[Storage, str, bytes]) -> None:
    storage, key, data = stored
    # A fresh PUT URL for the same key, bound to new bytes: other bytes of the same length, or
    # another length, or a recomputed digest header, are all refused.
    new = os.urandom(len(data))
    req = storage.presign_put(key, ttl_s=60, content_length=len(new), checksum_sha256=b64sha256(new))
    wrong = os.urandom(len(new))
    for body, digest in (
        (wrong, b64sha256(new)),  # same size, other digest
        (wrong, b64sha256(wrong)),  # digest header recomputed for the other bytes
        (new + b"x", b64sha256(new)),  # another size
    ):
        status, _ = await asyncio.to_thread(http, "PUT", req.url, body, {"x-amz-checksum-sha256": digest})
        assert status in (400, 403)
    await unchanged(storage, key, data)


async def test_part_url_refuses_wrong_size_or_digest(stored: tuple[Storage, str, bytes]) -> None:
    storage, _, _ = stored
    key = new_object_key("tamper")
    upload_id = await storage.create_multipart(key)
    part = os.urandom(8192)
    req = storage.presign_upload_part(
        key, upload_id, 1, ttl_s=60, content_length=len(part), checksum_sha256=b64sha256(part)
    )
    for body, digest in ((os.urandom(8192), b64sha256(part)), (part[:-1], b64sha256(part))):
        status, _ = await asyncio.to_thread(http, "PUT", req.url, body, {"x-amz-checksum-sha256": digest})
        assert status in (400, 403)
    # Another part number with the same signature is another request: refused.
    status, _ = await asyncio.to_thread(
        http, "PUT", with_query(req.url, partNumber="2"), part, {"x-amz-checksum-sha256": b64sha256(part)}
    )
    assert status == 403
    assert await storage.list_parts(key, upload_id) == []
    await storage.abort_multipart(key, upload_id)


async def _put(storage: Storage, data: bytes) -> str:
    key = new_object_key("tamper")
    req = storage.presign_put(key, ttl_s=60, content_length=len(data), checksum_sha256=b64sha256(data))
    status, _ = await asyncio.to_thread(
        http, "PUT", req.url, data, {"x-amz-checksum-sha256": b64sha256(data)}
    )
    assert status == 200
    return key

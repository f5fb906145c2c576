"""The S3 control plane against a real SeaweedFS that checks signatures."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import urllib.error
import urllib.request
from dataclasses import replace

import pytest

from exchange.dev.seaweed import SeaweedFS
from exchange.errors import NotFound, StorageUnavailable
from exchange.storage import PresignedRequest, Storage, new_object_key
from tests.conftest import BUCKET


def storage_for(
    seaweed: SeaweedFS, *, endpoint: str | None = None, public: str | None = None, operator: bool = False
) -> Storage:
    """A Storage with the service's least-privilege keys (the operator's, to make buckets)."""
    keys = seaweed.credentials if operator else seaweed.service_credentials
    return Storage(
        endpoint=endpoint or seaweed.endpoint,
        public_endpoint=public,
        region="us-east-1",
        bucket=BUCKET,
        access_key_id=keys.access_key_id,
        secret_access_key=keys.secret_access_key,
        timeout_s=3,
    )


def http(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def send(req: PresignedRequest, data: bytes) -> tuple[int, bytes]:
    return http(req.method, req.url, data, {k: v for k, v in req.headers.items() if k != "Content-Length"})


def b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.fixture
async def storage(seaweed: SeaweedFS) -> Storage:
    s = storage_for(seaweed)
    yield s  # type: ignore[misc]
    await s.close()


async def put_object(storage: Storage, data: bytes) -> str:
    key = new_object_key("test")
    req = storage.presign_put(key, ttl_s=60, content_length=len(data), checksum_sha256=b64sha256(data))
    status, body = await asyncio.to_thread(send, req, data)
    assert status == 200, body
    return key


async def test_control_unsigned_requests_are_refused(seaweed: SeaweedFS, storage: Storage) -> None:
    """Without this, every presign test below could pass against a store that allows everything."""
    key = await put_object(storage, b"secret bytes")
    status, _ = await asyncio.to_thread(http, "GET", f"{seaweed.endpoint}/{BUCKET}/{key}")
    assert status == 403
    status, _ = await asyncio.to_thread(http, "PUT", f"{seaweed.endpoint}/{BUCKET}/other", b"x")
    assert status == 403


async def test_presigned_get_round_trip_and_expiry(storage: Storage) -> None:
    data = os.urandom(1000)
    key = await put_object(storage, data)
    status, body = await asyncio.to_thread(http, "GET", storage.presign_get(key, ttl_s=60))
    assert (status, body) == (200, data)
    short = storage.presign_get(key, ttl_s=1)
    await asyncio.sleep(2.1)
    status, body = await asyncio.to_thread(http, "GET", short)
    assert status == 403, body
    assert b"AccessDenied" in body or b"expired" in body.lower()


async def test_presigned_get_serves_ranges_and_binds_the_key(storage: Storage) -> None:
    """Presigned GETs are signed by the minio SDK (cheaper than boto3): SeaweedFS honours them
    with a Range, as downloads use them, and refuses the same signature for another key."""
    data = os.urandom(100_000)
    key = await put_object(storage, data)
    other = await put_object(storage, b"another object")
    url = storage.presign_get(key, ttl_s=60)
    assert url.startswith(f"{storage._client.meta.endpoint_url}/{BUCKET}/{key}?")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    status, body = await asyncio.to_thread(http, "GET", url, None, {"Range": "bytes=1000-1999"})
    assert (status, body) == (206, data[1000:2000])
    status, body = await asyncio.to_thread(http, "GET", url, None, {"Range": "bytes=-10"})
    assert (status, body) == (206, data[-10:])
    status, body = await asyncio.to_thread(http, "GET", url.replace(key, other))
    assert status == 403, body


async def test_presigned_put_is_bound_to_size_and_digest(storage: Storage) -> None:
    data = b"a" * 4096
    key = new_object_key("test")
    req = storage.presign_put(key, ttl_s=60, content_length=len(data), checksum_sha256=b64sha256(data))
    status, _ = await asyncio.to_thread(send, req, b"b" * 4096)  # same length, other digest
    assert status >= 400
    status, _ = await asyncio.to_thread(send, req, data + b"x")  # other length
    assert status >= 400
    status, _ = await asyncio.to_thread(http, "PUT", req.url, data)  # digest header left out
    assert status == 403
    assert await storage.head(key) is None
    status, _ = await asyncio.to_thread(send, req, data)
    assert status == 200
    info = await storage.head(key)
    assert info is not None and info.size == len(data)


async def test_multipart_upload_list_complete(storage: Storage) -> None:
    key = new_object_key("test")
    upload_id = await storage.create_multipart(key)
    parts = [os.urandom(5 * 1024 * 1024), os.urandom(1234)]
    for number, data in enumerate(parts, start=1):
        req = storage.presign_upload_part(
            key, upload_id, number, ttl_s=60, content_length=len(data), checksum_sha256=b64sha256(data)
        )
        status, body = await asyncio.to_thread(send, req, data)
        assert status == 200, body
    listed = await storage.list_parts(key, upload_id)
    assert [(p.number, p.size) for p in listed] == [(1, len(parts[0])), (2, len(parts[1]))]
    # SeaweedFS does not report part checksums in ListParts: the caller supplies the ones it signed.
    await storage.complete_multipart(
        key, upload_id, [replace(p, checksum_sha256=b64sha256(parts[p.number - 1])) for p in listed]
    )
    status, body = await asyncio.to_thread(http, "GET", storage.presign_get(key, ttl_s=60))
    assert status == 200 and body == b"".join(parts)
    await storage.delete(key)
    assert await storage.head(key) is None


async def test_multipart_part_with_wrong_digest_is_refused(storage: Storage) -> None:
    key = new_object_key("test")
    upload_id = await storage.create_multipart(key)
    data = os.urandom(2048)
    req = storage.presign_upload_part(
        key, upload_id, 1, ttl_s=60, content_length=len(data), checksum_sha256=b64sha256(data)
    )
    status, _ = await asyncio.to_thread(send, req, os.urandom(2048))
    assert status >= 400
    assert await storage.list_parts(key, upload_id) == []
    await storage.abort_multipart(key, upload_id)
    with pytest.raises(NotFound):
        await storage.list_parts(key, upload_id)


async def test_public_endpoint_goes_into_presigned_urls(seaweed: SeaweedFS, storage: Storage) -> None:
    data = b"through another name"
    key = await put_object(storage, data)
    public = storage_for(seaweed, public=f"http://localhost:{seaweed.s3_port}")
    try:
        url = public.presign_get(key, ttl_s=60)
        assert url.startswith(f"http://localhost:{seaweed.s3_port}/")
        status, body = await asyncio.to_thread(http, "GET", url)
        assert (status, body) == (200, data)
    finally:
        await public.close()


async def test_unreachable_storage_is_a_dependency_error(seaweed: SeaweedFS) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = storage_for(seaweed, endpoint=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(StorageUnavailable) as err:
            await dead.ping()
        assert str(port) not in str(err.value)
    finally:
        await dead.close()


async def test_ensure_bucket_is_idempotent(seaweed: SeaweedFS) -> None:
    s = storage_for(seaweed, operator=True)
    s.bucket = "exchange-second"
    try:
        await s.ensure_bucket()
        await s.ensure_bucket()
        await s.ping()
    finally:
        await s.close()

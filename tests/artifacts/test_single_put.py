"""A file of one part is sent with one presigned PUT of its object (issue 16: a directory of
1,000 small files cost four storage calls a file through a multipart upload of its own). The PUT
is bound like a part (length and SHA-256), checked at completion by one HEAD, reported by the
upload's status for a resume, and — since a PUT URL outlives an abort or a deletion, where a part
URL dies with its upload — the object an old URL puts back is deleted again by the sweeper once
no such URL can work."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
from minio import Minio
from minio.error import S3Error

from exchange.api.artifacts import sweep_once
from exchange.api.keys import STORAGE
from exchange.client import artifacts as api
from exchange.errors import Conflict
from exchange.services.uploads import STORAGE_CLOCK_SKEW_S
from exchange.storage import PresignedRequest
from tests.artifacts.conftest import BUCKET
from tests.artifacts.test_bad_input import HandUpload
from tests.conftest import FakeClock, Stack
from tests.test_storage import send

MIB = 1024 * 1024


def _stored(store: Minio, key: str) -> bool:
    try:
        store.stat_object(BUCKET, key)
    except S3Error:
        return False
    return True


@pytest.fixture
def calls(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the storage calls the service makes, in order."""
    storage = stack.app[STORAGE]
    seen: list[str] = []
    for name in ("create_multipart", "list_parts", "complete_multipart", "abort_multipart", "head", "delete"):
        real = getattr(storage, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(storage, name, counted)
    yield seen


async def _put(u: dict[str, Any], data: bytes) -> int:
    status, _ = await asyncio.to_thread(send, PresignedRequest(u["method"], u["url"], u["headers"]), data)
    return status


async def test_a_file_of_one_part_is_one_put_and_one_head(
    stack: Stack, clock: FakeClock, calls: list[str], bucket: Minio
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, os.urandom(1000))
        detail = await hand.start()
        key = detail["files"][0]["object"]
        u = await hand.url(1)
        # A PUT of the object itself, bound to the part's length and SHA-256: no multipart upload.
        assert u["method"] == "PUT" and "uploadId" not in u["url"] and key in u["url"]
        assert (
            u["headers"]["x-amz-checksum-sha256"]
            == base64.b64encode(hashlib.sha256(hand.part(1)).digest()).decode()
        )
        row = await stack.db.fetchone("SELECT upload_id, put_until_ms FROM artifact_files")
        assert row is not None and row["upload_id"] is None
        assert row["put_until_ms"] == clock() + (stack.settings.presign_ttl_s + STORAGE_CLOCK_SKEW_S) * 1000
        status = await api.upload_status(c, detail["id"])
        assert status["files"][0]["stored"] == []
        assert await hand.put(1) == 200
        # A resuming client learns the file is stored, as it would of a part.
        status = await api.upload_status(c, detail["id"])
        assert status["files"][0]["stored"] == [{"number": 1, "size": len(hand.ciphertext)}]
        calls.clear()
        assert (await hand.complete())["status"] == "complete"
        assert calls == ["head"]  # where a multipart file costs list, complete and head
    assert _stored(bucket, key)


async def test_an_object_that_is_missing_or_not_the_bound_one_is_refused_at_completion(
    stack: Stack, bucket: Minio
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, os.urandom(3000))
        detail = await hand.start()
        key = detail["files"][0]["object"]
        await hand.url(1)
        events = await stack.count("audit_events")
        with pytest.raises(Conflict) as err:
            await hand.complete()
        assert err.value.code == "parts-missing" and "part(s) 1 not uploaded yet" in err.value.message
        # Someone with the store's own credentials puts other bytes at the key: of another
        # length, then of the same length (storage keeps their SHA-256, and the HEAD tells it).
        storage = stack.own_storage()
        try:
            for wrong, code in [
                (os.urandom(len(hand.ciphertext) + 1), "part-size-mismatch"),
                (os.urandom(len(hand.ciphertext)), "part-digest-mismatch"),
            ]:
                req = storage.presign_put(
                    key,
                    ttl_s=60,
                    content_length=len(wrong),
                    checksum_sha256=base64.b64encode(hashlib.sha256(wrong).digest()).decode(),
                )
                assert (await asyncio.to_thread(send, req, wrong))[0] == 200
                with pytest.raises(Conflict) as err:
                    await hand.complete()
                assert err.value.code == code
        finally:
            await storage.close()
        # Each refusal changed nothing but the log: still uploading, and the right bytes complete it.
        assert (await api.get(c, detail["id"]))["status"] == "uploading"
        assert await stack.count("audit_events") == events + 3
        assert await hand.put(1) == 200
        assert (await hand.complete())["status"] == "complete"
    assert _stored(bucket, key)


@pytest.mark.parametrize("end", ["abort", "delete"])
async def test_an_object_put_back_by_an_old_url_is_deleted_once_no_url_works(
    stack: Stack, clock: FakeClock, bucket: Minio, end: str
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, os.urandom(2000))
        detail = await hand.start()
        key = detail["files"][0]["object"]
        u = await hand.url(1)
        assert await _put(u, hand.part(1)) == 200
        # Another artifact, complete and kept: its URLs run out too, and its object stays.
        kept = HandUpload(c, dev, os.urandom(500))
        kept_key = (await kept.start())["files"][0]["object"]
        assert await kept.put(1) == 200
        await kept.complete()
        if end == "abort":
            await api.abort(c, detail["id"])
        else:
            await hand.complete()
            await api.delete(c, detail["id"], reason="leaked")
        assert not _stored(bucket, key)
        # The URL outlives the end (storage checks only its signature and expiry): the object is back.
        assert await _put(u, hand.part(1)) == 200
        assert _stored(bucket, key)
        until = await stack.db.fetchval("SELECT put_until_ms FROM artifact_files WHERE object_key = $1", key)
        clock.advance((until - clock()) / 1000 - 1)
        await sweep_once(stack.app)
        assert _stored(bucket, key)  # a URL might still work: deleting now could be undone
        clock.advance(1)
        await sweep_once(stack.app)
        assert not _stored(bucket, key) and _stored(bucket, kept_key)
        assert (
            await stack.db.fetchval("SELECT COUNT(*) FROM artifact_files WHERE put_until_ms IS NOT NULL") == 0
        )
    assert (
        await stack.db.fetchval("SELECT status FROM artifacts WHERE id = $1", kept.detail["id"]) == "complete"
    )

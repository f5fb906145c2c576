"""Storage killed (SIGKILL) half-way through an upload, then restarted on the same data.

The client must report an error (never a false success), the artifact must not be complete, no
partial object may be visible in the bucket, and the same command run again completes the upload
with digests that match.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exchange.client import artifacts as api
from exchange.client.transfer import download, upload
from exchange.dev.seaweed import S3Credentials, SeaweedFS
from exchange.errors import ExchangeError
from tests.artifacts.conftest import write
from tests.conftest import BUCKET, FakeClock, Stack, start_stack

MIB = 1024 * 1024


@pytest.fixture
async def own_storage(tmp_path: Path) -> AsyncIterator[SeaweedFS]:
    weed = SeaweedFS(
        tmp_path / "weed",
        credentials=S3Credentials.generate(),
        service_credentials=S3Credentials.generate(),
        bucket=BUCKET,
    )
    weed.start()
    weed.ensure_bucket(BUCKET)
    yield weed
    weed.stop()


async def test_storage_killed_mid_upload(
    tmp_path: Path, database_url: str, own_storage: SeaweedFS, clock: FakeClock
) -> None:
    stack: Stack = await start_stack(tmp_path, database_url, own_storage, clock)
    try:
        dev = await stack.principal("dana", "developer", org="lab")
        size = 48 * MIB  # six parts of 8 MiB
        data = write(tmp_path / "src" / "weights.bin", size, seed=5)
        sent = 0
        killed = False

        def kill_at_half(n: int) -> None:
            nonlocal sent, killed
            sent += n
            if sent >= size // 2 and not killed:
                killed = True
                own_storage.kill()

        async with stack.client(dev) as c:
            with pytest.raises(ExchangeError) as failed:
                await upload(c, tmp_path / "src" / "weights.bin", concurrency=2, progress=kill_at_half)
            assert killed
            assert failed.value.status >= 500, failed.value  # unavailable: retry later
            (pending,) = await api.list_artifacts(c, status="uploading")
            assert await api.list_artifacts(c, status="complete") == []

            own_storage.restart()
            # Nothing half-written is visible: the parts of an unfinished multipart upload are not
            # objects, and no object was assembled.
            listed = own_storage.client().list_objects_v2(Bucket=BUCKET)
            assert listed.get("KeyCount", 0) == 0, listed.get("Contents")

            resumed: list[bool] = []
            artifact_id = await upload(
                c, tmp_path / "src" / "weights.bin", on_start=lambda _a, _t, r: resumed.append(r)
            )
            assert (artifact_id, resumed) == (pending["id"], [True])
            detail = await api.get(c, artifact_id)
            out = tmp_path / "out"
            out.mkdir()
            await download(c, artifact_id, out)
        assert detail["status"] == "complete"
        (entry,) = detail["manifest"]["files"]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert hashlib.sha256((out / "weights.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        assert len([e for e in await stack.events() if e["action"] == "artifact.complete"]) == 1
    finally:
        await stack.server.close()

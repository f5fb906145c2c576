"""Fixtures for artifact tests: a stack with small parts, and a developer with a client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from minio import Minio

from exchange.dev.seaweed import SeaweedFS
from tests.conftest import BUCKET, FakeClock, Stack, start_stack

#: The smallest part size storage accepts (SeaweedFS enforces S3's 5 MiB): 80 encrypted chunks.
SMALL_PART_BYTES = 5 * 1024 * 1024


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path, database_url, seaweed, clock, upload_min_part_bytes=SMALL_PART_BYTES)
    yield s
    await s.server.close()


@pytest.fixture
def bucket(seaweed: SeaweedFS) -> Minio:
    """The minio SDK on the same bucket: an independent view of what storage holds."""
    host = seaweed.endpoint.split("://", 1)[1]
    return Minio(
        host,
        access_key=seaweed.credentials.access_key_id,
        secret_key=seaweed.credentials.secret_access_key,
        secure=False,
        region="us-east-1",
    )


def write(path: Path, size: int, *, seed: int = 0) -> bytes:
    """A file of `size` pseudo-random bytes (distinct per seed), written and returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = (
        os.urandom(min(size, 1 << 20))
        if seed == 0
        else bytes((seed + i) % 251 for i in range(min(size, 1 << 20)))
    )
    data = (block * (size // max(1, len(block)) + 1))[:size]
    path.write_bytes(data)
    return data


__all__ = ["BUCKET", "SMALL_PART_BYTES", "write"]

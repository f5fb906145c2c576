"""Fixtures for findings: lab's artifact granted to aisi's tester, and a clearinghouse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exchange.client import links
from exchange.client.transfer import upload
from exchange.dev.seaweed import SeaweedFS
from exchange.identity import Identity
from tests.artifacts.conftest import write
from tests.conftest import FakeClock, Stack, start_stack

#: The body of the finding the tests report.
BODY = b"# Safeguard bypass\n\nThe model writes working exploit code when asked in Welsh.\n"
#: Small, so the oversize-body case does not need megabytes.
BODY_MAX_BYTES = 4096


@pytest.fixture
async def fstack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    """A stack whose findings are also encrypted to the clearinghouse principal `clara`."""
    s = await start_stack(
        tmp_path,
        database_url,
        seaweed,
        clock,
        finding_clearinghouse=("clara", "nobody-by-that-name"),
        finding_body_max_bytes=BODY_MAX_BYTES,
    )
    yield s
    await s.server.close()


@dataclass
class World:
    dana: Identity  # developer, lab (owns the artifact)
    dave: Identity  # developer, lab
    tess: Identity  # tester, aisi, granted the artifact
    tom: Identity  # tester, aisi, not granted
    clara: Identity  # the clearinghouse
    ada: Identity  # auditor
    artifact_id: str


async def world(stack: Stack, tmp_path: Path) -> World:
    dana = await stack.principal("dana", "developer", org="lab")
    dave = await stack.principal("dave", "developer", org="lab")
    tess = await stack.principal("tess", "tester", org="aisi")
    tom = await stack.principal("tom", "tester", org="aisi")
    clara = await stack.principal("clara", "tester", org="clearinghouse")
    ada = await stack.principal("ada", "auditor", org="audit")
    src = tmp_path / "model" / "weights.bin"
    write(src, 50_000, seed=11)
    async with stack.client(dana) as c:
        artifact_id = await upload(c, src, kind="model-weights")
        await links.grant(c, artifact_id, "tess")
    return World(dana, dave, tess, tom, clara, ada, artifact_id)

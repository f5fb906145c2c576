"""The upload's two ways of sending a part, and its memory bound, end to end.

A part within `memory_part_bytes` is encrypted once into a buffer (hashed as it is sealed) and
sent from it; at most as many buffers exist as the memory budget allows. A larger part is never
held: it is encrypted once to hash it and again as it is sent. Whichever way, the download
verifies everything (signed manifest, part digests, every chunk's tag, the plaintext SHA-256).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exchange.client import _upload
from exchange.client.transfer import download, upload
from tests.artifacts.conftest import SMALL_PART_BYTES, write
from tests.conftest import Stack

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("memory_part_bytes", "budget", "most_buffers"),
    [
        (32 * MIB, _upload.MEMORY_BUDGET_BYTES, 9),  # in memory: 6 sent, 3 ready behind them
        (32 * MIB, SMALL_PART_BYTES + MIB, 1),  # in memory, one part at a time
        (MIB, _upload.MEMORY_BUDGET_BYTES, 0),  # streamed: encrypted twice, never held
    ],
    ids=["in-memory", "in-memory-one-at-a-time", "streamed"],
)
async def test_both_ways_round_trip_within_the_budget(
    stack: Stack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    memory_part_bytes: int,
    budget: int,
    most_buffers: int,
) -> None:
    allocated: list[int] = []
    real_buffer = _upload._buffer

    def counting_buffer(size: int) -> Any:
        allocated.append(size)
        return real_buffer(size)

    monkeypatch.setattr(_upload, "_buffer", counting_buffer)
    monkeypatch.setattr(_upload, "MEMORY_BUDGET_BYTES", budget)
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "src" / "model.bin", 10 * SMALL_PART_BYTES)  # 10 whole parts
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "src" / "model.bin", memory_part_bytes=memory_part_bytes)
        await download(c, artifact_id, out)
    assert (out / "model.bin").read_bytes() == data
    assert len(allocated) <= most_buffers
    if most_buffers:
        assert allocated, "the parts were to be held in memory"
        assert sum(allocated) <= budget

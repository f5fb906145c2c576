"""Downloads write around the page cache (direct I/O) and read back the same way to hash; the
page cache path stays for filesystems that refuse it and for EXCHANGE_DIRECT_IO=0. `workers`
bounds the threads doing crypto at once. Real SeaweedFS and databases; the only stand-in is a
write refused with EINVAL, which no filesystem here produces on demand."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from exchange.client import _download
from exchange.client._parts import CPUSlots, _cpu
from exchange.client.transfer import download, upload
from tests.artifacts.conftest import write
from tests.conftest import Stack

MIB = 1024 * 1024

#: The tail of each size is what a write of whole 4 KiB blocks cannot carry.
SIZES = {
    "one-byte.bin": 1,
    "chunk-and-one.bin": 65_537,
    "odd.bin": 3 * 65_536 + 4_097,
    "two-parts.bin": 2 * 5 * MIB + 7,  # the stack's parts are 5 MiB
}


def resident_bytes(path: Path) -> int:
    """How much of the file the page cache holds (util-linux's fincore, which asks mincore(2))."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def drop_cached(path: Path) -> None:
    """Evict the file's clean pages, so only what a download puts there afterwards counts."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def record_direct_opens(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    opened: list[int] = []
    real = _download._open_direct

    def spy(path: Path, fd: int) -> int:
        direct = real(path, fd)
        opened.append(direct)
        return direct

    monkeypatch.setattr(_download, "_open_direct", spy)
    return opened


async def round_trip(stack: Stack, tmp_path: Path, **kwargs: Any) -> tuple[Path, dict[str, bytes]]:
    dev = await stack.principal("dana", "developer", org="lab")
    src = tmp_path / "src" / "weights"
    data = {name: write(src / name, size) for name, size in SIZES.items()}
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, src, **kwargs)
        for name in SIZES:
            drop_cached(src / name)
        await download(c, artifact_id, out, **kwargs)
    return out / "weights", data


async def test_a_download_writes_around_the_page_cache(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = record_direct_opens(monkeypatch)
    out, data = await round_trip(stack, tmp_path)
    assert len(opened) == len(SIZES) and all(fd >= 0 for fd in opened)
    for name in data:
        # Nothing of the file went through the page cache but its tail that is not whole 4 KiB
        # blocks (at most one page; none when the size is whole blocks).
        assert resident_bytes(out / name) <= 4096, name
    for name, content in data.items():
        assert (out / name).read_bytes() == content


async def test_direct_io_off_keeps_the_page_cache_path(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXCHANGE_DIRECT_IO", "0")
    opened = record_direct_opens(monkeypatch)
    out, data = await round_trip(stack, tmp_path)
    assert opened and all(fd == -1 for fd in opened)
    big = out / "two-parts.bin"
    # Written through the page cache: it is there (the write-back only starts it on its way).
    assert resident_bytes(big) >= SIZES["two-parts.bin"] // 2
    for name, content in data.items():
        assert (out / name).read_bytes() == content


async def test_a_write_refused_for_direct_io_goes_through_the_page_cache(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused: list[int] = []
    real = _download._pwrite_all

    def pwrite(fd: int, data: Any, offset: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and offset % (2 * 65_536) == 0:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, data, offset)

    monkeypatch.setattr(_download, "_pwrite_all", pwrite)
    out, data = await round_trip(stack, tmp_path)
    assert refused  # some writes were refused, and went the other way
    for name, content in data.items():
        assert (out / name).read_bytes() == content


async def test_a_read_back_refused_for_direct_io_hashes_through_the_page_cache(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused: list[int] = []
    real = os.preadv

    def preadv(fd: int, buffers: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    # Parts too large to wait in memory for the hasher are read back (with direct I/O).
    monkeypatch.setattr(_download, "HELD_PLAINTEXT_BYTES", 0)
    out, data = await round_trip(stack, tmp_path)
    assert refused
    for name, content in data.items():
        assert (out / name).read_bytes() == content


async def test_the_hasher_hashes_from_memory_and_reads_nothing_back(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each part waits for the in-order hasher in a buffer of its own: nothing is read back from
    disk, and no more part buffers exist than the window, parts landing out of order included."""
    reads: list[int] = []
    real_preadv = os.preadv

    def preadv(fd: int, buffers: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # a read-back (the upload reads sources)
            reads.append(offset)
        return real_preadv(fd, buffers, offset)

    read_back: list[int] = []
    real_hash_range = _download._hash_range

    def hash_range(h: Any, fd: int, start: int, end: int, where: str) -> None:
        read_back.append(start)
        real_hash_range(h, fd, start, end, where)

    made: list[int] = []
    real_buffer = _download._buffer

    def buffer(size: int) -> memoryview:
        made.append(size)
        return real_buffer(size)

    windows: list[int] = []
    real_run = _download._Download.run

    async def run(self: Any, files: Any) -> None:
        windows.append(self.window)
        await real_run(self, files)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(_download, "_hash_range", hash_range)
    monkeypatch.setattr(_download, "_buffer", buffer)
    monkeypatch.setattr(_download._Download, "run", run)
    out, data = await round_trip(stack, tmp_path, concurrency=2)
    # Still around the page cache: what was written went to disk directly.
    for name in data:
        assert resident_bytes(out / name) <= 4096, name
    for name, content in data.items():
        assert (out / name).read_bytes() == content
    assert reads == [] and read_back == []
    largest = max(made)
    assert 0 < made.count(largest) <= windows[0]


async def test_a_full_disk_under_direct_io_is_a_clear_error(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_download, "_pwrite_all", full)
    dev = await stack.principal("dana", "developer", org="lab")
    write(tmp_path / "w.bin", 300_000)
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "w.bin")
        with pytest.raises(Exception) as err:
            await download(c, artifact_id, out)
    assert getattr(err.value, "code", None) == "disk-full"
    assert list(out.iterdir()) == []  # nothing half-written stays behind, no session to resume


async def test_one_worker_round_trips(stack: Stack, tmp_path: Path) -> None:
    out, data = await round_trip(stack, tmp_path, workers=1)
    for name, content in data.items():
        assert (out / name).read_bytes() == content


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_bound_the_threads_doing_crypto_at_once(workers: int) -> None:
    slots = CPUSlots(workers)
    busy = 0
    most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal busy, most
        slots.bind()
        for _ in range(5):
            with _cpu():
                with lock:
                    busy += 1
                    most = max(most, busy)
                time.sleep(0.01)
                with lock:
                    busy -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == workers


def test_a_thread_bound_to_no_transfer_runs_free() -> None:
    seen: list[object] = []
    t = threading.Thread(target=lambda: seen.append(_cpu()))
    t.start()
    t.join()
    assert not isinstance(seen[0], threading.BoundedSemaphore)


def test_the_default_is_every_cpu_this_process_may_use() -> None:
    assert CPUSlots(None).workers == len(os.sched_getaffinity(0))
    assert CPUSlots(0).workers == 1

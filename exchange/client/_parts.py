"""What uploads and downloads share: local file access, one part's encryption and decryption
(run on worker threads), and the retry loop. An implementation detail of `transfer`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    Conflict,
    ExchangeError,
    LocalFileError,
    StorageUnavailable,
)
from ..format import age
from ..format.manifest import PartRange
from ._storage_http import RETRYABLE

#: Attempts at one part before the transfer gives up (network failures, retryable answers).
_ATTEMPTS = 4
_READ_BLOCK = 1024 * 1024
#: Encrypted chunks per step when a part is streamed or decrypted as it arrives (~1 MiB).
_STREAM_CHUNKS = 16
#: Plaintext chunks read at a time to encrypt: small enough to stay in the CPU cache between the
#: read and the encryption (reading a whole step at once cost more system time, measured).
_READ_CHUNKS = int(os.environ.get("XB_READ_CHUNKS", "2"))
_E = age.ENCRYPTED_CHUNK_SIZE
NONCE = age.NONCE_SIZE

#: Called with a number of plaintext bytes each time that many more are done.
Progress = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


@dataclass(frozen=True)
class SourceFile:
    path: str  # inside the artifact
    source: Path  # on disk
    size: int
    mtime_ns: int = 0


def _disk_error(exc: OSError, where: Path) -> LocalFileError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return LocalFileError(f"no space left on the device writing {where}", code="disk-full")
    return LocalFileError(f"cannot write {where}: {exc.strerror}")


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _read_exact(fd: int, size: int, offset: int, where: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise _changed(where)
    return data


def _changed(where: str) -> LocalFileError:
    return LocalFileError(f"{where} changed while it was being read (it is shorter now)", code="file-changed")


def _pread_into(fd: int, view: memoryview, offset: int, where: str) -> None:
    """Fill `view` from `fd` at `offset` (no intermediate bytes object where preadv exists)."""
    if not _HAS_PREADV:  # pragma: no cover - macOS before 11
        view[:] = _read_exact(fd, len(view), offset, where)
        return
    filled = 0
    while filled < len(view):
        n = os.preadv(fd, [view[filled:]], offset + filled)
        if n <= 0:
            raise _changed(where)
        filled += n


_HAS_PREADV = hasattr(os, "preadv")


# -- part encryption and decryption (run on worker threads) --------------------------------------


def default_workers() -> int:
    """Every CPU this process may run on: the default number of threads doing crypto at once."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # pragma: no cover - macOS


class CPUSlots:
    """At most `workers` threads of one transfer encrypt, decrypt or hash at a time.

    A transfer runs more threads than that (one per part in flight, to keep the network busy, and
    one hasher), but only this many do crypto at once, so `workers` is how many cores the
    transfer uses. Each worker thread learns the transfer's slots from its pool's initializer
    (`bind`), so the functions below need no extra argument; a thread bound to none runs free."""

    def __init__(self, workers: int | None) -> None:
        self.workers = max(1, workers if workers is not None else default_workers())
        self._semaphore = threading.BoundedSemaphore(self.workers)

    def bind(self) -> None:
        """Run in each new worker thread (ThreadPoolExecutor's initializer)."""
        _scratch.cpu = self._semaphore


def _cpu() -> contextlib.AbstractContextManager[Any]:
    """This thread's crypto slot, held for one step of work (~1 MiB)."""
    semaphore: threading.BoundedSemaphore | None = getattr(_scratch, "cpu", None)
    return semaphore if semaphore is not None else contextlib.nullcontext()


#: Each worker thread's plaintext buffer for one step (_STREAM_CHUNKS chunks), reused.
_scratch = threading.local()


def _buffer(size: int) -> memoryview:
    """A zeroed buffer that starts on a page boundary. Alignment matters: measured on AMD EPYC,
    the kernel copies file and socket data into a buffer at 16 bytes past a page boundary (where
    malloc puts a large bytearray) 4 to 5 times slower than into an aligned one."""
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))


def _plain_buffer() -> memoryview:
    """This thread's plaintext buffer: one step (_STREAM_CHUNKS chunks), reused."""
    view: memoryview | None = getattr(_scratch, "plain", None)
    if view is None:
        view = _scratch.plain = _buffer(_STREAM_CHUNKS * age.CHUNK_SIZE)
    return view


def _encrypt_step(
    key: bytes,
    nonce: bytes,
    fd: int,
    size: int,
    r: PartRange,
    first: int,
    count: int,
    where: str,
    out: memoryview,
    plain_hash: Any = None,
) -> int:
    """Encrypt chunks [first, first + count) of part `r` (with the nonce if they open the part's
    payload) from the plaintext at their offset into the start of `out`; return the bytes written.

    The plaintext is read _READ_CHUNKS chunks at a time into a small buffer of this thread's,
    which stays in the CPU cache, and sealed from there straight into `out`; `plain_hash`, if
    given, is updated with it on the way (one read for both)."""
    pos = 0
    if r.has_nonce and first == r.first_chunk:
        out[:NONCE] = nonce
        pos = NONCE
    plain = _plain_buffer()
    final = r.first_chunk + r.chunks  # one past the part's last chunk
    for sub in range(first, first + count, _READ_CHUNKS):
        n = min(_READ_CHUNKS, first + count - sub)
        start = sub * age.CHUNK_SIZE
        view = plain[: min(n * age.CHUNK_SIZE, size - start)]
        _pread_into(fd, view, start, where)
        with _cpu():
            if plain_hash is not None:
                plain_hash.update(view)
            pos += age.encrypt_chunks_into(
                key, sub, view, out[pos:], last=r.has_final_chunk and sub + n == final
            )
    return pos


def _encrypted_steps(
    key: bytes, nonce: bytes, fd: int, size: int, r: PartRange, where: str, plain_hash: Any = None
) -> Iterator[memoryview]:
    """Part `r`'s ciphertext, encrypted a step at a time into one buffer: each piece yielded is
    overwritten by the next, so the consumer must be done with it first (a sendall is)."""
    out = _buffer(_STREAM_CHUNKS * _E + NONCE)
    for first, count in _steps(r):
        yield out[: _encrypt_step(key, nonce, fd, size, r, first, count, where, out, plain_hash)]


def _encrypt_part_into(
    key: bytes, nonce: bytes, fd: int, size: int, r: PartRange, where: str, buf: memoryview
) -> bytes:
    """Encrypt part `r` into `buf` (reused from part to part); return its SHA-256, hashed a step
    at a time right after each step is sealed, while it is still in the CPU cache."""
    h = hashlib.sha256()
    pos = 0
    for first, count in _steps(r):
        n = _encrypt_step(key, nonce, fd, size, r, first, count, where, buf[pos:])
        with _cpu():
            h.update(buf[pos : pos + n])
        pos += n
    if pos != r.size:  # pragma: no cover - the layout in manifest.py and the steps disagree
        raise AssertionError(f"part {r.number} encrypted to {pos} bytes, not {r.size}")
    return h.digest()


def _hash_part_streaming(key: bytes, nonce: bytes, fd: int, size: int, r: PartRange, where: str) -> bytes:
    h = hashlib.sha256()
    for piece in _encrypted_steps(key, nonce, fd, size, r, where):
        with _cpu():
            h.update(piece)
    return h.digest()


def _sha256_range(h: Any, fd: int, start: int, end: int, block: memoryview, where: str) -> None:
    # pread, not mmap: a source file truncated by someone else meanwhile must be an error here,
    # not a SIGBUS.
    offset = start
    while offset < end:
        view = block[: min(len(block), end - offset)]
        _pread_into(fd, view, offset, where)
        with _cpu():
            h.update(view)
        offset += len(view)


def _sha256_checking(
    key: bytes,
    nonce: bytes,
    fd: int,
    size: int,
    ranges: list[PartRange],
    kept: dict[int, bytes],
    where: str,
    checked: Callable[[int], None],
) -> bytes:
    """The file's SHA-256, in one pass that also checks that each part in `kept` (number ->
    the digest its URL was bound to: a part storage holds) still encrypts to that digest; its
    plaintext is read once for both. `checked(bytes)` is called for each part found unchanged.
    Raise Conflict `file-changed` for one that is not."""
    h = hashlib.sha256()
    block = _buffer(_READ_BLOCK)
    for r in ranges:
        digest = kept.get(r.number)
        if digest is None:
            _sha256_range(h, fd, r.plain_start, r.plain_end, block, where)
            continue
        part = hashlib.sha256()
        for piece in _encrypted_steps(key, nonce, fd, size, r, where, plain_hash=h):
            with _cpu():
                part.update(piece)
        if part.digest() != digest:
            raise _file_changed(where, r.number)
        checked(r.plain_end - r.plain_start)
    return h.digest()


def _file_changed(where: str, number: int) -> Conflict:
    return Conflict(
        f"{where} changed since this upload began (part {number} differs);"
        " abort the old upload (`exchange artifacts abort ID`) and upload again",
        code="file-changed",
    )


def _part_matches(key: bytes, nonce: bytes, fd: int, size: int, r: PartRange, digest: bytes) -> bool:
    """Does the plaintext at r's offset in `fd` encrypt to the part with this digest? (resume)"""
    try:
        return _hash_part_streaming(key, nonce, fd, size, r, "partial") == digest
    except LocalFileError:
        return False


async def _retrying(what: str, attempt: Callable[[], Any]) -> Any:
    """Run `attempt` until it succeeds, retrying network failures and retryable storage answers."""
    delay = 0.5
    for n in range(_ATTEMPTS):
        try:
            return await attempt()
        except RETRYABLE as exc:
            failure: Exception = StorageUnavailable(
                f"cannot reach storage for {what}: {exc.__class__.__name__}"
            )
        except StorageUnavailable as exc:
            if exc.code != "storage-retry":
                raise
            failure = exc
        if n == _ATTEMPTS - 1:
            raise failure
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: ours first, then any other, cancellations last."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for kinds in ((ExchangeError,), (Exception,), (BaseException,)):
        for leaf in leaves:
            if isinstance(leaf, kinds) and not isinstance(leaf, asyncio.CancelledError):
                return leaf
    return leaves[0]


def _steps(r: PartRange) -> list[tuple[int, int]]:
    """(first chunk, chunk count) of each streaming step of part r."""
    return [
        (first, min(_STREAM_CHUNKS, r.first_chunk + r.chunks - first))
        for first in range(r.first_chunk, r.first_chunk + r.chunks, _STREAM_CHUNKS)
    ]

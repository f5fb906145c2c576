"""What uploads and downloads share: local file access, one part's encryption and decryption
(run on worker threads), and the retry loop. An implementation detail of `transfer`."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    AgePayloadError,
    ExchangeError,
    IntegrityError,
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
        raise LocalFileError(
            f"{where} changed while it was being read (it is shorter now)", code="file-changed"
        )
    return data


# -- part encryption and decryption (run on worker threads) --------------------------------------


def _encrypt_range(
    key: bytes, nonce: bytes, fd: int, size: int, r: PartRange, first: int, count: int, where: str
) -> bytes:
    """Chunks [first, first + count) of part `r` (with the nonce if they open the part's payload)."""
    out = bytearray(nonce if (r.has_nonce and first == r.first_chunk) else b"")
    for index in range(first, first + count):
        start = index * age.CHUNK_SIZE
        plain = _read_exact(fd, min(age.CHUNK_SIZE, size - start), start, where)
        last = r.has_final_chunk and index == r.first_chunk + r.chunks - 1
        out += age.encrypt_chunk(key, index, plain, last=last)
    return bytes(out)


def _encrypt_part_into(
    key: bytes, nonce: bytes, fd: int, size: int, r: PartRange, where: str, buf: bytearray
) -> bytes:
    """Encrypt part `r` into `buf` (reused from part to part); return its SHA-256."""
    pos = 0
    if r.has_nonce:
        buf[:NONCE] = nonce
        pos = NONCE
    for index in range(r.first_chunk, r.first_chunk + r.chunks):
        start = index * age.CHUNK_SIZE
        plain = _read_exact(fd, min(age.CHUNK_SIZE, size - start), start, where)
        last = r.has_final_chunk and index == r.first_chunk + r.chunks - 1
        sealed = age.encrypt_chunk(key, index, plain, last=last)
        buf[pos : pos + len(sealed)] = sealed
        pos += len(sealed)
    with memoryview(buf) as view:
        return hashlib.sha256(view[:pos]).digest()


def _hash_part_streaming(key: bytes, nonce: bytes, fd: int, size: int, r: PartRange, where: str) -> bytes:
    h = hashlib.sha256()
    for first in range(r.first_chunk, r.first_chunk + r.chunks, _STREAM_CHUNKS):
        count = min(_STREAM_CHUNKS, r.first_chunk + r.chunks - first)
        h.update(_encrypt_range(key, nonce, fd, size, r, first, count, where))
    return h.digest()


def _sha256_file(fd: int, size: int, where: str) -> bytes:
    # pread, not mmap: a source file truncated by someone else meanwhile must be an error here,
    # not a SIGBUS.
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        block = _read_exact(fd, min(_READ_BLOCK, size - offset), offset, where)
        h.update(block)
        offset += len(block)
    return h.digest()


def _decrypt_range(
    key: bytes, r: PartRange, data: bytes | memoryview, first: int, count: int, where: str
) -> list[bytes]:
    """Decrypt chunks [first, first + count) of part `r` from `data`, which holds exactly them."""
    view = memoryview(data)
    out = []
    offset = 0
    for index in range(first, first + count):
        last = r.has_final_chunk and index == r.first_chunk + r.chunks - 1
        end = len(view) if last else offset + _E
        try:
            out.append(age.decrypt_chunk(key, index, bytes(view[offset:end]), last=last))
        except AgePayloadError as exc:
            raise IntegrityError(f"{where}: {exc.message}", path=where) from None
        offset = end
    if offset != len(view):
        raise IntegrityError(f"{where}: part {r.number} has bytes after its last chunk", path=where)
    return out


def _part_matches(key: bytes, nonce: bytes, fd: int, size: int, r: PartRange, digest: bytes) -> bool:
    """Does the plaintext at r's offset in `fd` encrypt to the part with this digest? (resume)"""
    try:
        h = hashlib.sha256()
        for first in range(r.first_chunk, r.first_chunk + r.chunks, _STREAM_CHUNKS):
            count = min(_STREAM_CHUNKS, r.first_chunk + r.chunks - first)
            h.update(_encrypt_range(key, nonce, fd, size, r, first, count, "partial"))
        return h.digest() == digest
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

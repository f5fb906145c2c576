"""The download engine: ranged GETs decrypted on worker threads into the staging files, the
plaintext hashed in order as parts land, URLs renewed as they age. An implementation detail of
`transfer`, which documents the protocol."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import hashlib
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..errors import (
    AgePayloadError,
    IntegrityError,
    LocalFileError,
    ManifestError,
    StorageUnavailable,
)
from ..files import fsync_directory
from ..format import age
from ..format.manifest import (
    FileEntry,
    Manifest,
    PartRange,
)
from . import Client
from . import artifacts as api
from ._parts import (
    _E,
    _READ_BLOCK,
    _STREAM_CHUNKS,
    NONCE,
    Progress,
    _buffer,
    _disk_error,
    _first_error,
    _part_matches,
    _plain_buffer,
    _pwrite_all,
    _retrying,
    _steps,
)
from ._storage_http import StorageHTTP, raise_for_answer


@dataclass
class _DownloadFile:
    entry: FileEntry
    url: str
    part_digests: list[bytes]
    ranges: list[PartRange]
    target: Path
    key: bytes
    fd: int = -1
    #: Set when part n (1-based) is written (or found intact on resume); the hasher waits on them.
    written: dict[int, asyncio.Event] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    sha256: bytes = b""


def _verified_manifest(info: dict[str, Any], uploader: dict[str, Any]) -> Manifest:
    """The artifact's manifest, verified with the key it names, which must be one its uploader
    holds or held (`previous_keys`: a manifest signed before a key rotation still verifies)."""
    manifest = Manifest.from_json(info.get("manifest"))
    signature = base64.b64decode(info.get("manifest_signature", ""), validate=True)
    held = {uploader["key_id"]: uploader["signing_public_key"]} | {
        k["key_id"]: k["signing_public_key"] for k in uploader.get("previous_keys") or ()
    }
    public_key = held.get(manifest.uploader)
    if public_key is None:
        raise ManifestError(
            "the manifest names another signing key than its uploader's", code="manifest-signature"
        )
    manifest.verify(signature, base64.b64decode(public_key))
    if manifest.artifact != info["id"] or manifest.name != info["name"]:
        raise ManifestError("the manifest is for another artifact", code="manifest-mismatch")
    return manifest


def _prune(staging: Path, expected: set[str]) -> None:
    """Remove from a partial directory whatever this artifact does not hold (left by another
    download of the same name, or put there by someone else): it would be moved into place."""
    for root, dirs, names in os.walk(staging, topdown=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            if os.path.islink(path) or os.path.relpath(path, staging) not in expected:
                os.unlink(path)
        if root != str(staging) and not os.listdir(root):
            os.rmdir(root)


def _fsync_dir(path: Path) -> None:
    # Best effort here: the files themselves were fsynced, and some filesystems refuse this.
    with contextlib.suppress(OSError):
        fsync_directory(path)


def _read_into(resp: Any, view: memoryview) -> memoryview:
    """Fill `view` from the answer; return the filled prefix (shorter only at the end of the body)."""
    filled = 0
    while filled < len(view):
        n = resp.readinto(view[filled:])
        if not n:
            break
        filled += n
    return view[:filled]


def _decrypt_and_write(
    key: bytes,
    r: PartRange,
    block: memoryview,
    first: int,
    count: int,
    fd: int,
    where: str,
    target: Path,
) -> int:
    """Open chunks [first, first + count) of part `r` from `block`, which holds exactly them,
    into this thread's step buffer, and write them at their offset with one pwrite."""
    last = r.has_final_chunk and first + count == r.first_chunk + r.chunks
    expected = min(count * age.CHUNK_SIZE, r.plain_end - first * age.CHUNK_SIZE)
    plain = _plain_buffer()
    try:
        opened = age.decrypt_chunks_into(key, first, block, plain, last=last)
    except AgePayloadError as exc:
        raise IntegrityError(f"{where}: {exc.message}", path=where) from None
    if opened != expected:
        raise IntegrityError(f"{where}: part {r.number} does not hold the chunks it should", path=where)
    try:
        _pwrite_all(fd, plain[:opened], first * age.CHUNK_SIZE)
    except OSError as exc:
        raise _disk_error(exc, target) from None
    return opened


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which the standard library does not wrap; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_sync_file_range = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _write_back(fd: int, start: int, end: int, settle: tuple[int, int] | None) -> None:
    """Start writing bytes [start, end) of a staging file to disk, and wait until the range
    `settle` (written earlier) is on its way out. Only a head start: the fsync before the rename
    is what makes the file durable, and reports any error; this leaves it little to do, where
    otherwise it would write the whole file out at the end (seconds per GiB)."""
    if _sync_file_range is None:
        return
    _sync_file_range(fd, start, end - start, _SFR_WRITE)
    if settle is not None:
        wait = _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER
        _sync_file_range(fd, settle[0], settle[1] - settle[0], wait)


def _hash_range(h: Any, fd: int, start: int, end: int, where: str) -> None:
    """Feed bytes [start, end) of a file we wrote to `h`, straight from the page cache (no copy).

    Only for the staging files of a download, which are ours (mode 0600 in a 0700 directory):
    mapping a file someone else may truncate would risk a SIGBUS."""
    if end <= start:
        return
    page = mmap.ALLOCATIONGRANULARITY
    base = start - start % page
    with (
        mmap.mmap(fd, end - base, access=mmap.ACCESS_READ, offset=base) as mapped,
        memoryview(mapped) as view,
    ):
        for offset in range(start - base, end - base, 16 * _READ_BLOCK):
            h.update(view[offset : min(offset + 16 * _READ_BLOCK, end - base)])


#: A download in progress remembers its session in DIR/<marker><suffix>, to resume uncounted.
SESSION_SUFFIX = ".exchange-session"


class _URLRefresher:
    """Presigned GETs live minutes; a download of hundreds of gigabytes outlives them. Before a
    part is fetched with a URL near its end, the service is asked for fresh ones (an audited
    access like the first)."""

    _MARGIN_S = 30.0

    def __init__(self, client: Client, info: dict[str, Any], files: Sequence[_DownloadFile]) -> None:
        self._client = client
        self._id = str(info["id"])
        self._session: str | None = info.get("session")
        self._files = {f.entry.path: f for f in files}
        self._lock = asyncio.Lock()
        self._renew_at = time.monotonic() + max(0.0, float(info["expires_in_s"]) - self._MARGIN_S)

    async def ensure_fresh(self) -> None:
        if time.monotonic() < self._renew_at:
            return
        async with self._lock:
            if time.monotonic() < self._renew_at:
                return
            info = await self._fetch_info()
            for served in info["files"]:
                self._files[served["path"]].url = served["url"]
            self._renew_at = time.monotonic() + max(0.0, float(info["expires_in_s"]) - self._MARGIN_S)

    async def _fetch_info(self) -> dict[str, Any]:
        # The same session, renewed: a long download is one download, counted once.
        return await api.download_info(self._client, self._id, session=self._session)

    def expire(self) -> None:
        """Storage refused a URL: renew before the next attempt."""
        self._renew_at = 0.0


class _Download:
    """Parts are fetched and decrypted in parallel, streamed in ~1 MiB steps, and written at
    their offsets; one hasher reads each file back in order (from the page cache) as its parts
    land, so no part is ever held in memory whole, whatever the part size."""

    def __init__(self, concurrency: int, progress: Progress, urls: _URLRefresher) -> None:
        self.urls = urls
        self.concurrency = max(1, concurrency)
        self.progress = progress
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="decrypt")
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeback")
        self.storage = StorageHTTP()
        self._local = threading.local()

    async def prepare(self, staging: Path, files: Sequence[_DownloadFile]) -> int:
        """Open (or reopen, to resume) every file in the staging directory; return bytes already done."""
        loop = asyncio.get_running_loop()
        staging.mkdir(mode=0o700, parents=False, exist_ok=True)
        if staging.is_symlink():
            # Planted by whoever can write to the destination: following it would write (and
            # prune) wherever it points.
            raise LocalFileError(f"{staging} is a symbolic link; not following it", code="symlink")
        _prune(staging, {f.entry.path for f in files})
        done = 0
        for f in files:
            f.written = {r.number: asyncio.Event() for r in f.ranges}
            try:
                f.target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                f.fd = os.open(f.target, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
                existing = os.fstat(f.fd).st_size
                if existing != f.entry.size:
                    os.ftruncate(f.fd, f.entry.size)
                    if f.entry.size and hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(f.fd, 0, f.entry.size)  # a full disk shows now, not mid-way
            except OSError as exc:
                raise _disk_error(exc, f.target) from None
            if existing == f.entry.size and existing > 0:
                # Resume: a part whose plaintext re-encrypts to its digest is done.
                matches = await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            self.pool,
                            _part_matches,
                            f.key,
                            f.entry.nonce,
                            f.fd,
                            f.entry.size,
                            r,
                            f.part_digests[r.number - 1],
                        )
                        for r in f.ranges
                    )
                )
                for r, ok in zip(f.ranges, matches, strict=True):
                    if ok:
                        f.done.add(r.number)
                        f.written[r.number].set()
                        done += r.plain_end - r.plain_start
        return done

    async def run(self, files: Sequence[_DownloadFile]) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._hash_in_order(files))
                for f in files:
                    for r in f.ranges:
                        if r.number in f.done:
                            continue
                        await slots.acquire()
                        group.create_task(self._part(f, r, slots))
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None

    async def _hash_in_order(self, files: Sequence[_DownloadFile]) -> None:
        loop = asyncio.get_running_loop()
        flushes: list[asyncio.Future[None]] = []
        for f in files:
            h = hashlib.sha256()
            for n, r in enumerate(f.ranges):
                await f.written[r.number].wait()
                await loop.run_in_executor(
                    self.hasher, _hash_range, h, f.fd, r.plain_start, r.plain_end, str(f.target)
                )
                # Hashed parts go to disk now (on a thread of their own, never in the hasher's
                # way) rather than all at once in the fsync at the end; each waits for the
                # part two back, so the dirty pages stay bounded too.
                back = f.ranges[n - 2] if n >= 2 else None
                settle = (back.plain_start, back.plain_end) if back is not None else None
                flushes.append(
                    loop.run_in_executor(self.flusher, _write_back, f.fd, r.plain_start, r.plain_end, settle)
                )
            f.sha256 = h.digest()
        await asyncio.gather(*flushes)

    async def _part(self, f: _DownloadFile, r: PartRange, slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:

            async def attempt() -> None:
                await self.urls.ensure_fresh()
                try:
                    await loop.run_in_executor(self.pool, self._fetch, f, r)
                except StorageUnavailable:
                    self.urls.expire()
                    raise

            await _retrying(f"part {r.number} of {f.entry.path}", attempt)
            f.written[r.number].set()
            self.progress(r.plain_end - r.plain_start)
        finally:
            slots.release()

    def _fetch(self, f: _DownloadFile, r: PartRange) -> None:
        """On a worker thread: GET part r and decrypt it as it arrives, ~1 MiB at a time, into a
        buffer the thread reuses. AEAD authenticates every chunk under the file key (tampering,
        reordering, truncation); the plaintext SHA-256 then proves the file is the uploader's, so
        the ciphertext need not be hashed again here."""
        where = f.entry.path
        view: memoryview | None = getattr(self._local, "buf", None)
        if view is None:
            view = self._local.buf = _buffer(_STREAM_CHUNKS * _E)
        resp = self.storage.request("GET", f.url, headers={"Range": f"bytes={r.start}-{r.end - 1}"})
        try:
            raise_for_answer(resp, f"part {r.number} of {where}")
            # "bytes START-END/TOTAL": the whole object's size must be the manifest's too.
            total = (resp.getheader("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) != f.entry.ciphertext_size:
                raise IntegrityError(
                    f"{where}: the stored object is {total} bytes,"
                    f" the manifest says {f.entry.ciphertext_size}",
                    path=where,
                )
            if r.has_nonce and _read_into(resp, view[:NONCE]) != f.entry.nonce:
                raise IntegrityError(
                    f"{where}: the payload starts with another nonce than the manifest's", path=where
                )
            steps = _steps(r)
            left = r.size - (NONCE if r.has_nonce else 0)
            for first, count in steps:
                size = min(count * _E, left)
                block = _read_into(resp, view[:size])
                if len(block) != size:
                    raise IntegrityError(
                        f"{where}: part {r.number} is shorter in storage than in the manifest", path=where
                    )
                left -= size
                _decrypt_and_write(f.key, r, block, first, count, f.fd, where, f.target)
            if resp.read(1):
                raise IntegrityError(
                    f"{where}: part {r.number} is longer in storage than in the manifest", path=where
                )
        except BaseException:
            self.storage.drop(f.url)  # the answer may be unread: the connection cannot be reused
            raise

    async def finish(self, files: Sequence[_DownloadFile]) -> None:
        loop = asyncio.get_running_loop()
        for f in files:
            if f.sha256 != f.entry.sha256:
                raise IntegrityError(
                    f"{f.entry.path}: the decrypted file does not match the SHA-256 in the signed manifest",
                    path=f.entry.path,
                )
            try:
                await loop.run_in_executor(self.hasher, os.fsync, f.fd)
            except OSError as exc:
                raise _disk_error(exc, f.target) from None

    def close(self, files: Sequence[_DownloadFile]) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.hasher.shutdown(wait=True, cancel_futures=True)
        self.flusher.shutdown(wait=True, cancel_futures=True)
        self.storage.close()
        for f in files:
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1

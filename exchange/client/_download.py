"""The download engine: ranged GETs decrypted on worker threads into the staging files, the
plaintext hashed in order as parts land, URLs renewed as they age. An implementation detail of
`transfer`, which documents the protocol."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import errno
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
    CPUSlots,
    Progress,
    _buffer,
    _cpu,
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
    #: The same file opened for direct I/O (around the page cache), or -1 (see `_open_direct`).
    direct_fd: int = -1
    #: Set when part n (1-based) is written (or found intact on resume); the hasher waits on them.
    written: dict[int, asyncio.Event] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    #: Of `done`, the parts taken on the journal's word (not read back before this run).
    trusted: set[int] = field(default_factory=set)
    #: Parts written this run whose plaintext waits in memory for the hasher (number -> buffer).
    held: dict[int, memoryview] = field(default_factory=dict)
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
    f: _DownloadFile,
    where: str,
    plain: memoryview,
) -> int:
    """Open chunks [first, first + count) of part `r` from `block`, which holds exactly them,
    into `plain` (page-aligned: the part's buffer at their place in it, or a step buffer), and
    write them at their offset (a multiple of the chunk size) with one pwrite."""
    last = r.has_final_chunk and first + count == r.first_chunk + r.chunks
    expected = min(count * age.CHUNK_SIZE, r.plain_end - first * age.CHUNK_SIZE)
    try:
        with _cpu():
            opened = age.decrypt_chunks_into(key, first, block, plain, last=last)
    except AgePayloadError as exc:
        raise IntegrityError(f"{where}: {exc.message}", path=where) from None
    if opened != expected:
        raise IntegrityError(f"{where}: part {r.number} does not hold the chunks it should", path=where)
    offset = first * age.CHUNK_SIZE
    # Whole blocks around the page cache where the file allows it; what is left (the file's last
    # few bytes, or everything if direct I/O is off or refused) through it.
    direct = opened - opened % DIRECT_IO_ALIGN if f.direct_fd >= 0 else 0
    try:
        if direct:
            try:
                _pwrite_all(f.direct_fd, plain[:direct], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = 0  # refused by this filesystem after all
        if direct < opened:
            _pwrite_all(f.fd, plain[direct:opened], offset + direct)
    except OSError as exc:
        raise _disk_error(exc, f.target) from None
    return opened


#: Direct I/O moves whole blocks: offsets, lengths and buffer addresses are multiples of this
#: (4 KiB covers every common disk; chunk boundaries are multiples of 64 KiB, buffers start on
#: a page).
DIRECT_IO_ALIGN = 4096


def _direct_io_wanted() -> bool:
    """EXCHANGE_DIRECT_IO=0 keeps downloads in the page cache (for a filesystem where direct I/O
    is slow, such as some network filesystems)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("EXCHANGE_DIRECT_IO", "1") != "0"


def _open_direct(path: Path, fd: int) -> int:
    """`path` (open as `fd`) opened again for direct I/O, or -1 where the platform or the
    filesystem has none.

    A download writes every byte once and never reads it again but to hash it: through the page
    cache that costs a copy and a fresh page per 4 KiB (on a virtual machine whose freed memory
    goes back to its host, a fault in the host too: measured, 2 of the 4 CPU seconds a GiB took),
    then writing the dirty pages out. Direct I/O sends the decrypted step from our buffer to the
    disk, and the hasher reads it back the same way, into a buffer of its own."""
    if not _direct_io_wanted():
        return -1
    try:
        direct = os.open(path, os.O_RDWR | os.O_DIRECT | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return -1  # tmpfs before Linux 6.6, some FUSE filesystems: the page cache it is
    first, again = os.fstat(fd), os.fstat(direct)
    if (first.st_dev, first.st_ino) != (again.st_dev, again.st_ino):
        os.close(direct)
        raise LocalFileError(f"{path} was replaced while it was being opened", code="file-changed")
    return direct


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
            with _cpu():
                h.update(view[offset : min(offset + 16 * _READ_BLOCK, end - base)])


#: The hasher reads a file back this many bytes at a time when it reads around the page cache.
_HASH_READ_BYTES = 8 * 1024 * 1024
#: Decrypted parts waiting in memory for the in-order hasher stay within this many bytes; with
#: parts too large for a window of them (`_Download.window`), parts are read back to be hashed.
HELD_PLAINTEXT_BYTES = 96 * 1024 * 1024


def _hash_view(h: Any, view: memoryview) -> None:
    with _cpu():
        h.update(view)


def _hash_range_direct(
    h: Any, direct_fd: int, fd: int, start: int, end: int, buf: memoryview, where: str
) -> None:
    """Feed bytes [start, end) of a staging file to `h`, read with direct I/O (`direct_fd`) into
    `buf` (page-aligned). `start` is a chunk boundary; `end` is one too, or the end of the file,
    where a read of whole blocks comes back short with exactly the bytes there are. Should the
    filesystem refuse a direct read after all, the rest is hashed through the page cache (`fd`)."""
    pos = start
    while pos < end:
        want = min(len(buf), end - pos)
        whole = -(-want // DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN
        got = 0
        try:
            while got < want:
                n = os.preadv(direct_fd, [buf[got:whole]], pos + got)
                if n <= 0:
                    break
                got += n
                if n % DIRECT_IO_ALIGN:
                    break  # the end of the file
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                _hash_range(h, fd, pos, end, where)
                return
            raise LocalFileError(f"cannot read back {where}: {exc.strerror}") from None
        if got < want:
            raise IntegrityError(f"{where} is shorter on disk than what was written to it", path=where)
        with _cpu():
            h.update(buf[:want])
        pos += want


class _TrustedPartsWrong(Exception):
    """A file does not hash to the manifest's SHA-256, and some of its parts were taken on the
    journal's word: they are to be checked the thorough way before anything is concluded."""


#: Beside the staging directory NAME.exchange-partial: NAME.exchange-partial<this>, the journal.
JOURNAL_SUFFIX = ".parts"
_JOURNAL_HEADER = "exchange download journal v1 manifest "
#: A journal longer than this is not ours to read (10,000 files of 10,000 parts fit many times).
_JOURNAL_MAX_BYTES = 256 * 1024 * 1024


class _Journal:
    """The parts of a download written so far: a header naming the manifest (its SHA-256), then
    a line `NUMBER PATH` for each part, appended once the part is wholly written.

    A resumed download takes its word for those parts and fetches only the others, so resuming
    costs the remainder, not a re-encryption of everything kept to check it. The word is checked
    at the end all the same: each file must hash to the manifest's SHA-256; if one does not and
    some of its parts were taken on the journal's word (changed on disk since, say), every kept
    part is then checked the thorough way and those that fail are fetched again."""

    def __init__(self, path: Path, manifest_id: str) -> None:
        self.path = path
        self.header = _JOURNAL_HEADER + manifest_id
        self._fd = -1
        self._lock = threading.Lock()

    def read(self) -> set[tuple[str, int]] | None:
        """The (path, part number) pairs this manifest's journal lists; None if there is no
        journal of this manifest (none, another download's, or unreadable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as fh:
            text = fh.read(_JOURNAL_MAX_BYTES + 1)
        if len(text) > _JOURNAL_MAX_BYTES:
            return None
        lines = text.decode("utf-8", "replace").split("\n")
        if lines[0] != self.header:
            return None
        parts = set()
        for line in lines[1:-1]:  # the last is empty, or a line cut short by a kill
            number, space, path = line.partition(" ")
            if space and number.isdigit():
                parts.add((path, int(number)))
        return parts

    def start(self, kept: set[tuple[str, int]]) -> None:
        """Begin the journal afresh, listing the parts kept."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
            lines = [self.header, *(f"{n} {p}" for p, n in sorted(kept))]
            data = memoryview(("\n".join(lines) + "\n").encode("utf-8"))
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LocalFileError(
                    f"{self.path} is a symbolic link; not following it", code="symlink"
                ) from None
            raise _disk_error(exc, self.path) from None

    def add(self, path: str, number: int) -> None:
        """Part `number` of `path` is wholly written (called on worker threads)."""
        with self._lock:
            if self._fd >= 0:
                try:
                    os.write(self._fd, f"{number} {path}\n".encode())
                except OSError as exc:
                    raise _disk_error(exc, self.path) from None

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


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
    their offsets; one hasher hashes each file in order as its parts land. Each part is decrypted
    into a buffer of its own, which waits for the hasher and goes back to a small pool: so the
    plaintext is hashed from memory, never read back from disk, and at most `window` parts'
    buffers exist (the parts start in order, one buffer each, so the part the hasher waits for
    always has one). Parts too large for a window within HELD_PLAINTEXT_BYTES, and parts written
    before this run (a resume), are read back instead (with direct I/O, or from the page cache
    where the file has none)."""

    def __init__(
        self,
        concurrency: int,
        progress: Progress,
        urls: _URLRefresher,
        journal: _Journal,
        workers: int | None = None,
    ) -> None:
        self.urls = urls
        self.journal = journal
        self.concurrency = max(1, concurrency)
        self.progress = progress
        # A thread per part in flight, and the hasher; at most `workers` of them decrypt or hash
        # at once.
        cpu = CPUSlots(workers)
        self.pool = ThreadPoolExecutor(self.concurrency, "decrypt", initializer=cpu.bind)
        self.hasher = ThreadPoolExecutor(1, "sha256", initializer=cpu.bind)
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeback")
        self._hash_buffer: memoryview | None = None
        #: Part buffers not in use, and how many more may be made (see the class).
        self._free: list[memoryview] = []
        self._buffers: asyncio.Semaphore | None = None
        self.storage = StorageHTTP()
        self._local = threading.local()

    async def prepare(
        self, staging: Path, files: Sequence[_DownloadFile], *, trust_journal: bool = True
    ) -> int:
        """Open (or reopen, to resume) every file in the staging directory; return bytes already
        done. A part the journal lists is done on its word (`trust_journal`); without a journal
        of this manifest (or not trusting it), each part of a file left whole in size is done if
        its plaintext re-encrypts to its digest."""
        loop = asyncio.get_running_loop()
        staging.mkdir(mode=0o700, parents=False, exist_ok=True)
        if staging.is_symlink():
            # Planted by whoever can write to the destination: following it would write (and
            # prune) wherever it points.
            raise LocalFileError(f"{staging} is a symbolic link; not following it", code="symlink")
        _prune(staging, {f.entry.path for f in files})
        journal = self.journal.read() if trust_journal else None
        done = 0
        for f in files:
            f.written = {r.number: asyncio.Event() for r in f.ranges}
            f.done, f.trusted, f.sha256 = set(), set(), b""
            try:
                f.target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                f.fd = os.open(f.target, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
                existing = os.fstat(f.fd).st_size
                if existing != f.entry.size:
                    os.ftruncate(f.fd, f.entry.size)
                    if f.entry.size and hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(f.fd, 0, f.entry.size)  # a full disk shows now, not mid-way
                f.direct_fd = _open_direct(f.target, f.fd)
            except OSError as exc:
                raise _disk_error(exc, f.target) from None
            if existing != f.entry.size or existing == 0:
                continue
            if journal is not None:
                f.trusted = {r.number for r in f.ranges if (f.entry.path, r.number) in journal}
                matches = [r.number in f.trusted for r in f.ranges]
            else:
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
        self.journal.start({(f.entry.path, n) for f in files for n in f.done})
        return done

    @property
    def window(self) -> int:
        """Part buffers at most: as many again as half the parts in flight, for parts that land
        out of order while the hasher waits for an earlier one."""
        return self.concurrency + max(2, self.concurrency // 2)

    async def run(self, files: Sequence[_DownloadFile]) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        largest = max((r.plain_end - r.plain_start for f in files for r in f.ranges), default=0)
        held = 0 < largest * self.window <= HELD_PLAINTEXT_BYTES
        self._buffers = asyncio.Semaphore(self.window) if held else None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._hash_in_order(files))
                for f in files:
                    for r in f.ranges:
                        if r.number in f.done:
                            continue
                        await slots.acquire()
                        buf = None
                        if self._buffers is not None:
                            # In part order, here only: see the class.
                            await self._buffers.acquire()
                            buf = self._free.pop() if self._free else _buffer(largest)
                        group.create_task(self._part(f, r, slots, buf))
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None

    def _give_back(self, buf: memoryview) -> None:
        self._free.append(buf)
        assert self._buffers is not None
        self._buffers.release()

    async def _hash_in_order(self, files: Sequence[_DownloadFile]) -> None:
        loop = asyncio.get_running_loop()
        flushes: list[asyncio.Future[None]] = []
        for f in files:
            h = hashlib.sha256()
            for n, r in enumerate(f.ranges):
                await f.written[r.number].wait()
                held = f.held.pop(r.number, None)
                if held is not None:
                    try:
                        await loop.run_in_executor(
                            self.hasher, _hash_view, h, held[: r.plain_end - r.plain_start]
                        )
                    finally:
                        self._give_back(held)
                    if f.direct_fd >= 0:
                        continue
                elif f.direct_fd >= 0:
                    if self._hash_buffer is None:
                        self._hash_buffer = _buffer(_HASH_READ_BYTES)
                    await loop.run_in_executor(
                        self.hasher,
                        _hash_range_direct,
                        h,
                        f.direct_fd,
                        f.fd,
                        r.plain_start,
                        r.plain_end,
                        self._hash_buffer,
                        str(f.target),
                    )
                    continue  # nothing waits in the page cache to be written out
                else:
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

    async def _part(
        self, f: _DownloadFile, r: PartRange, slots: asyncio.Semaphore, buf: memoryview | None
    ) -> None:
        loop = asyncio.get_running_loop()
        try:

            async def attempt() -> None:
                await self.urls.ensure_fresh()
                try:
                    await loop.run_in_executor(self.pool, self._fetch, f, r, buf)
                except StorageUnavailable:
                    self.urls.expire()
                    raise

            try:
                await _retrying(f"part {r.number} of {f.entry.path}", attempt)
            except BaseException:
                if buf is not None:
                    self._give_back(buf)
                raise
            if buf is not None:
                f.held[r.number] = buf  # the hasher gives it back
            f.written[r.number].set()
            self.progress(r.plain_end - r.plain_start)
        finally:
            slots.release()

    def _fetch(self, f: _DownloadFile, r: PartRange, buf: memoryview | None) -> None:
        """On a worker thread: GET part r and decrypt it as it arrives, ~1 MiB at a time, into
        `buf` at each step's place (or, without one, a step buffer the thread reuses). AEAD
        authenticates every chunk under the file key (tampering, reordering, truncation); the
        plaintext SHA-256 then proves the file is the uploader's, so the ciphertext need not be
        hashed again here."""
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
                plain = _plain_buffer() if buf is None else buf[(first - r.first_chunk) * age.CHUNK_SIZE :]
                _decrypt_and_write(f.key, r, block, first, count, f, where, plain)
            if resp.read(1):
                raise IntegrityError(
                    f"{where}: part {r.number} is longer in storage than in the manifest", path=where
                )
            self.journal.add(where, r.number)
        except BaseException:
            self.storage.drop(f.url)  # the answer may be unread: the connection cannot be reused
            raise

    async def finish(self, files: Sequence[_DownloadFile]) -> None:
        loop = asyncio.get_running_loop()
        for f in files:
            if f.sha256 != f.entry.sha256 and f.trusted:
                raise _TrustedPartsWrong(f.entry.path)
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
        self.journal.close()
        for f in files:
            for fd in (f.fd, f.direct_fd):
                if fd >= 0:
                    os.close(fd)
            f.fd = f.direct_fd = -1

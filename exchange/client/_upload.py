"""The upload engine: parts encrypted on worker threads, URLs asked for in batches, parts sent
from reused buffers. An implementation detail of `transfer`, which documents the protocol."""

from __future__ import annotations

import asyncio
import base64
import functools
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    Conflict,
    ValidationError,
)
from ..format import age
from ..format.manifest import (
    PartRange,
)
from . import Client
from . import artifacts as api
from ._parts import (
    CPUSlots,
    Progress,
    SourceFile,
    _buffer,
    _encrypt_part_into,
    _encrypted_steps,
    _file_changed,
    _first_error,
    _hash_part_streaming,
    _retrying,
    _sha256_checking,
)
from ._storage_http import StorageHTTP, raise_for_answer

_Pending = tuple[int, int, bytes, "asyncio.Future[dict[str, Any]]"]


class _URLBatcher:
    """Gathers part-URL requests from the workers into few API calls.

    Every call costs the service a signed request, a transaction and an audit entry whatever its
    size (measured: some 10 ms of its CPU per call, on the cores storage needs too; one part per
    call made the service spend ~1.8 CPU seconds per GiB uploaded, batching halves that). So a
    request waits for others, but never while storage could run dry: requests go at once when
    fewer than `busy_at` parts are on their way to storage (`poke` is called as each arrives) and
    fewer than MOST_CALLS calls are out, and otherwise when `max_batch` are waiting, or the first
    has waited WAIT_S, or the call before them has answered (one call at a time then: what
    arrives meanwhile goes into the next).
    """

    WAIT_S = 0.25
    #: Calls at once while storage runs dry: parts that arrive while they are answered wait for
    #: the next (one call per part would cost the service a call per small file).
    MOST_CALLS = 2

    def __init__(
        self, client: Client, artifact_id: str, max_batch: int, sending: Callable[[], int], busy_at: int
    ) -> None:
        self._client = client
        self._artifact_id = artifact_id
        self._max = max(1, max_batch)
        self._sending = sending
        self._busy_at = busy_at
        self._pending: list[_Pending] = []
        self._since = 0.0  # when the oldest pending request arrived
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()

    async def url(self, file_idx: int, number: int, digest: bytes) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if not self._pending:
            self._since = loop.time()
        self._pending.append((file_idx, number, digest, future))
        self.poke()
        return await future

    def poke(self, *, answered: bool = False) -> None:
        """Send what waits if it is time to (see the class); call when a part has been sent."""
        self._pending = [p for p in self._pending if not p[3].done()]  # dropped by a cancelled part
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        starving = self._sending() < self._busy_at
        due = answered or loop.time() - self._since >= self.WAIT_S or len(self._pending) >= self._max
        if (starving and len(self._calls) < self.MOST_CALLS) or (due and not self._calls):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            self._since = loop.time()
            call = loop.create_task(self._send(batch))
            self._calls.add(call)
            call.add_done_callback(self._answered)
            if self._pending:
                self.poke()
        elif self._timer is None and not self._calls:  # else the answer pokes again
            self._timer = loop.call_later(max(0.0, self._since + self.WAIT_S - loop.time()), self._timeout)

    def _timeout(self) -> None:
        self._timer = None
        self.poke()

    def _answered(self, call: asyncio.Task[None]) -> None:
        self._calls.discard(call)
        self.poke(answered=True)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            answer = await api.part_urls(self._client, self._artifact_id, [(f, n, d) for f, n, d, _ in batch])
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        by_part = {(p["file"], p["number"]): p for p in answer["parts"]}
        for f, n, _, future in batch:
            if not future.done():
                future.set_result(by_part[(f, n)])


@dataclass
class _UploadFile:
    index: int
    source: SourceFile
    nonce: bytes
    key: bytes
    fd: int
    ranges: list[PartRange]
    recorded: dict[int, bytes]
    stored: dict[int, int]
    digests: dict[int, bytes] = field(default_factory=dict)
    sha256: bytes = b""

    @functools.cached_property
    def kept(self) -> dict[int, bytes]:
        """The parts storage holds whole, with the digests their URLs were bound to."""
        return {
            r.number: self.recorded[r.number]
            for r in self.ranges
            if self.stored.get(r.number) == r.size and r.number in self.recorded
        }


async def _find_resumable(
    client: Client, me: dict[str, Any], name: str, kind: str, files: Sequence[SourceFile]
) -> dict[str, Any] | None:
    wanted = sorted((f.path, f.size) for f in files)
    for item in await api.list_artifacts(client, status="uploading"):
        if (item["created_by"], item["name"], item["kind"]) != (me["name"], name, kind):
            continue
        detail = await api.get(client, item["id"])
        if sorted((f["path"], f["size"]) for f in detail["files"]) == wanted:
            return detail
    return None


@dataclass(frozen=True)
class Destination:
    """Where an upload goes when not simply into one's own organisation (an upload link, a
    finding): the members of the create request that say so, and whom the upload must be
    readable by (name -> age recipient; the uploader is added to it)."""

    fields: dict[str, Any]
    recipients: Callable[[], Awaitable[dict[str, str]]]


async def _link_destination(
    client: Client, upload_link: str, kind: str | None, files: Sequence[SourceFile]
) -> tuple[str, Destination, dict[str, Any] | None]:
    """What an upload link asks for (its kind), where it leads, and the upload it already started
    (to resume), if any."""
    link: dict[str, Any] = await client.request("GET", f"/u/{upload_link}")
    if kind is not None and kind != link["kind"]:
        raise ValidationError(f"this upload link is for a {link['kind']}, not a {kind}", field="kind")
    first: list[dict[str, Any]] = [link]

    async def recipients() -> dict[str, str]:
        # The answer just fetched serves the first attempt; a retry asks again.
        current = first.pop() if first else await client.request("GET", f"/u/{upload_link}")
        return {r["name"]: r["age_recipient"] for r in current["recipients"]}

    destination = Destination({"upload_link": upload_link}, recipients)
    if link["artifact"] is None:
        return str(link["kind"]), destination, None
    if link["artifact_status"] != "uploading":
        raise Conflict(
            f"this upload link was already used: artifact {link['artifact']} is {link['artifact_status']}",
            code="link-used",
        )
    detail = await api.get(client, link["artifact"])
    if sorted((f["path"], f["size"]) for f in detail["files"]) != sorted((f.path, f.size) for f in files):
        raise Conflict(
            f"this upload link's upload ({link['artifact']}) is of other files or sizes than these:"
            " it can only be resumed with the same ones",
            code="link-used",
        )
    return str(link["kind"]), destination, detail


async def _recipients(client: Client, me: dict[str, Any], destination: Destination | None) -> dict[str, str]:
    """Who the upload must be readable by: the receiving organisation's active developers (one's
    own, or as the destination says) and oneself."""
    if destination is None:
        developers = await client.list_principals(org=me["org"], role="developer")
        recipients = {p["name"]: p["age_recipient"] for p in developers if p["status"] == "active"}
    else:
        recipients = dict(await destination.recipients())
    recipients[me["name"]] = me["age_recipient"]
    return recipients


async def _start(
    client: Client,
    me: dict[str, Any],
    name: str,
    kind: str,
    files: Sequence[SourceFile],
    file_key: bytes,
    destination: Destination | None = None,
) -> dict[str, Any]:
    declared = [(f.path, f.size, os.urandom(age.NONCE_SIZE)) for f in files]
    for attempt in range(2):
        recipients = await _recipients(client, me, destination)
        headers = {who: age.wrap_file_key(file_key, [r]).to_bytes() for who, r in recipients.items()}
        try:
            return await api.create(
                client,
                name=name,
                kind=kind,
                files=declared,
                headers=headers,
                extra=None if destination is None else destination.fields,
            )
        except Conflict as exc:
            # A developer enrolled between the listing and the request: list again, once.
            if exc.code != "headers-incomplete" or attempt:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


#: Encrypted parts held in memory at once (being sent, or ready behind those) stay within this
#: many bytes: with the default 8 MiB parts and 6 in flight, 9 parts, ~72 MiB.
MEMORY_BUDGET_BYTES = 80 * 1024 * 1024
#: Parts in flight at once, however small: their URLs are asked for together, so a directory of
#: small files costs the service a few calls of many parts, not a call a file.
MOST_PARTS_IN_FLIGHT = 128
#: Buffers of parts this large or larger are reused from part to part; smaller ones are made for
#: each part (cheap), so the reused ones number at most the held bytes over this.
_POOLED_PART_BYTES = 1024 * 1024


class _ByteBudget:
    """A semaphore counted in bytes, for one taker: `take(n)` waits until n more fit (or nothing
    is taken: a single cost above the limit still goes, alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._waiting: asyncio.Future[None] | None = None

    async def take(self, n: int) -> None:
        while self.taken and self.taken + n > self.limit:
            self._waiting = asyncio.get_running_loop().create_future()
            await self._waiting
        self.taken += n

    def give(self, n: int) -> None:
        self.taken -= n
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)


class _Upload:
    """Parts are encrypted (and hashed) into buffers a few parts ahead of the ones being sent, so
    that when sends finish, as they tend to, several at once, the next parts already hold their
    URLs and storage is never left waiting for encryption and a URL round trip.

    At most `concurrency` parts are sent at a time, and the parts in flight hold at most
    `budget` bytes: as many as half as many again as are sent, of the largest part's size,
    within MEMORY_BUDGET_BYTES (so 9 parts of a large file; many more of small files, up to
    MOST_PARTS_IN_FLIGHT, whose URLs then come in few calls). A part larger than
    `memory_part_bytes` is never held: it is encrypted twice, once to hash and once to send; it
    counts as a `concurrency`th of the budget.
    """

    def __init__(
        self,
        client: Client,
        storage: StorageHTTP,
        artifact_id: str,
        concurrency: int,
        memory_part_bytes: int,
        progress: Progress,
        memory_budget_bytes: int | None = None,
        workers: int | None = None,
    ) -> None:
        self.storage = storage
        self.concurrency = max(1, concurrency)
        self.ahead = max(2, self.concurrency // 2)
        self.memory_part_bytes = memory_part_bytes
        self.memory_budget_bytes = MEMORY_BUDGET_BYTES if memory_budget_bytes is None else memory_budget_bytes
        self.progress = progress
        #: Parts on their way to storage right now (the URL batcher holds requests only while
        #: enough are).
        self.sending = 0
        self.urls = _URLBatcher(
            client,
            artifact_id,
            max_batch=MOST_PARTS_IN_FLIGHT,
            sending=lambda: self.sending,
            busy_at=max(1, self.concurrency // 2),
        )
        self.send_slots = asyncio.Semaphore(self.concurrency)
        # Sends block a thread each for their whole length: they get threads of their own, and
        # encryption (C code that releases the GIL) a few others, so it can always run ahead.
        # At most `workers` of them encrypt or hash at once (a streamed part is encrypted by its
        # sender).
        cpu = CPUSlots(workers)
        self.senders = ThreadPoolExecutor(self.concurrency, "send", initializer=cpu.bind)
        self.pool = ThreadPoolExecutor(self.ahead, "encrypt", initializer=cpu.bind)
        self.hasher = ThreadPoolExecutor(1, "sha256", initializer=cpu.bind)
        self.buffers: list[memoryview] = []

    def budget(self, files: Sequence[_UploadFile]) -> int:
        """The bytes the parts in flight may hold at once (see the class)."""
        largest = max(
            (r.size for f in files for r in f.ranges if r.size <= self.memory_part_bytes), default=0
        )
        if not largest:  # every part is streamed: none is held, `concurrency` are in flight
            return self.concurrency * self.memory_part_bytes
        return max(largest, min((self.concurrency + self.ahead) * largest, self.memory_budget_bytes))

    def cost(self, r: PartRange, budget: int) -> int:
        """What part `r` takes of `budget` while in flight."""
        return r.size if r.size <= self.memory_part_bytes else max(1, budget // self.concurrency)

    async def run(self, files: Sequence[_UploadFile]) -> None:
        try:
            budget = self.budget(files)
            held = _ByteBudget(budget)
            slots = asyncio.Semaphore(MOST_PARTS_IN_FLIGHT)
            try:
                async with asyncio.TaskGroup() as group:
                    # Parts storage holds (a resumed upload) are not sent again; they are only
                    # checked to encrypt to what their URLs were bound to (the file has not changed
                    # since), by the hasher, in the same read of the file as its SHA-256. The
                    # others are sent; their hashing may lag behind them.
                    group.create_task(self._hash(files))
                    for f in files:
                        for r in f.ranges:
                            if r.number not in f.kept:
                                cost = self.cost(r, budget)
                                await held.take(cost)
                                await slots.acquire()
                                group.create_task(self._part(f, r, slots, held, cost))
            except BaseExceptionGroup as eg:
                raise _first_error(eg) from None
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.senders.shutdown(wait=True, cancel_futures=True)
            self.hasher.shutdown(wait=True, cancel_futures=True)

    async def _hash(self, files: Sequence[_UploadFile]) -> None:
        loop = asyncio.get_running_loop()

        def checked(nbytes: int) -> None:
            loop.call_soon_threadsafe(self.progress, nbytes)

        for f in files:
            f.sha256 = await loop.run_in_executor(
                self.hasher,
                _sha256_checking,
                f.key,
                f.nonce,
                f.fd,
                f.source.size,
                f.ranges,
                f.kept,
                str(f.source.source),
                checked,
            )
            f.digests.update(f.kept)

    async def _part(
        self, f: _UploadFile, r: PartRange, slots: asyncio.Semaphore, held: _ByteBudget, cost: int
    ) -> None:
        loop = asyncio.get_running_loop()
        where = str(f.source.source)
        streamed = r.size > self.memory_part_bytes
        pooled = not streamed and r.size >= _POOLED_PART_BYTES
        # Parts in flight hold at most the budget, so at most budget / _POOLED_PART_BYTES pooled
        # buffers ever exist.
        if streamed:
            buf = None
        elif pooled and self.buffers:
            buf = self.buffers.pop()
        else:
            buf = _buffer(r.size)
        try:
            if buf is None:
                digest = await loop.run_in_executor(
                    self.pool, _hash_part_streaming, f.key, f.nonce, f.fd, f.source.size, r, where
                )
            else:
                if len(buf) < r.size:
                    buf = _buffer(r.size)
                digest = await loop.run_in_executor(
                    self.pool, _encrypt_part_into, f.key, f.nonce, f.fd, f.source.size, r, where, buf
                )
            known = f.recorded.get(r.number)
            if known is not None and known != digest:
                raise _file_changed(str(f.source.source), r.number)
            await _retrying(f"part {r.number} of {f.source.path}", lambda: self._put(f, r, digest, buf))
            f.digests[r.number] = digest
            self.progress(r.plain_end - r.plain_start)
        finally:
            if buf is not None and pooled:
                self.buffers.append(buf)
            slots.release()
            held.give(cost)

    async def _put(self, f: _UploadFile, r: PartRange, digest: bytes, buf: memoryview | None) -> None:
        # A fresh URL for every attempt: URLs are short-lived and re-issuable.
        url = await self.urls.url(f.index, r.number, digest)
        async with self.send_slots:
            self.sending += 1
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self.senders, self._put_blocking, f, r, url, buf
                )
            finally:
                self.sending -= 1
                self.urls.poke()

    def _put_blocking(
        self, f: _UploadFile, r: PartRange, url: dict[str, Any], buf: memoryview | None
    ) -> None:
        """On a worker thread: send the part, from its buffer with one sendall, or encrypted again
        on the fly for a part too large to hold (the signed Content-Length keeps it unchunked)."""
        body: memoryview | Iterable[memoryview]
        if buf is None:
            # Each step is sent (sendall) before the generator overwrites it with the next.
            body = _encrypted_steps(f.key, f.nonce, f.fd, f.source.size, r, str(f.source.source))
        else:
            body = buf[: r.size]
        resp = self.storage.request(url["method"], url["url"], headers=url["headers"], body=body)
        raise_for_answer(resp, f"part {r.number} of {f.source.path}")
        resp.read()

"""The upload engine: parts encrypted on worker threads, URLs asked for in batches, parts sent
from reused buffers. An implementation detail of `transfer`, which documents the protocol."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    Conflict,
)
from ..format import age
from ..format.manifest import (
    PartRange,
)
from . import Client
from . import artifacts as api
from ._parts import (
    Progress,
    SourceFile,
    _encrypt_part_into,
    _encrypt_range,
    _first_error,
    _hash_part_streaming,
    _retrying,
    _sha256_file,
    _steps,
)
from ._storage_http import StorageHTTP, raise_for_answer


class _URLBatcher:
    """Gathers part-URL requests from the workers in flight into one API call."""

    def __init__(self, client: Client, artifact_id: str, max_batch: int) -> None:
        self._client = client
        self._artifact_id = artifact_id
        self._max = max_batch
        self._pending: list[tuple[int, int, bytes, asyncio.Future[dict[str, Any]]]] = []
        self._timer: asyncio.Task[None] | None = None

    async def url(self, file_idx: int, number: int, digest: bytes) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((file_idx, number, digest, future))
        if len(self._pending) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._soon())
        return await future

    async def _soon(self) -> None:
        await asyncio.sleep(0.003)
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[tuple[int, int, bytes, asyncio.Future[dict[str, Any]]]]) -> None:
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


async def _start(
    client: Client, me: dict[str, Any], name: str, kind: str, files: Sequence[SourceFile], file_key: bytes
) -> dict[str, Any]:
    declared = [(f.path, f.size, os.urandom(age.NONCE_SIZE)) for f in files]
    for attempt in range(2):
        developers = await client.list_principals(org=me["org"], role="developer")
        recipients = {p["name"]: p["age_recipient"] for p in developers if p["status"] == "active"}
        recipients[me["name"]] = me["age_recipient"]
        headers = {who: age.wrap_file_key(file_key, [r]).to_bytes() for who, r in recipients.items()}
        try:
            return await api.create(client, name=name, kind=kind, files=declared, headers=headers)
        except Conflict as exc:
            # A developer enrolled between the listing and the request: list again, once.
            if exc.code != "headers-incomplete" or attempt:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class _Upload:
    def __init__(
        self,
        client: Client,
        storage: StorageHTTP,
        artifact_id: str,
        concurrency: int,
        memory_part_bytes: int,
        progress: Progress,
    ) -> None:
        self.storage = storage
        self.concurrency = max(1, concurrency)
        self.memory_part_bytes = memory_part_bytes
        self.progress = progress
        self.urls = _URLBatcher(client, artifact_id, max_batch=max(1, concurrency))
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="encrypt")
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.buffers: list[bytearray] = []

    async def run(self, files: Sequence[_UploadFile]) -> None:
        loop = asyncio.get_running_loop()
        try:
            slots = asyncio.Semaphore(self.concurrency)
            hashes = [
                loop.run_in_executor(self.hasher, _sha256_file, f.fd, f.source.size, str(f.source.source))
                for f in files
            ]
            try:
                async with asyncio.TaskGroup() as group:
                    for f in files:
                        for r in f.ranges:
                            await slots.acquire()
                            group.create_task(self._part(f, r, slots))
            except BaseExceptionGroup as eg:
                raise _first_error(eg) from None
            for f, sha in zip(files, await asyncio.gather(*hashes), strict=True):
                f.sha256 = sha
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.hasher.shutdown(wait=True, cancel_futures=True)

    async def _part(self, f: _UploadFile, r: PartRange, slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        where = str(f.source.source)
        streamed = r.size > self.memory_part_bytes
        # In-flight parts are bounded by `slots`, so at most `concurrency` buffers ever exist.
        buf = None if streamed else (self.buffers.pop() if self.buffers else bytearray(r.size))
        try:
            if buf is None:
                digest = await loop.run_in_executor(
                    self.pool, _hash_part_streaming, f.key, f.nonce, f.fd, f.source.size, r, where
                )
            else:
                if len(buf) < r.size:
                    buf = bytearray(r.size)
                digest = await loop.run_in_executor(
                    self.pool, _encrypt_part_into, f.key, f.nonce, f.fd, f.source.size, r, where, buf
                )
            known = f.recorded.get(r.number)
            if known is not None and known != digest:
                raise Conflict(
                    f"{f.source.source} changed since this upload began (part {r.number} differs);"
                    " abort the old upload (`exchange artifacts abort ID`) and upload again",
                    code="file-changed",
                )
            if f.stored.get(r.number) != r.size:
                await _retrying(f"part {r.number} of {f.source.path}", lambda: self._put(f, r, digest, buf))
            f.digests[r.number] = digest
            self.progress(r.plain_end - r.plain_start)
        finally:
            if buf is not None:
                self.buffers.append(buf)
            slots.release()

    async def _put(self, f: _UploadFile, r: PartRange, digest: bytes, buf: bytearray | None) -> None:
        # A fresh URL for every attempt: URLs are short-lived and re-issuable.
        url = await self.urls.url(f.index, r.number, digest)
        await asyncio.get_running_loop().run_in_executor(self.pool, self._put_blocking, f, r, url, buf)

    def _put_blocking(self, f: _UploadFile, r: PartRange, url: dict[str, Any], buf: bytearray | None) -> None:
        """On a worker thread: send the part, from its buffer with one sendall, or encrypted again
        on the fly for a part too large to hold (the signed Content-Length keeps it unchunked)."""
        body: memoryview | Iterable[bytes]
        if buf is None:
            body = (
                _encrypt_range(f.key, f.nonce, f.fd, f.source.size, r, first, count, str(f.source.source))
                for first, count in _steps(r)
            )
        else:
            body = memoryview(buf)[: r.size]
        resp = self.storage.request(url["method"], url["url"], headers=url["headers"], body=body)
        raise_for_answer(resp, f"part {r.number} of {f.source.path}")
        resp.read()

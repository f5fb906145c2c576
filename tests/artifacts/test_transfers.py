"""Uploads and downloads end to end: real SeaweedFS, SQLite and PostgreSQL, no fakes.

Round trips over the sizes that matter to the chunking (empty, one byte short of a chunk, exactly
one chunk, one byte over, several parts), directories, what storage holds at rest, resuming a
killed upload and a killed download, and the abandoned-upload sweep.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from exchange.api.artifacts import sweep_once
from exchange.client import _download
from exchange.client import artifacts as api
from exchange.client.transfer import PARTIAL_SUFFIX, download, upload
from exchange.errors import Conflict, NotFound
from exchange.format import age
from tests.artifacts.conftest import BUCKET, write
from tests.conftest import FakeClock, Stack

MIB = 1024 * 1024


class Interrupted(Exception):
    """Stands in for a kill: raised from the progress callback after some bytes are done."""


def interrupt_after(limit: int) -> Any:
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if done >= limit:
            raise Interrupted

    return progress


def session_marker(artifact_id: str) -> str:
    return f".exchange-artifact-{artifact_id}.exchange-session"


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_directory_round_trip_at_every_chunk_boundary(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    src = tmp_path / "src" / "llama"
    sizes = {
        "config.json": 0,
        "a/short.bin": 65_535,
        "a/one-chunk.bin": 65_536,
        "a/over.bin": 65_537,
        "b/c/shards.bin": 11 * MIB + 3,
    }
    expected = {name: write(src / name, size, seed=i + 1) for i, (name, size) in enumerate(sizes.items())}
    async with stack.client(dev) as c:
        artifact_id = await upload(c, src, kind="model-weights")
        detail = await api.get(c, artifact_id)
        out = tmp_path / "out"
        out.mkdir()
        assert await download(c, artifact_id, out) == [out / "llama"]
    assert detail["status"] == "complete" and detail["name"] == "llama" and detail["file_count"] == 5
    assert {f["path"]: f["size"] for f in detail["files"]} == {f"llama/{k}": v for k, v in sizes.items()}
    shards = next(f for f in detail["files"] if f["path"] == "llama/b/c/shards.bin")
    assert shards["part_count"] == 3  # 5 MiB parts: the multipart path is exercised
    for name, data in expected.items():
        assert (out / "llama" / name).read_bytes() == data
    manifest = {f["path"]: f for f in detail["manifest"]["files"]}
    assert manifest["llama/a/over.bin"]["sha256"] == hashlib.sha256(expected["a/over.bin"]).hexdigest()
    assert listing(out)[0] == "llama"  # no partial left over
    assert not any(PARTIAL_SUFFIX in p for p in listing(out))


async def test_nothing_readable_at_rest(stack: Stack, tmp_path: Path, bucket: Minio) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    marker = b"PLAINTEXT-MARKER-" * 4000
    (tmp_path / "secret-weights.bin").write_bytes(marker)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "secret-weights.bin")
        detail = await api.get(c, artifact_id)
    keys = {f["object"] for f in detail["files"]}
    listed = {o.object_name: o.size for o in bucket.list_objects(BUCKET, prefix="artifacts/", recursive=True)}
    assert keys <= set(listed)
    for key in keys:
        assert "secret" not in key and "weights" not in key  # names live only in metadata
        data = bucket.get_object(BUCKET, key).read()
        assert len(data) == age.ciphertext_size(len(marker)) == listed[key]
        assert b"PLAINTEXT-MARKER" not in data
        assert data[:16] == __import__("base64").b64decode(detail["files"][0]["nonce"])
        # A standard age file once its header is put in front: ciphertext, nothing else.
        async with stack.client(dev) as c:
            header = await api.header(c, artifact_id)
        assert age.decrypt(header + data, [dev.age_identity]) == marker


async def test_upload_wraps_the_key_for_every_developer_of_the_org(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    colleague = await stack.principal("carl", "developer", org="lab")
    tester = await stack.principal("tess", "tester", org="lab")
    outsider = await stack.principal("otto", "developer", org="elsewhere")
    data = write(tmp_path / "f.bin", 1000)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "f.bin")
    out = tmp_path / "carl"
    out.mkdir()
    async with stack.client(colleague) as c:
        await download(c, artifact_id, out)
    assert (out / "f.bin").read_bytes() == data
    async with stack.client(tester) as c:
        with pytest.raises(Exception) as err:
            await download(c, artifact_id, out)
        assert getattr(err.value, "code", None) == "not-a-recipient"
    async with stack.client(outsider) as c:
        with pytest.raises(NotFound):
            await api.get(c, artifact_id)


async def test_killed_upload_resumes_from_the_stored_parts(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "big.bin", 16 * MIB)
    async with stack.client(dev) as c:
        with pytest.raises(Interrupted):
            await upload(c, tmp_path / "big.bin", concurrency=1, progress=interrupt_after(1))
        [pending] = await api.list_artifacts(c, status="uploading")
        status = await api.upload_status(c, pending["id"])
        stored_before = [p["number"] for p in status["files"][0]["stored"]]
        assert stored_before and len(stored_before) < 4
        started: list[tuple[str, bool]] = []
        artifact_id = await upload(
            c, tmp_path / "big.bin", on_start=lambda i, total, resumed: started.append((i, resumed))
        )
        assert started == [(pending["id"], True)]
        assert artifact_id == pending["id"]
        out = tmp_path / "out"
        out.mkdir()
        await download(c, artifact_id, out)
    assert (out / "big.bin").read_bytes() == data
    # The parts stored before the kill were not requested again.
    parts_events = [e for e in await stack.events() if e["action"] == "artifact.parts"]
    assert sum(e["details"]["recorded"] for e in parts_events) == 4


async def test_resume_refuses_a_file_that_changed(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    write(tmp_path / "big.bin", 16 * MIB, seed=3)
    async with stack.client(dev) as c:
        with pytest.raises(Interrupted):
            await upload(c, tmp_path / "big.bin", concurrency=1, progress=interrupt_after(1))
        write(tmp_path / "big.bin", 16 * MIB, seed=4)  # same size, other bytes
        with pytest.raises(Conflict) as err:
            await upload(c, tmp_path / "big.bin")
        assert err.value.code in ("file-changed", "part-digest-changed")
        [pending] = await api.list_artifacts(c, status="uploading")
        await api.abort(c, pending["id"])
        artifact_id = await upload(c, tmp_path / "big.bin")  # a fresh upload now
        assert artifact_id != pending["id"]


async def test_parts_in_flight_hold_at_most_the_memory_budget(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts in flight are counted in bytes: small ones many at a time, large ones few, and never
    more than the budget at once."""
    from exchange.client import _upload

    most = 0
    real_take = _upload._ByteBudget.take

    async def take(self: Any, n: int) -> None:
        nonlocal most
        await real_take(self, n)
        most = max(most, self.taken)
        assert self.limit == 8 * MIB

    monkeypatch.setattr(_upload, "MEMORY_BUDGET_BYTES", 8 * MIB)
    monkeypatch.setattr(_upload._ByteBudget, "take", take)
    dev = await stack.principal("dana", "developer", org="lab")
    src = tmp_path / "src" / "shards"
    data = {f"s{i}.bin": write(src / f"s{i}.bin", 3 * MIB + i) for i in range(6)}
    async with stack.client(dev) as c:
        artifact_id = await upload(c, src)
        out = tmp_path / "out"
        out.mkdir()
        await download(c, artifact_id, out)
    assert {name: (out / "shards" / name).read_bytes() for name in data} == data
    assert 3 * MIB < most <= 8 * MIB  # two of these parts at once, never three


async def _stopped_upload(stack: Stack, c: Any, source: Path) -> tuple[str, list[Any]]:
    """An upload of `source` killed after its first part; its id and the parts storage holds."""
    from exchange.format.manifest import part_ranges

    with pytest.raises(Interrupted):
        await upload(c, source, concurrency=1, progress=interrupt_after(1))
    [pending] = await api.list_artifacts(c, status="uploading")
    status = await api.upload_status(c, pending["id"])
    ranges = part_ranges(source.stat().st_size, status["part_size"])
    kept = [ranges[p["number"] - 1] for p in status["files"][0]["stored"]]
    assert kept and len(kept) < len(ranges)
    return pending["id"], kept


async def test_a_resumed_upload_reads_the_kept_parts_once(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each part storage holds is read once, to check it still encrypts to its digest and for the
    file's SHA-256 at the same time; each other part twice (encrypted to send; hashed), as in a
    fresh upload."""
    from exchange.client import _parts

    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "big.bin", 16 * MIB + 5)
    async with stack.client(dev) as c:
        artifact_id, kept = await _stopped_upload(stack, c, tmp_path / "big.bin")
        read = 0
        real = _parts._pread_into

        def counted(fd: int, view: memoryview, offset: int, where: str) -> None:
            nonlocal read
            read += len(view)
            real(fd, view, offset, where)

        monkeypatch.setattr(_parts, "_pread_into", counted)
        assert await upload(c, tmp_path / "big.bin") == artifact_id
        monkeypatch.undo()
        kept_bytes = sum(r.plain_end - r.plain_start for r in kept)
        assert read == len(data) + (len(data) - kept_bytes)
        out = tmp_path / "out"
        out.mkdir()
        await download(c, artifact_id, out)
    assert (out / "big.bin").read_bytes() == data


async def test_a_resumed_upload_refuses_a_change_inside_a_kept_part(stack: Stack, tmp_path: Path) -> None:
    """One byte changed in a part storage already holds: the one-pass check finds it, and the
    upload is refused before it is completed (the manifest would promise other bytes)."""
    dev = await stack.principal("dana", "developer", org="lab")
    source = tmp_path / "big.bin"
    write(source, 16 * MIB, seed=7)
    async with stack.client(dev) as c:
        artifact_id, kept = await _stopped_upload(stack, c, source)
        with source.open("r+b") as f:
            f.seek(kept[0].plain_start + 1000)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(Conflict) as err:
            await upload(c, source)
        assert err.value.code == "file-changed" and f"part {kept[0].number} differs" in err.value.message
        assert (await api.get(c, artifact_id))["status"] == "uploading"


async def test_killed_download_resumes_from_what_was_written(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "big.bin", 16 * MIB + 5)
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "big.bin")
        with pytest.raises(Interrupted):
            await download(c, artifact_id, out, concurrency=1, progress=interrupt_after(6 * MIB))
        # The partial file, and the download session to continue (not counted again).
        assert listing(out) == sorted(
            [
                "big.bin" + PARTIAL_SUFFIX,
                f"big.bin{PARTIAL_SUFFIX}/big.bin",
                f"big.bin{PARTIAL_SUFFIX}.parts",  # the journal of the parts written
                session_marker(artifact_id),
            ]
        )
        resumed_from: list[int] = []
        await download(c, artifact_id, out, on_start=lambda info, done: resumed_from.append(done))
    assert resumed_from[0] >= 5 * MIB  # at least the first whole part was kept
    assert (out / "big.bin").read_bytes() == data
    assert listing(out) == ["big.bin"]


async def test_abandoned_upload_is_aborted_and_its_parts_removed(
    stack: Stack, tmp_path: Path, clock: FakeClock
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    write(tmp_path / "big.bin", 11 * MIB)
    async with stack.client(dev) as c:
        with pytest.raises(Interrupted):
            await upload(c, tmp_path / "big.bin", concurrency=1, progress=interrupt_after(1))
        [pending] = await api.list_artifacts(c, status="uploading")
    row = await stack.db.fetchone(
        "SELECT object_key, upload_id FROM artifact_files WHERE artifact_id = $1", pending["id"]
    )
    assert row is not None and row["upload_id"]
    clock.advance(stack.settings.upload_abandon_after_s - 60)
    assert await sweep_once(stack.app) == []
    clock.advance(120)
    assert await sweep_once(stack.app) == [pending["id"]]
    storage = stack.own_storage()
    try:
        with pytest.raises(NotFound):
            await storage.list_parts(row["object_key"], row["upload_id"])
    finally:
        await storage.close()
    # (The fake clock moved a day on: signed requests would be refused now; read the database.)
    assert await stack.db.fetchval("SELECT status FROM artifacts WHERE id = $1", pending["id"]) == "aborted"
    event = (await stack.events())[-1]
    assert event["action"] == "artifact.abandon" and event["actor"] == {"type": "system"}


async def test_audit_events_for_the_whole_story(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    write(tmp_path / "f.bin", 10)
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "f.bin", kind="report")
        await download(c, artifact_id, out)
    actions = [e["action"] for e in await stack.events() if e.get("resource", {}).get("id") == artifact_id]
    assert actions[0] == "artifact.create" and "artifact.complete" in actions
    assert actions.index("artifact.parts") < actions.index("artifact.complete")
    # The download: a session opened and its header read (either order), then the receipt.
    assert sorted(actions[-3:-1]) == ["artifact.download", "artifact.header"]
    assert actions[-1] == "artifact.receipt"
    complete = next(e for e in await stack.events() if e["action"] == "artifact.complete")
    assert len(complete["resource"]["sha256"]) == 64


async def test_only_developers_upload(stack: Stack, tmp_path: Path) -> None:
    tester = await stack.principal("tess", "tester", org="lab")
    write(tmp_path / "f.bin", 10)
    async with stack.client(tester) as c:
        with pytest.raises(Exception) as err:
            await upload(c, tmp_path / "f.bin")
    assert getattr(err.value, "code", None) == "role-required"
    assert await stack.count("artifacts") == 0


async def test_a_long_download_renews_its_urls(
    tmp_path: Path, database_url: str, seaweed: Any, clock: FakeClock
) -> None:
    from tests.artifacts.conftest import SMALL_PART_BYTES
    from tests.conftest import start_stack

    stack = await start_stack(
        tmp_path, database_url, seaweed, clock, upload_min_part_bytes=SMALL_PART_BYTES, presign_ttl_s=2
    )
    try:
        dev = await stack.principal("dana", "developer", org="lab")
        data = write(tmp_path / "big.bin", 11 * MIB)
        out = tmp_path / "out"
        out.mkdir()
        async with stack.client(dev) as c:
            artifact_id = await upload(c, tmp_path / "big.bin")
            await download(c, artifact_id, out, concurrency=1)
        assert (out / "big.bin").read_bytes() == data
        # URLs that live 2 s are renewed before each part: one audited access per renewal.
        # One session, renewed in place: opened once, each renewal its own event, never counted.
        opened = [e for e in await stack.events() if e["action"] == "artifact.download"]
        renewals = [e for e in await stack.events() if e["action"] == "artifact.renew"]
        assert len(opened) == 1 and len(renewals) >= 2
        assert {e["details"]["session"] for e in renewals} == {opened[0]["details"]["session"]}
    finally:
        await stack.server.close()


async def test_strays_in_a_partial_directory_are_not_moved_into_place(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "llama" / "w.bin", 1000)
    out = tmp_path / "out"
    stray = out / ("llama" + PARTIAL_SUFFIX) / "llama" / "evil.bin"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not from the uploader")
    (stray.parent / "link").symlink_to(tmp_path)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "llama")
        await download(c, artifact_id, out)
    assert listing(out) == ["llama", "llama/w.bin"]
    assert (out / "llama" / "w.bin").read_bytes() == data


@pytest.mark.parametrize("size", [0, 65_535, 65_536, 65_537])
async def test_single_file_at_chunk_boundaries(stack: Stack, tmp_path: Path, size: int) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "f.bin", size)
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "f.bin")
        detail = await api.get(c, artifact_id)
        await download(c, artifact_id, out)
    assert detail["files"][0]["ciphertext_size"] == age.ciphertext_size(size)
    assert (out / "f.bin").read_bytes() == data
    assert listing(out) == ["f.bin"]


async def test_parts_too_large_to_hold_are_streamed(stack: Stack, tmp_path: Path) -> None:
    """A part over the memory budget is encrypted twice (hash, then send) and never held."""
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "big.bin", 11 * MIB + 7)
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "big.bin", memory_part_bytes=MIB)
        await download(c, artifact_id, out)
    assert (out / "big.bin").read_bytes() == data


async def test_a_resumed_download_refetches_parts_spoiled_on_disk(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "big.bin", 16 * MIB)
    out = tmp_path / "out"
    out.mkdir()
    partial = out / ("big.bin" + PARTIAL_SUFFIX) / "big.bin"
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "big.bin")
        with pytest.raises(Interrupted):
            await download(c, artifact_id, out, concurrency=1, progress=interrupt_after(6 * MIB))
        with partial.open("r+b") as fh:  # spoil a byte of the first part, already written
            fh.seek(1000)
            fh.write(bytes([data[1000] ^ 0xFF]))
        resumed_from: list[int] = []
        checked: list[int] = []
        real = _download._part_matches

        def part_matches(*args: Any) -> bool:
            ok = bool(real(*args))
            if ok:
                checked.append(args[-2].number)
            return ok

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_download, "_part_matches", part_matches)
            await download(c, artifact_id, out, on_start=lambda info, done: resumed_from.append(done))
    # Parts 1 and 2 were taken on the journal's word; the file did not hash right, so every kept
    # part was then checked the thorough way: 2 held, 1 (spoiled) was fetched again.
    assert resumed_from == [10 * MIB]
    assert 2 in checked and 1 not in checked
    assert (out / "big.bin").read_bytes() == data
    assert listing(out) == ["big.bin"]


async def test_an_artifact_of_many_small_files_is_completed_several_files_at_a_time(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exchange.api.keys import STORAGE
    from exchange.services.uploads import STORAGE_CALLS_AT_ONCE

    storage = stack.app[STORAGE]
    busy, most = 0, 0
    calls: list[str] = []

    def counted(name: str) -> Any:
        real = getattr(storage, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal busy, most
            calls.append(name)
            busy += 1
            most = max(most, busy)
            try:
                return await real(*args, **kwargs)
            finally:
                busy -= 1

        return call

    for name in ("create_multipart", "list_parts", "complete_multipart", "head"):
        monkeypatch.setattr(storage, name, counted(name))
    dev = await stack.principal("dana", "developer", org="lab")
    src = tmp_path / "src" / "tokenizer"
    data = {f"f{i:03}.json": write(src / f"f{i:03}.json", 100 + i * 37) for i in range(40)}
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, src)
        uploaded = list(calls)
        await download(c, artifact_id, out)
    for name, content in data.items():
        assert (out / "tokenizer" / name).read_bytes() == content
    calls = uploaded
    # Files of one part are PUTs of their objects: no multipart upload, one HEAD each to complete.
    assert calls == ["head"] * 40
    # Never more at once than the bound, and more than one: 40 files are not 40 round trips one
    # after another.
    assert 1 < most <= STORAGE_CALLS_AT_ONCE
    # The client asks for many small files' URLs in one call (it used to ask about one a call).
    asked = [e["details"]["requested"] for e in await stack.events() if e["action"] == "artifact.parts"]
    assert sum(asked) == 40 and len(asked) <= 20, asked


async def test_url_requests_that_arrive_together_go_in_few_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batcher's rule, alone (the API call faked: a pure unit): while storage waits, at most
    two calls are out; what arrives meanwhile goes in the next call, up to the batch's size."""
    import asyncio

    from exchange.client import _upload

    calls: list[list[tuple[int, int]]] = []

    async def part_urls(client: Any, artifact_id: str, parts: list[tuple[int, int, bytes]]) -> Any:
        calls.append([(f, n) for f, n, _ in parts])
        await asyncio.sleep(0.05)
        return {"parts": [{"file": f, "number": n, "url": f"u{f}"} for f, n, _ in parts]}

    monkeypatch.setattr(_upload.api, "part_urls", part_urls)
    batcher = _upload._URLBatcher(None, "art_x", max_batch=16, sending=lambda: 0, busy_at=3)  # type: ignore[arg-type]
    answers = await asyncio.gather(*(batcher.url(i, 1, b"d" * 32) for i in range(40)))
    assert [a["url"] for a in answers] == [f"u{i}" for i in range(40)]
    # Two calls go at once (storage has nothing to do), the other 38 wait for an answer and then
    # go 16 at a time, one call out at a time or two while starving.
    assert [len(c) for c in calls[:2]] == [1, 1]
    assert sorted(p for c in calls for p in c) == [(i, 1) for i in range(40)]
    assert len(calls) <= 2 + 3 and max(len(c) for c in calls) == 16


async def test_a_resumed_download_fetches_only_the_remainder(stack: Stack, tmp_path: Path) -> None:
    """The journal's word for the parts written: nothing kept is read back before the download
    goes on, and only the parts missing are fetched."""
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "big.bin", 21 * MIB + 3)  # five parts: four of 5 MiB and a short one
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "big.bin")
        with pytest.raises(Interrupted):
            await download(c, artifact_id, out, concurrency=1, progress=interrupt_after(9 * MIB))
        journal = (out / f"big.bin{PARTIAL_SUFFIX}.parts").read_text().splitlines()[1:]
        kept = len(journal) * 5 * MIB
        assert kept >= 10 * MIB
        moved = 0

        def progress(n: int) -> None:
            nonlocal moved
            moved += n

        def never(*args: Any) -> bool:
            raise AssertionError("a kept part was re-encrypted to check it")

        resumed_from: list[int] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_download, "_part_matches", never)
            await download(
                c, artifact_id, out, progress=progress, on_start=lambda i, done: resumed_from.append(done)
            )
    assert resumed_from == [kept]
    assert moved == len(data) - kept
    assert (out / "big.bin").read_bytes() == data
    assert listing(out) == ["big.bin"]


@pytest.mark.parametrize("journal", ["another manifest's", "none", "a forged line"])
async def test_a_journal_not_to_be_trusted_falls_back_to_checking(
    stack: Stack, tmp_path: Path, journal: str
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    data = write(tmp_path / "big.bin", 16 * MIB)
    out = tmp_path / "out"
    out.mkdir()
    path = out / f"big.bin{PARTIAL_SUFFIX}.parts"
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "big.bin")
        with pytest.raises(Interrupted):
            await download(c, artifact_id, out, concurrency=1, progress=interrupt_after(1))
        header, *lines = path.read_text().splitlines()
        assert header.startswith("exchange download journal v1 manifest ") and lines[0] == "1 big.bin"
        kept = len(lines) * 5 * MIB
        if journal == "another manifest's":
            path.write_text("exchange download journal v1 manifest " + "0" * 64 + "\n1 big.bin\n4 big.bin\n")
        elif journal == "none":
            path.unlink()
        else:  # says part 4 is written: it is not
            path.write_text(f"{header}\n" + "".join(f"{line}\n" for line in lines) + "4 big.bin\n")
        resumed_from: list[int] = []
        await download(c, artifact_id, out, on_start=lambda i, done: resumed_from.append(done))
    # Another manifest's journal, or none: each kept part is checked by re-encrypting it (part 1
    # holds). A forged line is believed at first (part 4, the last, 1 MiB), and the file's
    # SHA-256 then sends the download back to check every part.
    assert resumed_from == ([kept + 1 * MIB] if journal == "a forged line" else [kept])
    assert (out / "big.bin").read_bytes() == data
    assert listing(out) == ["big.bin"]

"""Bad input, each with its own clear error and nothing left behind.

Storage is tampered with through the minio SDK (an independent client with the store's own
credentials, standing in for whoever controls the storage); the database through its own
connection (standing in for whoever controls the service).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from exchange.client import artifacts as api
from exchange.client import transfer
from exchange.client.transfer import download, upload
from exchange.errors import (
    AgeNoIdentityMatch,
    Conflict,
    IntegrityError,
    LocalFileError,
    ManifestError,
    ValidationError,
)
from exchange.format import age
from exchange.format.manifest import FileEntry, Manifest, ciphertext_digest, part_ranges
from exchange.identity import Identity
from tests.artifacts.conftest import BUCKET, write
from tests.conftest import Stack
from tests.test_storage import send

MIB = 1024 * 1024


def replace_object(bucket: Minio, key: str, change: Any) -> None:
    import io

    data = bucket.get_object(BUCKET, key).read()
    new = change(bytearray(data))
    bucket.put_object(BUCKET, key, io.BytesIO(bytes(new)), len(new))


async def uploaded(stack: Stack, tmp_path: Path, size: int, name: str = "w.bin") -> tuple[Identity, str, str]:
    dev = await stack.principal("dana", "developer", org="lab")
    write(tmp_path / name, size)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / name)
        detail = await api.get(c, artifact_id)
    return dev, artifact_id, detail["files"][0]["object"]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def _flip(data: bytearray) -> bytearray:
    data[len(data) // 2] ^= 0x01
    return data


def _truncate(data: bytearray) -> bytearray:
    return data[:-100]


def _swap_chunks(data: bytearray) -> bytearray:
    e = age.ENCRYPTED_CHUNK_SIZE
    a, b = 16 + 2 * e, 16 + 3 * e
    data[a : a + e], data[b : b + e] = data[b : b + e], data[a : a + e]
    return data


def _append(data: bytearray) -> bytearray:
    return data + b"\x00" * 32


@pytest.mark.parametrize(
    "change",
    [_flip, _truncate, _swap_chunks, _append],
    ids=["tampered", "truncated", "reordered", "appended"],
)
async def test_changed_ciphertext_is_refused_and_nothing_is_left(
    stack: Stack, tmp_path: Path, out: Path, bucket: Minio, change: Any
) -> None:
    dev, artifact_id, key = await uploaded(stack, tmp_path, 6 * MIB + 1)
    replace_object(bucket, key, change)
    async with stack.client(dev) as c:
        with pytest.raises(IntegrityError) as err:
            await download(c, artifact_id, out)
    assert "w.bin" in err.value.message  # names the file that failed
    assert list(out.iterdir()) == []


async def test_the_wrong_key_opens_nothing(stack: Stack, tmp_path: Path, out: Path) -> None:
    dev, artifact_id, _ = await uploaded(stack, tmp_path, 1000)
    stranger = Identity.generate()
    other_header = age.wrap_file_key(os.urandom(16), [stranger.public.age_recipient]).to_bytes()
    await _exec(stack, "UPDATE artifact_headers SET header = $1", other_header)
    async with stack.client(dev) as c:
        with pytest.raises(AgeNoIdentityMatch):
            await download(c, artifact_id, out)
    assert list(out.iterdir()) == []


async def _exec(stack: Stack, sql: str, *args: Any) -> None:
    async with stack.db.transaction() as conn:
        await conn.execute(sql, *args)


async def test_a_stored_manifest_changed_after_signing_is_refused(
    stack: Stack, tmp_path: Path, out: Path
) -> None:
    dev, artifact_id, _ = await uploaded(stack, tmp_path, 1000)
    raw = bytes(await stack.db.fetchval("SELECT manifest FROM artifacts WHERE id = $1", artifact_id))
    forged = raw.replace(b'"size":1000', b'"size":1001').replace(
        f'"ciphertext_size":{age.ciphertext_size(1000)}'.encode(),
        f'"ciphertext_size":{age.ciphertext_size(1001)}'.encode(),
    )
    assert forged != raw
    await _exec(stack, "UPDATE artifacts SET manifest = $1 WHERE id = $2", forged, artifact_id)
    async with stack.client(dev) as c:
        with pytest.raises(ManifestError) as err:
            await download(c, artifact_id, out)
    assert err.value.code == "manifest-signature"
    assert list(out.iterdir()) == []


# -- completion refusals ----------------------------------------------------------------------------


@pytest.fixture
def resign(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Intercept the client's completion to send another manifest or another signer's signature."""
    plan: dict[str, Any] = {}
    real = api.complete

    async def complete(client: Any, artifact_id: str, manifest: dict[str, Any], signature: bytes) -> Any:
        m = Manifest.from_json(manifest)
        if "mutate" in plan:
            m = plan["mutate"](m)
            signature = m.sign(client.identity.signing_key)
        if "signer" in plan:
            signature = m.sign(plan["signer"].signing_key)
        return await real(client, artifact_id, m.to_json(), signature)

    monkeypatch.setattr(transfer.api, "complete", complete)
    yield plan


async def test_a_manifest_signed_by_someone_else_is_refused(
    stack: Stack, tmp_path: Path, resign: dict[str, Any]
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    resign["signer"] = await stack.principal("carl", "developer", org="lab")
    write(tmp_path / "w.bin", 1000)
    async with stack.client(dev) as c:
        with pytest.raises(ValidationError) as err:  # the service's 400, code and all
            await upload(c, tmp_path / "w.bin")
        assert err.value.code == "manifest-signature"
        [pending] = await api.list_artifacts(c)
    assert pending["status"] == "uploading"
    event = (await stack.events())[-1]
    assert event["action"] == "artifact.complete" and event["outcome"] == {
        "result": "denied",
        "reason": "manifest-signature",
    }


def _other_digest(m: Manifest) -> Manifest:
    f = m.files[0]
    entry = FileEntry(f.path, f.size, f.sha256, f.nonce, f.ciphertext_size, b"\x00" * 32, f.object)
    return Manifest(m.artifact, m.org, m.name, m.kind, m.uploader, m.part_size, (entry,))


def _other_size(m: Manifest) -> Manifest:
    f = m.files[0]
    entry = FileEntry(
        f.path, f.size + 1, f.sha256, f.nonce, age.ciphertext_size(f.size + 1), f.ciphertext_digest, f.object
    )
    return Manifest(m.artifact, m.org, m.name, m.kind, m.uploader, m.part_size, (entry,))


@pytest.mark.parametrize("mutate", [_other_digest, _other_size])
async def test_a_manifest_that_does_not_match_the_records_is_refused(
    stack: Stack, tmp_path: Path, resign: dict[str, Any], mutate: Any
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    resign["mutate"] = mutate
    write(tmp_path / "w.bin", 1000)
    async with stack.client(dev) as c:
        with pytest.raises(Conflict) as err:
            await upload(c, tmp_path / "w.bin")
        assert err.value.code == "manifest-mismatch"
        [pending] = await api.list_artifacts(c)
    assert pending["status"] == "uploading"


# -- parts by hand ---------------------------------------------------------------------------------


class HandUpload:
    """An upload driven request by request, to do what the client never would."""

    def __init__(self, client: Any, identity: Identity, data: bytes) -> None:
        self.client, self.identity, self.data = client, identity, data
        self.file_key, self.nonce = age.generate_file_key(), os.urandom(16)
        self.ciphertext = b"".join(age.encrypt_stream(self.file_key, [data], nonce=self.nonce))

    async def start(self) -> dict[str, Any]:
        me = await self.client.whoami()
        header = age.wrap_file_key(self.file_key, [me["age_recipient"]]).to_bytes()
        self.detail = await api.create(
            self.client,
            name="hand.bin",
            kind="other",
            files=[("hand.bin", len(self.data), self.nonce)],
            headers={me["name"]: header},
        )
        self.ranges = part_ranges(len(self.data), self.detail["part_size"])
        return self.detail

    def part(self, number: int) -> bytes:
        r = self.ranges[number - 1]
        return self.ciphertext[r.start : r.end]

    async def url(self, number: int, digest: bytes | None = None) -> Any:
        digest = digest or hashlib.sha256(self.part(number)).digest()
        answer = await api.part_urls(self.client, self.detail["id"], [(0, number, digest)])
        return answer["parts"][0]

    async def put(self, number: int, data: bytes | None = None) -> int:
        from exchange.storage import PresignedRequest

        u = await self.url(number)
        status, _ = await asyncio.to_thread(
            send,
            PresignedRequest(u["method"], u["url"], u["headers"]),
            self.part(number) if data is None else data,
        )
        return status

    def manifest(self) -> Manifest:
        """The manifest of what `part` sends, as the client would sign it."""
        digests = [hashlib.sha256(self.part(r.number)).digest() for r in self.ranges]
        return Manifest(
            artifact=self.detail["id"],
            org=self.detail["org"],
            name="hand.bin",
            kind="other",
            uploader=self.identity.key_id,
            part_size=self.detail["part_size"],
            files=(
                FileEntry(
                    "hand.bin",
                    len(self.data),
                    hashlib.sha256(self.data).digest(),
                    self.nonce,
                    len(self.ciphertext),
                    ciphertext_digest(digests),
                    self.detail["files"][0]["object"],
                ),
            ),
        )

    async def complete(self) -> Any:
        m = self.manifest()
        return await api.complete(
            self.client, self.detail["id"], m.to_json(), m.sign(self.identity.signing_key)
        )


async def test_a_part_uploaded_twice_is_harmless(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    data = os.urandom(6 * MIB)
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, data)
        await hand.start()
        assert len(hand.ranges) == 2
        assert await hand.put(1) == 200
        assert await hand.put(1) == 200  # the same part again, through a re-issued URL
        assert await hand.put(2) == 200
        done = await hand.complete()
        assert done["status"] == "complete"
        out = tmp_path / "out"
        out.mkdir()
        await download(c, done["id"], out)
    assert (out / "hand.bin").read_bytes() == data


async def test_a_part_cannot_change_its_digest(stack: Stack) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, os.urandom(1000))
        await hand.start()
        await hand.url(1)
        before = await stack.count("artifact_parts")
        with pytest.raises(Conflict) as err:
            await hand.url(1, digest=b"\x01" * 32)
        assert err.value.code == "part-digest-changed"
        assert await stack.count("artifact_parts") == before
        # Other bytes than the URL was bound to: storage itself refuses them.
        assert await hand.put(1, os.urandom(len(hand.part(1)))) >= 400


@pytest.mark.parametrize(
    ("file_idx", "number"),
    [(1, 1), (9_999, 1), (10**30, 1), (0, 2), (0, 10_000), (0, 10**30)],
    ids=["next-file", "last-possible-file", "huge-file", "next-part", "max-part", "huge-part"],
)
async def test_part_urls_for_parts_the_artifact_lacks_are_refused(
    stack: Stack, file_idx: int, number: int
) -> None:
    """The part-URL call reads only the files and parts it names: one the artifact does not
    have is a 400 whatever the number, and nothing is recorded."""
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, os.urandom(1000))  # one file of one part
        await hand.start()
        before = await stack.count("artifact_parts"), await stack.count("audit_events")
        with pytest.raises(ValidationError):
            await api.part_urls(
                c, hand.detail["id"], [(0, 1, b"\x02" * 32), (file_idx, number, b"\x01" * 32)]
            )
        assert (await stack.count("artifact_parts"), await stack.count("audit_events")) == (
            before[0],
            before[1] + 1,  # the refusal's own event
        )


async def test_missing_and_wrongly_sized_parts_are_refused_at_completion(stack: Stack) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, os.urandom(6 * MIB))
        detail = await hand.start()
        assert await hand.put(1) == 200
        with pytest.raises(Conflict) as err:
            await hand.complete()
        assert err.value.code == "parts-missing"
        # Someone with the store's own credentials puts a part 2 of another size.
        await hand.url(2)
        upload_id = await stack.db.fetchval("SELECT upload_id FROM artifact_files")
        wrong = os.urandom(len(hand.part(2)) - 1)
        storage = stack.own_storage()
        try:
            req = storage.presign_upload_part(
                detail["files"][0]["object"],
                upload_id,
                2,
                ttl_s=60,
                content_length=len(wrong),
                checksum_sha256=base64.b64encode(hashlib.sha256(wrong).digest()).decode(),
            )
            status, _ = await asyncio.to_thread(send, req, wrong)
            assert status == 200
        finally:
            await storage.close()
        with pytest.raises(Conflict) as err:
            await hand.complete()
        assert err.value.code == "part-size-mismatch"
        assert (await api.get(c, detail["id"]))["status"] == "uploading"


async def test_completing_twice_is_a_conflict(stack: Stack) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, b"tiny")
        await hand.start()
        await hand.put(1)
        await hand.complete()
        with pytest.raises(Conflict) as err:
            await hand.complete()
    assert err.value.code == "artifact-complete"


# -- paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "a\x01b", "a//b", "./a"])
async def test_the_service_refuses_unsafe_paths(stack: Stack, path: str) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        me = await c.whoami()
        header = age.wrap_file_key(age.generate_file_key(), [me["age_recipient"]]).to_bytes()
        with pytest.raises(ValidationError):
            await api.create(
                c, name="x", kind="other", files=[(path, 1, os.urandom(16))], headers={"dana": header}
            )
    assert await stack.count("artifacts") == 0


async def test_the_client_refuses_symlinks(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    tree = tmp_path / "tree"
    write(tree / "real.bin", 10)
    (tree / "link.bin").symlink_to(tmp_path / "outside-secret")
    (tmp_path / "outside-secret").write_bytes(b"not yours")
    (tmp_path / "dirlink").symlink_to(tree)
    async with stack.client(dev) as c:
        for path in (tree, tmp_path / "dirlink", tree / "link.bin"):
            with pytest.raises(LocalFileError) as err:
                await upload(c, path)
            assert err.value.code == "symlink" and "symbolic link" in err.value.message
    assert await stack.count("artifacts") == 0


async def test_download_does_not_overwrite(stack: Stack, tmp_path: Path, out: Path) -> None:
    dev, artifact_id, _ = await uploaded(stack, tmp_path, 10)
    (out / "w.bin").write_bytes(b"mine")
    async with stack.client(dev) as c:
        with pytest.raises(LocalFileError) as err:
            await download(c, artifact_id, out)
    assert err.value.code == "exists"
    assert (out / "w.bin").read_bytes() == b"mine"
    assert sorted(p.name for p in out.iterdir()) == ["w.bin"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs); needs root, as CI has."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


async def test_a_full_disk_is_a_clear_error_and_leaves_nothing(
    stack: Stack, tmp_path: Path, small_disk: Path
) -> None:
    dev, artifact_id, _ = await uploaded(stack, tmp_path, 3 * MIB)
    async with stack.client(dev) as c:
        with pytest.raises(LocalFileError) as err:
            await download(c, artifact_id, small_disk)
    assert err.value.code == "disk-full" and "no space left" in err.value.message
    assert list(small_disk.iterdir()) == []

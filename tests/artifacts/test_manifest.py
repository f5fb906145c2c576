"""The pure parts: paths, the part layout, the ciphertext digest, and the signed manifest."""

from __future__ import annotations

import hashlib
import itertools
import os

import pytest
from nacl.signing import SigningKey

from exchange.errors import ManifestError, ValidationError
from exchange.format import age
from exchange.format.manifest import (
    MAX_PARTS,
    FileEntry,
    Manifest,
    check_path,
    check_paths,
    choose_part_size,
    ciphertext_digest,
    part_count,
    part_range,
    part_ranges,
)

E = age.ENCRYPTED_CHUNK_SIZE
MIB = 1024 * 1024


@pytest.mark.parametrize(
    "size", [0, 1, 65_535, 65_536, 65_537, 2 * 65_536, 80 * 65_536, 80 * 65_536 + 1, 161 * 65_536 - 1]
)
def test_parts_tile_the_payload_on_chunk_boundaries(size: int) -> None:
    part_size = 80 * E
    ranges = part_ranges(size, part_size)
    assert ranges[0].start == 0 and ranges[0].has_nonce
    assert ranges[-1].end == age.ciphertext_size(size) and ranges[-1].has_final_chunk
    assert ranges[-1].plain_end == size
    for before, after in itertools.pairwise(ranges):
        assert before.end == after.start and before.plain_end == after.plain_start
        assert before.first_chunk + before.chunks == after.first_chunk
        assert not before.has_final_chunk
    # Every part but the first (nonce on top) and the last is exactly the part size.
    assert all(r.size == part_size for r in ranges[1:-1])
    if len(ranges) > 1:
        assert ranges[0].size == part_size + age.NONCE_SIZE
    assert sum(r.chunks for r in ranges) == age.chunk_count(size)


@pytest.mark.parametrize("size", [0, 65_536, 80 * 65_536, 80 * 65_536 + 1, 500 * 65_536 + 7])
def test_one_part_is_computed_alone_and_a_missing_one_is_refused(size: int) -> None:
    part_size = 80 * E
    count = part_count(size, part_size)
    assert [part_range(size, part_size, n) for n in range(1, count + 1)] == part_ranges(size, part_size)
    for number in (0, -1, count + 1):
        with pytest.raises(ValueError, match="no part"):
            part_range(size, part_size, number)


def test_each_part_encrypts_alone_to_the_same_bytes_as_the_whole_stream() -> None:
    data = os.urandom(5 * 65_536 + 17)
    file_key, nonce = os.urandom(16), os.urandom(16)
    whole = b"".join(age.encrypt_stream(file_key, [data], nonce=nonce))
    key = age.payload_key(file_key, nonce)
    pieces = []
    for r in part_ranges(len(data), 2 * E):
        out = nonce if r.has_nonce else b""
        for i in range(r.first_chunk, r.first_chunk + r.chunks):
            last = r.has_final_chunk and i == r.first_chunk + r.chunks - 1
            out += age.encrypt_chunk(key, i, data[i * 65_536 : (i + 1) * 65_536], last=last)
        assert len(out) == r.size
        assert whole[r.start : r.end] == out
        pieces.append(out)
    assert b"".join(pieces) == whole


def test_part_size_fits_five_tib_in_ten_thousand_parts() -> None:
    for size in (0, 1, 10 * MIB, 100 * 1024**3, 5 * 1024**4):
        p = choose_part_size(size, min_part_bytes=8 * MIB)
        assert p % E == 0 and p >= 8 * MIB
        assert len(part_ranges(size, p)) <= MAX_PARTS
    # Small files get the minimum, rounded up to whole chunks.
    assert choose_part_size(10, min_part_bytes=8 * MIB) == 128 * E
    with pytest.raises(ValidationError):
        choose_part_size(60 * 1024**4, min_part_bytes=8 * MIB)


def test_ciphertext_digest_is_sha256_of_the_part_digests() -> None:
    parts = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    assert ciphertext_digest(parts) == hashlib.sha256(b"".join(parts)).digest()
    assert ciphertext_digest(parts) != ciphertext_digest(parts[::-1])


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("a/../b", "'..'"),
        ("..", "'..'"),
        ("a/./b", "'.'"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("a\\b", "backslash"),
        ("a\x00b", "control"),
        ("new\nline", "control"),
        ("x" * 256, "255"),
    ],
)
def test_bad_paths_are_refused(path: str, why: str) -> None:
    with pytest.raises(ValidationError) as err:
        check_path(path)
    assert why in err.value.message


def test_paths_may_not_clash() -> None:
    assert check_paths(["m/b", "m/a"]) == ["m/a", "m/b"]
    with pytest.raises(ValidationError, match="same path"):
        check_paths(["a", "a"])
    with pytest.raises(ValidationError, match="also a directory"):
        check_paths(["a", "a/b"])
    with pytest.raises(ValidationError, match="at least one"):
        check_paths([])


def _manifest(**changes: object) -> Manifest:
    entry = FileEntry(
        path="m/w.bin",
        size=70_000,
        sha256=b"\x01" * 32,
        nonce=b"\x02" * 16,
        ciphertext_size=age.ciphertext_size(70_000),
        ciphertext_digest=b"\x03" * 32,
        object="artifacts/abc",
    )
    fields = {
        "artifact": "art_1",
        "org": "lab",
        "name": "m",
        "kind": "model-weights",
        "uploader": "k" * 32,
        "part_size": 128 * E,
        "files": (entry,),
    }
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_manifest_is_canonical_and_round_trips() -> None:
    m = _manifest()
    raw = m.canonical()
    assert raw.startswith(b'{"artifact":"art_1"') and b" " not in raw
    assert Manifest.from_canonical(raw) == m
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(ManifestError, match="canonical"):
        Manifest.from_canonical(raw.replace(b'{"artifact"', b'{ "artifact"'))


def test_manifest_signature_verifies_only_for_its_signer_and_its_bytes() -> None:
    uploader, other = SigningKey.generate(), SigningKey.generate()
    m = _manifest()
    signature = m.sign(uploader)
    m.verify(signature, bytes(uploader.verify_key))
    with pytest.raises(ManifestError) as err:
        m.verify(m.sign(other), bytes(uploader.verify_key))  # signed by someone else
    assert err.value.code == "manifest-signature"
    with pytest.raises(ManifestError):
        _manifest(name="other").verify(signature, bytes(uploader.verify_key))  # altered


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("kind"),
        lambda d: d.update(extra=1),
        lambda d: d.update(type="exchange.manifest/v2"),
        lambda d: d.update(part_size=1000),
        lambda d: d["files"][0].update(ciphertext_size=1),
        lambda d: d["files"][0].update(sha256="AB" * 32),
        lambda d: d["files"][0].update(path="../escape"),
        lambda d: d["files"][0].update(size=True),
        lambda d: d.update(files=[]),
    ],
)
def test_malformed_manifests_are_refused(mutate: object) -> None:
    data = _manifest().to_json()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ManifestError):
        Manifest.from_json(data)

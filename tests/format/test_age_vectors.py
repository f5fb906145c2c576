"""The C2SP CCTV age test vectors (../shared/vectors/age), every one of them.

Each vector is a textual header (expect, payload hash, identities, …), a blank line and
an age file, possibly zlib-compressed (see README.cctv.md there). We decrypt the file
with the identities we can use and check the outcome is the vector's, with the exact
exception class: header failure → AgeHeaderError, no match → AgeNoIdentityMatch,
HMAC failure → AgeHeaderMacError, payload failure → AgePayloadError.

Where exchange's scope is narrower than age's, the rules are:

- ASCII armor is not supported. An armored file does not start with the binary version
  line, so every armored vector that expects a failure — whichever failure — must fail
  with AgeHeaderError.
- Only X25519 identities are supported. Post-quantum identities (AGE-SECRET-KEY-PQ-1…)
  and passphrases in a vector are not passed to our decrypt; it runs with the X25519
  identities alone, possibly none. Their failure vectors must still fail correctly,
  through our checks of every native stanza's shape (see exchange.format.age).
- The vectors that expect *success* through armor, a post-quantum identity or a
  passphrase are listed one by one in OUT_OF_SCOPE and run as strict xfails that must
  fail with the named exception: a vector that starts passing, or fails differently,
  breaks the suite.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exchange.errors import (
    AgeError,
    AgeHeaderError,
    AgeHeaderMacError,
    AgeNoIdentityMatch,
    AgePayloadError,
)
from exchange.format import age

VECTORS = Path(__file__).parents[2].parent / "shared" / "vectors" / "age"
if not VECTORS.is_dir():
    pytest.skip(f"CCTV age vectors not found at {VECTORS}", allow_module_level=True)

NOT_VECTORS = {"LICENSE", "README.cctv.md"}

EXPECTED_ERROR: dict[str, type[AgeError]] = {
    "header failure": AgeHeaderError,
    "no match": AgeNoIdentityMatch,
    "HMAC failure": AgeHeaderMacError,
    "payload failure": AgePayloadError,
    "armor failure": AgeHeaderError,  # we never decode armor: not a binary header
}

# Vectors expecting success through a feature exchange does not implement, and the error
# our decrypt gives instead. Nothing else is excused.
OUT_OF_SCOPE: dict[str, tuple[str, type[AgeError]]] = {
    "armor_crlf": ("ASCII armor", AgeHeaderError),
    "armor_full_last_line": ("ASCII armor", AgeHeaderError),
    "armor_hybrid": ("ASCII armor, post-quantum identity", AgeHeaderError),
    "armor_no_eol": ("ASCII armor", AgeHeaderError),
    "armor_scrypt": ("ASCII armor, passphrase", AgeHeaderError),
    "armor_whitespace_outside": ("ASCII armor", AgeHeaderError),
    "armor_x25519": ("ASCII armor", AgeHeaderError),
    "hybrid": ("post-quantum identity", AgeNoIdentityMatch),
    "hybrid_and_x25519": ("post-quantum identity (the X25519 stanza is not ours)", AgeNoIdentityMatch),
    "hybrid_grease": ("post-quantum identity", AgeNoIdentityMatch),
    "hybrid_multiple_recipients": ("post-quantum identity", AgeNoIdentityMatch),
    "scrypt": ("passphrase", AgeNoIdentityMatch),
}

# Header failures that only show once the header has parsed: age reports a missing or
# short payload nonce while opening the file, and the vectors file that under header.
HEADER_FAILURES_AFTER_PARSE = {"stream_no_nonce", "stream_short_nonce"}


@dataclass
class Vector:
    name: str
    expect: str
    file: bytes
    payload_hash: str | None = None
    file_key: bytes | None = None
    identities: list[str] = field(default_factory=list)
    unsupported_identities: list[str] = field(default_factory=list)
    passphrases: list[str] = field(default_factory=list)
    armored: bool = False
    comment: str = ""
    unknown_keys: list[str] = field(default_factory=list)


def load(path: Path) -> Vector:
    meta, _, file = path.read_bytes().partition(b"\n\n")
    vector = Vector(name=path.name, expect="", file=file)
    compressed = False
    for line in meta.decode("utf-8").splitlines():
        key, _, value = line.partition(": ")
        if key == "expect":
            vector.expect = value
        elif key == "payload":
            vector.payload_hash = value
        elif key == "file key":
            vector.file_key = bytes.fromhex(value)
        elif key == "identity":
            # X25519 identities are ours; anything else (post-quantum) is set aside.
            target = (
                vector.identities if value.startswith("AGE-SECRET-KEY-1") else vector.unsupported_identities
            )
            target.append(value)
        elif key == "passphrase":
            vector.passphrases.append(value)
        elif key == "armored":
            vector.armored = value == "yes"
        elif key == "compressed":
            assert value == "zlib", f"unknown compression {value!r}"
            compressed = True
        elif key == "comment":
            vector.comment = value
        else:
            vector.unknown_keys.append(key)
    assert vector.expect in {"success", *EXPECTED_ERROR}, f"unknown expect {vector.expect!r}"
    if compressed:
        vector.file = zlib.decompress(vector.file)
    return vector


def _vector_paths() -> list[Path]:
    return [p for p in sorted(VECTORS.iterdir()) if p.is_file() and p.name not in NOT_VECTORS]


def _meta(path: Path) -> dict[str, str]:
    """The textual header of a vector, read cheaply at collection time."""
    meta = path.read_bytes().partition(b"\n\n")[0].decode("utf-8")
    return dict(line.partition(": ")[::2] for line in meta.splitlines())


def _params(*, where: Callable[[dict[str, str]], bool] = lambda m: True) -> list[object]:
    return [pytest.param(p, id=p.name) for p in _vector_paths() if where(_meta(p))]


def _all_params_marked() -> list[object]:
    params: list[object] = []
    for path in _vector_paths():
        marks = []
        if path.name in OUT_OF_SCOPE:
            reason, error = OUT_OF_SCOPE[path.name]
            marks.append(pytest.mark.xfail(strict=True, raises=error, reason=f"not supported: {reason}"))
        params.append(pytest.param(path, id=path.name, marks=marks))
    return params


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("path", _all_params_marked())
def test_vector(path: Path) -> None:
    v = load(path)
    if v.unknown_keys:
        pytest.skip(f"unknown vector keys {v.unknown_keys}: the README says to ignore such files")
    if v.expect == "success":
        plaintext = age.decrypt(v.file, v.identities)
        assert sha256(plaintext) == v.payload_hash
        return
    expected = AgeHeaderError if v.armored else EXPECTED_ERROR[v.expect]
    with pytest.raises(AgeError) as caught:
        age.decrypt(v.file, v.identities)
    # Exact class, not a subclass check: distinct failures must stay distinct.
    assert type(caught.value) is expected, f"{v.comment or v.name}: got {caught.value!r}"
    assert caught.value.message


@pytest.mark.parametrize(
    "path", _params(where=lambda m: m["expect"] == "payload failure" and "armored" not in m)
)
def test_vector_payload_released_before_failure(path: Path) -> None:
    """For payload failures, the plaintext that streamed out before the error is the vector's."""
    v = load(path)
    header, offset = age.Header.parse(v.file)
    file_key = age.unwrap_file_key(header, v.identities)
    released: list[bytes] = []
    with pytest.raises(AgePayloadError):
        for piece in age.decrypt_stream(file_key, [v.file[offset:]]):
            released.append(piece)
    assert sha256(b"".join(released)) == v.payload_hash


@pytest.mark.parametrize("path", _params(where=lambda m: "armored" not in m))
def test_vector_header_round_trip(path: Path) -> None:
    """Headers that parse re-encode byte for byte; header failures fail in the header alone."""
    v = load(path)
    if v.expect == "header failure" and v.name not in HEADER_FAILURES_AFTER_PARSE:
        # Our header checks do not depend on the identities: the bytes alone are refused.
        with pytest.raises(AgeHeaderError):
            age.Header.parse(v.file)
        return
    header, offset = age.Header.parse(v.file)
    assert header.to_bytes() == v.file[:offset]
    assert age.Header.parse(header.to_bytes()) == (header, offset)


@pytest.mark.parametrize("path", _params(where=lambda m: m["expect"] == "success" and "armored" not in m))
def test_vector_stream_round_trip(path: Path) -> None:
    """Every success vector's payload re-encrypts identically from its file key and nonce.

    This covers the post-quantum and passphrase vectors too: their payloads are plain
    STREAM, only their stanzas are out of scope.
    """
    v = load(path)
    assert v.file_key is not None
    _, offset = age.Header.parse(v.file)
    payload = v.file[offset:]
    plaintext = b"".join(age.decrypt_stream(v.file_key, [payload]))
    assert sha256(plaintext) == v.payload_hash
    again = b"".join(age.encrypt_stream(v.file_key, [plaintext], nonce=payload[: age.NONCE_SIZE]))
    assert again == payload
    assert age.plaintext_size(len(payload)) == len(plaintext)
    assert age.ciphertext_size(len(plaintext)) == len(payload)


def test_out_of_scope_list_is_exactly_the_unsupported_successes() -> None:
    """OUT_OF_SCOPE names every success vector needing armor, PQ or scrypt — and nothing else."""
    needs_unsupported = set()
    for path in _vector_paths():
        v = load(path)
        if v.expect == "success" and (v.armored or v.unsupported_identities or v.passphrases):
            needs_unsupported.add(v.name)
    assert needs_unsupported == set(OUT_OF_SCOPE)


def test_every_vector_is_collected() -> None:
    names = {p.name for p in VECTORS.iterdir() if p.name not in NOT_VECTORS}
    assert len(_all_params_marked()) == len(names) > 100

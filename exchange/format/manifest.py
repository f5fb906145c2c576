"""Artifact manifests, file paths and the part layout of an encrypted file: pure, no I/O.

An artifact is one file or a tree of files. Each file is stored as one age payload (a 16-byte
nonce, then 64 KiB chunks, see `exchange.format._stream`), uploaded as an S3 multipart object.
This module holds what client and service must agree on byte for byte:

Paths. A file's path inside its artifact is relative, '/'-separated and already normal: no empty
components, no '.' or '..', no leading '/', no backslash, no NUL or other control character (C0,
DEL and C1: CR and LF included), each component at most MAX_COMPONENT_BYTES (255) UTF-8 bytes and
the path at most MAX_PATH_BYTES (4096), as on Linux and macOS; no path that is a directory of
another, and no two paths that are the same text once Unicode-normalised (NFC): "café" composed
and decomposed are one name on macOS and others, so twins are refused naming both (`check_paths`,
code `path-collision`). `check_path` refuses rather than repairs: the client normalises what it
reads from disk, the service refuses anything that is not already normal, so one file has exactly
one spelling. Other characters are kept exactly (bidirectional overrides such as U+202E
included): they are data, shown escaped by the CLI, never interpreted.

The part layout. Part boundaries fall on chunk boundaries, so every part can be encrypted and
decrypted on its own from the plaintext (or ciphertext) at a computable offset. With P, the part
size, a multiple of the encrypted chunk size (65,552 bytes):

    part 0:   bytes [0, 16 + P)           the nonce and the first P/65,552 chunks
    part i:   bytes [16 + i·P, 16 + (i+1)·P)
    the last part ends at the end of the payload, and may be shorter

So every part but the first and the last is exactly P bytes; the first carries the 16-byte nonce
on top. `choose_part_size` picks the smallest P (at least a configured minimum) that fits the
payload into S3's 10,000 parts: for a 5 TiB file that is about 550 MB. (The payload of a 5 TiB
file is 1/4096 larger than the file: AWS S3 itself stores objects up to 5 TiB only.)

The ciphertext digest of a file is SHA-256 over the concatenation of its parts' raw SHA-256
digests, in part order. Part URLs are bound to each part's SHA-256, so storage itself guarantees
the stored bytes hash to the digests the service recorded, and the service and a downloader can
both check the whole file from the part digests without hashing it end to end.

The manifest. The uploader signs, with its Ed25519 key, the RFC 8785 canonical JSON of:

    type        "exchange.manifest/v1"
    artifact    the artifact id
    org         the owning organisation's name
    name, kind  the artifact's name and kind
    uploader    the key id of the signing key
    part_size   P, in bytes
    files       sorted by path, each {path, size, sha256 (hex, of the plaintext), nonce (base64),
                ciphertext_size, ciphertext_digest (hex, as above), object (the storage key)}

The signature is over exactly the canonical bytes; `Manifest.digest()` is their SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from ..errors import ManifestError, ValidationError
from ._stream import CHUNK_SIZE, ENCRYPTED_CHUNK_SIZE, NONCE_SIZE, chunk_count, ciphertext_size

__all__ = [
    "KINDS",
    "MANIFEST_TYPE",
    "MAX_COMPONENT_BYTES",
    "MAX_PARTS",
    "MAX_PATH_BYTES",
    "FileEntry",
    "Manifest",
    "PartRange",
    "check_path",
    "check_paths",
    "choose_part_size",
    "ciphertext_digest",
    "part_count",
    "part_ranges",
]

MANIFEST_TYPE = "exchange.manifest/v1"
KINDS = ("model-weights", "dataset", "report", "finding-attachment", "other")
#: S3 allows at most this many parts in one multipart upload.
MAX_PARTS = 10_000
#: The largest part S3 accepts (5 GiB).
MAX_PART_BYTES = 5 * 1024**3
#: The longest path in an artifact, in UTF-8 bytes (Linux's PATH_MAX).
MAX_PATH_BYTES = 4096
#: The longest component (file or directory name) of a path, in UTF-8 bytes (NAME_MAX on Linux
#: and macOS): a longer name could not be written by a downloader.
MAX_COMPONENT_BYTES = 255
#: C0 controls (NUL, CR, LF, ESC, ...), DEL and C1 controls (0x9b is a terminal's CSI).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILE_FIELDS = {"path", "size", "sha256", "nonce", "ciphertext_size", "ciphertext_digest", "object"}
_MANIFEST_FIELDS = {"type", "artifact", "org", "name", "kind", "uploader", "part_size", "files"}


# -- paths ----------------------------------------------------------------------------------------


def check_path(path: str) -> str:
    """Return `path` if it is a valid artifact path; raise ValidationError saying why not."""
    if not isinstance(path, str) or not path:
        raise ValidationError("a file path is empty")
    shown = repr(path[:80])
    if _CONTROL.search(path):
        raise ValidationError(f"the path {shown} has a control character")
    if "\\" in path:
        raise ValidationError(f"the path {shown} has a backslash; use '/' between components")
    if path.startswith("/"):
        raise ValidationError(f"the path {shown} is absolute; paths in an artifact are relative")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"the path {shown} is not valid Unicode text") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise ValidationError(
            f"the path {shown} is {len(encoded)} bytes long, over the limit of {MAX_PATH_BYTES} bytes",
            code="path-too-long",
        )
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValidationError(f"the path {shown} is not normal: it has an empty, '.' or '..' component")
        size = len(part.encode("utf-8"))
        if size > MAX_COMPONENT_BYTES:
            raise ValidationError(
                f"a name in the path {shown} is {size} bytes long, over the limit of"
                f" {MAX_COMPONENT_BYTES} bytes for one file or directory name",
                code="path-too-long",
            )
    return path


def check_paths(paths: Iterable[str]) -> list[str]:
    """Check every path, and that no two clash: duplicates, Unicode-normalisation twins, or a
    file that is another's directory (also through a twin)."""
    checked = sorted(check_path(p) for p in paths)
    if not checked:
        raise ValidationError("an artifact needs at least one file")
    # Compared in NFC: two spellings of one name are one file on macOS (and to most people).
    by_form: dict[str, str] = {}
    for i, path in enumerate(checked):
        if i and checked[i - 1] == path:  # sorted: exact duplicates are neighbours
            raise ValidationError(
                f"two files in the artifact have the same path {path!r}", code="path-collision"
            )
        twin = by_form.setdefault(unicodedata.normalize("NFC", path), path)
        if twin != path:
            raise ValidationError(
                f"the paths {twin!a} and {path!a} are the same name once Unicode-normalised"
                " (NFC); they would overwrite each other on macOS and other systems: rename one",
                code="path-collision",
            )
    for form, path in by_form.items():
        parts = form.split("/")
        for depth in range(1, len(parts)):
            parent = by_form.get("/".join(parts[:depth]))
            if parent is not None:
                raise ValidationError(
                    f"the path {parent!a} is a file and also a directory of {path!a}"
                    + ("" if path.startswith(parent + "/") else " once Unicode-normalised (NFC)"),
                    code="path-collision",
                )
    return checked


# -- the part layout ------------------------------------------------------------------------------


def choose_part_size(largest_plaintext: int, *, min_part_bytes: int) -> int:
    """The part size for an artifact whose largest file has `largest_plaintext` bytes.

    A multiple of the encrypted chunk size, at least `min_part_bytes`, and the smallest such that
    the largest file's payload fits in MAX_PARTS parts.
    """
    if largest_plaintext < 0:
        raise ValueError("a file size cannot be negative")
    body = ciphertext_size(largest_plaintext) - NONCE_SIZE
    min_chunks = max(1, -(-min_part_bytes // ENCRYPTED_CHUNK_SIZE))
    fit_chunks = -(-body // (MAX_PARTS * ENCRYPTED_CHUNK_SIZE))
    part_size = max(min_chunks, fit_chunks) * ENCRYPTED_CHUNK_SIZE
    if part_size + NONCE_SIZE > MAX_PART_BYTES:
        raise ValidationError(
            f"a file of {largest_plaintext} bytes is too large for {MAX_PARTS} parts of 5 GiB"
        )
    return part_size


def part_count(plaintext_size: int, part_size: int) -> int:
    """How many parts the payload of `plaintext_size` bytes has with this part size."""
    _check_part_size(part_size)
    chunks_per_part = part_size // ENCRYPTED_CHUNK_SIZE
    return -(-chunk_count(plaintext_size) // chunks_per_part)


@dataclass(frozen=True)
class PartRange:
    """Part `number` (1-based, as S3 counts) of a payload: where it lies in ciphertext and plaintext."""

    number: int
    #: Byte range [start, end) of the part in the payload object.
    start: int
    end: int
    #: Chunks [first_chunk, first_chunk + chunks) of the STREAM, and whether the last is final.
    first_chunk: int
    chunks: int
    has_final_chunk: bool
    #: Byte range [plain_start, plain_end) of the plaintext these chunks encrypt.
    plain_start: int
    plain_end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def has_nonce(self) -> bool:
        return self.start == 0


def _check_part_size(part_size: int) -> None:
    if part_size <= 0 or part_size % ENCRYPTED_CHUNK_SIZE:
        raise ValueError(f"a part size must be a positive multiple of {ENCRYPTED_CHUNK_SIZE}")


def part_ranges(plaintext_size: int, part_size: int) -> list[PartRange]:
    """Every part of the payload of `plaintext_size` bytes, in order."""
    return [
        part_range(plaintext_size, part_size, number)
        for number in range(1, part_count(plaintext_size, part_size) + 1)
    ]


def part_range(plaintext_size: int, part_size: int, number: int) -> PartRange:
    """Part `number` (1-based) of the payload of `plaintext_size` bytes, without the others."""
    _check_part_size(part_size)
    per_part = part_size // ENCRYPTED_CHUNK_SIZE
    total_chunks = chunk_count(plaintext_size)
    if not 1 <= number <= -(-total_chunks // per_part):
        raise ValueError(f"the payload has no part {number}")
    first = (number - 1) * per_part
    chunks = min(per_part, total_chunks - first)
    final = first + chunks == total_chunks
    start = 0 if number == 1 else NONCE_SIZE + first * ENCRYPTED_CHUNK_SIZE
    end = ciphertext_size(plaintext_size) if final else NONCE_SIZE + (first + chunks) * ENCRYPTED_CHUNK_SIZE
    plain_start = first * CHUNK_SIZE
    plain_end = plaintext_size if final else (first + chunks) * CHUNK_SIZE
    return PartRange(number, start, end, first, chunks, final, plain_start, plain_end)


def ciphertext_digest(part_digests: Sequence[bytes]) -> bytes:
    """SHA-256 over the concatenated raw SHA-256 digests of a payload's parts, in part order."""
    if not part_digests:
        raise ValueError("a payload has at least one part")
    h = hashlib.sha256()
    for digest in part_digests:
        if len(digest) != 32:
            raise ValueError("a part digest is 32 bytes (raw SHA-256)")
        h.update(digest)
    return h.digest()


# -- the manifest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: bytes
    nonce: bytes
    ciphertext_size: int
    ciphertext_digest: bytes
    object: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256.hex(),
            "nonce": base64.b64encode(self.nonce).decode("ascii"),
            "ciphertext_size": self.ciphertext_size,
            "ciphertext_digest": self.ciphertext_digest.hex(),
            "object": self.object,
        }

    @classmethod
    def from_json(cls, data: Any) -> FileEntry:
        d = _object(data, "a file entry", _FILE_FIELDS)
        path = _str(d, "path")
        try:
            check_path(path)
        except ValidationError as exc:
            raise ManifestError(f"manifest: {exc.message}") from None
        size, csize = _int(d, "size"), _int(d, "ciphertext_size")
        if csize != ciphertext_size(size):
            raise ManifestError(f"manifest: the ciphertext size of {path!r} does not match its size")
        nonce = _b64(d, "nonce")
        if len(nonce) != NONCE_SIZE:
            raise ManifestError(f"manifest: the nonce of {path!r} is not {NONCE_SIZE} bytes")
        return cls(
            path=path,
            size=size,
            sha256=_hex(d, "sha256"),
            nonce=nonce,
            ciphertext_size=csize,
            ciphertext_digest=_hex(d, "ciphertext_digest"),
            object=_str(d, "object"),
        )


@dataclass(frozen=True)
class Manifest:
    artifact: str
    org: str
    name: str
    kind: str
    uploader: str
    part_size: int
    files: tuple[FileEntry, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(sorted(self.files, key=lambda f: f.path)))
        if self.kind not in KINDS:
            raise ManifestError(f"manifest: unknown artifact kind {self.kind[:40]!r}")
        try:
            check_paths(f.path for f in self.files)
            _check_part_size(self.part_size)
        except (ValidationError, ValueError) as exc:
            raise ManifestError(f"manifest: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": MANIFEST_TYPE,
            "artifact": self.artifact,
            "org": self.org,
            "name": self.name,
            "kind": self.kind,
            "uploader": self.uploader,
            "part_size": self.part_size,
            "files": [f.to_json() for f in self.files],
        }

    def canonical(self) -> bytes:
        """The RFC 8785 bytes that are signed."""
        return bytes(rfc8785.dumps(self.to_json()))

    def digest(self) -> bytes:
        return hashlib.sha256(self.canonical()).digest()

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse a manifest object strictly: every field present, no others, right types."""
        d = _object(data, "the manifest", _MANIFEST_FIELDS)
        if d["type"] != MANIFEST_TYPE:
            raise ManifestError(f"manifest: the type must be {MANIFEST_TYPE!r}")
        files = d["files"]
        if not isinstance(files, list) or not files:
            raise ManifestError("manifest: 'files' must be a non-empty list")
        return cls(
            artifact=_str(d, "artifact"),
            org=_str(d, "org"),
            name=_str(d, "name"),
            kind=_str(d, "kind"),
            uploader=_str(d, "uploader"),
            part_size=_int(d, "part_size"),
            files=tuple(FileEntry.from_json(f) for f in files),
        )

    @classmethod
    def from_canonical(cls, data: bytes) -> Manifest:
        """Parse signed manifest bytes, which must be exactly canonical."""
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError("manifest: not valid JSON") from exc
        manifest = cls.from_json(parsed)
        if manifest.canonical() != bytes(data):
            raise ManifestError("manifest: not in canonical (RFC 8785) form")
        return manifest

    def sign(self, key: SigningKey) -> bytes:
        return bytes(key.sign(self.canonical()).signature)

    def verify(self, signature: bytes, public_key: bytes) -> None:
        """Raise ManifestError(code manifest-signature) unless `signature` is the uploader's over it."""
        try:
            VerifyKey(public_key).verify(self.canonical(), signature)
        except (BadSignatureError, ValueError, TypeError):
            raise ManifestError(
                "the manifest signature does not verify with the uploader's registered signing key",
                code="manifest-signature",
            ) from None


# -- strict field access --------------------------------------------------------------------------


def _object(data: Any, what: str, fields: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ManifestError(f"manifest: {what} must be an object")
    if set(data) != fields:
        missing, extra = sorted(fields - set(data)), sorted(set(data) - fields)
        raise ManifestError(f"manifest: {what} has missing fields {missing} or unknown fields {extra}")
    return data


def _str(d: Mapping[str, Any], name: str) -> str:
    value = d[name]
    if not isinstance(value, str) or not value:
        raise ManifestError(f"manifest: {name!r} must be a non-empty string")
    return value


def _int(d: Mapping[str, Any], name: str) -> int:
    value = d[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**53 - 1:
        raise ManifestError(f"manifest: {name!r} must be a non-negative integer")
    return value


def _hex(d: Mapping[str, Any], name: str) -> bytes:
    value = d[name]
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ManifestError(f"manifest: {name!r} must be 64 lower-case hex digits")
    return bytes.fromhex(value)


def _b64(d: Mapping[str, Any], name: str) -> bytes:
    value = d[name]
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or base64.b64encode(raw).decode("ascii") != value:
        raise ManifestError(f"manifest: {name!r} must be canonical base64")
    return raw

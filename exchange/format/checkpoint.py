"""C2SP tlog-checkpoint bodies and tlog-cosignature (cosignature/v1, Ed25519) signatures.

A checkpoint is the signed-note text that commits the audit log to a tree head
(c2sp.org/tlog-checkpoint):

    <origin>\\n
    <tree size, decimal, no leading zeros>\\n
    <root hash, base64>\\n
    [<extension line>\\n ...]

The log signs it as an ordinary Ed25519 note (`exchange.format.note`). Witnesses add
cosignatures (c2sp.org/tlog-cosignature, c2sp.org/tlog-witness): signature lines of type 0x04
whose key ID is SHA-256(name || 0x0A || 0x04 || public key)[:4] and whose signature bytes are

    timestamp (8 bytes, big-endian, POSIX seconds) || Ed25519 signature

over the message

    cosignature/v1\\n
    time <timestamp>\\n
    <the checkpoint text, final newline included>

The message does not name the cosigner, so a cosigner's key must never sign anything else (the
0x04 key ID and the "cosignature/v1" header keep it apart from note signatures).

Parsing is strict, because two spellings of one tree head would be two different signed
messages: the size has no sign, no leading zeros and fits in a signed 64-bit integer (what the
database and other tlog implementations store), the root is canonical base64 of exactly 32
bytes, lines are non-empty, and `Checkpoint.parse(text).to_text() == text` always holds.

What this module deliberately does not do: no clock (the cosignature timestamp is a parameter,
and whether a timestamp is too far in the future is the caller's policy), no witness protocol
(HTTP, add-checkpoint requests), no check that the root matches any tree (that is
`exchange.format.merkle`), and no ML-DSA-44 cosignatures (type 0x06), which we neither produce
nor accept.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from exchange.errors import NoteError
from exchange.format.note import (
    Signature,
    b64decode_canonical,
    check_key_name,
    compute_key_id,
    decode_vkey,
    encode_vkey,
)

__all__ = [
    "COSIGNATURE_V1",
    "MAX_TIMESTAMP",
    "MAX_TREE_SIZE",
    "Checkpoint",
    "cosign",
    "cosignature_message",
    "cosigner_key_id",
    "cosigner_vkey",
    "verify_cosignature",
]

COSIGNATURE_V1 = 0x04
"""Signature type byte of timestamped Ed25519 checkpoint cosignatures (c2sp.org/signed-note)."""

MAX_TREE_SIZE = 2**63 - 1
"""Largest tree size we write or read: a signed 64-bit integer, like the database column."""

MAX_TIMESTAMP = 2**63 - 1
"""tlog-cosignature: the timestamp "MUST NOT exceed 2^63 - 1"."""

HASH_SIZE = 32
_TIMESTAMP_SIZE = 8
_ED25519_KEY_SIZE = 32
_ED25519_SIG_SIZE = 64

# ASCII decimal without sign, spaces, underscores or leading zeros (int() accepts all of those,
# and non-ASCII digits too).
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
# ASCII control characters other than newline; a checkpoint must be embeddable in a note.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")


def _check_line(value: str, what: str) -> None:
    if not value:
        raise NoteError(f"A checkpoint's {what} must not be empty.")
    if "\n" in value or _CONTROL.search(value):
        raise NoteError(f"A checkpoint's {what} must be one line without control characters.")


@dataclass(frozen=True)
class Checkpoint:
    """A tlog-checkpoint body: the log's origin, tree size, root hash and extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Validated on construction too, so that every Checkpoint prints as a text that parses.
        _check_line(self.origin, "origin")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise NoteError("A checkpoint's tree size must be an integer.")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise NoteError(f"A checkpoint's tree size must be between 0 and {MAX_TREE_SIZE}.")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise NoteError(f"A checkpoint's root hash must be {HASH_SIZE} bytes.")
        if not isinstance(self.extensions, tuple):
            raise NoteError("A checkpoint's extension lines must be a tuple of strings.")
        for line in self.extensions:
            _check_line(line, "extension line")

    def to_text(self) -> str:
        """The note text: origin, size, base64 root and extension lines, each ending in a newline."""
        lines = [
            self.origin,
            str(self.size),
            base64.b64encode(self.root_hash).decode("ascii"),
            *self.extensions,
        ]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text strictly (see the module docstring)."""
        if not text.endswith("\n"):
            raise NoteError("A checkpoint text must end with a newline.")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("A checkpoint has at least three lines: origin, tree size and root hash.")
        origin, size_text, root_text, *extensions = lines
        _check_line(origin, "origin")
        if not _DECIMAL.fullmatch(size_text):
            raise NoteError(
                "A checkpoint's tree size must be a decimal number without sign or leading zeros."
            )
        # Bounded by length before int(): a 10,000-digit size is refused without converting it.
        if len(size_text) > len(str(MAX_TREE_SIZE)) or int(size_text) > MAX_TREE_SIZE:
            raise NoteError(f"A checkpoint's tree size must not exceed {MAX_TREE_SIZE}.")
        root_hash = b64decode_canonical(root_text, what="checkpoint's root hash")
        return cls(origin, int(size_text), root_hash, tuple(extensions))


def _checkpoint_bytes(checkpoint_text: str) -> bytes:
    # Cosigners assert things about checkpoints only: refuse to sign or accept a signature over
    # anything that is not a canonical checkpoint text.
    Checkpoint.parse(checkpoint_text)
    return checkpoint_text.encode("utf-8")


def _check_timestamp(timestamp: int) -> None:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise NoteError("A cosignature timestamp must be an integer.")
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise NoteError(f"A cosignature timestamp must be between 0 and {MAX_TIMESTAMP}.")


def cosignature_message(checkpoint_text: str, timestamp: int) -> bytes:
    """The bytes a cosigner signs: "cosignature/v1\\ntime <t>\\n" then the checkpoint text."""
    _check_timestamp(timestamp)
    return (
        b"cosignature/v1\ntime " + str(timestamp).encode("ascii") + b"\n" + _checkpoint_bytes(checkpoint_text)
    )


def cosigner_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x04 || public key)[:4]: the cosigner's key ID (tlog-cosignature)."""
    return compute_key_id(name, COSIGNATURE_V1, public_key)


def _signing_key(name: str, seed: bytes) -> nacl.signing.SigningKey:
    check_key_name(name)
    if len(seed) != _ED25519_KEY_SIZE:
        raise NoteError(f"An Ed25519 seed is {_ED25519_KEY_SIZE} bytes.")
    return nacl.signing.SigningKey(bytes(seed))


def cosigner_vkey(name: str, seed: bytes) -> str:
    """The cosigner's public vkey `<name>+<hex key ID>+base64(0x04 || public key)`."""
    public_key = bytes(_signing_key(name, seed).verify_key)
    return encode_vkey(name, COSIGNATURE_V1, public_key)


def cosign(checkpoint_text: str, name: str, seed: bytes, timestamp: int) -> Signature:
    """A cosignature/v1 over a checkpoint text at `timestamp` (POSIX seconds, from the caller).

    The returned Signature's `sig` is timestamp (8 bytes, big-endian) || Ed25519 signature; its
    `to_line()` is the line to append to the signed checkpoint.
    """
    key = _signing_key(name, seed)
    message = cosignature_message(checkpoint_text, timestamp)
    signed = key.sign(message).signature
    key_id = cosigner_key_id(name, bytes(key.verify_key))
    return Signature(name, key_id, timestamp.to_bytes(_TIMESTAMP_SIZE, "big") + bytes(signed))


def verify_cosignature(checkpoint_text: str, sig: Signature, vkey: str) -> int:
    """Check a cosignature/v1 from the cosigner `vkey` over a checkpoint text; return its timestamp.

    Raises NoteError if the vkey is not a type 0x04 cosigner key, if the signature is from
    another key (name or key ID differ), if it is not 8 + 64 bytes, if its timestamp exceeds
    2^63 - 1, if the text is not a checkpoint, or if the signature does not verify. Whether the
    timestamp is plausible (not in the future, fresh enough) is for the caller to decide.
    """
    name, key_type, public_key = decode_vkey(vkey)
    if key_type != COSIGNATURE_V1:
        raise NoteError(
            f"The key for {name} has signature type {key_type:#04x}, not a cosignature/v1 key "
            f"({COSIGNATURE_V1:#04x})."
        )
    if len(public_key) != _ED25519_KEY_SIZE:
        raise NoteError(f"A cosigner's Ed25519 public key is {_ED25519_KEY_SIZE} bytes.")
    key_id = cosigner_key_id(name, public_key)
    if sig.name != name or sig.key_id != key_id:
        raise NoteError(
            f"The signature is from {sig.name}+{sig.key_id.hex()}, "
            f"not from the cosigner {name}+{key_id.hex()}."
        )
    if len(sig.sig) != _TIMESTAMP_SIZE + _ED25519_SIG_SIZE:
        raise NoteError(f"The cosignature by {name} is not a timestamp and an Ed25519 signature.")
    timestamp = int.from_bytes(sig.sig[:_TIMESTAMP_SIZE], "big")
    if timestamp > MAX_TIMESTAMP:
        raise NoteError(f"The cosignature by {name} has a timestamp beyond 2^63 - 1.")
    message = cosignature_message(checkpoint_text, timestamp)
    try:
        nacl.signing.VerifyKey(public_key).verify(message, sig.sig[_TIMESTAMP_SIZE:])
    except nacl.exceptions.BadSignatureError as exc:
        raise NoteError(
            f"The cosignature by {name} does not verify: the checkpoint or its timestamp was altered."
        ) from exc
    return timestamp

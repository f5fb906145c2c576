"""The age v1 file format (c2sp.org/age), header and payload, for X25519 recipients.

An age file is a text header — a version line, one recipient stanza per recipient,
each wrapping the same 16-byte file key, and an HMAC over all of it — followed by a
binary STREAM payload. exchange keeps the two apart: one header per recipient in the
database, one payload per file in storage; `header || payload` is a standard age file
that `age -d` decrypts. The payload code lives in `exchange.format._stream` and the
X25519 keys and key wrapping in `exchange.format.age_keys`; both are re-exported here,
the one module callers import.

What this module does:
- parses headers strictly and canonically (`Header.parse`), and writes them
  (`Header.to_bytes`); a `Header` object is valid by construction, whoever builds it;
- wraps a file key for X25519 recipients and unwraps it with X25519 identities,
  verifying the header MAC (`wrap_file_key`, `unwrap_file_key`);
- encrypts and decrypts whole in-memory files (`encrypt`, `decrypt`).
- seals and opens runs of consecutive payload chunks between caller-owned buffers
  (`encrypt_chunks_into`, `decrypt_chunks_into`): the same bytes as `encrypt_chunk` and
  `decrypt_chunk`, without a copy per chunk, for the bulk transfers of `exchange.client`.

What it deliberately does not do: ASCII armor, passphrase (scrypt) encryption,
post-quantum or tagged recipients, plugins. Their stanzas are still recognised so that
no file can slip through half-checked: every native stanza type of the spec is checked
for its shape (argument count and sizes, canonical base64, a 32-byte body, no low-order
X25519 share, scrypt alone in its header) whatever identities are at hand, and a
malformed one fails the whole header. Stanzas of unknown types are carried and ignored,
as the spec requires. No I/O, no clock: bytes in, bytes out.

Errors, all from `exchange.errors`, stay distinct:
- `AgeHeaderError`: malformed or non-canonical header, unsupported version, bad
  recipient or identity strings, a degenerate request (no recipients);
- `AgeNoIdentityMatch`: the header is fine but no stanza opens with the identities;
- `AgeHeaderMacError`: a stanza opened but the header MAC does not verify;
- `AgePayloadError`: the payload is truncated, tampered with or malformed.
Misuse by our own code (a file key of the wrong length) raises `ValueError`.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from exchange.errors import AgeHeaderError, AgeHeaderMacError, AgeNoIdentityMatch, AgePayloadError
from exchange.format._stream import (
    CHUNK_SIZE,
    ENCRYPTED_CHUNK_SIZE,
    FILE_KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    _check_key,
    _chunk_nonce,
    chunk_count,
    ciphertext_size,
    decrypt_chunk,
    decrypt_stream,
    encrypt_chunk,
    encrypt_stream,
    hkdf_sha256,
    payload_key,
    plaintext_size,
)
from exchange.format.age_keys import (
    POINT_SIZE,
    generate_identity,
    identity_to_recipient,
    is_low_order_point,
    parse_identity,
    parse_recipient,
    public_key,
    recipient_from_public_key,
    unwrap_x25519,
    wrap_x25519,
)

__all__ = [
    "CHUNK_SIZE",
    "ENCRYPTED_CHUNK_SIZE",
    "FILE_KEY_SIZE",
    "MAC_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "Header",
    "Stanza",
    "chunk_count",
    "ciphertext_size",
    "decrypt",
    "decrypt_chunk",
    "decrypt_chunks_into",
    "decrypt_stream",
    "encrypt",
    "encrypt_chunk",
    "encrypt_chunks_into",
    "encrypt_stream",
    "generate_file_key",
    "generate_identity",
    "identity_to_recipient",
    "parse_identity",
    "parse_recipient",
    "payload_key",
    "plaintext_size",
    "recipient_from_public_key",
    "unwrap_file_key",
    "wrap_file_key",
]

MAC_SIZE = 32
"""Bytes in the header MAC (HMAC-SHA-256)."""

_VERSION_PREFIX = b"age-encryption.org/"
_VERSION_LINE = b"age-encryption.org/v1\n"
_STANZA_PREFIX = b"-> "
_MAC_MARK = b"---"
_COLUMNS = 64  # base64 characters per full body line, i.e. 48 bytes
_WRAPPED_FILE_KEY_SIZE = FILE_KEY_SIZE + TAG_SIZE
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_ARGUMENT = re.compile(r"[\x21-\x7e]+")  # 1*VCHAR
_DECIMAL = re.compile(r"[1-9][0-9]*")
# age refuses scrypt work factors above 2**22 by default (about 15 s of work); we never
# open scrypt stanzas, but a header beyond that limit is one age itself would refuse.
_SCRYPT_MAX_LOG_N = 22


def generate_file_key() -> bytes:
    """A fresh random 16-byte file key.

    exchange uses one file key per artifact, for all of its files: each file's payload
    has its own random nonce, which gives it its own payload key. Never reuse a file
    key across artifacts.
    """
    return os.urandom(FILE_KEY_SIZE)


# --- canonical unpadded base64 -----------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str | bytes, what: str) -> bytes:
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    # Padding, whitespace and any non-alphabet byte are refused up front: Python's
    # decoder would skip some of them, and age must not be malleable.
    if len(raw) % 4 == 1 or not _B64_ALPHABET.issuperset(raw):
        raise AgeHeaderError(f"{what} is not unpadded base64")
    decoded = base64.b64decode(raw + b"=" * (-len(raw) % 4))
    # Re-encoding catches non-zero trailing bits, the other spelling of the same bytes.
    if base64.b64encode(decoded).rstrip(b"=") != raw:
        raise AgeHeaderError(f"{what} is not canonical base64")
    return decoded


# --- the shape of native stanzas -----------------------------------------------------


def _expect_args(stanza: Stanza, count: int) -> None:
    if len(stanza.args) != count:
        raise AgeHeaderError(
            f"a {stanza.type} stanza has {count} argument(s) after its type, this one has {len(stanza.args)}"
        )


def _expect_b64_arg(stanza: Stanza, index: int, size: int, what: str) -> bytes:
    value = _b64decode(stanza.args[index], f"the {what} of a {stanza.type} stanza")
    if len(value) != size:
        raise AgeHeaderError(f"the {what} of a {stanza.type} stanza is {len(value)} bytes, not {size}")
    return value


def _expect_wrapped_file_key(stanza: Stanza) -> None:
    # The spec wants the length checked before any decryption: a body of another length
    # could otherwise serve a partitioning-oracle attack on the AEAD.
    if len(stanza.body) != _WRAPPED_FILE_KEY_SIZE:
        raise AgeHeaderError(
            f"the body of a {stanza.type} stanza must be a wrapped 16-byte file key "
            f"({_WRAPPED_FILE_KEY_SIZE} bytes), not {len(stanza.body)} bytes"
        )


def _expect_not_low_order(point: bytes, stanza: Stanza) -> None:
    if is_low_order_point(point):
        raise AgeHeaderError(
            f"the X25519 share of a {stanza.type} stanza is a low-order point, "
            "which gives every identity an all-zero shared secret"
        )


def _check_x25519(stanza: Stanza) -> None:
    _expect_args(stanza, 1)
    share = _expect_b64_arg(stanza, 0, POINT_SIZE, "ephemeral share")
    _expect_wrapped_file_key(stanza)
    _expect_not_low_order(share, stanza)


def _check_mlkem768x25519(stanza: Stanza) -> None:
    # X-Wing: enc is the 1088-byte ML-KEM ciphertext followed by the 32-byte X25519 share.
    _expect_args(stanza, 1)
    enc = _expect_b64_arg(stanza, 0, 1120, "encapsulated key")
    _expect_wrapped_file_key(stanza)
    _expect_not_low_order(enc[-POINT_SIZE:], stanza)


def _check_scrypt(stanza: Stanza) -> None:
    _expect_args(stanza, 2)
    _expect_b64_arg(stanza, 0, 16, "salt")
    log_n = stanza.args[1]
    # Decimal without sign or leading zero; the length test comes first so int() never
    # sees a huge string.
    if not (_DECIMAL.fullmatch(log_n) and len(log_n) <= 2 and int(log_n) <= _SCRYPT_MAX_LOG_N):
        raise AgeHeaderError(
            f"the work factor of a scrypt stanza must be a decimal from 1 to {_SCRYPT_MAX_LOG_N}"
        )
    _expect_wrapped_file_key(stanza)


def _check_p256tag(stanza: Stanza) -> None:
    _expect_args(stanza, 2)
    _expect_b64_arg(stanza, 0, 4, "tag")
    _expect_b64_arg(stanza, 1, 65, "encapsulated key")
    _expect_wrapped_file_key(stanza)


def _check_mlkem768p256tag(stanza: Stanza) -> None:
    _expect_args(stanza, 2)
    _expect_b64_arg(stanza, 0, 4, "tag")
    _expect_b64_arg(stanza, 1, 1153, "encapsulated key")
    _expect_wrapped_file_key(stanza)


_NATIVE_CHECKS: dict[str, Callable[[Stanza], None]] = {
    "X25519": _check_x25519,
    "mlkem768x25519": _check_mlkem768x25519,
    "scrypt": _check_scrypt,
    "p256tag": _check_p256tag,
    "mlkem768p256tag": _check_mlkem768p256tag,
}


def _check_stanzas(stanzas: tuple[Stanza, ...]) -> None:
    if not stanzas:
        raise AgeHeaderError("an age header needs at least one recipient stanza")
    # A passphrase-encrypted file promises it was made by whoever knew the passphrase;
    # another stanza beside it would break that promise, so the spec forbids the mix.
    if len(stanzas) > 1 and any(s.type == "scrypt" for s in stanzas):
        raise AgeHeaderError("an scrypt (passphrase) stanza must be the only stanza in its header")
    for stanza in stanzas:
        check = _NATIVE_CHECKS.get(stanza.type)
        if check is not None:
            check(stanza)


# --- header --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stanza:
    """One recipient stanza: `-> type args…` and a body that wraps the file key."""

    type: str
    args: tuple[str, ...]
    body: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "body", bytes(self.body))
        for arg in (self.type, *self.args):
            if not isinstance(arg, str) or not _ARGUMENT.fullmatch(arg):
                raise AgeHeaderError("a stanza argument is empty or has a character outside printable ASCII")

    def to_bytes(self) -> bytes:
        """The stanza as it appears in a header: argument line, then body at 64 columns."""
        encoded = _b64encode(self.body).encode("ascii")
        lines = [encoded[i : i + _COLUMNS] for i in range(0, len(encoded), _COLUMNS)]
        # The body always ends with a line shorter than 64 columns, empty if need be:
        # that short line is what marks the end of the stanza.
        if len(encoded) % _COLUMNS == 0:
            lines.append(b"")
        arg_line = _STANZA_PREFIX + " ".join((self.type, *self.args)).encode("ascii")
        return b"\n".join([arg_line, *lines]) + b"\n"


def _mac_input(stanzas: tuple[Stanza, ...]) -> bytes:
    # The MAC covers the header up to and including "---", not the space after it.
    return _VERSION_LINE + b"".join(s.to_bytes() for s in stanzas) + _MAC_MARK


def _header_mac(file_key: bytes, stanzas: tuple[Stanza, ...]) -> bytes:
    key = hkdf_sha256(file_key, b"", b"header")
    return hmac.digest(key, _mac_input(stanzas), "sha256")


class _Lines:
    """LF-terminated lines of a byte string, with the offset just past the last one read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def peek(self, prefix: bytes) -> bool:
        return self.data.startswith(prefix, self.pos)

    def next(self, what: str) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise AgeHeaderError(f"the header is truncated: it ends in {what} with no line feed")
        line = self.data[self.pos : end]
        self.pos = end + 1
        return line


def _parse_stanza(lines: _Lines) -> Stanza:
    arg_line = lines.next("a stanza")
    if not arg_line.startswith(_STANZA_PREFIX):
        raise AgeHeaderError("expected a recipient stanza ('-> ') or the MAC line ('--- ') in the header")
    try:
        fields = arg_line[len(_STANZA_PREFIX) :].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise AgeHeaderError("a stanza argument has a character outside printable ASCII") from None
    body = bytearray()
    while True:
        line = lines.next("a stanza body")
        if line.startswith((_MAC_MARK, b"->")):
            raise AgeHeaderError("a stanza ends without its short final body line")
        if len(line) > _COLUMNS:
            raise AgeHeaderError(f"a stanza body line is longer than {_COLUMNS} columns")
        # Full lines are 64 characters, so decoding line by line is the same as decoding
        # the whole body, and each line's canonical form is checked on its own.
        body += _b64decode(line, "a stanza body line")
        if len(line) < _COLUMNS:
            break
    return Stanza(fields[0], tuple(fields[1:]), bytes(body))


@dataclass(frozen=True)
class Header:
    """An age v1 header: recipient stanzas and the MAC that binds them to the file key.

    Construction checks that the header is valid — at least one stanza, a 32-byte MAC,
    well-formed native stanzas — so no invalid Header object exists. `parse` accepts
    only the canonical encoding, so `to_bytes()` reproduces byte for byte what was
    parsed; that is what the MAC is verified over.
    """

    stanzas: tuple[Stanza, ...]
    mac: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "stanzas", tuple(self.stanzas))
        object.__setattr__(self, "mac", bytes(self.mac))
        if len(self.mac) != MAC_SIZE:
            raise AgeHeaderError(f"the header MAC is {MAC_SIZE} bytes, not {len(self.mac)}")
        _check_stanzas(self.stanzas)

    def to_bytes(self) -> bytes:
        """The exact header bytes, from `age-encryption.org/v1` to the MAC line's line feed."""
        return _mac_input(self.stanzas) + b" " + _b64encode(self.mac).encode("ascii") + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> tuple[Header, int]:
        """Parse the header at the start of `data`; returns it and the offset of the payload."""
        if not data:
            raise AgeHeaderError("the input is empty, not an age file")
        lines = _Lines(data)
        version = lines.next("the version line")
        if version + b"\n" != _VERSION_LINE:
            if version.startswith(b"-----BEGIN"):
                raise AgeHeaderError("this is an ASCII-armored age file; only binary age files are supported")
            if version.startswith(_VERSION_PREFIX):
                raise AgeHeaderError(
                    "unsupported age format version: only age-encryption.org/v1 is supported"
                )
            raise AgeHeaderError("this is not an age file: it does not start with age-encryption.org/v1")
        stanzas: list[Stanza] = []
        while not lines.peek(_MAC_MARK):
            stanzas.append(_parse_stanza(lines))
        mac_line = lines.next("the MAC line")
        if not mac_line.startswith(_MAC_MARK + b" "):
            raise AgeHeaderError("the MAC line must be '--- ' followed by the MAC")
        mac = _b64decode(mac_line[len(_MAC_MARK) + 1 :], "the header MAC")
        header = cls(tuple(stanzas), mac)
        # Belt and braces: the MAC is verified over to_bytes(), so it must be exactly
        # what we were given. The strict grammar above should make this unreachable.
        if header.to_bytes() != data[: lines.pos]:
            raise AgeHeaderError("the header is not in canonical form")
        return header, lines.pos


# --- file key wrapping ---------------------------------------------------------------


def _check_file_key(file_key: bytes) -> None:
    if not isinstance(file_key, bytes) or len(file_key) != FILE_KEY_SIZE:
        raise ValueError(f"an age file key is {FILE_KEY_SIZE} bytes")


def _reject_single_string(keys: Sequence[str], what: str) -> None:
    # A lone string is a Sequence[str] of characters; encrypting "to each letter" must
    # fail loudly instead of failing later with a puzzling message.
    if isinstance(keys, str):
        raise TypeError(f"{what} must be a sequence of key strings, not a single string")


def wrap_file_key(file_key: bytes, recipients: Sequence[str]) -> Header:
    """A header that wraps `file_key` for each `age1…` recipient, with its MAC.

    Raises AgeHeaderError for an empty recipient list (never a header nobody can open)
    or a recipient string that is not a valid age X25519 recipient.
    """
    _check_file_key(file_key)
    _reject_single_string(recipients, "recipients")
    if not recipients:
        raise AgeHeaderError("refusing to encrypt to an empty list of recipients")
    public_keys = [parse_recipient(r) for r in recipients]
    stanzas = []
    for recipient in public_keys:
        share, body = wrap_x25519(file_key, recipient)
        stanzas.append(Stanza("X25519", (_b64encode(share),), body))
    return Header(tuple(stanzas), _header_mac(file_key, tuple(stanzas)))


def unwrap_file_key(header: Header | bytes, identities: Sequence[str]) -> bytes:
    """The file key of `header` (a Header, or exactly the header bytes), opened with `identities`.

    Tries each `AGE-SECRET-KEY-1…` identity against each X25519 stanza, then verifies
    the header MAC with the file key found. Raises AgeHeaderError (bad header or
    identity string), AgeNoIdentityMatch (nothing opens; also for an empty list) or
    AgeHeaderMacError (a stanza opens but the MAC does not verify).
    """
    if not isinstance(header, Header):
        parsed, end = Header.parse(bytes(header))
        if end != len(header):
            raise AgeHeaderError("bytes follow the header where only a header was expected")
        header = parsed
    _reject_single_string(identities, "identities")
    keys = [(secret, public_key(secret)) for secret in map(parse_identity, identities)]
    # Decoded once; the Header already checked every X25519 stanza's shape.
    x25519_stanzas = [
        (_b64decode(s.args[0], "the X25519 ephemeral share"), s.body)
        for s in header.stanzas
        if s.type == "X25519"
    ]
    file_key = None
    for secret, public in keys:
        for share, body in x25519_stanzas:
            file_key = unwrap_x25519(secret, public, share, body)
            if file_key is not None:
                break
        if file_key is not None:
            break
    if file_key is None:
        if not keys:
            raise AgeNoIdentityMatch("no identity was given to open the age header with")
        raise AgeNoIdentityMatch(
            f"none of the {len(keys)} identities opens any of the header's "
            f"{len(header.stanzas)} recipient stanzas: the file was not encrypted to them"
        )
    if not hmac.compare_digest(_header_mac(file_key, header.stanzas), header.mac):
        raise AgeHeaderMacError(
            "the age header MAC does not verify: the header was altered after it was written"
        )
    return file_key


# --- whole files ---------------------------------------------------------------------


def encrypt(plaintext: bytes, recipients: Sequence[str]) -> bytes:
    """A complete binary age file (header || payload) of `plaintext` for `recipients`."""
    file_key = generate_file_key()
    header = wrap_file_key(file_key, recipients)
    return header.to_bytes() + b"".join(encrypt_stream(file_key, [plaintext]))


def decrypt(data: bytes, identities: Sequence[str]) -> bytes:
    """The plaintext of a complete binary age file, opened with `identities`."""
    header, offset = Header.parse(data)
    file_key = unwrap_file_key(header, identities)
    # age reports a missing nonce while opening the file, before any payload is read,
    # and the CCTV vectors file it under header failures; we follow.
    if len(data) - offset < NONCE_SIZE:
        raise AgeHeaderError(f"the file ends before the {NONCE_SIZE}-byte payload nonce")
    with memoryview(data) as view:
        return b"".join(decrypt_stream(file_key, [view[offset:]]))


# --- runs of chunks into caller-owned buffers ----------------------------------------

# The same ChaCha20-Poly1305 (RFC 8439) as `encrypt_chunk`, through OpenSSL (the `cryptography`
# package, which exchange already uses for Ed25519): measured here about twice as fast as the
# libsodium build PyNaCl bundles, and it seals and opens straight into a caller's buffer.
# `encrypt_into` and `decrypt_into` arrived in cryptography 46; older versions take the
# chunk-at-a-time path below, which produces the same bytes.
_INTO = hasattr(ChaCha20Poly1305, "encrypt_into") and hasattr(ChaCha20Poly1305, "decrypt_into")


def _run_of_chunks(first_index: int, size: int, whole: int, last: bool) -> int:
    """How many chunks a run of `size` bytes starting at chunk `first_index` holds, each chunk
    `whole` bytes but a `last` run's final one; ValueError when the run cannot be that."""
    if first_index < 0:
        raise ValueError(f"chunk index {first_index} is negative")
    if not last:
        if size == 0 or size % whole:
            raise ValueError(f"a run of chunks that is not the last is whole chunks of {whole} bytes")
        return size // whole
    return max(1, -(-size // whole))


def encrypt_chunks_into(
    key: bytes, first_index: int, plaintext: memoryview, out: memoryview, *, last: bool
) -> int:
    """Seal the consecutive chunks `first_index`, `first_index + 1`, ... of a payload, whose
    plaintext is `plaintext`, into the start of `out`; return the number of bytes written.

    The result is exactly `encrypt_chunk` of each chunk, concatenated. `plaintext` holds whole
    CHUNK_SIZE chunks; when `last`, its final chunk is the payload's final chunk and may be
    short (1..CHUNK_SIZE bytes, or empty when it is the only chunk, chunk 0). `out` must hold
    at least len(plaintext) + TAG_SIZE per chunk, and must not overlap `plaintext`.
    """
    _check_key(key)
    size = len(plaintext)
    count = _run_of_chunks(first_index, size, CHUNK_SIZE, last)
    if last and size == 0 and first_index != 0:
        raise ValueError("the last chunk may be empty only when it is the only chunk")
    total = size + count * TAG_SIZE
    if len(out) < total:
        raise ValueError(f"the output buffer holds {len(out)} bytes, not the {total} needed")
    aead = ChaCha20Poly1305(key) if _INTO else None
    pos = 0
    for n in range(count):
        start = n * CHUNK_SIZE
        end = min(start + CHUNK_SIZE, size)
        final = last and n == count - 1
        nonce = _chunk_nonce(first_index + n, final)
        length = end - start + TAG_SIZE
        if aead is not None:
            aead.encrypt_into(nonce, plaintext[start:end], None, out[pos : pos + length])
        else:
            sealed = encrypt_chunk(key, first_index + n, bytes(plaintext[start:end]), last=final)
            out[pos : pos + length] = sealed
        pos += length
    return pos


def decrypt_chunks_into(
    key: bytes, first_index: int, ciphertext: memoryview, out: memoryview, *, last: bool
) -> int:
    """Open the consecutive sealed chunks `first_index`, ... in `ciphertext` into the start of
    `out`; return the number of plaintext bytes written.

    Accepts and refuses exactly what `decrypt_chunk` does, chunk by chunk: `ciphertext` holds
    whole ENCRYPTED_CHUNK_SIZE chunks, and when `last` its final chunk is sealed as the payload's
    final chunk and may be short. Raises AgePayloadError when a chunk does not open or has an
    impossible size; `out` then holds unauthenticated bytes that must not be used. `out` must
    hold the plaintext (len(ciphertext) less TAG_SIZE per chunk) and must not overlap
    `ciphertext`.
    """
    _check_key(key)
    if first_index < 0:
        raise ValueError(f"chunk index {first_index} is negative")
    size = len(ciphertext)
    count = max(1, -(-size // ENCRYPTED_CHUNK_SIZE))
    if len(out) < size - count * TAG_SIZE:
        needed = size - count * TAG_SIZE
        raise ValueError(f"the output buffer holds {len(out)} bytes, not the {needed} needed")
    aead = ChaCha20Poly1305(key) if _INTO else None
    pos = 0
    for n in range(count):
        start = n * ENCRYPTED_CHUNK_SIZE
        end = min(start + ENCRYPTED_CHUNK_SIZE, size)
        final = last and n == count - 1
        index = first_index + n
        length = end - start - TAG_SIZE
        if aead is None or not (length == CHUNK_SIZE or (final and (length > 0 or index == 0))):
            # Without encrypt_into, and for whatever decrypt_chunk refuses (a chunk cut short,
            # an empty final chunk after others), decrypt_chunk itself: the same checks, the
            # same errors.
            opened = decrypt_chunk(key, index, bytes(ciphertext[start:end]), last=final)
            out[pos : pos + len(opened)] = opened
            pos += len(opened)
            continue
        try:
            nonce = _chunk_nonce(index, final)
            aead.decrypt_into(nonce, ciphertext[start:end], None, out[pos : pos + length])
        except InvalidTag:
            raise AgePayloadError(
                f"payload chunk {index} does not authenticate: the payload is corrupted, tampered with, "
                "reordered or truncated"
            ) from None
        pos += length
    return pos

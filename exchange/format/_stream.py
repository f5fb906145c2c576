"""The age v1 payload: STREAM encryption in 64 KiB ChaCha20-Poly1305 chunks.

An age payload is a random 16-byte nonce followed by chunks. The payload key is
HKDF-SHA-256(ikm = file key, salt = nonce, info = "payload"); chunk i is sealed with
ChaCha20-Poly1305 under the 12-byte nonce `i as 11 big-endian bytes || last flag`,
where the flag byte is 0x01 on the final chunk and 0x00 before it. Every chunk but the
last holds exactly 64 KiB of plaintext; the last holds 1 to 64 KiB, and is empty only
when the whole plaintext is empty.

This module offers that construction at two levels:

- single chunks (`encrypt_chunk`, `decrypt_chunk`), so callers may encrypt and decrypt
  chunks in parallel, out of order, or starting from the middle of a payload (a
  resumed or ranged download) — the index and the "last" flag are all a chunk needs;
- whole payloads as iterators (`encrypt_stream`, `decrypt_stream`), which re-chunk
  arbitrary input pieces and hold at most one input piece plus one chunk in memory.

It deliberately does not read files, talk to storage or parse the age header (that is
`exchange.format.age`, which re-exports everything here). Errors: bytes that come from
outside and do not decrypt raise `AgePayloadError`; misuse of the API by our own code
(a key of the wrong length, a chunk index out of range, an over-long chunk to encrypt)
raises `ValueError`.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Iterator
from itertools import chain

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from exchange.errors import AgePayloadError

__all__ = [
    "CHUNK_SIZE",
    "ENCRYPTED_CHUNK_SIZE",
    "FILE_KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "chunk_count",
    "ciphertext_size",
    "decrypt_chunk",
    "decrypt_stream",
    "encrypt_chunk",
    "encrypt_stream",
    "hkdf_sha256",
    "payload_key",
    "plaintext_size",
]

FILE_KEY_SIZE = 16
"""Bytes in an age file key."""
CHUNK_SIZE = 64 * 1024
"""Plaintext bytes in every payload chunk but the last."""
NONCE_SIZE = 16
"""Bytes of the random nonce that opens every payload."""
TAG_SIZE = 16
"""Bytes of the Poly1305 tag that closes every chunk."""
ENCRYPTED_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
"""Ciphertext bytes in every payload chunk but the last."""

_KEY_SIZE = 32
# The chunk counter is 11 bytes wide; a payload can never get near it (2**88 chunks of
# 64 KiB), but an index handed to encrypt_chunk/decrypt_chunk is still range-checked so
# it can never wrap into another chunk's nonce.
_MAX_CHUNKS = 1 << 88


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 HKDF-SHA-256 with a 32-byte output, the only length age ever asks for."""
    # An empty salt means HashLen zero bytes (RFC 5869 §2.2); HMAC pads a short key with
    # zeros anyway, so passing b"" is the same thing, spelt out here for the reader.
    prk = hmac.digest(salt or bytes(32), ikm, "sha256")
    # One block of HKDF-Expand: T(1) = HMAC(PRK, info || 0x01) is exactly 32 bytes.
    return hmac.digest(prk, info + b"\x01", "sha256")


def payload_key(file_key: bytes, nonce: bytes) -> bytes:
    """The 32-byte ChaCha20-Poly1305 key for a payload, from the file key and its nonce."""
    if len(file_key) != FILE_KEY_SIZE:
        raise ValueError(f"an age file key is {FILE_KEY_SIZE} bytes, not {len(file_key)}")
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"an age payload nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
    return hkdf_sha256(bytes(file_key), bytes(nonce), b"payload")


def _chunk_nonce(index: int, last: bool) -> bytes:
    if not 0 <= index < _MAX_CHUNKS:
        raise ValueError(f"chunk index {index} is outside the 88-bit STREAM counter")
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != _KEY_SIZE:
        raise ValueError(f"a payload key is {_KEY_SIZE} bytes (see payload_key)")


def encrypt_chunk(key: bytes, index: int, plaintext: bytes, *, last: bool) -> bytes:
    """Seal chunk `index` of a payload; returns ciphertext || tag.

    A chunk that is not `last` must be exactly CHUNK_SIZE bytes; the last chunk must be
    1..CHUNK_SIZE bytes, or empty when it is chunk 0 (an empty plaintext).
    """
    _check_key(key)
    size = len(plaintext)
    if size > CHUNK_SIZE:
        raise ValueError(f"a chunk holds at most {CHUNK_SIZE} bytes of plaintext, not {size}")
    if not last and size != CHUNK_SIZE:
        raise ValueError("only the last chunk may be shorter than CHUNK_SIZE")
    if last and size == 0 and index != 0:
        raise ValueError("the last chunk may be empty only when it is the only chunk")
    return crypto_aead_chacha20poly1305_ietf_encrypt(bytes(plaintext), None, _chunk_nonce(index, last), key)


def decrypt_chunk(key: bytes, index: int, ciphertext: bytes, *, last: bool) -> bytes:
    """Open chunk `index` of a payload, sealed as the last chunk or not.

    Raises AgePayloadError if the chunk has an impossible size, does not authenticate
    under this key, index and flag (tampered, reordered, truncated or from another
    payload), or is an empty last chunk that is not the only chunk.
    """
    _check_key(key)
    size = len(ciphertext)
    if size < TAG_SIZE:
        raise AgePayloadError(f"payload chunk {index} is {size} bytes, shorter than its tag")
    if size > ENCRYPTED_CHUNK_SIZE or (not last and size != ENCRYPTED_CHUNK_SIZE):
        raise AgePayloadError(f"payload chunk {index} has an impossible size of {size} bytes")
    # The spec forbids an empty final chunk after full ones, so that each plaintext has
    # exactly one encryption; age refuses it even though it authenticates.
    if last and size == TAG_SIZE and index != 0:
        raise AgePayloadError(f"payload chunk {index} is an empty final chunk, which only an empty file has")
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(
            bytes(ciphertext), None, _chunk_nonce(index, last), key
        )
    except CryptoError:
        raise AgePayloadError(
            f"payload chunk {index} does not authenticate: the payload is corrupted, tampered with, "
            "reordered or truncated"
        ) from None


def chunk_count(plaintext_size: int) -> int:
    """How many chunks a payload of `plaintext_size` bytes has (an empty one still has one)."""
    if plaintext_size < 0:
        raise ValueError("a plaintext size cannot be negative")
    return max(1, -(-plaintext_size // CHUNK_SIZE))


def ciphertext_size(plaintext_size: int) -> int:
    """Bytes in the payload (nonce included) that encrypts `plaintext_size` bytes."""
    return NONCE_SIZE + plaintext_size + TAG_SIZE * chunk_count(plaintext_size)


def plaintext_size(ciphertext_size: int) -> int:
    """Bytes of plaintext in a payload of `ciphertext_size` bytes (nonce included).

    Raises AgePayloadError for a size no valid payload has: shorter than a nonce and one
    tag, a last chunk too short to hold its tag, or an empty last chunk after full ones.
    """
    body = ciphertext_size - NONCE_SIZE
    if body < TAG_SIZE:
        raise AgePayloadError(f"{ciphertext_size} bytes is too short for an age payload")
    full, rest = divmod(body, ENCRYPTED_CHUNK_SIZE)
    if rest == 0:
        return full * CHUNK_SIZE
    if rest < TAG_SIZE or (rest == TAG_SIZE and full > 0):
        raise AgePayloadError(f"{ciphertext_size} bytes is not the size of any age payload")
    return full * CHUNK_SIZE + rest - TAG_SIZE


_Piece = bytes | bytearray | memoryview


def _rechunk(pieces: Iterable[_Piece], size: int) -> Iterator[tuple[bytes, bool]]:
    """Cut a stream of byte pieces into blocks of `size` bytes, flagging the final block.

    Yields (block, final). A full block is released as not final only once a byte
    beyond it has arrived, so `final` is exact: the final block may be full, short, or
    (only if the stream is empty) empty. Memory: at most one block besides the piece
    being cut, whatever the sizes of the pieces.
    """
    held = bytearray()
    for piece in pieces:
        # Cast to unsigned bytes so slicing counts bytes even for a typed buffer.
        with memoryview(piece) as raw, raw.cast("B") as view:
            start, end = 0, len(view)
            while start < end:
                if len(held) == size:
                    yield bytes(held), False
                    held.clear()
                if not held and end - start > size:
                    # Fast path: a whole block, with more bytes after it, straight from
                    # the piece without passing through `held`.
                    yield bytes(view[start : start + size]), False
                    start += size
                    continue
                take = min(size - len(held), end - start)
                held += view[start : start + take]
                start += take
    yield bytes(held), True


def encrypt_stream(
    file_key: bytes,
    chunks_of_plaintext: Iterable[bytes | bytearray | memoryview],
    *,
    nonce: bytes | None = None,
) -> Iterator[bytes]:
    """Encrypt a plaintext given as pieces of any size into an age payload.

    Yields the nonce, then one ciphertext chunk at a time. `nonce` is for tests and
    vectors only; leave it None so a fresh random nonce is drawn, as the spec requires.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    key = payload_key(file_key, nonce)
    yield bytes(nonce)
    for index, (block, final) in enumerate(_rechunk(chunks_of_plaintext, CHUNK_SIZE)):
        yield encrypt_chunk(key, index, block, last=final)


def _split_nonce(pieces: Iterable[_Piece]) -> tuple[bytes, Iterator[_Piece]]:
    it = iter(pieces)
    nonce = bytearray()
    for piece in it:
        view = memoryview(piece).cast("B")
        need = NONCE_SIZE - len(nonce)
        nonce += view[:need]
        if len(nonce) == NONCE_SIZE:
            rest: list[_Piece] = [view[need:]]
            return bytes(nonce), chain(rest, it)
    raise AgePayloadError(f"the payload ends before its {NONCE_SIZE}-byte nonce")


def decrypt_stream(file_key: bytes, ciphertext: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes]:
    """Decrypt an age payload (nonce then chunks) given as pieces of any size.

    Yields plaintext one chunk at a time, each only after it authenticated. Raises
    AgePayloadError — possibly after yielding the chunks that did authenticate — if the
    payload has no nonce or no chunks, a chunk is tampered with, the payload stops
    before a final chunk, or bytes follow the final chunk.
    """
    nonce, rest = _split_nonce(ciphertext)
    key = payload_key(file_key, nonce)
    for index, (block, final) in enumerate(_rechunk(rest, ENCRYPTED_CHUNK_SIZE)):
        if final and not block and index == 0:
            raise AgePayloadError("the payload has a nonce but no chunks")
        try:
            plaintext = decrypt_chunk(key, index, block, last=final)
        except AgePayloadError:
            if len(block) != ENCRYPTED_CHUNK_SIZE:
                raise
            # A full chunk opens under one flag or the other, and what it opens as says
            # what went wrong — after the chunk, which is authentic and released, as
            # age releases it. A middle chunk at the very end: the payload was cut off
            # at a chunk boundary. A final chunk with bytes after it: those bytes were
            # appended, or are a second final chunk.
            yield _open_or_raise(key, index, block, last=not final)
            if final:
                raise AgePayloadError("the payload ends without a final chunk: it is truncated") from None
            raise AgePayloadError("bytes follow the final chunk of the payload") from None
        yield plaintext


def _open_or_raise(key: bytes, index: int, block: bytes, *, last: bool) -> bytes:
    """Second attempt at a chunk under the other flag; its failure keeps the first message."""
    try:
        return decrypt_chunk(key, index, block, last=last)
    except AgePayloadError:
        pass
    raise AgePayloadError(
        f"payload chunk {index} does not authenticate: the payload is corrupted, tampered with, "
        "reordered or truncated"
    )

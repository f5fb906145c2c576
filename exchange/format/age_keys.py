"""age X25519 keys: their text forms, and the X25519 key wrapping of the age spec.

An identity is 32 random bytes (an X25519 private scalar), written as uppercase Bech32
under the HRP `AGE-SECRET-KEY-`; its recipient is the X25519 public key, written as
lowercase Bech32 under the HRP `age`. Parsing is strict, like age's own: the exact HRP
in the exact case, exactly 32 bytes, a valid checksum and canonical padding. Anything
else — including age's post-quantum (`AGE-SECRET-KEY-PQ-`, `age1pq1`) and plugin keys,
which exchange does not support — raises `AgeHeaderError` with a sentence that never
repeats the key itself.

The X25519 recipient type wraps a file key for a public key: a fresh ephemeral share,
an X25519 shared secret, a wrap key from HKDF-SHA-256 (salt = share || recipient, info
"age-encryption.org/v1/X25519"), and ChaCha20-Poly1305 under a zero nonce
(`wrap_x25519`, `unwrap_x25519`). An all-zero shared secret — a low-order share or
recipient — is refused, as the spec demands.

It deliberately does not read key files (a caller strips `#` comments and blank lines
and passes each key line), does not build stanzas or headers (`exchange.format.age`
does), and does not hold keys in any object: identities stay the strings the client
stores, converted to bytes only where they are used.
"""

from __future__ import annotations

import hmac
import os

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from exchange.errors import AgeHeaderError
from exchange.format import bech32
from exchange.format._stream import FILE_KEY_SIZE, TAG_SIZE, hkdf_sha256

__all__ = [
    "IDENTITY_HRP",
    "POINT_SIZE",
    "RECIPIENT_HRP",
    "generate_identity",
    "identity_to_recipient",
    "is_low_order_point",
    "parse_identity",
    "parse_recipient",
    "public_key",
    "recipient_from_public_key",
    "unwrap_x25519",
    "wrap_x25519",
]

IDENTITY_HRP = "AGE-SECRET-KEY-"
RECIPIENT_HRP = "age"
POINT_SIZE = 32
"""Bytes in an X25519 key or share."""
_KEY_SIZE = POINT_SIZE
_X25519_LABEL = b"age-encryption.org/v1/X25519"
# A zero nonce is safe here: every wrap key is used once, since each stanza has a fresh
# ephemeral share and the share is part of the HKDF salt.
_ZERO_NONCE = bytes(12)
# X25519 clamps every scalar to a multiple of 8, so X25519(k, P) is all zeros for every
# k exactly when P has order dividing 8. Probing with this fixed scalar therefore tells
# whether *any* identity would get the forbidden all-zero shared secret from P.
_PROBE_SCALAR = bytes(range(1, 33))


def _decode(s: str, what: str) -> tuple[str, bytes]:
    try:
        return bech32.decode(s)
    except ValueError as exc:
        # The Bech32 reason (checksum, case, alphabet) is safe to pass on: it never
        # contains the key text, which for an identity is a secret.
        raise AgeHeaderError(f"this is not a valid age {what}: {exc}") from None


def parse_identity(s: str) -> bytes:
    """The 32-byte X25519 private key inside an `AGE-SECRET-KEY-1…` identity string."""
    hrp, data = _decode(s, "identity")
    if hrp.upper() == "AGE-SECRET-KEY-PQ-":
        raise AgeHeaderError("post-quantum age identities (AGE-SECRET-KEY-PQ-1…) are not supported")
    if hrp != IDENTITY_HRP:
        # Also catches the lowercase spelling, which age refuses as well.
        raise AgeHeaderError("this is not an age X25519 identity: it must start with AGE-SECRET-KEY-1")
    if len(data) != _KEY_SIZE:
        raise AgeHeaderError(f"an age identity holds {_KEY_SIZE} bytes, this one holds {len(data)}")
    return data


def parse_recipient(s: str) -> bytes:
    """The 32-byte X25519 public key inside an `age1…` recipient string."""
    hrp, data = _decode(s, "recipient")
    if hrp.lower() == "age1pq":
        raise AgeHeaderError("post-quantum age recipients (age1pq1…) are not supported")
    if hrp != RECIPIENT_HRP:
        raise AgeHeaderError(
            "this is not an age X25519 recipient: it must start with age1 in lowercase "
            "(plugin recipients are not supported)"
        )
    if len(data) != _KEY_SIZE:
        raise AgeHeaderError(f"an age recipient holds {_KEY_SIZE} bytes, this one holds {len(data)}")
    return data


def generate_identity() -> str:
    """A new random X25519 identity, as `AGE-SECRET-KEY-1…`."""
    return bech32.encode(IDENTITY_HRP, os.urandom(_KEY_SIZE))


def recipient_from_public_key(public_key: bytes) -> str:
    """The `age1…` text form of a 32-byte X25519 public key."""
    if len(public_key) != _KEY_SIZE:
        raise ValueError(f"an X25519 public key is {_KEY_SIZE} bytes, not {len(public_key)}")
    return bech32.encode(RECIPIENT_HRP, public_key)


def public_key(secret: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    # libsodium clamps the scalar exactly as RFC 7748 X25519 does, as age requires.
    return crypto_scalarmult_base(secret)


def identity_to_recipient(identity: str) -> str:
    """The `age1…` recipient that encrypts to `identity`."""
    return recipient_from_public_key(public_key(parse_identity(identity)))


def _x25519(scalar: bytes, point: bytes) -> bytes | None:
    """X25519(scalar, point), or None when the result is the all-zero low-order output."""
    try:
        shared = crypto_scalarmult(scalar, point)
    except CryptoError:
        # libsodium refuses to return the all-zero output and reports it as an error.
        return None
    return None if hmac.compare_digest(shared, bytes(POINT_SIZE)) else shared


def is_low_order_point(point: bytes) -> bool:
    """Whether every X25519 private key gets an all-zero shared secret with `point`."""
    return _x25519(_PROBE_SCALAR, point) is None


def _wrap_key(shared: bytes, share: bytes, recipient: bytes) -> bytes:
    return hkdf_sha256(shared, share + recipient, _X25519_LABEL)


def wrap_x25519(file_key: bytes, recipient: bytes) -> tuple[bytes, bytes]:
    """Wrap `file_key` for the X25519 public key `recipient`: (ephemeral share, body)."""
    ephemeral = os.urandom(POINT_SIZE)  # fresh per stanza and per file, as the spec requires
    share = public_key(ephemeral)
    shared = _x25519(ephemeral, recipient)
    if shared is None:
        raise AgeHeaderError("the recipient is not a usable X25519 public key (it is a low-order point)")
    body = crypto_aead_chacha20poly1305_ietf_encrypt(
        bytes(file_key), None, _ZERO_NONCE, _wrap_key(shared, share, recipient)
    )
    return share, body


def unwrap_x25519(secret: bytes, public: bytes, share: bytes, body: bytes) -> bytes | None:
    """The file key in an X25519 stanza (`share`, `body`) if this identity opens it, else None.

    `public` is `public_key(secret)`, passed in so a caller trying many stanzas derives
    it once. Raises AgeHeaderError for a low-order share or a body that is not exactly
    a wrapped 16-byte file key.
    """
    # The spec wants the length checked before decrypting: a body of another length
    # could serve a partitioning-oracle attack on the AEAD.
    if len(body) != FILE_KEY_SIZE + TAG_SIZE:
        raise AgeHeaderError("an X25519 stanza body is not a wrapped 16-byte file key")
    shared = _x25519(secret, share)
    if shared is None:
        # The spec says abort, not "try the next stanza": such a share can only have
        # been chosen to probe or confuse, and the header check normally refuses it first.
        raise AgeHeaderError("an X25519 stanza's share is a low-order point")
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(
            bytes(body), None, _ZERO_NONCE, _wrap_key(shared, share, public)
        )
    except CryptoError:
        return None

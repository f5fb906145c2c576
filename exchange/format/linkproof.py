"""Link proofs: the secret a link's challenge carries, encrypted to the link's recipient.

A download link is a URL, and URLs leak (a mail gateway, a browser history, another tester). So
a counted download session opens only for whoever shows the *proof* the service sent, encrypted
to the recipient's age key, in answer to `GET /l/TOKEN/challenge`: decrypting it is possessing
the key. `curl … | age -d -i key.txt` is all it takes, so nothing of ours is needed.

A proof is stateless: `exp1_` then, in unpadded base64url, the time it was issued (8 bytes,
milliseconds, big-endian), 16 random bytes and an HMAC-SHA256 over a domain-separated text naming
the link, the time and the random bytes, under a key only the service holds. Checking one needs
no stored challenge, so a stranger asking for challenges costs the service no rows. The link's
id is inside the MAC, so a proof for one link opens nothing on another.

This module is pure: it neither stores nor looks anything up. Sessions opened by a proof, and
how long a proof may be used to open one, are the link service's business.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import struct

__all__ = ["PROOF_KEY_LABEL", "PROOF_PREFIX", "LinkProofError", "make_proof", "proof_digest", "verify_proof"]

PROOF_PREFIX = "exp1_"
_RANDOM_BYTES = 16
_MAC_BYTES = 32
_RAW_BYTES = 8 + _RANDOM_BYTES + _MAC_BYTES
#: 56 bytes are 75 base64url characters; the last carries two zero bits (one spelling per proof).
_BODY = re.compile(r"[A-Za-z0-9_-]{75}")
_DOMAIN = b"exchange link proof v1\n"
#: The label the service derives its proof MAC key under (from its log key: `note.Signer.derive_key`).
PROOF_KEY_LABEL = b"exchange link proof key v1"


class LinkProofError(ValueError):
    """A proof that does not parse, was not made for this link, or is too old. `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _mac(key: bytes, link_id: str, issued_ms: int, nonce: bytes) -> bytes:
    message = _DOMAIN + link_id.encode("utf-8") + b"\n" + struct.pack(">Q", issued_ms) + nonce
    return hmac.new(key, message, hashlib.sha256).digest()


def make_proof(key: bytes, link_id: str, issued_ms: int, *, nonce: bytes | None = None) -> str:
    """A fresh proof for `link_id`, issued at `issued_ms`."""
    nonce = secrets.token_bytes(_RANDOM_BYTES) if nonce is None else nonce
    if len(nonce) != _RANDOM_BYTES:
        raise ValueError(f"a proof's nonce is {_RANDOM_BYTES} bytes")
    raw = struct.pack(">Q", issued_ms) + nonce + _mac(key, link_id, issued_ms, nonce)
    return PROOF_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _parse(text: str) -> tuple[int, bytes, bytes]:
    if not (text.startswith(PROOF_PREFIX) and _BODY.fullmatch(text[len(PROOF_PREFIX) :])):
        raise LinkProofError("proof-malformed")
    body = text[len(PROOF_PREFIX) :]
    raw = base64.urlsafe_b64decode(body + "=")
    if len(raw) != _RAW_BYTES or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:
        raise LinkProofError("proof-malformed")
    (issued_ms,) = struct.unpack(">Q", raw[:8])
    return issued_ms, raw[8 : 8 + _RANDOM_BYTES], raw[8 + _RANDOM_BYTES :]


def verify_proof(key: bytes, link_id: str, text: str, *, now_ms: int, max_age_ms: int) -> None:
    """Raise LinkProofError unless `text` is a proof this key made for `link_id`, issued at most
    `max_age_ms` before `now_ms` (and not more than a minute after it: clocks of replicas differ
    a little, never by much)."""
    issued_ms, nonce, mac = _parse(text)
    if not hmac.compare_digest(mac, _mac(key, link_id, issued_ms, nonce)):
        raise LinkProofError("proof-invalid")
    if issued_ms > now_ms + 60_000:
        raise LinkProofError("proof-invalid")
    if now_ms - issued_ms > max_age_ms:
        raise LinkProofError("proof-expired")


def proof_digest(text: str) -> bytes:
    """What the service stores of a proof that opened a session: its SHA-256 (LinkProofError if it
    does not parse)."""
    _parse(text)
    return hashlib.sha256(text.encode("ascii")).digest()

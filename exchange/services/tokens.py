"""Link tokens: how a download or upload link's secret is made, parsed and kept, and its refusal.

A token is a prefix (`exl1_` for a download link, `exu1_` for an upload link) and 32 random bytes
in unpadded base64url. It is shown once, to its creator; the service keeps only its SHA-256
(`hash_token`), so a stolen database yields no working link. A text that is not a canonical
token is refused before anything is looked up (`parse_token`), with the same `LinkRefused` —
one uniform answer, its precise reason kept for the audit log — that every other unusable link
gets.

What this module does not do: look anything up, decide whether a link may be used now, or
append audit events (`links`, `uploadlinks`). It is pure, and imports no other service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets

from ..errors import NotFound

__all__ = ["TOKEN_PREFIX", "LinkRefused", "hash_token", "new_token", "parse_token"]

TOKEN_PREFIX = "exl1_"  # noqa: S105 - a prefix, not a secret
_TOKEN_BYTES = 32
_TOKEN_BODY = re.compile(r"[A-Za-z0-9_-]{43}")


class LinkRefused(NotFound):
    """The one answer for every link that cannot be redeemed now. `reason` goes to the log only."""

    code = "link-unavailable"

    def __init__(self, reason: str, *, link_id: str | None = None) -> None:
        super().__init__(
            "this link cannot be used: it is unknown, expired, revoked or used up (ask its sender for"
            " a new one)"
        )
        self.reason = reason
        self.link_id = link_id

    @property
    def audit_reason(self) -> str:
        return self.reason


def new_token(prefix: str = TOKEN_PREFIX) -> str:
    """A fresh token: `prefix` and 32 random bytes in unpadded base64url."""
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(_TOKEN_BYTES)).rstrip(b"=").decode()


def parse_token(text: str, prefix: str = TOKEN_PREFIX) -> bytes:
    """The token's SHA-256, if `text` is a canonical token; LinkRefused('link-malformed') if not.

    Pure: nothing is looked up for a token that does not parse."""
    if not (text.startswith(prefix) and _TOKEN_BODY.fullmatch(text[len(prefix) :])):
        raise LinkRefused("link-malformed")
    body = text[len(prefix) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=")
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern admits only the alphabet
        raise LinkRefused("link-malformed") from None
    # 43 characters carry 258 bits: the last two must be zero, or two texts would name one token.
    if len(raw) != _TOKEN_BYTES or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:
        raise LinkRefused("link-malformed")
    return hash_token(text)


def hash_token(token: str) -> bytes:
    """What the service keeps of a token: its SHA-256."""
    return hashlib.sha256(token.encode("ascii")).digest()

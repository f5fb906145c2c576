"""Verifying RFC 9421 HTTP Message Signatures on incoming requests.

Every API request (except the few routes that say they need none) carries one Ed25519 signature
covering at least `@method`, `@target-uri` and `content-digest` (RFC 9530), with `created`,
`nonce`, `keyid` and `alg` parameters. The canonicalisation and the Ed25519 check are the
http-message-signatures library's; the policy is ours, and each refusal stays distinct:

    no Signature / Signature-Input            MissingSignature
    malformed, wrong algorithm, bad coverage  BadSignature
    keyid not registered (or disabled)        UnknownKey
    |created - now| > the allowed skew        ClockSkew
    signature does not verify                 BadSignature
    body does not match Content-Digest        DigestMismatch
    nonce seen before for this key            ReplayedNonce

The nonce is recorded only after everything else passed, so an attacker who cannot sign cannot
burn a principal's nonces. Seen nonces live in the database, shared by all replicas, until a
signature carrying them could no longer pass the skew check.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import http_sf
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import (
    ContentDigest,
    HTTPMessageSignaturesException,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    algorithms,
)
from multidict import CIMultiDictProxy

from ..db import Database
from ..errors import (
    BadSignature,
    ClockSkew,
    DigestMismatch,
    InputError,
    MissingSignature,
    PermissionDenied,
    UnknownKey,
)
from ..services import nonces
from ..services.principals import Principal, principal_by_key_id
from .keys import CLOCK, DB, SETTINGS

__all__ = ["REQUIRED_COMPONENTS", "SignedRequest", "authenticate", "authenticate_with_key", "verify_request"]

#: What every signature must cover, whatever else it covers.
REQUIRED_COMPONENTS = ("@method", "@target-uri", "content-digest")
_NONCE = re.compile(r"[A-Za-z0-9_\-]{16,128}")


@dataclass(frozen=True)
class SignedRequest:
    key_id: str
    created: int
    nonce: str


@dataclass
class _Message:
    """The view of a request the library reads: method, absolute URL, header fields."""

    method: str
    url: str
    headers: CIMultiDictProxy[str]


class _OneKey(HTTPSignatureKeyResolver):
    def __init__(self, key_id: str, public_key: bytes) -> None:
        self._key_id = key_id
        self._key = Ed25519PublicKey.from_public_bytes(public_key)

    def resolve_public_key(self, key_id: str) -> Any:
        return self._key if key_id == self._key_id else None

    def resolve_private_key(self, key_id: str) -> Any:  # pragma: no cover - never signs
        raise NotImplementedError


def _signature_params(headers: CIMultiDictProxy[str]) -> tuple[list[str], dict[str, Any]]:
    raw_input = headers.getall("Signature-Input", [])
    raw_sig = headers.getall("Signature", [])
    if not raw_input or not raw_sig:
        raise MissingSignature("this request must be signed (RFC 9421 Signature and Signature-Input headers)")
    try:
        parsed = http_sf.parse(", ".join(raw_input).encode("latin-1"), tltype="dictionary")
    except Exception as exc:  # http_sf raises bare ValueError and friends
        raise BadSignature("Signature-Input is not a valid structured field") from exc
    if not isinstance(parsed, dict) or len(parsed) != 1:
        raise BadSignature("exactly one signature is expected")
    ((_, value),) = parsed.items()
    if not isinstance(value, tuple) or not isinstance(value[0], list):
        raise BadSignature("Signature-Input member must be an inner list")
    components = [str(c[0]) for c in value[0] if isinstance(c, tuple)]
    return components, dict(value[1])


async def verify_request(
    *,
    method: str,
    url: str,
    headers: CIMultiDictProxy[str],
    body: bytes,
    db: Database,
    now_ms: int,
    max_skew_s: int,
    resolve_key: Callable[[str], Awaitable[bytes | None]],
) -> SignedRequest:
    """Check the request's signature; record its nonce; raise the specific AuthError otherwise."""
    components, params = _signature_params(headers)
    key_id, created, nonce, alg = (params.get(k) for k in ("keyid", "created", "nonce", "alg"))
    if not isinstance(key_id, str) or not key_id:
        raise BadSignature("the signature has no keyid parameter")
    if alg != "ed25519":
        raise BadSignature('the signature must use alg="ed25519"')
    if not isinstance(created, int) or isinstance(created, bool):
        raise BadSignature("the signature has no integer created parameter")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise BadSignature("the signature needs a nonce of 16-128 URL-safe characters")
    missing = [c for c in REQUIRED_COMPONENTS if c not in components]
    if missing:
        raise BadSignature(f"the signature must cover {', '.join(missing)}")

    public_key = await resolve_key(key_id)
    if public_key is None:
        raise UnknownKey("no active principal has this signing key; enrol it first")

    if abs(created * 1000 - now_ms) > max_skew_s * 1000:
        raise ClockSkew(
            f"the signature was created {abs(created - now_ms // 1000)} s away from the server's time;"
            f" at most {max_skew_s} s is allowed (check the client's clock)"
        )

    verifier = HTTPMessageVerifier(
        signature_algorithm=algorithms.ED25519, key_resolver=_OneKey(key_id, public_key)
    )
    # Our skew check above is the policy; keep the library's own time checks out of its way.
    verifier.max_clock_skew = verifier.max_clock_skew.__class__(seconds=max_skew_s + 1)
    try:
        verifier.verify(
            _Message(method=method, url=url, headers=headers),
            max_age=None,
            require_components=REQUIRED_COMPONENTS,
        )
    except HTTPMessageSignaturesException as exc:
        raise BadSignature("the signature does not verify for this request") from exc

    try:
        ContentDigest.verify(headers.get("Content-Digest", ""), body)
    except HTTPMessageSignaturesException as exc:
        raise DigestMismatch("the body does not match its Content-Digest header") from exc

    await nonces.record(db, key_id, nonce, expires_at_ms=created * 1000 + 2 * max_skew_s * 1000)
    return SignedRequest(key_id=key_id, created=created, nonce=nonce)


# -- aiohttp glue ---------------------------------------------------------------------------------


def signed_url(request: web.Request, public_url: str) -> str:
    """The target URI the client signed: the configured public URL when set (behind a proxy)."""
    if public_url:
        return public_url.rstrip("/") + str(request.rel_url)
    try:
        return str(request.url)  # built from the Host header, which the client chose
    except ValueError as exc:
        raise InputError("the Host header is not a valid host", code="bad-host") from exc


async def _verify(
    request: web.Request, resolve_key: Callable[[str], Awaitable[bytes | None]]
) -> SignedRequest:
    app = request.app
    settings = app[SETTINGS]
    return await verify_request(
        method=request.method,
        url=signed_url(request, settings.public_url),
        headers=request.headers,
        body=await request.read(),
        db=app[DB],
        now_ms=app[CLOCK](),
        max_skew_s=settings.signature_max_skew_s,
        resolve_key=resolve_key,
    )


async def authenticate(request: web.Request) -> Principal:
    """The principal whose registered key signed this request, active or not: the caller
    refuses a disabled one with `require_active` once the request's context names it, so that
    its refusal in the log says who tried. The status is read from the shared database on every
    request, so a disable holds on every replica at once."""
    found: list[Principal] = []

    async def resolve(key_id: str) -> bytes | None:
        principal = await principal_by_key_id(request.app[DB], key_id)
        if principal is None:
            return None
        found.append(principal)
        return principal.signing_public_key

    await _verify(request, resolve)
    return found[0]


def require_active(principal: Principal) -> None:
    """Refuse a disabled principal's (verified) request: 403 `principal-disabled`."""
    if principal.status != "active":
        raise PermissionDenied(
            f"{principal.name} is disabled: an admin can re-enable it (`exchange principals enable`)",
            code="principal-disabled",
        )


async def authenticate_with_key(request: web.Request, key_id: str, public_key: bytes) -> SignedRequest:
    """Verify against a key the request itself presents (enrolment proves possession this way)."""

    async def resolve(claimed: str) -> bytes | None:
        return public_key if claimed == key_id else None

    return await _verify(request, resolve)

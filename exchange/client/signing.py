"""Signing outgoing requests: RFC 9421 with Ed25519, covering method, target URI and digest."""

from __future__ import annotations

import datetime
import secrets
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms

from ..identity import Identity

__all__ = ["COVERED_COMPONENTS", "sign_headers"]

COVERED_COMPONENTS = ("@method", "@target-uri", "content-digest")


class _Resolver(HTTPSignatureKeyResolver):
    def __init__(self, identity: Identity) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(identity.signing_seed)

    def resolve_private_key(self, key_id: str) -> Any:
        return self._key

    def resolve_public_key(self, key_id: str) -> Any:  # pragma: no cover - never verifies
        return self._key.public_key()


class _Message:
    def __init__(self, method: str, url: str, headers: dict[str, str]) -> None:
        self.method = method
        self.url = url
        self.headers = headers


def sign_headers(
    identity: Identity,
    *,
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str] | None = None,
    covered_components: tuple[str, ...] = COVERED_COMPONENTS,
    created: datetime.datetime | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers with Content-Digest, Signature-Input and Signature added for this request.

    `body=None` signs without computing a digest (only for testing the server's refusal).
    """
    out = dict(headers or {})
    message = _Message(method.upper(), url, out)
    signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=_Resolver(identity))
    signer.sign(
        message,
        key_id=identity.key_id,
        created=created or datetime.datetime.now(datetime.UTC),
        nonce=nonce or secrets.token_urlsafe(18),
        label="exchange",
        covered_component_ids=covered_components,
        body=body,
    )
    return out

"""Every error exchange raises on purpose, split by who is at fault.

```
ExchangeError
├── InputError                  the caller sent something wrong (4xx)
│   ├── ValidationError           a body, parameter or name is malformed (400)
│   ├── PayloadTooLarge           a body over the configured limit (413)
│   ├── UnsupportedMediaType      a body that is not JSON where JSON is required (415)
│   ├── NotFound                  no such thing, or not visible to the caller (404)
│   ├── Conflict                  the thing exists, or its state forbids the change (409)
│   ├── LocalFileError            a local file cannot be read or written (disk full, unsafe path)
│   └── FormatError               bytes that do not parse as the format they claim to be
│       ├── AgeError                the age file format
│       │   ├── AgeHeaderError        malformed or non-canonical header
│       │   ├── AgeNoIdentityMatch    no stanza opens with the given identity
│       │   ├── AgeHeaderMacError     the header MAC does not verify
│       │   └── AgePayloadError       payload truncated, tampered or malformed
│       ├── ManifestError           an artifact manifest that does not parse or whose signature fails
│       ├── IntegrityError          downloaded or stored bytes that do not match the signed manifest
│       ├── NoteError               a signed note or checkpoint that does not parse or verify
│       └── ProofError              a Merkle inclusion or consistency proof that does not verify
├── AuthError                   the request is not authenticated (401)
│   ├── MissingSignature          no RFC 9421 signature on a request that needs one
│   ├── UnknownKey                the signing key is not registered (or its principal is disabled)
│   ├── BadSignature              the signature does not verify over the covered components
│   ├── ClockSkew                 the signature's created time is too far from the server's clock
│   ├── ReplayedNonce             the signature's nonce was seen before
│   └── DigestMismatch            the body does not match its signed Content-Digest
├── PermissionDenied            authenticated, but the role or grant does not allow it (403)
└── DependencyError             a dependency failed; not the caller's fault (503)
    ├── AuditLogDamaged           the stored Merkle tree lacks nodes: appends stop (fail closed)
    ├── StorageUnavailable        the S3 store did not answer or answered with an error
    └── DatabaseUnavailable       the database did not answer or refused the write
```

Each class names the HTTP status and a stable problem `code` (a slug used in problem+json bodies,
audit reasons and exit-code mapping). Messages are written for the person who reads them: they
say what was wrong and, where it helps, what to do. They never hold secrets or internal URLs.

Third-party exceptions (botocore, sqlite3, asyncpg, aiohttp) are translated where they are
raised (`storage`, `db`, `client`) and never escape those modules.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AgeError",
    "AgeHeaderError",
    "AgeHeaderMacError",
    "AgeNoIdentityMatch",
    "AgePayloadError",
    "AuditLogDamaged",
    "AuthError",
    "BadSignature",
    "ClockSkew",
    "Conflict",
    "DatabaseUnavailable",
    "DependencyError",
    "DigestMismatch",
    "ExchangeError",
    "FormatError",
    "InputError",
    "IntegrityError",
    "LocalFileError",
    "ManifestError",
    "MissingSignature",
    "NotFound",
    "NoteError",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProofError",
    "ReplayedNonce",
    "StorageUnavailable",
    "UnknownKey",
    "UnsupportedMediaType",
    "ValidationError",
]


class ExchangeError(Exception):
    """Root of every error exchange raises on purpose."""

    status: ClassVar[int] = 500
    #: Stable slug for problem+json `type`, audit reasons and exit codes. An instance may refine
    #: its class's code (`PermissionDenied("…", code="invite-expired")`) but keeps its status.
    code: str = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        # Extra members for the problem detail (e.g. the offending field). Never secrets.
        self.extra = extra

    @property
    def audit_reason(self) -> str:
        """What the audit log records for this refusal: the code, unless a subclass keeps a more
        precise reason for the log behind a deliberately uniform answer."""
        return self.code


class InputError(ExchangeError):
    status = 400
    code = "bad-request"
    title = "Bad request"


class ValidationError(InputError):
    status = 400
    code = "invalid-input"
    title = "Invalid input"


class PayloadTooLarge(InputError):
    status = 413
    code = "payload-too-large"
    title = "Request body too large"


class UnsupportedMediaType(InputError):
    status = 415
    code = "unsupported-media-type"
    title = "Unsupported media type"


class NotFound(InputError):
    status = 404
    code = "not-found"
    title = "Not found"


class Conflict(InputError):
    status = 409
    code = "conflict"
    title = "Conflict"


class LocalFileError(InputError):
    """Client side only: a local path is unsafe, unreadable or unwritable (e.g. the disk is full)."""

    code = "local-file"
    title = "Local file error"


class FormatError(InputError):
    code = "bad-format"
    title = "Malformed data"


class AgeError(FormatError):
    code = "age-error"
    title = "Invalid age file"


class AgeHeaderError(AgeError):
    code = "age-header"
    title = "Invalid age header"


class AgeNoIdentityMatch(AgeError):
    code = "age-no-match"
    title = "No age identity matches"


class AgeHeaderMacError(AgeError):
    code = "age-header-mac"
    title = "age header MAC does not verify"


class AgePayloadError(AgeError):
    code = "age-payload"
    title = "Invalid age payload"


class ManifestError(FormatError):
    code = "bad-manifest"
    title = "Invalid artifact manifest"


class IntegrityError(FormatError):
    code = "integrity"
    title = "Data does not match its manifest"


class NoteError(FormatError):
    code = "bad-note"
    title = "Invalid signed note"


class ProofError(FormatError):
    code = "bad-proof"
    title = "Invalid Merkle proof"


class AuthError(ExchangeError):
    status = 401
    code = "unauthenticated"
    title = "Not authenticated"


class MissingSignature(AuthError):
    code = "missing-signature"
    title = "Request is not signed"


class UnknownKey(AuthError):
    code = "unknown-key"
    title = "Unknown signing key"


class BadSignature(AuthError):
    code = "bad-signature"
    title = "Signature does not verify"


class ClockSkew(AuthError):
    code = "clock-skew"
    title = "Signature time outside the allowed window"


class ReplayedNonce(AuthError):
    code = "replayed-nonce"
    title = "Signature nonce was already used"


class DigestMismatch(AuthError):
    code = "digest-mismatch"
    title = "Body does not match its Content-Digest"


class PermissionDenied(ExchangeError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class DependencyError(ExchangeError):
    status = 503
    code = "dependency-unavailable"
    title = "Service temporarily unavailable"


class StorageUnavailable(DependencyError):
    code = "storage-unavailable"
    title = "Storage unavailable"


class AuditLogDamaged(DependencyError):
    """The stored Merkle tree is missing nodes: nothing may be appended until it is repaired."""

    code = "audit-log-damaged"
    title = "Audit log damaged"


class DatabaseUnavailable(DependencyError):
    code = "database-unavailable"
    title = "Database unavailable"

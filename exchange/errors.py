"""Every error exchange raises on purpose, split by who is at fault.

```
ExchangeError
├── InputError                  the caller sent something wrong (4xx)
│   ├── ValidationError           a body, parameter or name is malformed (400)
│   ├── PayloadTooLarge           a body over the configured limit (413)
│   ├── BodyTimeout               a body that did not arrive within the configured time (408)
│   ├── UnsupportedMediaType      a body that is not JSON where JSON is required (415)
│   ├── RangeNotSatisfiable       a byte range that is not one FIRST-LAST inside the object (416)
│   ├── RateLimited               too many requests from one source or for one link (429)
│   ├── NotFound                  no such thing, or not visible to the caller (404)
│   │   └── LinkRefused             (services/tokens.py) the one answer for every link that
│   │                               cannot be used now; its precise reason goes to the log only
│   ├── Conflict                  the thing exists, or its state forbids the change (409)
│   ├── LocalFileError            a local file cannot be read or written (disk full, unsafe path)
│   ├── FormatError               bytes that do not parse as the format they claim to be
│   │   ├── AgeError                the age file format
│   │   │   ├── AgeHeaderError        malformed or non-canonical header
│   │   │   ├── AgeNoIdentityMatch    no stanza opens with the given identity
│   │   │   ├── AgeHeaderMacError     the header MAC does not verify
│   │   │   └── AgePayloadError       payload truncated, tampered or malformed
│   │   ├── ManifestError           an artifact manifest that does not parse or whose signature
│   │   │                           fails (code manifest-signature): the uploader's fault on upload
│   │   ├── NoteError               a signed note or checkpoint that does not parse or verify
│   │   ├── ProofError              a Merkle inclusion or consistency proof that does not verify
│   │   └── KeyRotationError        (format/keyrotation.py) a key-rotation proof that cannot be
│   │                               built or does not verify; `reason` says which
│   └── AddCheckpointError        (witness.py) an add-checkpoint request a witness refuses: the
│       │                         submitting log's fault; malformed (400). Answered in plain
│       │                         text, as c2sp.org/tlog-witness says, not problem+json
│       ├── CheckpointUntrusted     (witness.py) no trusted log signature verifies (403)
│       ├── UnknownLogOrigin        (witness.py) the witness knows no log of that origin (404)
│       ├── CheckpointConflict      (witness.py) the old size is not the one cosigned last, or
│       │                           the same size comes with another root (409)
│       └── CheckpointInconsistent  (witness.py) the consistency proof does not verify (422)
├── AuthError                   the request is not authenticated (401)
│   ├── MissingSignature          no RFC 9421 signature on a request that needs one
│   ├── UnknownKey                the signing key is not registered (or its principal is disabled)
│   ├── BadSignature              the signature does not verify over the covered components
│   ├── ClockSkew                 the signature's created time is too far from the server's clock
│   ├── ReplayedNonce             the signature's nonce was seen before
│   └── DigestMismatch            the body does not match its signed Content-Digest
├── PermissionDenied            authenticated, but the role or grant does not allow it (403)
├── DependencyError             a dependency failed; not the caller's fault (503)
│   ├── AuditLogDamaged           the stored log fails its own check (a leaf, a column, a node,
│   │                             a gap): appends and checkpoints stop (fail closed)
│   ├── StorageUnavailable        the S3 store did not answer or answered with an error
│   ├── DatabaseUnavailable       the database did not answer or refused the write
│   ├── ServiceUnreachable        client side: the service did not answer at all
│   ├── InternalAddressRefused    (witness.py) a witness's name resolved to an internal address;
│   │                             also an OSError, which is what aiohttp expects of a resolver
│   └── SeaweedStartError         (dev/seaweed.py) the development S3 store did not come up;
│                                 also a RuntimeError, as it was before it joined the tree
└── IntegrityFailure            the data is not what was signed: neither the caller's mistake
    │                           nor a dependency being down (exit 8)
    ├── IntegrityError            downloaded or stored bytes that do not match the signed manifest
    ├── AuditEventUnverified      an audit event or checkpoint the service served fails the
    │                             client's check (pinned key, saved state, proof, filter)
    └── VerifyFailure             (auditverify.py) an audit export fails offline verification;
                                  its `kind` is the verdict, with exit codes of its own (10-16)
```

Each class names the HTTP status and a stable problem `code` (a slug used in problem+json bodies,
audit reasons and exit-code mapping). Messages are written for the person who reads them: they
say what was wrong and, where it helps, what to do. They never hold secrets or internal URLs.
A class that lives elsewhere (its module in parentheses) belongs to one module's protocol or policy;
it is drawn here all the same, and `tests/test_errors.py` checks that every exception class in
the package is drawn.

Where a failure sits follows who is at fault, not where it is noticed: a manifest whose
signature fails is a `ManifestError` because on upload it is the caller's (the CLI answers
exit 8 for any `FormatError` all the same); bytes that do not match a manifest that verified
are an `IntegrityFailure`, since neither the caller nor a dependency being down explains them.
`IntegrityFailure` keeps status 400: its classes are raised on the client, where no response
is made, and 400 is what they answered when they were `FormatError`s.

Outside the tree, on purpose:

- `LinkProofError` (format/linkproof.py), a `ValueError`: the link service always translates
  it into `LinkRefused`. Were it an `ExchangeError`, one that escaped would be answered with
  its reason (`proof-invalid`, `proof-expired`), telling a guesser which check failed; as a
  `ValueError` an escape is a bare 500.
- `_PortOpen` (dev/seaweed.py), private control flow: `SeaweedFS.start()` turns it into
  `SeaweedStartError` and it never leaves the module.
- `_Fenced` (services/auditlog.py), private control flow: a write under the checkpoint signer
  lease found the lease in another term; the `Publisher` rolls the transaction back, steps down
  and logs it, and it never leaves the class.
- `_TrustedPartsWrong` (client/_download.py), private control flow: a file failed its SHA-256
  after a resume took parts on its journal's word; `download_verified` checks every kept part
  the thorough way, fetches those that fail, and it never leaves that function.

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
    "AuditEventUnverified",
    "AuditLogDamaged",
    "AuthError",
    "BadSignature",
    "BodyTimeout",
    "ClockSkew",
    "Conflict",
    "DatabaseUnavailable",
    "DependencyError",
    "DigestMismatch",
    "ExchangeError",
    "FormatError",
    "InputError",
    "IntegrityError",
    "IntegrityFailure",
    "LocalFileError",
    "ManifestError",
    "MissingSignature",
    "NotFound",
    "NoteError",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProofError",
    "RangeNotSatisfiable",
    "RateLimited",
    "ReplayedNonce",
    "ServiceUnreachable",
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


class BodyTimeout(InputError):
    """The request body trickled in slower than `http_body_timeout_s` allows (a slow-body client)."""

    status = 408
    code = "body-timeout"
    title = "Request body timed out"


class UnsupportedMediaType(InputError):
    status = 415
    code = "unsupported-media-type"
    title = "Unsupported media type"


class RangeNotSatisfiable(InputError):
    status = 416
    code = "range-not-satisfiable"
    title = "Range not satisfiable"


class RateLimited(InputError):
    status = 429
    code = "rate-limited"
    title = "Too many requests"


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
    """The stored log failed the service's own check: a leaf that does not hash to its stored node,
    a column that does not match its leaf, a missing node, a gap or a row past the head. Nothing
    is appended and no checkpoint signed until it is repaired and the service restarted."""

    code = "audit-log-damaged"
    title = "Audit log damaged"


class DatabaseUnavailable(DependencyError):
    code = "database-unavailable"
    title = "Database unavailable"


class ServiceUnreachable(DependencyError):
    """Client side only: the service did not answer (refused, reset, timed out, no such host)."""

    code = "service-unreachable"
    title = "Service unreachable"


class IntegrityFailure(ExchangeError):
    """The data is not what was signed. Not the caller's fault, and not a dependency that is down:
    retrying does not help, and the bytes are not to be trusted (exit 8)."""

    # Raised on the client, where no response is made; 400 is what these answered as FormatErrors.
    status = 400
    code = "integrity-failure"
    title = "Data does not verify"


class IntegrityError(IntegrityFailure):
    code = "integrity"
    title = "Data does not match its manifest"


class AuditEventUnverified(IntegrityFailure):
    """Client side only: what the service served as an audit event does not verify (exit 8)."""

    code = "audit-unverified"
    title = "Audit event does not verify"

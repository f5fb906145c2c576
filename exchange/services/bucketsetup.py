"""Setting up the service's S3 bucket as an operator: create it, add the backstops, read it back.

`set_up` brings one bucket on MinIO or AWS S3 (any store that speaks S3) to what exchange
expects, with the minio SDK and an operator's credentials, then reads the bucket again to check:

- **The bucket exists**, made in the settings' region (`s3_region`).
- **A lifecycle rule aborts incomplete multipart uploads** (`exchange-abort-incomplete-uploads`)
  N days after they started. The service's own sweep is the first line: every
  `upload_sweep_interval_s` it aborts uploads older than `upload_abandon_after_s`, removes their
  parts and writes `artifact.abandon` to the audit log. The bucket rule is the backstop for
  uploads the database lost track of (a restore from an older backup, a crash between
  CreateMultipartUpload and the commit, a service down for days); it must never fire first, or
  a client would lose an upload the service still lets it finish. So N days must exceed the
  abandon window plus one sweep interval, and the default is the smallest whole number of days
  that does (2 with the default settings). A store aborts an upload at the earliest N days after
  it started (AWS rounds up to the next midnight UTC).
- **Versioning is off by default.** Artifacts are immutable and their keys the server's (a key
  is never written twice, so no overwrite needs undoing); a delete is a decision the audit log
  records; and a versioned bucket keeps a deleted artifact's ciphertext, which breaks the promise
  that delete deletes. `versioning=True` is for operators who want the other trade: the
  service's identity may delete objects but not object versions (infra/s3/), so a leaked service
  key cannot destroy data for good. Noncurrent versions then expire after
  `noncurrent_version_days` (rule `exchange-expire-noncurrent-versions`, which also removes
  delete markers left alone), so delete still deletes within that many days. Turning it off on a
  versioned bucket suspends versioning (S3 cannot unversion a bucket); versions already kept stay
  until that rule, if present, or the operator removes them.
- **Nothing is granted to anonymous callers.** Allow statements of the bucket policy whose
  principal is everyone (`"*"`, `{"AWS": "*"}`, or any `NotPrincipal`) are removed, the rest
  kept; a policy left empty is deleted. That is MinIO's `mc anonymous set none`. AWS's Block
  Public Access and Object Ownership (ACLs) are not in the minio SDK: the report says to set
  them with the AWS CLI or console.
- **Default encryption SSE-S3** where the bucket has none; a bucket encrypted with KMS keeps it.
  Artifacts are age-encrypted end to end, so this is defence in depth only.

Every step reads before it writes, and a second run changes nothing. The decision is `plan`, a
plain function over what was read (`BucketState`) and what is wanted (`BucketConfig`); `set_up`
reads, plans, applies (unless `dry_run`), and reads back, reporting any difference.

A store that answers NotImplemented (or, for SSE-S3 on an older MinIO without a KMS,
InvalidArgument "KMS is not configured"): for default encryption or bucket policies, a warning
(an optional layer the store lacks); for lifecycle rules, or versioning asked for, a problem in the
report, which the CLI turns into exit 7 after showing it. minio errors stop here: refused
credentials are `AuthError`, a refused operation `PermissionDenied` naming the IAM action it
needs, a bucket name owned by another account `Conflict`, a region the bucket is not in
`ValidationError`, anything else (unreachable, 5xx, not S3) `StorageUnavailable`. Messages hold
the endpoint (the operator's own configuration) but never credentials.

What this module does not do: touch the service's database or audit log (the bucket's
configuration is the operator's, not an audited action of the service); grant the service's
identity anything (infra/s3/ has its policies); set AWS Block Public Access, Object Ownership,
replication, object lock or KMS keys; delete versions or objects; or keep lifecycle rule elements
the minio SDK does not model (object-size filters) in rules it did not write: those rules are
written back as the SDK read them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.lifecycleconfig import (
    AbortIncompleteMultipartUpload,
    Expiration,
    LifecycleConfig,
    NoncurrentVersionExpiration,
    Rule,
)
from minio.sseconfig import Rule as EncryptionRule
from minio.sseconfig import SSEConfig
from minio.versioningconfig import OFF, SUSPENDED, VersioningConfig

from ..errors import (
    AuthError,
    Conflict,
    ExchangeError,
    NotFound,
    PermissionDenied,
    StorageUnavailable,
    ValidationError,
)
from ..settings import Settings

__all__ = [
    "ABORT_RULE_ID",
    "DEFAULT_NONCURRENT_VERSION_DAYS",
    "IAM_ACTIONS",
    "NONCURRENT_RULE_ID",
    "NOT_IMPLEMENTED",
    "BucketConfig",
    "BucketState",
    "Change",
    "Credentials",
    "Plan",
    "SetupReport",
    "default_abort_days",
    "operator_credentials",
    "plan",
    "set_up",
]

T = TypeVar("T")

ABORT_RULE_ID = "exchange-abort-incomplete-uploads"
NONCURRENT_RULE_ID = "exchange-expire-noncurrent-versions"
#: The `code` of the StorageUnavailable raised when the store does not implement an operation.
NOT_IMPLEMENTED = "storage-not-implemented"
DAY_S = 86_400
#: How long noncurrent versions are kept when versioning is on and no other number is given.
DEFAULT_NONCURRENT_VERSION_DAYS = 7
UNSUPPORTED = "unsupported"
NO_ENCRYPTION = "none"

#: Steps whose NotImplemented is a warning: layers the store may lack without the bucket being unfit.
_OPTIONAL_STEPS = frozenset({"encryption", "public-access"})
_NOT_IMPLEMENTED_CODES = frozenset({"NotImplemented", "XNotImplemented"})
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired"}
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled"})
_REGION_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "PermanentRedirect"}
)
_ABSENT_CODES = frozenset({"NoSuchBucket", "NoSuchBucketPolicy"})
#: The IAM action each S3 call needs, named when the store refuses it.
IAM_ACTIONS = {
    "CreateBucket": "s3:CreateBucket",
    "HeadBucket": "s3:ListBucket",
    "GetBucketVersioning": "s3:GetBucketVersioning",
    "PutBucketVersioning": "s3:PutBucketVersioning",
    "GetBucketLifecycleConfiguration": "s3:GetLifecycleConfiguration",
    "PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
    "GetBucketEncryption": "s3:GetEncryptionConfiguration",
    "PutBucketEncryption": "s3:PutEncryptionConfiguration",
    "GetBucketPolicy": "s3:GetBucketPolicy",
    "PutBucketPolicy": "s3:PutBucketPolicy",
    "DeleteBucketPolicy": "s3:DeleteBucketPolicy",
}
_AWS_PUBLIC_ACCESS = (
    "not checked: the minio SDK cannot read or set AWS Block Public Access or Object Ownership. Set"
    " both with `aws s3api put-public-access-block --bucket {bucket} --public-access-block-configuration"
    " BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true` and"
    " `aws s3api put-bucket-ownership-controls --bucket {bucket} --ownership-controls"
    " Rules=[{{ObjectOwnership=BucketOwnerEnforced}}]` (new buckets have both since April 2023)"
)


# -- what is wanted, what was read, what to do ------------------------------------------------------


def default_abort_days(settings: Settings) -> int:
    """The fewest whole days that outlast the service's abandon window plus one sweep interval."""
    return (settings.upload_abandon_after_s + settings.upload_sweep_interval_s) // DAY_S + 1


@dataclass(frozen=True, kw_only=True)
class BucketConfig:
    """The bucket as exchange wants it."""

    bucket: str
    region: str
    abort_uploads_after_days: int
    #: The service's abandon window plus one sweep interval: the rule must not fire within it.
    service_sweep_s: int
    versioning: bool = False
    noncurrent_version_days: int = DEFAULT_NONCURRENT_VERSION_DAYS

    def __post_init__(self) -> None:
        if self.abort_uploads_after_days * DAY_S <= self.service_sweep_s:
            raise ValidationError(
                f"--abort-uploads-after-days {self.abort_uploads_after_days} would abort uploads the service"
                f" still lets clients finish: it must exceed upload_abandon_after_s plus"
                f" upload_sweep_interval_s ({self.service_sweep_s} s), so at least"
                f" {self.service_sweep_s // DAY_S + 1} days"
            )
        if self.noncurrent_version_days < 1:
            raise ValidationError("--noncurrent-version-days must be at least 1")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        abort_uploads_after_days: int | None = None,
        versioning: bool = False,
        noncurrent_version_days: int | None = None,
    ) -> BucketConfig:
        if noncurrent_version_days is not None and not versioning:
            raise ValidationError("--noncurrent-version-days applies only with --versioning")
        return cls(
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            abort_uploads_after_days=(
                default_abort_days(settings) if abort_uploads_after_days is None else abort_uploads_after_days
            ),
            service_sweep_s=settings.upload_abandon_after_s + settings.upload_sweep_interval_s,
            versioning=versioning,
            noncurrent_version_days=(
                DEFAULT_NONCURRENT_VERSION_DAYS
                if noncurrent_version_days is None
                else noncurrent_version_days
            ),
        )


@dataclass(frozen=True, kw_only=True)
class BucketState:
    """What the store answered. A missing bucket has nothing else; a feature the store does not
    implement reads as `UNSUPPORTED` (versioning, encryption) or a False `…_supported`."""

    exists: bool
    versioning: str = OFF  # Off | Enabled | Suspended | unsupported
    lifecycle_supported: bool = True
    rules: tuple[Rule, ...] = ()
    encryption: str = NO_ENCRYPTION  # none | AES256 | aws:kms | … | unsupported
    policy_supported: bool = True
    policy: str | None = None  # the bucket policy's JSON text, if any


@dataclass(frozen=True)
class Change:
    """One write: its step (bucket, public-access, encryption, versioning, lifecycle), what it
    does in words, and what to send (`policy` None for public-access: delete the policy)."""

    step: str
    detail: str
    lifecycle: LifecycleConfig | None = None
    versioning: str | None = None
    policy: str | None = None


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: What keeps the bucket from the configuration wanted: the run fails after reporting them.
    problems: list[str] = field(default_factory=list)


def plan(state: BucketState, config: BucketConfig) -> Plan:
    """The writes that take a bucket from `state` to `config`: none if it is there already."""
    out = Plan()
    if not state.exists:
        out.changes.append(Change("bucket", f"create bucket {config.bucket} in region {config.region}"))
        state = BucketState(exists=True)  # a new bucket has no policy, rules or versioning
    _plan_public_access(state, out)
    _plan_encryption(state, out)
    _plan_versioning(state, config, out)
    _plan_lifecycle(state, config, out)
    return out


def _everyone(principal: Any) -> bool:
    if principal == "*":
        return True
    if isinstance(principal, dict):
        return any(v == "*" or (isinstance(v, list) and "*" in v) for v in principal.values())
    return False


def _grants_anonymous(statement: Any) -> bool:
    return (
        isinstance(statement, dict)
        and statement.get("Effect") == "Allow"
        and ("NotPrincipal" in statement or _everyone(statement.get("Principal")))
    )


def _plan_public_access(state: BucketState, out: Plan) -> None:
    if not state.policy_supported or state.policy is None:
        return
    try:
        document = json.loads(state.policy)
        statements = document["Statement"]
    except (ValueError, TypeError, KeyError):
        out.problems.append(
            "the bucket policy does not parse as a policy document: check by hand that it grants"
            " anonymous callers nothing"
        )
        return
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list):
        out.problems.append("the bucket policy's Statement is neither a list nor one statement")
        return
    kept = [s for s in statements if not _grants_anonymous(s)]
    removed = [s for s in statements if _grants_anonymous(s)]
    if not removed:
        return
    names = ", ".join(str(s.get("Sid") or f"#{statements.index(s) + 1}") for s in removed)
    if kept:
        out.changes.append(
            Change(
                "public-access",
                f"remove {len(removed)} statement(s) granting anonymous access ({names}) from the bucket"
                f" policy, keeping {len(kept)}",
                policy=json.dumps({**document, "Statement": kept}),
            )
        )
    else:
        out.changes.append(
            Change(
                "public-access",
                f"delete the bucket policy: every statement grants anonymous access ({names})",
            )
        )


def _plan_encryption(state: BucketState, out: Plan) -> None:
    if state.encryption == UNSUPPORTED:
        out.warnings.append(
            "the store does not implement default bucket encryption: objects are stored as uploaded"
            " (age-encrypted end to end; SSE would only be defence in depth)"
        )
    elif state.encryption == NO_ENCRYPTION:
        out.changes.append(Change("encryption", "set default encryption SSE-S3 (AES256)"))


def _plan_versioning(state: BucketState, config: BucketConfig, out: Plan) -> None:
    if config.versioning:
        if state.versioning == UNSUPPORTED:
            out.problems.append("versioning was asked for, but the store does not implement it")
        elif state.versioning != ENABLED:
            out.changes.append(
                Change(
                    "versioning",
                    f"enable versioning (noncurrent versions expire after"
                    f" {config.noncurrent_version_days} days)",
                    versioning=ENABLED,
                )
            )
    elif state.versioning == ENABLED:
        cleanup = (
            f"rule {NONCURRENT_RULE_ID} keeps expiring them"
            if any(r.rule_id == NONCURRENT_RULE_ID for r in state.rules)
            else "remove them with the store's own tools"
        )
        out.changes.append(
            Change("versioning", "suspend versioning (S3 cannot turn it off once on)", versioning=SUSPENDED)
        )
        out.warnings.append(f"versions the bucket already keeps are not removed by suspending: {cleanup}")


def _abort_rule(days: int) -> Rule:
    return Rule(
        ENABLED,
        rule_filter=Filter(prefix=""),
        rule_id=ABORT_RULE_ID,
        abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days),
    )


def _noncurrent_rule(days: int) -> Rule:
    return Rule(
        ENABLED,
        rule_filter=Filter(prefix=""),
        rule_id=NONCURRENT_RULE_ID,
        noncurrent_version_expiration=NoncurrentVersionExpiration(days),
        expiration=Expiration(expired_object_delete_marker=True),
    )


def _rule_key(rule: Rule) -> tuple[Any, ...]:
    """A rule as a comparable value: stores differ in how they spell an empty filter or an absent flag."""
    f = rule.rule_filter
    expiration = rule.expiration
    noncurrent = rule.noncurrent_version_expiration
    abort = rule.abort_incomplete_multipart_upload
    return (
        rule.rule_id,
        rule.status,
        (f.prefix or "", f.tag, f.and_operator) if f is not None else ("", None, None),
        abort.days_after_initiation if abort else None,
        (expiration.days, expiration.date, bool(expiration.expired_object_delete_marker))
        if expiration
        else None,
        (noncurrent.noncurrent_days, noncurrent.newer_noncurrent_versions) if noncurrent else None,
        rule.transition,
        rule.noncurrent_version_transition,
    )


def _put_rule(rules: list[Rule], rule: Rule) -> str | None:
    """Put `rule` in place of the rule of its id (or at the end); say what changed, None if nothing."""
    for i, old in enumerate(rules):
        if old.rule_id == rule.rule_id:
            if _rule_key(old) == _rule_key(rule):
                return None
            rules[i] = rule
            return f"replace rule {rule.rule_id}"
    rules.append(rule)
    return f"add rule {rule.rule_id}"


def _plan_lifecycle(state: BucketState, config: BucketConfig, out: Plan) -> None:
    if not state.lifecycle_supported:
        out.problems.append(
            "the store does not implement bucket lifecycle rules: nothing backs the service's own sweep"
            " of abandoned uploads"
        )
        return
    rules = list(state.rules)
    done = []
    what = _put_rule(rules, _abort_rule(config.abort_uploads_after_days))
    if what:
        done.append(
            f"{what}: abort incomplete multipart uploads"
            f" {config.abort_uploads_after_days} days after they start"
        )
    if config.versioning:
        what = _put_rule(rules, _noncurrent_rule(config.noncurrent_version_days))
        if what:
            done.append(f"{what}: expire noncurrent versions after {config.noncurrent_version_days} days")
    if done:
        out.changes.append(Change("lifecycle", "; ".join(done), lifecycle=LifecycleConfig(rules)))
    for rule in state.rules:
        if rule.rule_id in (ABORT_RULE_ID, NONCURRENT_RULE_ID) or rule.status != ENABLED:
            continue
        if rule.expiration is not None and (rule.expiration.days or rule.expiration.date):
            out.warnings.append(
                f"lifecycle rule {rule.rule_id or '(no id)'} expires current objects: the store would delete"
                " artifacts the database still lists"
            )
        abort = rule.abort_incomplete_multipart_upload
        if abort is not None and (abort.days_after_initiation or 0) * DAY_S <= config.service_sweep_s:
            out.warnings.append(
                f"lifecycle rule {rule.rule_id or '(no id)'} aborts uploads after"
                f" {abort.days_after_initiation} days, before the service's own sweep: clients may lose"
                " uploads the service lets them finish"
            )


# -- credentials ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    #: "operator" (given for this command) or "service" (the service's own, with a warning).
    source: str = "operator"


def operator_credentials(
    access_key_id: str | None, secret_access_key: str | None, settings: Settings
) -> tuple[Credentials, str | None]:
    """The operator's keys if given, else the service's with a warning (the second value)."""
    if access_key_id or secret_access_key:
        if not (access_key_id and secret_access_key):
            raise ValidationError(
                "give both the operator's access key id and secret access key"
                " (EXCHANGE_ADMIN_S3_ACCESS_KEY_ID, EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY), or neither"
            )
        return Credentials(access_key_id, secret_access_key, "operator"), None
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        return Credentials(settings.s3_access_key_id, settings.s3_secret_access_key, "service"), (
            "no operator credentials (EXCHANGE_ADMIN_S3_ACCESS_KEY_ID, EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY):"
            " using the service's own S3 keys. The service's identity should NOT be able to create a"
            " bucket or change its configuration (infra/s3/ allows neither); if this run succeeds,"
            " its rights are wider than they should be"
        )
    raise ValidationError(
        "no S3 credentials: set EXCHANGE_ADMIN_S3_ACCESS_KEY_ID and EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY"
        " to an operator's keys"
    )


# -- the store --------------------------------------------------------------------------------------


def _connection_failure(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    kinds = {
        urllib3.exceptions.NewConnectionError: "connection failed",
        urllib3.exceptions.ConnectTimeoutError: "connecting timed out",
        urllib3.exceptions.ReadTimeoutError: "no answer in time",
        urllib3.exceptions.SSLError: "TLS failed",
        urllib3.exceptions.NameResolutionError: "no such host",
    }
    return next((text for kind, text in kinds.items() if isinstance(reason, kind)), type(reason).__name__)


class _Store:
    """One bucket through the minio SDK, every error translated (see the module docstring)."""

    def __init__(self, endpoint: str, region: str, bucket: str, credentials: Credentials, timeout_s: float):
        if any(ch.isspace() or not ch.isprintable() for ch in endpoint):
            raise ValidationError("the S3 endpoint must not contain spaces or control characters")
        parts = urlsplit(endpoint)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or "@" in parts.netloc
            or parts.path.strip("/")
            or parts.query
            or parts.fragment
        ):
            raise ValidationError(
                "the S3 endpoint must be http(s)://HOST[:PORT], with no path, query or credentials"
            )
        self.endpoint = endpoint
        self.bucket = bucket
        self.credential_source = credentials.source
        self.aws = (
            (parts.hostname or "").lower().rstrip(".").endswith((".amazonaws.com", ".amazonaws.com.cn"))
        )
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            # A few quick retries for a store that blinks; the last 5xx answer reaches minio as is.
            retries=urllib3.Retry(
                total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504], raise_on_status=False
            ),
        )
        try:
            self._client = Minio(
                parts.netloc,
                access_key=credentials.access_key_id,
                secret_key=credentials.secret_access_key,
                secure=parts.scheme == "https",
                region=region,
                http_client=http,
            )
        except ValueError as exc:
            raise ValidationError(f"the S3 endpoint is unusable: {exc}") from None

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ValueError as exc:  # the SDK's own checks (bucket name, region), before any request
            raise ValidationError(f"{operation}: {exc}") from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._translate(operation, exc) from None

    def _translate(self, operation: str, exc: BaseException) -> ExchangeError:
        if isinstance(exc, ServerError) and exc.status_code == 501:
            return StorageUnavailable(
                f"the store does not implement {operation} (HTTP 501)", code=NOT_IMPLEMENTED
            )
        if isinstance(exc, ServerError):
            return StorageUnavailable(f"storage answered {operation} with HTTP {exc.status_code}")
        if isinstance(exc, InvalidResponseError):
            return StorageUnavailable(f"{self.endpoint} did not answer {operation} as an S3 store does")
        if not isinstance(exc, S3Error):
            return StorageUnavailable(
                f"storage at {self.endpoint} is unreachable ({_connection_failure(exc)})"
            )
        code = exc.code or "unknown"
        # MinIO without a KMS refuses SSE-S3 as NotImplemented, or (older releases) as
        # InvalidArgument with this message: the same lack, the same answer here.
        if code in _NOT_IMPLEMENTED_CODES or (
            code == "InvalidArgument" and "KMS is not configured" in (exc.message or "")
        ):
            return StorageUnavailable(
                f"the store does not implement {operation} ({code})", code=NOT_IMPLEMENTED
            )
        if code in _CREDENTIAL_CODES:
            return AuthError(
                f"storage refused the credentials ({code}): check EXCHANGE_ADMIN_S3_ACCESS_KEY_ID and"
                " EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY",
                code="storage-credentials",
            )
        if code in _DENIED_CODES:
            hint = (
                "; these were the service's own keys, which should not have it: give an operator's"
                if self.credential_source == "service"
                else ""
            )
            return PermissionDenied(
                f"storage refused {operation} on bucket {self.bucket} ({code}): the identity needs"
                f" {IAM_ACTIONS.get(operation, operation)}{hint}",
                code="storage-access-denied",
            )
        if code == "BucketAlreadyExists":
            return Conflict(
                f"bucket name {self.bucket} is taken by another account ({code}): choose another"
                " EXCHANGE_S3_BUCKET",
                code="bucket-taken",
            )
        if code == "BucketAlreadyOwnedByYou":
            return Conflict(f"bucket {self.bucket} exists already ({code})", code="bucket-exists")
        if code in _ABSENT_CODES:
            return NotFound(f"storage has no such thing ({code})", code=code)
        if code in _REGION_CODES:
            return ValidationError(
                f"bucket {self.bucket} is not in region EXCHANGE_S3_REGION names ({code}): set the region it"
                " was made in"
            )
        return StorageUnavailable(f"storage answered {operation} with an error ({code})")

    def _unless_unsupported(self, operation: str, fn: Callable[[], T]) -> tuple[bool, T | None]:
        """(True, fn's answer), or (False, None) when the store does not implement `operation`."""
        try:
            return True, self._call(operation, fn)
        except StorageUnavailable as exc:
            if exc.code != NOT_IMPLEMENTED:
                raise
            return False, None

    def read(self) -> BucketState:
        c, b = self._client, self.bucket
        try:
            # A GET before anything else: unlike HEAD, its refusal says why (a bad key or no right).
            supported, versioning = self._unless_unsupported(
                "GetBucketVersioning", lambda: c.get_bucket_versioning(b)
            )
            if not supported and not self._call("HeadBucket", lambda: c.bucket_exists(b)):
                return BucketState(exists=False)
        except NotFound:
            return BucketState(exists=False)
        lifecycle_supported, lifecycle = self._unless_unsupported(
            "GetBucketLifecycleConfiguration", lambda: c.get_bucket_lifecycle(b)
        )
        encryption_supported, encryption = self._unless_unsupported(
            "GetBucketEncryption", lambda: c.get_bucket_encryption(b)
        )
        try:
            policy_supported, policy = self._unless_unsupported(
                "GetBucketPolicy", lambda: c.get_bucket_policy(b)
            )
        except NotFound:
            policy_supported, policy = True, None
        return BucketState(
            exists=True,
            versioning=versioning.status_string if versioning is not None else UNSUPPORTED,
            lifecycle_supported=lifecycle_supported,
            rules=tuple(lifecycle.rules) if lifecycle is not None else (),
            encryption=(
                UNSUPPORTED
                if not encryption_supported
                else encryption.rule.sse_algorithm
                if encryption is not None
                else NO_ENCRYPTION
            ),
            policy_supported=policy_supported,
            policy=policy or None,
        )

    def apply(self, change: Change, config: BucketConfig) -> None:
        c, b = self._client, self.bucket
        if change.step == "bucket":
            try:
                self._call("CreateBucket", lambda: c.make_bucket(b, config.region))
            except Conflict as exc:
                if exc.code != "bucket-exists":  # made by someone else since it was read: fine
                    raise
        elif change.step == "public-access":
            policy = change.policy
            if policy is None:
                self._call("DeleteBucketPolicy", lambda: c.delete_bucket_policy(b))
            else:
                self._call("PutBucketPolicy", lambda: c.set_bucket_policy(b, policy))
        elif change.step == "encryption":
            sse = SSEConfig(EncryptionRule.new_sse_s3_rule())
            self._call("PutBucketEncryption", lambda: c.set_bucket_encryption(b, sse))
        elif change.step == "versioning":
            versioning = VersioningConfig(change.versioning)
            self._call("PutBucketVersioning", lambda: c.set_bucket_versioning(b, versioning))
        elif change.step == "lifecycle" and change.lifecycle is not None:
            lifecycle = change.lifecycle
            self._call("PutBucketLifecycleConfiguration", lambda: c.set_bucket_lifecycle(b, lifecycle))
        else:
            raise AssertionError(f"no way to apply {change.step}")


# -- the run ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SetupReport:
    config: BucketConfig
    endpoint: str
    credentials: str
    dry_run: bool
    #: What was changed (or, in a dry run, would be).
    changes: list[Change]
    #: As read back after the changes (in a dry run: as found).
    state: BucketState
    aws: bool
    warnings: list[str]
    problems: list[str]

    def to_json(self) -> dict[str, Any]:
        state = self.state
        rules = {r.rule_id: r for r in state.rules}
        abort = rules.get(ABORT_RULE_ID)
        noncurrent = rules.get(NONCURRENT_RULE_ID)
        anonymous: int | None = None
        if state.policy_supported:
            try:
                statements = json.loads(state.policy)["Statement"] if state.policy else []
                statements = [statements] if isinstance(statements, dict) else statements
                anonymous = sum(1 for s in statements if _grants_anonymous(s))
            except (ValueError, TypeError, KeyError):
                anonymous = None
        return {
            "bucket": self.config.bucket,
            "region": self.config.region,
            "endpoint": self.endpoint,
            "credentials": self.credentials,
            "dry_run": self.dry_run,
            "changed": bool(self.changes) and not self.dry_run,
            "changes": [{"step": c.step, "detail": c.detail} for c in self.changes],
            "state": {
                "exists": state.exists,
                "abort_incomplete_uploads_after_days": (
                    abort.abort_incomplete_multipart_upload.days_after_initiation
                    if abort is not None and abort.abort_incomplete_multipart_upload is not None
                    else None
                ),
                "lifecycle_rules": (
                    [r.rule_id or "" for r in state.rules] if state.lifecycle_supported else UNSUPPORTED
                ),
                "versioning": state.versioning,
                "noncurrent_versions_expire_after_days": (
                    noncurrent.noncurrent_version_expiration.noncurrent_days
                    if noncurrent is not None and noncurrent.noncurrent_version_expiration is not None
                    else None
                ),
                "encryption": state.encryption,
                "anonymous_policy_statements": anonymous if state.policy_supported else UNSUPPORTED,
                "public_access_block": (
                    _AWS_PUBLIC_ACCESS.format(bucket=self.config.bucket) if self.aws else "no such setting"
                ),
            },
            "service_sweep": {
                "abandon_and_sweep_s": self.config.service_sweep_s,
                "bucket_rule_after_s": self.config.abort_uploads_after_days * DAY_S,
            },
            "warnings": self.warnings,
            "problems": self.problems,
        }


def set_up(
    config: BucketConfig,
    *,
    endpoint: str,
    credentials: Credentials,
    timeout_s: float,
    dry_run: bool = False,
) -> SetupReport:
    """Read the bucket, plan, apply (unless `dry_run`), read it back: the report says what changed
    and what still differs. Raises the translated errors of the module docstring."""
    store = _Store(endpoint, config.region, config.bucket, credentials, timeout_s)
    before = store.read()
    todo = plan(before, config)
    warnings, problems = list(todo.warnings), list(todo.problems)
    if dry_run:
        return SetupReport(
            config=config,
            endpoint=endpoint,
            credentials=credentials.source,
            dry_run=True,
            changes=todo.changes,
            state=before,
            aws=store.aws,
            warnings=warnings,
            problems=problems,
        )
    done: list[Change] = []
    unsupported: set[str] = set()
    for change in todo.changes:
        try:
            store.apply(change, config)
        except StorageUnavailable as exc:
            if exc.code != NOT_IMPLEMENTED:
                raise
            unsupported.add(change.step)
            if change.step in _OPTIONAL_STEPS:
                warnings.append(f"{exc.message}: {change.detail} was skipped")
            else:
                problems.append(f"{exc.message}: could not {change.detail}")
            continue
        done.append(change)
    after = store.read()
    # Verify: the state read back needs nothing more, but what the store refused as unimplemented.
    for change in plan(after, config).changes:
        if change.step not in unsupported:
            problems.append(f"read back, the bucket still needs: {change.detail}")
    return SetupReport(
        config=config,
        endpoint=endpoint,
        credentials=credentials.source,
        dry_run=False,
        changes=done,
        state=after,
        aws=store.aws,
        warnings=warnings,
        problems=problems,
    )

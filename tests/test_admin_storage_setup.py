"""`exchange admin bucket setup` against the real SeaweedFS of the `seaweed` fixture.

SeaweedFS 4.x implements, through the minio SDK, everything the command sets: it creates the
bucket, stores and returns a lifecycle configuration with AbortIncompleteMultipartUpload,
NoncurrentVersionExpiration and ExpiredObjectDeleteMarker, turns versioning on and suspends it,
stores default encryption (AES256), and enforces bucket policies (an anonymous GET succeeds under
an Allow-to-"*" statement and is refused once it is removed). So all of that is tested for real,
each test on a bucket of its own, read back with boto3 rather than with the command's own code.
Whether weed's lifecycle worker aborts an upload after N days is not tested: it takes days.

What SeaweedFS does implement cannot be made to answer NotImplemented without a fake store, so the
store's refusal of an unimplemented feature is tested where the decision is: `plan` over a state
that says so, and the translation of the SDK's NotImplemented answers. The refusals a real store
does give are tested through the command: wrong keys (exit 3), the service's least-privilege
keys (exit 4, naming the IAM action), an endpoint that does not answer (exit 7), and bad input.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import urllib3
from botocore.exceptions import ClientError
from click.testing import CliRunner, Result
from minio.commonconfig import ENABLED, Filter
from minio.error import S3Error, ServerError
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, Rule

from exchange.cli import main
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import StorageUnavailable
from exchange.services import bucketsetup
from exchange.services.bucketsetup import (
    ABORT_RULE_ID,
    NONCURRENT_RULE_ID,
    NOT_IMPLEMENTED,
    UNSUPPORTED,
    BucketConfig,
    BucketState,
    Credentials,
    plan,
)
from exchange.settings import Settings
from tests.conftest import free_port


@pytest.fixture
def bucket() -> str:
    return f"setup-{secrets.token_hex(4)}"


def _env(seaweed: SeaweedFS, tmp_path: Path, bucket: str, *, operator: bool = True) -> dict[str, str | None]:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("EXCHANGE_")}
    env |= {
        "EXCHANGE_HOME": str(tmp_path),
        "EXCHANGE_S3_ENDPOINT": seaweed.endpoint,
        "EXCHANGE_S3_BUCKET": bucket,
        "EXCHANGE_S3_ACCESS_KEY_ID": seaweed.service_credentials.access_key_id,
        "EXCHANGE_S3_SECRET_ACCESS_KEY": seaweed.service_credentials.secret_access_key,
    }
    if operator:
        env |= {
            "EXCHANGE_ADMIN_S3_ACCESS_KEY_ID": seaweed.credentials.access_key_id,
            "EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY": seaweed.credentials.secret_access_key,
        }
    return env


def _setup(env: dict[str, str | None], *args: str, as_json: bool = True) -> Result:
    argv = [*(["--json"] if as_json else []), "admin", "bucket", "setup", *args]
    return CliRunner(env=env).invoke(main, argv, catch_exceptions=False)


def _report(done: Result) -> dict[str, Any]:
    assert done.exit_code == 0, done.output
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _steps(report: dict[str, Any]) -> list[str]:
    return [c["step"] for c in report["changes"]]


def _anonymous_get(seaweed: SeaweedFS, bucket: str, key: str) -> int:
    try:
        with urllib.request.urlopen(f"{seaweed.endpoint}/{bucket}/{key}", timeout=10) as answer:  # noqa: S310
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


# -- against the store ------------------------------------------------------------------------------


def test_a_new_bucket_is_planned_made_read_back_and_left_alone(
    seaweed: SeaweedFS, tmp_path: Path, bucket: str
) -> None:
    env = _env(seaweed, tmp_path, bucket)
    s3 = seaweed.client()

    planned = _report(_setup(env, "--dry-run"))
    assert planned["dry_run"] and not planned["changed"]
    assert _steps(planned) == ["bucket", "encryption", "lifecycle"]
    assert planned["state"]["exists"] is False
    told = _setup(env, "--dry-run", as_json=False)
    assert told.exit_code == 0 and "would make 3 change(s)" in told.stdout
    assert told.stdout.endswith("dry run: nothing was changed\n")
    with pytest.raises(ClientError):  # the dry runs made nothing
        s3.head_bucket(Bucket=bucket)

    made = _report(_setup(env))
    assert made["changed"] and _steps(made) == ["bucket", "encryption", "lifecycle"]
    assert made["credentials"] == "operator" and made["warnings"] == [] and made["problems"] == []
    # The default outlasts the service's own window: 24 h abandon + 5 min sweep -> 2 days.
    assert made["service_sweep"] == {"abandon_and_sweep_s": 86_700, "bucket_rule_after_s": 172_800}
    assert made["state"] == made["state"] | {
        "exists": True,
        "abort_incomplete_uploads_after_days": 2,
        "lifecycle_rules": [ABORT_RULE_ID],
        "versioning": "Off",
        "noncurrent_versions_expire_after_days": None,
        "encryption": "AES256",
        "anonymous_policy_statements": 0,
    }
    # Read back apart from the command's own code.
    (rule,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["ID"] == ABORT_RULE_ID and rule["Status"] == "Enabled"
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
    sse = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert sse["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert s3.get_bucket_versioning(Bucket=bucket).get("Status") is None

    again = _report(_setup(env))
    assert again["changes"] == [] and not again["changed"] and again["state"] == made["state"]
    human = _setup(env, as_json=False)
    assert (
        human.exit_code == 0
        and f"bucket {bucket} at {seaweed.endpoint}: already set up, nothing changed" in (human.stdout)
    )
    assert "abort incomplete uploads: after 2 days" in human.stdout and not human.stderr


def test_versioning_on_keeps_versions_for_a_while_and_off_suspends_it(
    seaweed: SeaweedFS, tmp_path: Path, bucket: str
) -> None:
    env = _env(seaweed, tmp_path, bucket)
    s3 = seaweed.client()

    on = _report(_setup(env, "--versioning", "--noncurrent-version-days", "3"))
    assert on["state"]["versioning"] == "Enabled"
    assert on["state"]["noncurrent_versions_expire_after_days"] == 3
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert rules[NONCURRENT_RULE_ID]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 3
    assert rules[NONCURRENT_RULE_ID]["Expiration"] == {"ExpiredObjectDeleteMarker": True}
    assert rules[ABORT_RULE_ID]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
    assert _report(_setup(env, "--versioning", "--noncurrent-version-days", "3"))["changes"] == []

    off = _report(_setup(env))  # the default: versioning off
    assert _steps(off) == ["versioning"] and off["state"]["versioning"] == "Suspended"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Suspended"
    # Versions already kept are not lost track of: the rule that expires them stays.
    assert any("not removed by suspending" in w and NONCURRENT_RULE_ID in w for w in off["warnings"])
    assert off["state"]["lifecycle_rules"] == [ABORT_RULE_ID, NONCURRENT_RULE_ID]
    assert _report(_setup(env))["changes"] == []


def test_anonymous_grants_go_other_rules_and_statements_stay_and_a_dry_run_changes_nothing(
    seaweed: SeaweedFS, tmp_path: Path, bucket: str
) -> None:
    env = _env(seaweed, tmp_path, bucket)
    s3 = seaweed.client()
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"ciphertext")
    keep = {
        "Sid": "NoBucketDelete",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:DeleteBucket",
        "Resource": f"arn:aws:s3:::{bucket}",
    }
    public = {
        "Sid": "PublicRead",
        "Effect": "Allow",
        "Principal": {"AWS": ["*"]},
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/*",
    }
    s3.put_bucket_policy(
        Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [public, keep]})
    )
    scratch: Any = {
        "ID": "scratch",
        "Status": "Enabled",
        "Filter": {"Prefix": "scratch/"},
        "Expiration": {"Days": 30},
    }
    stale: Any = {
        "ID": ABORT_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 9},
    }
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [scratch, stale]})
    assert _anonymous_get(seaweed, bucket, "k") == 200
    policy_before = s3.get_bucket_policy(Bucket=bucket)["Policy"]
    rules_before = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]

    planned = _report(_setup(env, "--dry-run"))
    assert _steps(planned) == ["public-access", "encryption", "lifecycle"]
    assert "PublicRead" in planned["changes"][0]["detail"]
    assert planned["changes"][2]["detail"].startswith(f"replace rule {ABORT_RULE_ID}")
    assert planned["state"]["anonymous_policy_statements"] == 1
    assert any("scratch" in w and "expires current objects" in w for w in planned["warnings"])
    assert _anonymous_get(seaweed, bucket, "k") == 200
    assert s3.get_bucket_policy(Bucket=bucket)["Policy"] == policy_before
    assert s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"] == rules_before
    with pytest.raises(ClientError):
        s3.get_bucket_encryption(Bucket=bucket)

    made = _report(_setup(env))
    assert _steps(made) == ["public-access", "encryption", "lifecycle"]
    assert _anonymous_get(seaweed, bucket, "k") == 403
    assert json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])["Statement"] == [
        {**keep, "Action": "s3:DeleteBucket", "Resource": f"arn:aws:s3:::{bucket}"}
    ]
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert rules["scratch"]["Expiration"] == {"Days": 30} and rules["scratch"]["Filter"] == {
        "Prefix": "scratch/"
    }
    assert rules[ABORT_RULE_ID]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
    assert made["state"]["anonymous_policy_statements"] == 0

    again = _report(_setup(env))
    assert again["changes"] == [] and any("scratch" in w for w in again["warnings"])


# -- refusals ---------------------------------------------------------------------------------------


def test_wrong_operator_keys_are_one_line_and_exit_3(seaweed: SeaweedFS, tmp_path: Path, bucket: str) -> None:
    env = _env(seaweed, tmp_path, bucket) | {
        "EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY": "not-the-secret-0123456789"
    }
    refused = _setup(env, as_json=False)
    assert refused.exit_code == 3, refused.output
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith(
        "exchange: error: storage refused the"
    )
    as_json = _setup(env)
    assert as_json.exit_code == 3 and json.loads(as_json.stderr)["error"]["code"] == "storage-credentials"
    for secret in ("not-the-secret-0123456789", seaweed.credentials.secret_access_key):
        assert secret not in refused.output + as_json.output


def test_the_services_own_keys_are_refused_with_the_action_they_lack(
    seaweed: SeaweedFS, tmp_path: Path, bucket: str
) -> None:
    # No operator keys: the service's least-privilege identity is tried, with a warning, and the
    # store refuses it (it may only read and write objects of the suite's bucket).
    refused = _setup(_env(seaweed, tmp_path, bucket, operator=False), as_json=False)
    assert refused.exit_code == 4, refused.output
    warning, error = refused.stderr.splitlines()
    assert warning.startswith("exchange: warning: no operator credentials") and "should NOT" in warning
    assert "s3:GetBucketVersioning" in error and "service's own keys" in error
    assert seaweed.service_credentials.secret_access_key not in refused.output
    with pytest.raises(ClientError):
        seaweed.client().head_bucket(Bucket=bucket)


def test_an_endpoint_that_does_not_answer_is_exit_7(seaweed: SeaweedFS, tmp_path: Path, bucket: str) -> None:
    env = _env(seaweed, tmp_path, bucket)
    gone = _setup(env, "--endpoint", f"http://127.0.0.1:{free_port()}")
    assert gone.exit_code == 7, gone.output
    assert json.loads(gone.stderr)["error"] == {
        "code": "storage-unavailable",
        "detail": json.loads(gone.stderr)["error"]["detail"],
    }
    assert "unreachable (connection failed)" in gone.stderr and gone.stdout == ""


@pytest.mark.parametrize(
    ("args", "extra", "expected"),
    [
        (["--abort-uploads-after-days", "1"], {}, "at least 2 days"),
        (["--noncurrent-version-days", "3"], {}, "only with --versioning"),
        ([], {"EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY": None}, "give both"),
        (["--endpoint", "http://127.0.0.1:9/prefix"], {}, "no path"),
        ([], {"EXCHANGE_UPLOAD_ABANDON_AFTER_S": "3d"}, None),  # the default follows the setting
    ],
)
def test_bad_input_is_refused_before_storage_is_asked(
    seaweed: SeaweedFS,
    tmp_path: Path,
    bucket: str,
    args: list[str],
    extra: dict[str, str | None],
    expected: str,
) -> None:
    env = _env(seaweed, tmp_path, bucket) | extra
    if expected is None:
        planned = _report(_setup(env, "--dry-run", *args))
        assert planned["service_sweep"]["bucket_rule_after_s"] == 4 * 86_400
        return
    refused = _setup(env, *args)
    assert refused.exit_code == 2, refused.output
    assert json.loads(refused.stderr)["error"]["code"] == "invalid-input"
    assert expected in refused.stderr
    with pytest.raises(ClientError):
        seaweed.client().head_bucket(Bucket=bucket)


# -- what SeaweedFS implements, and so cannot refuse: the decisions ------------------------------------


def _config(**changes: Any) -> BucketConfig:
    return BucketConfig.from_settings(Settings().replace(s3_bucket="b"), **changes)


def _ours(days: int = 2) -> Rule:
    return Rule(
        ENABLED,
        rule_filter=Filter(prefix=""),
        rule_id=ABORT_RULE_ID,
        abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days),
    )


def test_a_store_without_lifecycle_rules_is_a_problem_and_without_encryption_a_warning() -> None:
    state = BucketState(exists=True, lifecycle_supported=False, encryption=UNSUPPORTED)
    todo = plan(state, _config())
    assert todo.changes == []
    assert todo.problems == [
        "the store does not implement bucket lifecycle rules: nothing backs the service's own sweep"
        " of abandoned uploads"
    ]
    assert len(todo.warnings) == 1 and "default bucket encryption" in todo.warnings[0]


def test_versioning_asked_of_a_store_without_it_is_a_problem_and_not_asked_is_fine() -> None:
    state = BucketState(exists=True, versioning=UNSUPPORTED, rules=(_ours(),), encryption="AES256")
    assert plan(state, _config()).problems == [] and plan(state, _config()).changes == []
    asked = plan(state, _config(versioning=True))
    assert asked.problems == ["versioning was asked for, but the store does not implement it"]


def test_a_stronger_encryption_and_a_policy_the_store_lacks_are_left_alone() -> None:
    state = BucketState(exists=True, rules=(_ours(),), encryption="aws:kms", policy_supported=False)
    assert plan(state, _config()) == bucketsetup.Plan()


def test_a_policy_that_does_not_parse_is_a_problem_not_a_guess() -> None:
    state = BucketState(exists=True, rules=(_ours(),), encryption="AES256", policy="{not json")
    assert plan(state, _config()).problems[0].startswith("the bucket policy does not parse")


def test_a_foreign_rule_that_aborts_uploads_too_early_is_warned_of() -> None:
    early = Rule(
        ENABLED,
        rule_filter=Filter(prefix=""),
        rule_id="cost-saver",
        abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(1),
    )
    todo = plan(BucketState(exists=True, rules=(early, _ours()), encryption="AES256"), _config())
    assert todo.changes == [] and len(todo.warnings) == 1 and "cost-saver" in todo.warnings[0]


@pytest.mark.parametrize(
    "answer",
    [
        S3Error(
            urllib3.HTTPResponse(status=501),
            "NotImplemented",
            "A header you provided implies functionality that is not implemented",
            "/b",
            "r",
            "h",
            bucket_name="b",
        ),
        S3Error(urllib3.HTTPResponse(status=501), "XNotImplemented", None, "/b", "r", "h"),
        ServerError("no body", 501),
        # An older MinIO without a KMS, refusing SSE-S3.
        S3Error(
            urllib3.HTTPResponse(status=400),
            "InvalidArgument",
            "Server side encryption specified but KMS is not configured",
            "/b",
            "r",
            "h",
        ),
    ],
)
def test_the_stores_not_implemented_answers_become_one_error_code(answer: Exception) -> None:
    store = bucketsetup._Store(
        "http://127.0.0.1:9", "us-east-1", "b", Credentials("id", "secret"), timeout_s=1.0
    )
    translated = store._translate("PutBucketEncryption", answer)
    assert isinstance(translated, StorageUnavailable) and translated.code == NOT_IMPLEMENTED
    assert "PutBucketEncryption" in translated.message

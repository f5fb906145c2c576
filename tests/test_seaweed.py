"""exchange.dev.seaweed against real `weed mini` processes (no mocks).

Besides the launcher itself, these tests pin down how SeaweedFS treats authentication, presigned
URL expiry and presigned uploads bound to a length and a SHA-256 checksum, which the storage layer
relies on. The statuses and error codes asserted here are the ones SeaweedFS 4.48 returns.
The attacks on weed's other ports (filer, volume server, master, gRPC) are in
tests/hostile/test_storage_ports.py; here are the keys that lock them.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import stat
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from exchange.dev import seaweed as seaweed_module
from exchange.dev.seaweed import REGION, S3Credentials, SeaweedFS, SeaweedStartError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BUCKET = "seaweed-tests"


# -- helpers ---------------------------------------------------------------------------------------


def s3_client(endpoint: str, access_key_id: str, secret: str, **config: Any) -> S3Client:
    """A boto3 client with arbitrary keys and extra botocore config (the launcher's is fixed)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            **config,
        ),
    )


def raw(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    chunked: bool = False,
) -> tuple[int, str, str]:
    """Send one plain HTTP request (no SDK, no signing of our own) -> (status, S3 error code, message)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        if chunked:
            conn.request(method, target, body=iter([body or b""]), headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read().decode(errors="replace")
    finally:
        conn.close()

    def element(name: str) -> str:
        start = data.find(f"<{name}>")
        return data[start + len(name) + 2 : data.find(f"</{name}>")] if start >= 0 else ""

    return response.status, element("Code"), element("Message")


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def error_of(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


def signed_headers(url: str) -> set[str]:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    return set(query["X-Amz-SignedHeaders"][0].split(";"))


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One instance shared by the tests that only make requests."""
    instance = SeaweedFS(tmp_path_factory.mktemp("weed"), credentials=S3Credentials.generate())
    try:
        instance.start()
        instance.ensure_bucket(BUCKET)
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def make_weed(tmp_path: Path) -> Iterator[Callable[[str], SeaweedFS]]:
    """Unstarted instances in tmp_path/<name>, each stopped at teardown whatever happened."""
    made: list[SeaweedFS] = []

    def make(name: str, **options: Any) -> SeaweedFS:
        credentials = S3Credentials.load_or_create(tmp_path / f"{name}-credentials.json")
        instance = SeaweedFS(tmp_path / name, credentials=credentials, **options)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.stop()


# -- credentials -----------------------------------------------------------------------------------


def test_generated_credentials_are_shaped_like_aws_keys_and_hide_the_secret() -> None:
    credentials = S3Credentials.generate()
    assert len(credentials.access_key_id) == 20
    assert (
        credentials.access_key_id.isalnum() and credentials.access_key_id == credentials.access_key_id.upper()
    )
    assert len(credentials.secret_access_key) == 40 and credentials.secret_access_key.isalnum()
    assert credentials.secret_access_key not in repr(credentials)
    assert credentials.secret_access_key not in str(credentials)
    assert S3Credentials.generate() != credentials


def test_credentials_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "credentials.json"
    first = S3Credentials.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {
        "access_key_id": first.access_key_id,
        "secret_access_key": first.secret_access_key,
    }
    assert S3Credentials.load_or_create(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]  # no temp files left


def test_malformed_credentials_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text('{"access_key_id": "AKIA", "secret": "hunter2hunter2"}')
    with pytest.raises(ValueError, match="malformed S3 credentials file") as caught:
        S3Credentials.load_or_create(path)
    assert "hunter2" not in str(caught.value)


# -- authentication --------------------------------------------------------------------------------


def test_unsigned_requests_are_refused(weed: SeaweedFS) -> None:
    weed.client().put_object(Bucket=BUCKET, Key="unsigned/existing", Body=b"secret bytes")

    assert raw("GET", f"{weed.endpoint}/")[:2] == (403, "AccessDenied")
    assert raw("GET", f"{weed.endpoint}/{BUCKET}")[:2] == (403, "AccessDenied")
    assert raw("GET", f"{weed.endpoint}/{BUCKET}/unsigned/existing")[:2] == (403, "AccessDenied")
    assert raw("PUT", f"{weed.endpoint}/{BUCKET}/unsigned/new", b"x")[:2] == (403, "AccessDenied")

    with pytest.raises(ClientError) as caught:
        weed.client().head_object(Bucket=BUCKET, Key="unsigned/new")
    assert error_of(caught.value)[0] == 404


def test_wrong_secret_and_unknown_key_are_refused(weed: SeaweedFS) -> None:
    weed.client().put_object(Bucket=BUCKET, Key="wrong/existing", Body=b"x")
    wrong_secret = s3_client(weed.endpoint, weed.credentials.access_key_id, "x" * 40)
    calls: list[Callable[[], object]] = [
        lambda: wrong_secret.list_buckets(),
        lambda: wrong_secret.get_object(Bucket=BUCKET, Key="wrong/existing"),
        lambda: wrong_secret.put_object(Bucket=BUCKET, Key="wrong/new", Body=b"y"),
    ]
    for call in calls:
        with pytest.raises(ClientError) as caught:
            call()
        assert error_of(caught.value) == (403, "SignatureDoesNotMatch")

    unknown_key = s3_client(weed.endpoint, "A" * 20, weed.credentials.secret_access_key)
    with pytest.raises(ClientError) as caught:
        unknown_key.get_object(Bucket=BUCKET, Key="wrong/existing")
    assert error_of(caught.value) == (403, "InvalidAccessKeyId")

    with pytest.raises(ClientError) as caught:
        weed.client().head_object(Bucket=BUCKET, Key="wrong/new")
    assert error_of(caught.value)[0] == 404


def test_right_credentials_round_trip(weed: SeaweedFS) -> None:
    client = weed.client()
    body = os.urandom(4096)
    client.put_object(Bucket=BUCKET, Key="round/trip", Body=body)
    assert client.get_object(Bucket=BUCKET, Key="round/trip")["Body"].read() == body
    assert BUCKET in {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_uploads_to_a_missing_bucket_are_not_auto_created(weed: SeaweedFS) -> None:
    with pytest.raises(ClientError) as caught:
        weed.client().put_object(Bucket="no-such-bucket", Key="k", Body=b"x")
    assert error_of(caught.value) == (404, "NoSuchBucket")
    weed.ensure_bucket(BUCKET)  # idempotent on an existing bucket


# -- presigned URLs --------------------------------------------------------------------------------


def test_presigned_get_works_until_it_expires(weed: SeaweedFS) -> None:
    weed.client().put_object(Bucket=BUCKET, Key="presigned/get", Body=b"hello")
    # X-Amz-Date has whole seconds; sign just after a second boundary so "immediately" is well
    # inside the 1 s lifetime.
    time.sleep(1 - time.time() % 1)
    url = weed.client().generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "presigned/get"}, ExpiresIn=1
    )
    assert raw("GET", url)[0] == 200
    time.sleep(2.1)
    assert raw("GET", url) == (403, "AccessDenied", "Request has expired")


@pytest.mark.parametrize("checksum_calculation", ["when_required", "when_supported"])
def test_presigned_put_object_binds_length_and_sha256(weed: SeaweedFS, checksum_calculation: str) -> None:
    """A URL presigned with ContentLength and ChecksumSHA256 accepts exactly those bytes."""
    client = s3_client(
        weed.endpoint,
        weed.credentials.access_key_id,
        weed.credentials.secret_access_key,
        request_checksum_calculation=checksum_calculation,
    )
    key = f"presigned/put-{checksum_calculation}"
    body = os.urandom(1000)
    tampered = os.urandom(len(body))
    checksum = sha256_b64(body)
    url = client.generate_presigned_url(
        "put_object",
        Params={"Bucket": BUCKET, "Key": key, "ContentLength": len(body), "ChecksumSHA256": checksum},
        ExpiresIn=300,
    )
    # boto3 keeps both as signed headers (not query parameters): the uploader must send them.
    assert signed_headers(url) == {"content-length", "host", "x-amz-checksum-sha256"}
    header = {"x-amz-checksum-sha256": checksum}

    # Same length, signed checksum header, other bytes: weed hashes the body and refuses it.
    assert raw("PUT", url, tampered, header)[:2] == (400, "BadDigest")
    with pytest.raises(ClientError) as caught:
        client.head_object(Bucket=BUCKET, Key=key)
    assert error_of(caught.value)[0] == 404
    # Anything that changes a signed header breaks the signature.
    assert raw("PUT", url, body)[:2] == (403, "SignatureDoesNotMatch")  # checksum header left out
    assert raw("PUT", url, tampered, {"x-amz-checksum-sha256": sha256_b64(tampered)})[:2] == (
        403,
        "SignatureDoesNotMatch",
    )
    assert raw("PUT", url, body[:-1], header)[:2] == (403, "SignatureDoesNotMatch")
    assert raw("PUT", url, body + b"x", header)[:2] == (403, "SignatureDoesNotMatch")
    assert raw("PUT", url, body, header, chunked=True)[:2] == (403, "SignatureDoesNotMatch")

    assert raw("PUT", url, body, header)[0] == 200
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
    head = client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(body)
    assert head["ChecksumSHA256"] == checksum

    # A refused upload leaves the stored object as it was.
    assert raw("PUT", url, tampered, header)[:2] == (400, "BadDigest")
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body


def test_presigned_upload_part_binds_length_and_sha256(weed: SeaweedFS) -> None:
    client = weed.client()
    key = "presigned/multipart"
    upload_id = client.create_multipart_upload(Bucket=BUCKET, Key=key, ChecksumAlgorithm="SHA256")["UploadId"]
    part = os.urandom(2048)  # the last (here: only) part may be smaller than 5 MiB
    tampered = bytes([part[0] ^ 1]) + part[1:]
    checksum = sha256_b64(part)
    url = client.generate_presigned_url(
        "upload_part",
        Params={
            "Bucket": BUCKET,
            "Key": key,
            "UploadId": upload_id,
            "PartNumber": 1,
            "ContentLength": len(part),
            "ChecksumSHA256": checksum,
        },
        ExpiresIn=300,
    )
    assert signed_headers(url) == {"content-length", "host", "x-amz-checksum-sha256"}
    header = {"x-amz-checksum-sha256": checksum}

    assert raw("PUT", url, tampered, header)[:2] == (400, "BadDigest")
    assert raw("PUT", url, part)[:2] == (403, "SignatureDoesNotMatch")
    assert raw("PUT", url, part[:-1], header)[:2] == (403, "SignatureDoesNotMatch")
    assert client.list_parts(Bucket=BUCKET, Key=key, UploadId=upload_id).get("Parts", []) == []

    status, _, _ = raw("PUT", url, part, header)
    assert status == 200
    parts = client.list_parts(Bucket=BUCKET, Key=key, UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, len(part))]
    client.complete_multipart_upload(
        Bucket=BUCKET,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": parts[0]["ETag"], "ChecksumSHA256": checksum}]},
    )
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == part


# -- the process -----------------------------------------------------------------------------------


def _listening_sockets(pid: int) -> list[tuple[str, str, int]]:
    """(family, hex address, port) of every TCP socket in LISTEN state owned by `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with_target = os.readlink(fd) if fd.is_symlink() else ""
        if with_target.startswith("socket:["):
            inodes.add(with_target[len("socket:[") : -1])
    found = []
    for family in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{family}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.append((family, address, int(port, 16)))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_listens_only_on_loopback_and_only_on_its_ports(weed: SeaweedFS) -> None:
    assert weed.pid is not None
    # start() returns once S3 is ready; the admin server binds a moment later.
    deadline = time.monotonic() + 10
    while {port for _, _, port in _listening_sockets(weed.pid)} != set(weed.ports.values()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    listening = _listening_sockets(weed.pid)
    assert {(family, address) for family, address, _ in listening} == {("tcp", "0100007F")}  # 127.0.0.1
    assert {port for _, _, port in listening} == set(weed.ports.values())
    assert weed.endpoint == f"http://127.0.0.1:{weed.s3_port}"


def test_kill_restart_and_a_second_run_keep_objects(make_weed: Callable[..., SeaweedFS]) -> None:
    first = make_weed("store")
    first.start()
    first.ensure_bucket(BUCKET)
    body = os.urandom(10_000)
    first.client().put_object(Bucket=BUCKET, Key="durable", Body=body)
    endpoint, ports, pid = first.endpoint, dict(first.ports), first.pid

    first.kill()
    assert not first.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", first.s3_port), timeout=2).close()

    first.restart()
    assert first.running and first.pid != pid
    assert (first.endpoint, dict(first.ports)) == (endpoint, ports)
    assert first.client().get_object(Bucket=BUCKET, Key="durable")["Body"].read() == body

    first.stop()
    assert not first.running
    # A new launcher on the same data directory, with credentials from the same file and fresh ports.
    with make_weed("store") as second:
        assert second.client().get_object(Bucket=BUCKET, Key="durable")["Body"].read() == body
        second_pid = second.pid
    assert not second.running
    assert second_pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(second_pid, 0)
    assert second.credentials.secret_access_key not in second.log_path.read_text()


def test_two_instances_run_side_by_side(make_weed: Callable[..., SeaweedFS]) -> None:
    one, two = make_weed("one"), make_weed("two")
    one.start()
    two.start()
    assert set(one.ports.values()).isdisjoint(two.ports.values())

    one.ensure_bucket("only-in-one")
    one.client().put_object(Bucket="only-in-one", Key="k", Body=b"one")
    assert "only-in-one" not in {b["Name"] for b in two.client().list_buckets()["Buckets"]}

    # Each refuses the other's keys.
    stranger = s3_client(two.endpoint, one.credentials.access_key_id, one.credentials.secret_access_key)
    with pytest.raises(ClientError) as caught:
        stranger.list_buckets()
    assert error_of(caught.value) == (403, "InvalidAccessKeyId")


def test_logs_go_to_its_own_log_file_and_leave_nothing_in_the_temporary_directory(
    make_weed: Callable[..., SeaweedFS], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # weed's logger writes a file per start (and per severity) into $TMPDIR unless told not to:
    # a test suite starting hundreds of stores would leave thousands there.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    instance = make_weed("quiet")
    instance.start()
    instance.ensure_bucket("logged")
    instance.stop()
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("weed")]
    # What it logged is in the instance's own log file instead (glog's "I1206 08:20:00.45 ..." lines).
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d", instance.log_path.read_text(), re.MULTILINE)


def test_a_taken_port_fails_start_with_the_log_tail(make_weed: Callable[..., SeaweedFS]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        instance = make_weed("blocked", s3_port=port)
        with pytest.raises(SeaweedStartError) as caught:
            instance.start(timeout=20)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert "exited" in message and f"{port}" in message and "not available" in message
    assert instance.credentials.secret_access_key not in message
    assert not instance.running


# -- keys for the internal ports -------------------------------------------------------------------


def _jwt_keys(instance: SeaweedFS) -> dict[str, str]:
    config = tomllib.loads((instance.data_dir / "security.toml").read_text())
    jwt = config["jwt"]
    return {
        "volume write": jwt["signing"]["key"],
        "volume read": jwt["signing"]["read"]["key"],
        "filer write": jwt["filer_signing"]["key"],
        "filer read": jwt["filer_signing"]["read"]["key"],
    }


def test_internal_keys_are_private_new_at_each_start_and_never_logged(
    make_weed: Callable[..., SeaweedFS],
) -> None:
    instance = make_weed("keys")
    instance.start()
    instance.ensure_bucket(BUCKET)
    body = os.urandom(5000)
    instance.client().put_object(Bucket=BUCKET, Key="kept", Body=body)

    assert stat.S_IMODE(instance.data_dir.stat().st_mode) == 0o700
    for name in ("security.toml", "grpc-key.pem", "s3-identities.json"):
        assert stat.S_IMODE((instance.data_dir / name).stat().st_mode) == 0o600, name
    first = _jwt_keys(instance)
    assert all(len(bytes.fromhex(key)) == 32 for key in first.values())
    assert len(set(first.values())) == 4
    first_tls_key = (instance.data_dir / "grpc-key.pem").read_bytes()

    # A crash and a restart: fresh keys and certificate, and the objects written before are served.
    instance.kill()
    instance.restart()
    second = _jwt_keys(instance)
    assert set(first.values()).isdisjoint(second.values())
    assert (instance.data_dir / "grpc-key.pem").read_bytes() != first_tls_key
    assert instance.client().get_object(Bucket=BUCKET, Key="kept")["Body"].read() == body

    log = instance.log_path.read_text()
    assert "-config_dir=" in log and "-disableHttp" in log
    for key in (*first.values(), *second.values()):
        assert key not in log


def test_a_grpc_port_left_without_tls_fails_start(
    make_weed: Callable[..., SeaweedFS], monkeypatch: pytest.MonkeyPatch
) -> None:
    """weed serves plaintext gRPC for any service whose certificate it does not find; start() refuses."""
    without_s3 = tuple(name for name in seaweed_module._GRPC_COMPONENTS if name != "s3")
    monkeypatch.setattr(seaweed_module, "_GRPC_COMPONENTS", without_s3)
    instance = make_weed("open")
    with pytest.raises(SeaweedStartError) as caught:
        instance.start()
    assert f"the s3 gRPC port {instance.ports['s3.grpc']} accepts clients without a certificate" in str(
        caught.value
    )
    assert not instance.running

"""A local user goes around the S3 port of the embedded storage (issue 12, item 5).

`weed mini` listens on loopback with a master, a volume server and a filer besides S3, and every
local user can reach loopback. Each test attacks one of those ports without keys, as such a user
could, and checks the refusal and that the victim object, read back through authenticated S3, is
unchanged. Before the fix every one of these attacks worked: the filer took PUT, DELETE and
listings, the volume server stored bytes under any file id, the master handed out file ids (and
deleted whole collections), and `weed filer.copy` overwrote an object over plain gRPC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from exchange.dev.seaweed import S3Credentials, SeaweedFS, find_weed
from tests.conftest import BUCKET

# What a plaintext gRPC server answers an HTTP/2 client preface with: a SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2_SETTINGS = 4
SERVICES = ("master", "volume", "filer", "s3", "admin")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """Started as the suite's session fixture and scripts/run start it; its own, as tests attack it."""
    instance = SeaweedFS(tmp_path_factory.mktemp("attacked"), credentials=S3Credentials.generate())
    instance.start()
    try:
        instance.ensure_bucket(BUCKET)
        yield instance
    finally:
        instance.stop()


def request(
    store: SeaweedFS,
    service: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One plain HTTP request to one of weed's ports, with no credentials of any kind."""
    conn = http.client.HTTPConnection(store.host, store.ports[service], timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def victim(store: SeaweedFS, key: str) -> bytes:
    body = os.urandom(3000)
    store.client().put_object(Bucket=BUCKET, Key=key, Body=body)
    return body


def stored(store: SeaweedFS, key: str) -> bytes | None:
    """The object's bytes as authenticated S3 returns them, None when there is no such key."""
    try:
        return store.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchKey":
            return None
        raise


def bucket_volume(store: SeaweedFS) -> int:
    """A volume holding the bucket's objects, from the volume server's /status (open to all)."""
    status, body = request(store, "volume", "GET", "/status")
    assert status == 200
    ids = [v["Id"] for v in json.loads(body)["Volumes"] if v["Collection"] == BUCKET]
    assert ids, "the bucket has no volume yet"
    return int(ids[0])


def foreign_jwt(fid: str) -> str:
    """A well-formed HS256 token for `fid`, signed with a key weed does not have."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"fid": fid, "exp": int(time.time()) + 600}).encode())
    signature = hmac.new(secrets.token_bytes(32), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


def attacker(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The weed binary run as another local user would: no security.toml, no WEED_* settings."""
    home = tmp_path / "attacker"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "AWS_"))} | {"HOME": str(home)}
    return subprocess.run(
        [str(find_weed()), *args], cwd=home, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def answers_plaintext_grpc(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(H2_PREFACE)
        try:
            answer = conn.recv(9)
        except ConnectionResetError:
            return False
    return len(answer) >= 4 and answer[3] == H2_SETTINGS


# -- the filer -------------------------------------------------------------------------------------


def test_filer_refuses_writes_overwrites_deletes_and_listings(store: SeaweedFS) -> None:
    body = victim(store, "filer/victim")
    path = f"/buckets/{BUCKET}/filer/victim"

    # The filer's HTTP API is not served at all: every path answers 404, whatever the method.
    assert request(store, "filer", "PUT", f"/buckets/{BUCKET}/filer/planted", b"planted")[0] == 404
    assert request(store, "filer", "PUT", path, b"overwritten")[0] == 404
    form = (
        b"--x\r\nContent-Disposition: form-data; name=file; filename=victim\r\n\r\noverwritten\r\n--x--\r\n"
    )
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    assert request(store, "filer", "POST", f"/buckets/{BUCKET}/filer/", form, multipart)[0] == 404
    assert request(store, "filer", "DELETE", path)[0] == 404
    listing = {"Accept": "application/json"}
    assert request(store, "filer", "GET", f"/buckets/{BUCKET}/filer/", headers=listing)[0] == 404
    assert request(store, "filer", "GET", "/", headers=listing)[0] == 404
    assert request(store, "filer", "GET", path)[0] == 404

    assert stored(store, "filer/victim") == body
    assert stored(store, "filer/planted") is None


# -- the volume server -----------------------------------------------------------------------------


def test_volume_server_refuses_requests_without_a_valid_token(store: SeaweedFS) -> None:
    body = victim(store, "volume/victim")
    # A file id nobody assigned, in a volume that exists: needle id and cookie chosen by the attacker.
    fid = f"{bucket_volume(store)},{secrets.token_hex(8)}{secrets.token_hex(4)}"

    assert request(store, "volume", "PUT", f"/{fid}", b"planted")[0] == 401
    assert request(store, "volume", "POST", f"/{fid}", b"planted")[0] == 401
    assert request(store, "volume", "GET", f"/{fid}")[0] == 401
    assert request(store, "volume", "DELETE", f"/{fid}")[0] == 401
    # A token is checked against weed's own key, not merely required.
    forged = {"Authorization": f"Bearer {foreign_jwt(fid)}"}
    assert request(store, "volume", "PUT", f"/{fid}", b"planted", forged)[0] == 401
    assert request(store, "volume", "DELETE", f"/{fid}", headers=forged)[0] == 401

    assert stored(store, "volume/victim") == body


# -- the master ------------------------------------------------------------------------------------


def test_master_serves_no_api_to_assign_grow_or_delete(store: SeaweedFS) -> None:
    body = victim(store, "master/victim")

    for path in (
        "/dir/assign",  # a file id and, with keys configured, the token to write it
        f"/dir/lookup?volumeId={bucket_volume(store)}",  # with a fileId, a token to overwrite it
        "/vol/grow?count=1",
        "/vol/vacuum",
        "/submit",
        f"/col/delete?collection={BUCKET}",  # every volume of the bucket
    ):
        assert request(store, "master", "GET", path)[0] == 404, path

    assert stored(store, "master/victim") == body


# -- gRPC ------------------------------------------------------------------------------------------


def test_grpc_ports_refuse_clients_without_a_certificate(store: SeaweedFS, tmp_path: Path) -> None:
    body = victim(store, "grpc/victim")
    local = tmp_path / "victim"
    local.write_bytes(b"overwritten over gRPC")

    # weed's own tools, as an attacker would use them: filer.copy writes through the filer's
    # gRPC API, upload assigns a file id through the master's.
    filer_url = f"http://{store.host}:{store.ports['filer']}/buckets/{BUCKET}/grpc/"
    copy = attacker(tmp_path, "filer.copy", str(local), filer_url)
    assert copy.returncode != 0, copy.stdout + copy.stderr
    master = f"{store.host}:{store.ports['master']}.{store.ports['master.grpc']}"
    upload = attacker(tmp_path, "upload", f"-master={master}", str(local))
    assert upload.returncode != 0, upload.stdout + upload.stderr
    assert "fid" not in upload.stdout

    # And no gRPC port speaks plaintext HTTP/2 to anyone.
    for name in SERVICES:
        assert not answers_plaintext_grpc(store.host, store.ports[f"{name}.grpc"]), name

    assert stored(store, "grpc/victim") == body

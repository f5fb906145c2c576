"""exchange.dev.seaweedcluster against real weed processes, and the service's S3 identity on both stores.

One cluster for the module (a master, two volume servers, a filer, an S3 gateway): it starts with
the same locks as `weed mini`, keeps every object on both volume servers, serves them with either
server gone, and restarts on its data. The least-privilege identity the service is given is
checked on both the cluster and the session's `weed mini`; so is rotating its key without a
restart. The service's whole artifact story (upload, download, abandoned-upload sweep) on the
cluster reuses the tests of tests/artifacts/test_transfers.py (see the end of this module).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from exchange.dev.seaweed import SERVICE_ACTIONS, S3Credentials, SeaweedFS, _http_get
from exchange.dev.seaweedcluster import REPLICATION, SeaweedCluster
from exchange.errors import StorageUnavailable
from exchange.storage import Storage
from tests.artifacts.conftest import SMALL_PART_BYTES

# The service's whole artifact story, collected here again with this module's `stack` fixture,
# which serves from the cluster: upload, download and the audit trail; an upload abandoned and
# swept (aborted, its parts removed) with the service's own least-privilege keys.
from tests.artifacts.test_transfers import (  # noqa: F401 (collected by pytest)
    test_abandoned_upload_is_aborted_and_its_parts_removed,
    test_audit_events_for_the_whole_story,
)
from tests.conftest import BUCKET, FakeClock, Stack, start_stack
from tests.test_seaweed import _listening_sockets, error_of, raw

#: A bucket the service's identity must not reach.
OTHER_BUCKET = "someone-elses"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    instance = SeaweedCluster(
        tmp_path_factory.mktemp("cluster"),
        credentials=S3Credentials.generate(),
        service_credentials=S3Credentials.generate(),
        bucket=BUCKET,
    )
    try:
        instance.start()
        instance.ensure_bucket()
        instance.ensure_bucket(OTHER_BUCKET)
        yield instance
    finally:
        instance.stop()


@pytest.fixture(params=["mini", "cluster"])
def store(request: pytest.FixtureRequest, seaweed: SeaweedFS) -> SeaweedFS | SeaweedCluster:
    """Each store the service runs on in development, with OTHER_BUCKET made by the operator."""
    if request.param == "mini":
        seaweed.ensure_bucket(OTHER_BUCKET)
        return seaweed
    return request.getfixturevalue("cluster")  # type: ignore[no-any-return]


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, cluster: SeaweedCluster, clock: FakeClock
) -> AsyncIterator[Stack]:
    """The service served from the cluster, with the service's keys (tests.conftest.make_settings)."""
    s = await start_stack(tmp_path, database_url, cluster, clock, upload_min_part_bytes=SMALL_PART_BYTES)  # type: ignore[arg-type]
    yield s
    await s.server.close()


def volume_status(cluster: SeaweedCluster, index: int) -> dict[int, tuple[int, int]]:
    """{volume id: (file count, size)} of the service bucket's volumes, from a volume server's /status."""
    answer = _http_get(cluster.host, cluster.ports[f"volume{index}"], "/status")
    assert answer is not None and answer[0] == 200
    volumes = json.loads(answer[1])["Volumes"] or []  # null before the first volume grows
    return {v["Id"]: (v["FileCount"], v["Size"]) for v in volumes if v["Collection"] == BUCKET}


def refused(call: Any) -> tuple[int, str]:
    with pytest.raises(ClientError) as caught:
        call()
    return error_of(caught.value)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


# -- the cluster -----------------------------------------------------------------------------------


def test_starts_locked_down_on_loopback(cluster: SeaweedCluster) -> None:
    assert cluster.running
    assert raw("GET", f"{cluster.endpoint}/")[0] == 403
    assert raw("GET", f"{cluster.endpoint}/{BUCKET}/anything")[0] == 403
    assert stat.S_IMODE(cluster.data_dir.stat().st_mode) == 0o700
    for name in ("security.toml", "grpc-key.pem", "s3-identities.json"):
        assert stat.S_IMODE((cluster.data_dir / name).stat().st_mode) == 0o600, name
    pids = cluster.pids
    assert set(pids) == {"master", "volume0", "volume1", "filer", "s3"}
    listening: set[tuple[str, str]] = set()
    ports: set[int] = set()
    for name, pid in pids.items():
        assert os.getpgid(pid) == pid, f"{name} is not in a process group of its own"
        for family, address, port in _listening_sockets(pid):
            listening.add((family, address))
            ports.add(port)
    assert listening == {("tcp", "0100007F")}  # 127.0.0.1 only
    assert ports <= set(cluster.ports.values())
    master_log = cluster.log_path("master").read_text()
    assert f"-defaultReplication={REPLICATION}" in master_log and "-disableHttp" in master_log


def test_every_object_is_on_both_volume_servers(cluster: SeaweedCluster) -> None:
    before = [volume_status(cluster, i) for i in (0, 1)]
    body = os.urandom(20_000)  # random: weed would compress a repetitive body
    cluster.service_client().put_object(Bucket=BUCKET, Key="replicated", Body=body)
    after = [volume_status(cluster, i) for i in (0, 1)]
    assert after[0] == after[1]  # the same volumes, with the same needles, on both servers
    # Exactly one volume gained exactly one needle, at least as large as the body, on each server.
    gained = {vid: (n - before[0].get(vid, (0, 0))[0], size) for vid, (n, size) in after[0].items()}
    [(added, size)] = [counts for counts in gained.values() if counts[0]]
    assert added == 1 and size >= len(body)


@pytest.mark.parametrize("lost", [0, 1])
def test_objects_stay_readable_with_a_volume_server_gone(cluster: SeaweedCluster, lost: int) -> None:
    body = os.urandom(10_000)
    key = f"survives-{lost}"
    cluster.service_client().put_object(Bucket=BUCKET, Key=key, Body=body)
    cluster.kill_volume(lost)
    try:
        assert not cluster.running
        assert cluster.service_client().get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
    finally:
        cluster.start_volume(lost)
    assert cluster.running
    assert cluster.client().get_object(Bucket=BUCKET, Key=key)["Body"].read() == body


def _as_in_a_terminal() -> None:
    # Ctrl-C as a person at a terminal sends it: SIGINT at its default, whatever this test run
    # inherited (a suite started in the background by a non-interactive shell ignores SIGINT,
    # and Python then leaves it ignored in its children).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_runs_alone_until_interrupted(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "exchange.dev.seaweedcluster", str(tmp_path / "alone")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_as_in_a_terminal,  # a signal disposition, set before exec
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line or not line:
                break
        text = "".join(lines)
        assert "SeaweedFS cluster: S3 at http://127.0.0.1:" in text, text
        endpoint = text.split("S3 at ", 1)[1].split(",", 1)[0]
        assert raw("GET", f"{endpoint}/")[0] == 403
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            # SIGTERM stops the cluster's processes too (each runs in a session of its own, so a
            # SIGKILL here would leave them running after the test).
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    for name in ("s3-credentials.json", "s3-service-credentials.json"):
        assert stat.S_IMODE((tmp_path / "alone" / name).stat().st_mode) == 0o600


# -- the service's identity, on both stores --------------------------------------------------------


def test_service_identity_is_scoped_to_its_bucket_in_the_identity_file(
    store: SeaweedFS | SeaweedCluster,
) -> None:
    identities = {i["name"]: i for i in json.loads(store.identities_path.read_text())["identities"]}
    assert identities["exchange"]["actions"] == [f"{a}:{BUCKET}" for a in SERVICE_ACTIONS]
    assert [c["accessKey"] for c in identities["exchange"]["credentials"]] == [
        store.service_credentials.access_key_id
    ]
    assert "Admin" in identities["admin"]["actions"]


def test_service_identity_reads_and_writes_objects_in_its_bucket(store: SeaweedFS | SeaweedCluster) -> None:
    service = store.service_client()
    service.head_bucket(Bucket=BUCKET)
    service.put_object(Bucket=BUCKET, Key="scoped/own", Body=b"mine")
    assert service.get_object(Bucket=BUCKET, Key="scoped/own")["Body"].read() == b"mine"
    assert service.head_object(Bucket=BUCKET, Key="scoped/own")["ContentLength"] == 4
    upload = service.create_multipart_upload(Bucket=BUCKET, Key="scoped/parts")["UploadId"]
    service.list_parts(Bucket=BUCKET, Key="scoped/parts", UploadId=upload)
    service.abort_multipart_upload(Bucket=BUCKET, Key="scoped/parts", UploadId=upload)
    service.delete_object(Bucket=BUCKET, Key="scoped/own")
    assert refused(lambda: service.head_object(Bucket=BUCKET, Key="scoped/own"))[0] == 404


def test_service_identity_cannot_create_or_delete_buckets(store: SeaweedFS | SeaweedCluster) -> None:
    service = store.service_client()
    assert refused(lambda: service.create_bucket(Bucket="made-by-the-service")) == (403, "AccessDenied")
    assert refused(lambda: service.delete_bucket(Bucket=OTHER_BUCKET)) == (403, "AccessDenied")
    assert refused(lambda: service.delete_bucket(Bucket=BUCKET)) == (403, "AccessDenied")
    assert service.list_buckets()["Buckets"] == []  # answered, but it sees none
    names = {b["Name"] for b in store.client().list_buckets()["Buckets"]}
    assert {BUCKET, OTHER_BUCKET} <= names and "made-by-the-service" not in names


def test_service_identity_cannot_touch_another_bucket(store: SeaweedFS | SeaweedCluster) -> None:
    store.client().put_object(Bucket=OTHER_BUCKET, Key="theirs", Body=b"not yours")
    service = store.service_client()
    denied = (403, "AccessDenied")
    assert refused(lambda: service.get_object(Bucket=OTHER_BUCKET, Key="theirs")) == denied
    assert refused(lambda: service.put_object(Bucket=OTHER_BUCKET, Key="mine", Body=b"x")) == denied
    assert refused(lambda: service.delete_object(Bucket=OTHER_BUCKET, Key="theirs")) == denied
    assert refused(lambda: service.list_objects_v2(Bucket=OTHER_BUCKET)) == denied
    assert refused(lambda: service.create_multipart_upload(Bucket=OTHER_BUCKET, Key="m")) == denied
    assert store.client().get_object(Bucket=OTHER_BUCKET, Key="theirs")["Body"].read() == b"not yours"


def test_service_identity_cannot_list_or_configure_its_own_bucket(store: SeaweedFS | SeaweedCluster) -> None:
    service = store.service_client()
    denied = (403, "AccessDenied")
    assert refused(lambda: service.list_objects_v2(Bucket=BUCKET)) == denied
    assert (
        refused(lambda: service.put_object_tagging(Bucket=BUCKET, Key="k", Tagging={"TagSet": []})) == denied
    )
    assert refused(lambda: service.get_bucket_encryption(Bucket=BUCKET)) == denied


# -- rotating the service's key without a restart --------------------------------------------------


def storage_with(store: SeaweedFS | SeaweedCluster, keys: S3Credentials) -> Storage:
    return Storage(
        endpoint=store.endpoint,
        region="us-east-1",
        bucket=BUCKET,
        access_key_id=keys.access_key_id,
        secret_access_key=keys.secret_access_key,
        timeout_s=3,
    )


@pytest.fixture(params=["mini", "cluster"])
def rotating(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SeaweedFS | SeaweedCluster]:
    """A store of each kind of its own, since rotating changes the keys every other test uses."""
    if request.param == "cluster":
        # The module's cluster, its original key put back afterwards.
        cluster: SeaweedCluster = request.getfixturevalue("cluster")
        original = cluster.service_credentials
        yield cluster
        cluster.set_service_credentials(original)
        return
    own = SeaweedFS(
        tmp_path / "weed",
        credentials=S3Credentials.generate(),
        service_credentials=S3Credentials.generate(),
        bucket=BUCKET,
    )
    with own:
        own.ensure_bucket()
        yield own


async def test_service_key_rotation_without_downtime(rotating: SeaweedFS | SeaweedCluster) -> None:
    old = rotating.service_credentials
    new = S3Credentials.generate()
    rotating.client().put_object(Bucket=BUCKET, Key="rotation/kept", Body=b"kept")
    old_storage, new_storage = storage_with(rotating, old), storage_with(rotating, new)
    try:
        old_url = old_storage.presign_get("rotation/kept", ttl_s=600)
        assert http_status(old_url) == 200
        with pytest.raises(StorageUnavailable):  # not yet known to the store
            await new_storage.head("rotation/kept")

        # Step 1: the identity holds both keys. Replicas still on the old key and those already
        # restarted with the new one both work, and URLs handed out before stay good.
        rotating.set_service_credentials(old, new)
        assert rotating.service_credentials == new
        assert (await new_storage.head("rotation/kept")) is not None
        key = "rotation/new"
        upload_id = await new_storage.create_multipart(key)
        await new_storage.abort_multipart(key, upload_id)
        assert (await old_storage.head("rotation/kept")) is not None
        assert http_status(old_url) == 200
        assert http_status(new_storage.presign_get("rotation/kept", ttl_s=600)) == 200

        # Step 2: every replica runs with the new key; the old one is removed and refused at once,
        # as are the URLs it signed.
        rotating.set_service_credentials(new)
        assert (await new_storage.head("rotation/kept")) is not None
        with pytest.raises(StorageUnavailable):
            await old_storage.head("rotation/kept")
        assert http_status(old_url) == 403
        assert http_status(new_storage.presign_get("rotation/kept", ttl_s=600)) == 200
        identities = json.loads(rotating.identities_path.read_text())["identities"]
        service_keys = [
            c["accessKey"] for i in identities if i["name"] == "exchange" for c in i["credentials"]
        ]
        assert service_keys == [new.access_key_id]
    finally:
        await old_storage.close()
        await new_storage.close()


def test_rotation_refuses_degenerate_key_sets(cluster: SeaweedCluster) -> None:
    with pytest.raises(ValueError, match="at least one"):
        cluster.set_service_credentials()
    with pytest.raises(ValueError, match="own access key id"):
        cluster.set_service_credentials(cluster.credentials)
    assert cluster.service_client().head_bucket(Bucket=BUCKET)


# -- restart (last: it moves the cluster's keys and certificates) -----------------------------------


def test_restart_keeps_objects_and_comes_back_locked(cluster: SeaweedCluster) -> None:
    body = os.urandom(30_000)
    cluster.service_client().put_object(Bucket=BUCKET, Key="durable", Body=body)
    endpoint = cluster.endpoint
    cluster.kill()
    assert not cluster.pids
    cluster.restart()
    assert cluster.endpoint == endpoint
    assert raw("GET", f"{endpoint}/{BUCKET}/durable")[0] == 403
    assert cluster.service_client().get_object(Bucket=BUCKET, Key="durable")["Body"].read() == body

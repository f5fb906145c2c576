"""Deleting an artifact (issue 18): objects removed, records and events kept, a tombstone shown,
links and downloads dead — through the real CLI against `exchange serve`, and, for a store that
fails mid-delete, in-process behind a proxy that resets storage's connections."""

from __future__ import annotations

import json
from pathlib import Path

from minio import Minio
from minio.error import S3Error

from exchange.api.artifacts import sweep_once
from exchange.client import artifacts as api
from exchange.client.transfer import upload
from exchange.errors import Conflict
from tests.artifacts.conftest import bucket, write  # noqa: F401 - the fixture
from tests.conftest import BUCKET, Served, Stack
from tests.faults.test_storage_proxy import FaultyProxy, proxied  # noqa: F401 - the fixture


def _stored(store: Minio, keys: list[str]) -> list[bool]:
    out = []
    for key in keys:
        try:
            store.stat_object(BUCKET, key)
            out.append(True)
        except S3Error:
            out.append(False)
    return out


def test_delete_through_the_cli(served: Served, tmp_path: Path, bucket: Minio) -> None:  # noqa: F811
    dev, other, tess = tmp_path / "dev.json", tmp_path / "other.json", tmp_path / "tess.json"
    served.enrol("developer", "del-lab", "del-dev", dev)
    served.enrol("developer", "del-other", "del-other-dev", other)
    served.enrol("tester", "del-aisi", "del-tess", tess)
    write(tmp_path / "src" / "a.bin", 40_000, seed=5)
    write(tmp_path / "src" / "b.bin", 20_000, seed=6)
    up = served.run("upload", str(tmp_path / "src"), "--name", "to-delete", "--to", "del-tess", identity=dev)
    assert up.returncode == 0, up.stderr
    artifact = up.stdout.strip()
    link = served.run("link", "create", artifact, "--for", "del-tess", identity=dev).stdout.strip()
    detail = json.loads(served.run("--json", "artifacts", "show", artifact, identity=dev).stdout)
    keys = [f["object"] for f in detail["files"]]
    assert _stored(bucket, keys) == [True, True]

    # Who may not: the tester (4), another organisation's developer (sees nothing: 5); without
    # --yes off a terminal: a usage error (2). Nothing changes.
    assert served.run("artifacts", "delete", artifact, "--yes", identity=tess).returncode == 4
    assert served.run("artifacts", "delete", artifact, "--yes", identity=other).returncode == 5
    unconfirmed = served.run("artifacts", "delete", artifact, identity=dev)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    assert (
        json.loads(served.run("--json", "artifacts", "show", artifact, identity=dev).stdout)["status"]
        == "complete"
    )
    assert _stored(bucket, keys) == [True, True]

    # The reason is the deleter's own text, shown to others: a newline, an escape and a command in it.
    reason = "superseded by v2\n\x1b[2J$(touch PWNED)"
    gone = served.run("artifacts", "delete", artifact, "--yes", "--reason", reason, identity=dev)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.startswith(f"deleted {artifact} (to-delete)")
    assert _stored(bucket, keys) == [False, False]

    # The tombstone: records kept, status deleted, who, when, why.
    shown = served.run("artifacts", "show", artifact, identity=dev)
    assert (
        "DELETED:" in shown.stdout
        and "by del-dev: superseded by v2\\x0a\\x1b[2J$(touch PWNED)" in shown.stdout
    )
    assert "\x1b" not in shown.stdout and not (tmp_path / "PWNED").exists()
    assert "a.bin" in shown.stdout and "b.bin" in shown.stdout
    tomb = json.loads(served.run("--json", "artifacts", "show", artifact, identity=dev).stdout)
    assert tomb["status"] == "deleted" and tomb["deleted"]["storage_purged"] is True
    assert tomb["deleted"]["reason"] == reason  # kept exactly; only its display is escaped
    listed = json.loads(served.run("--json", "artifacts", "ls", "--status", "deleted", identity=dev).stdout)
    assert [a["id"] for a in listed] == [artifact]

    # Dead: the link, the download by id, a new grant, a new link; deleting again.
    dead = served.run("download", link, "-o", str(tmp_path / "l"), identity=tess, server=False)
    assert dead.returncode == 5 and "link-unavailable" in dead.stderr, dead.stderr
    by_id = served.run("download", artifact, "-o", str(tmp_path / "i"), identity=tess)
    assert by_id.returncode == 6 and "artifact-deleted" in by_id.stderr, by_id.stderr
    assert not (tmp_path / "l").exists() or not any((tmp_path / "l").iterdir())
    regrant = served.run("grant", artifact, "del-tess", identity=dev)
    assert regrant.returncode == 6 and "artifact-deleted" in regrant.stderr, regrant.stderr
    relink = served.run("link", "create", artifact, "--for", "del-tess", identity=dev)
    assert relink.returncode == 6, relink.stderr
    again = served.run("artifacts", "delete", artifact, "--yes", identity=dev)
    assert again.returncode == 6 and "artifact-deleted" in again.stderr

    # The tester's findings about it still come: the bytes it downloaded are still out there.
    body = tmp_path / "finding.md"
    body.write_text("Found before it was deleted.\n")
    finding = served.run(
        "finding",
        "submit",
        artifact,
        "--title",
        "late",
        "--severity",
        "low",
        "--body",
        str(body),
        identity=tess,
    )
    assert finding.returncode == 0, finding.stderr

    vkey = served.run("audit", "vkey").stdout.strip()
    state = ("--vkey", vkey, "--state", str(tmp_path / "st"))

    def query(*filters: str) -> list[tuple[str, str]]:
        out = served.run(
            "--json", "audit", "query", *filters, "--format", "jsonl", *state, identity=served.admin
        )
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line)["event"] for line in out.stdout.splitlines()]
        return [(e["action"], e["outcome"].get("reason", e["outcome"]["result"])) for e in rows]

    actions = query("--resource", f"artifact:{artifact}")
    assert actions.index(("artifact.delete", "allowed")) < actions.index(("artifact.purge", "allowed"))
    refused = sorted(r for _, r in query("--action", "artifact.delete", "--outcome", "denied"))
    assert refused == ["artifact-deleted", "not-found", "not-owner"], refused


async def test_a_store_failing_mid_delete_leaves_a_deleted_artifact_purged_later(
    proxied: tuple[Stack, FaultyProxy],  # noqa: F811
    tmp_path: Path,
    bucket: Minio,  # noqa: F811
) -> None:
    stack, proxy = proxied
    dev = await stack.principal("dev", "developer")
    write(tmp_path / "w.bin", 30_000, seed=7)
    async with stack.client(dev) as c:
        artifact = await upload(c, tmp_path / "w.bin")
        keys = [f["object"] for f in (await api.get(c, artifact))["files"]]
        assert _stored(bucket, keys) == [True]

        proxy.set_mode("reset")
        tomb = await api.delete(c, artifact, reason="leak")
        assert tomb["status"] == "deleted" and tomb["deleted"]["storage_purged"] is False
        assert _stored(bucket, keys) == [True]  # the store refused; the artifact is deleted anyway
        actions = [e["action"] for e in await stack.events()]
        assert actions.count("artifact.delete") == 1 and "artifact.purge" not in actions

        proxy.set_mode("pass")
        assert artifact in await sweep_once(stack.app)
        assert _stored(bucket, keys) == [False]
        assert (await api.get(c, artifact))["deleted"]["storage_purged"] is True
        try:
            await api.delete(c, artifact)
            raise AssertionError("a purged artifact was deleted twice")
        except Conflict as exc:
            assert exc.code == "artifact-deleted"
    events = [e for e in await stack.events() if e["action"] == "artifact.purge"]
    assert (
        len(events) == 1 and events[0]["actor"]["type"] == "system" and events[0]["details"] == {"objects": 1}
    )
    assert await sweep_once(stack.app) == []  # nothing left to do

"""Findings end to end: encrypted on the reporter's machine, tracked through their lifecycle.

Every test runs on SQLite and PostgreSQL, with the real SeaweedFS, through the real client.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
from pathlib import Path

import pytest

from exchange.client import Client, links
from exchange.client import artifacts as artifacts_api
from exchange.client import findings as api
from exchange.client._upload import Destination
from exchange.client.transfer import upload
from exchange.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ValidationError,
)
from exchange.format import age
from tests.artifacts.conftest import write
from tests.conftest import FakeClock, Stack
from tests.findings.conftest import BODY, BODY_MAX_BYTES, World, world


async def submit(stack: Stack, w: World, tmp_path: Path, **options: object) -> dict[str, object]:
    log = tmp_path / "attach" / "session.log"
    write(log, 70_000, seed=12)
    poc = tmp_path / "attach" / "poc.py"
    poc.write_bytes(b"print('proof of concept')\n")
    args: dict[str, object] = {
        "title": "Exploit code on request",
        "severity": "high",
        "category": "safeguard bypass",
        "body": BODY,
        "attachments": [log, poc],
    } | options
    async with stack.client(w.tess) as c:
        return await api.submit(c, w.artifact_id, **args)  # type: ignore[arg-type]


async def test_report_read_and_follow_the_lifecycle(fstack: Stack, tmp_path: Path) -> None:
    w = await world(fstack, tmp_path)
    f = await submit(fstack, w, tmp_path)
    assert (f["status"], f["reporter"], f["org"], f["severity"]) == ("submitted", "tess", "lab", "high")

    # Readers: lab's developers, the reporter and the clearinghouse decrypt the body.
    for who in (w.dana, w.dave, w.tess, w.clara):
        async with fstack.client(who) as c:
            body, _ = await api.read(c, await api.get(c, str(f["id"])))
        assert body == BODY.decode()
    # Metadata without a key: the reporter's colleague, an auditor. Nothing for anyone else.
    for who in (w.tom, w.ada):
        async with fstack.client(who) as c:
            assert [x["id"] for x in await api.list_findings(c)] == [f["id"]]
            body, _ = await api.read(c, await api.get(c, str(f["id"])))
        assert body is None
    sam = await fstack.principal("sam", "developer", org="elsewhere")
    async with fstack.client(sam) as c:
        assert await api.list_findings(c) == []
        with pytest.raises(NotFound):
            await api.get(c, str(f["id"]))

    # The lifecycle, with encrypted notes that every reader can open.
    async with fstack.client(w.dana) as c:
        await api.move(c, str(f["id"]), "acknowledged", note="Reproduced on build 7.")
        await api.move(c, str(f["id"]), "validated")
        await api.move(c, str(f["id"]), "remediated", note="Fixed in build 9.")
    async with fstack.client(w.tess) as c:
        await api.move(c, str(f["id"]), "closed", note="Confirmed fixed.")
        reopened = await api.move(c, str(f["id"]), "submitted", note="It is back in build 10.")
        body, notes = await api.read(c, reopened)
    assert [(m["from"], m["to"], m["by"]) for m in reopened["moves"]] == [
        (None, "submitted", "tess"),
        ("submitted", "acknowledged", "dana"),
        ("acknowledged", "validated", "dana"),
        ("validated", "remediated", "dana"),
        ("remediated", "closed", "tess"),
        ("closed", "submitted", "tess"),
    ]
    assert notes == [
        None,
        "Reproduced on build 7.",
        None,
        "Fixed in build 9.",
        "Confirmed fixed.",
        "It is back in build 10.",
    ]
    # The service holds the notes only encrypted.
    stored = [
        bytes(r["note"]) for r in await fstack.db.fetchall("SELECT note FROM finding_moves") if r["note"]
    ]
    assert len(stored) == 4 and not any(b"build" in n for n in stored)

    events = [e for e in await fstack.events() if e["action"].startswith("finding.")]
    assert [e["action"] for e in events if e["outcome"]["result"] == "allowed"] == ["finding.submit"] + [
        "finding.move"
    ] * 5
    submitted = events[0]
    assert submitted["details"]["title"] == "Exploit code on request"
    # The event ties the finding to the reporter's signed manifests of what it sent.
    completes = {
        e["resource"]["id"]: e["resource"]["sha256"]
        for e in await fstack.events()
        if e["action"] == "artifact.complete"
    }
    assert submitted["details"]["body_manifest_sha256"] == completes[f["body"]]
    assert submitted["details"]["attachments_manifest_sha256"] == completes[f["attachments"]]
    assert BODY.decode() not in json.dumps(await fstack.events())

    # The attachments: fetched, decrypted and verified into DIR/FINDING_ID/.
    out = tmp_path / "fetched"
    out.mkdir()
    async with fstack.client(w.dave) as c:
        written = await api.fetch(c, str(f["id"]), out)
        with pytest.raises(Exception) as again:
            await api.fetch(c, str(f["id"]), out)
        assert "exists" in str(again.value)
    assert [p.name for p in written] == ["body.md", "poc.py", "session.log"]
    assert (out / str(f["id"]) / "body.md").read_bytes() == BODY
    assert (out / str(f["id"]) / "poc.py").read_bytes() == b"print('proof of concept')\n"
    assert [p.name for p in out.iterdir()] == [f["id"]]  # no staging directory left behind


async def test_export(fstack: Stack, tmp_path: Path) -> None:
    w = await world(fstack, tmp_path)
    f = await submit(fstack, w, tmp_path, title='=HYPERLINK("http://evil")', attachments=[])
    async with fstack.client(w.dana) as c:
        exported = json.loads(await api.export(c, fmt="json"))
    assert [(x["id"], x["body"], x["title"]) for x in exported] == [(f["id"], BODY.decode(), f["title"])]
    async with fstack.client(w.ada) as c:
        table = list(csv.DictReader(io.StringIO(await api.export(c, artifact_id=w.artifact_id, fmt="csv"))))
    assert [(r["id"], r["body"], r["status"]) for r in table] == [(f["id"], "", "submitted")]
    assert table[0]["title"] == '\'=HYPERLINK("http://evil")'  # shown as text by spreadsheets


async def test_only_granted_artifacts_can_be_reported_on(fstack: Stack, tmp_path: Path) -> None:
    w = await world(fstack, tmp_path)
    before = await fstack.count("artifacts")
    for who in (w.tom, w.ada):  # not granted; an auditor
        async with fstack.client(who) as c:
            with pytest.raises(PermissionDenied) as denied:
                await api.submit(c, w.artifact_id, title="t", severity="low", body=b"x")
            assert denied.value.code == "not-granted"
    async with fstack.client(w.tess) as c:  # an id that does not exist answers the same
        with pytest.raises(PermissionDenied):
            await api.submit(c, "art_00000000000000000000", title="t", severity="low", body=b"x")
    async with fstack.client(w.dana) as c:
        await links.revoke(c, w.artifact_id, "tess")
    async with fstack.client(w.tess) as c:
        with pytest.raises(PermissionDenied):
            await api.submit(c, w.artifact_id, title="t", severity="low", body=b"x")
    assert await fstack.count("artifacts") == before
    assert await fstack.count("findings") == 0
    denials = [e for e in await fstack.events() if e["outcome"].get("reason") == "not-granted"]
    assert len(denials) == 4 and {e["action"] for e in denials} == {"finding.recipients"}


async def test_moves_that_are_not_allowed_change_nothing(fstack: Stack, tmp_path: Path) -> None:
    w = await world(fstack, tmp_path)
    f = await submit(fstack, w, tmp_path, attachments=[])
    fid = str(f["id"])
    async with fstack.client(w.tess) as c:  # the reporter may not acknowledge
        with pytest.raises(Conflict) as role:
            await api.move(c, fid, "acknowledged")
    async with fstack.client(w.dana) as c:
        with pytest.raises(Conflict) as skip:
            await api.move(c, fid, "validated")  # skips acknowledged
        with pytest.raises(Conflict):
            await api.move(c, fid, "closed")  # the reporter's move, and a skip
        with pytest.raises(ValidationError):
            await c.request("POST", f"/v1/findings/{fid}/moves", json_body={"to": "fixed"})
        with pytest.raises(ValidationError):  # a note that is not an age payload
            await c.request(
                "POST", f"/v1/findings/{fid}/moves", json_body={"to": "acknowledged", "note": "aGk="}
            )
    async with fstack.client(w.tom) as c:  # sees it, may not move it
        with pytest.raises(Conflict):
            await api.move(c, fid, "acknowledged")
    assert role.value.code == "move-not-permitted"
    assert skip.value.code == "move-skips-lifecycle"
    assert "acknowledged" in skip.value.message
    async with fstack.client(w.dana) as c:
        now = await api.get(c, fid)
    assert now["status"] == "submitted" and len(now["moves"]) == 1
    assert [e["outcome"]["result"] for e in await fstack.events() if e["action"] == "finding.move"] == [
        "denied"
    ] * 6


async def test_racing_moves_one_wins(fstack: Stack, tmp_path: Path) -> None:
    w = await world(fstack, tmp_path)
    f = await submit(fstack, w, tmp_path, attachments=[])

    async def acknowledge() -> str:
        async with fstack.client(w.dana) as c:
            try:
                await api.move(c, str(f["id"]), "acknowledged")
                return "moved"
            except Conflict as exc:
                return exc.code

    results = await asyncio.gather(*(acknowledge() for _ in range(6)))
    assert results.count("moved") == 1, results
    assert await fstack.count("finding_moves") == 2


async def test_bad_submissions(fstack: Stack, tmp_path: Path) -> None:
    w = await world(fstack, tmp_path)
    before = await fstack.count("artifacts")
    async with fstack.client(w.tess) as c:
        # An oversize body: refused before a byte is uploaded.
        with pytest.raises(PayloadTooLarge) as big:
            await api.submit(c, w.artifact_id, title="t", severity="low", body=b"x" * (BODY_MAX_BYTES + 1))
        assert big.value.code == "body-too-large"
        # An unknown severity.
        with pytest.raises(ValidationError):
            await c.request(
                "POST",
                "/v1/findings",
                json_body={"artifact": w.artifact_id, "body": "art_x", "title": "t", "severity": "urgent"},
            )
        assert await fstack.count("artifacts") == before
        # An attachment whose upload never completed.
        body_id = await _upload_part(c, w, "body", tmp_path, complete=True)
        attachments_id = await _upload_part(c, w, "attachments", tmp_path, complete=False)
        with pytest.raises(Conflict) as unfinished:
            await c.request(
                "POST",
                "/v1/findings",
                json_body={
                    "artifact": w.artifact_id,
                    "body": body_id,
                    "attachments": attachments_id,
                    "title": "t",
                    "severity": "low",
                },
            )
        assert unfinished.value.code == "artifact-uploading"
        # Someone else's upload, or one about another artifact, is not a body.
        with pytest.raises(ValidationError):
            await c.request(
                "POST",
                "/v1/findings",
                json_body={"artifact": w.artifact_id, "body": w.artifact_id, "title": "t", "severity": "low"},
            )
    assert await fstack.count("findings") == 0


async def _upload_part(c: Client, w: World, part: str, tmp_path: Path, *, complete: bool) -> str:
    """A finding's body or attachments upload, through the client's own machinery or started only."""

    async def recipients() -> dict[str, str]:
        return await api.policy_recipients(c, w.artifact_id)

    destination = Destination({"finding": {"on": w.artifact_id, "part": part}}, recipients)
    if complete:
        src = tmp_path / f"upload-{part}" / "body.md"
        src.parent.mkdir()
        src.write_bytes(BODY)
        return await upload(c, src, kind="finding-attachment", destination=destination)
    me = await c.whoami()
    wanted = await recipients() | {me["name"]: me["age_recipient"]}
    key = age.generate_file_key()
    made = await artifacts_api.create(
        c,
        name="unfinished",
        kind="finding-attachment",
        files=[("log.txt", 10, os.urandom(16))],
        headers={n: age.wrap_file_key(key, [r]).to_bytes() for n, r in wanted.items()},
        extra=destination.fields,
    )
    return str(made["id"])


async def test_the_client_refuses_the_wrong_recipients(fstack: Stack, tmp_path: Path) -> None:
    w = await world(fstack, tmp_path)
    await fstack.principal("mallory", "tester", org="elsewhere")
    async with fstack.client(w.tess) as c:
        policy = await api.policy_recipients(c, w.artifact_id)
        assert sorted(policy) == ["clara", "dana", "dave"]
        stranger = (await c.get_principal("mallory"))["age_recipient"]
        wrong = [
            {k: v for k, v in policy.items() if k != "dave"},  # a developer left out
            policy | {"mallory": stranger},  # someone not entitled added
            policy | {"dave": stranger},  # dave's name, someone else's key
        ]
        for recipients in wrong:
            with pytest.raises(ValidationError) as refused:
                await api.submit(
                    c, w.artifact_id, title="t", severity="low", body=BODY, recipients=recipients
                )
            assert refused.value.code == "wrong-recipients"
        # The pinned list, when right, is accepted.
        await api.submit(c, w.artifact_id, title="t", severity="low", body=BODY, recipients=dict(policy))
    assert await fstack.count("findings") == 1
    assert (
        len([e for e in await fstack.events() if e["action"] == "artifact.create"]) == 2
    )  # w's, and one body


async def test_a_developer_who_joins_later_is_given_access(fstack: Stack, tmp_path: Path) -> None:
    w = await world(fstack, tmp_path)
    f = await submit(fstack, w, tmp_path)
    dora = await fstack.principal("dora", "developer", org="lab")
    async with fstack.client(dora) as c:
        body, _ = await api.read(c, await api.get(c, str(f["id"])))
        assert body is None
    async with fstack.client(w.tess) as c:  # the reporter is not the owner's developer
        with pytest.raises(PermissionDenied):
            await api.share(c, str(f["id"]), "dora")
    async with fstack.client(w.dana) as c:
        with pytest.raises(Conflict):
            await api.share(c, str(f["id"]), "tom")  # not a developer of lab
        await api.share(c, str(f["id"]), "dora")
        with pytest.raises(Conflict) as twice:
            await api.share(c, str(f["id"]), "dora")
        assert twice.value.code == "already-shared"
    async with fstack.client(dora) as c:
        body, _ = await api.read(c, await api.get(c, str(f["id"])))
        out = tmp_path / "dora"
        out.mkdir()
        written = await api.fetch(c, str(f["id"]), out)
    assert body == BODY.decode()
    assert [p.name for p in written] == ["body.md", "poc.py", "session.log"]
    (event,) = [
        e
        for e in await fstack.events()
        if e["action"] == "finding.share" and e["outcome"]["result"] == "allowed"
    ]
    assert event["details"] == {"principal": "dora"}


async def test_pages(fstack: Stack, tmp_path: Path, clock: FakeClock) -> None:
    w = await world(fstack, tmp_path)
    made = []
    for n in range(3):
        made.append((await submit(fstack, w, tmp_path / str(n), title=f"finding {n}", attachments=[]))["id"])
        clock.advance(1)
    async with fstack.client(w.dana) as c:
        first = await c.request("GET", "/v1/findings", params={"limit": "2"})
        second = await c.request("GET", "/v1/findings", params={"limit": "2", "cursor": first["next_cursor"]})
        with pytest.raises(ValidationError):
            await c.request("GET", "/v1/findings", params={"cursor": "9" * 19 + ":x"})
        with pytest.raises(ValidationError):
            await c.request("GET", "/v1/findings", params={"severity": "urgent"})
    assert [f["id"] for f in first["items"] + second["items"]] == made[::-1]
    assert second["next_cursor"] is None

"""Upload links: a tester returns files into a developer organisation, bounded and expiring.

Each test runs on SQLite and PostgreSQL, with the real SeaweedFS, through the real client.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from pathlib import Path
from typing import Any

import pytest

from exchange.client import Client
from exchange.client import artifacts as artifacts_api
from exchange.client import uploadlinks as api
from exchange.client.transfer import download, upload
from exchange.errors import Conflict, NotFound, PermissionDenied, ValidationError
from exchange.format import age
from exchange.identity import Identity
from tests.artifacts.conftest import write
from tests.conftest import FakeClock, Stack


class Interrupted(Exception):
    """Raised from a progress callback to stop an upload half-way, as a kill would."""


async def setup(stack: Stack) -> tuple[Identity, Identity, Identity]:
    """`dana` and `dave` develop at lab; `tess` tests at aisi."""
    dana = await stack.principal("dana", "developer", org="lab")
    dave = await stack.principal("dave", "developer", org="lab")
    tess = await stack.principal("tess", "tester", org="aisi")
    return dana, dave, tess


async def make(stack: Stack, dev: Identity, **options: Any) -> tuple[dict[str, Any], str]:
    """An upload link made by `dev`; returns the link and its token."""
    body = {"kind": "report", "max_bytes": 1_000_000} | options
    uploader = body.pop("uploader", "tess")
    async with stack.client(dev) as c:
        made = await api.create(c, uploader, **body)
    public = stack.settings.effective_public_url
    assert made["url"].startswith(public + "/u/exu1_")
    server, token = api.split_upload_link(made["url"])
    assert server == public
    return made, token


async def refusal_reasons(stack: Stack) -> list[str]:
    return [e["outcome"]["reason"] for e in await stack.events() if e["outcome"]["result"] == "denied"]


async def test_tester_returns_files_that_the_developers_can_read(stack: Stack, tmp_path: Path) -> None:
    dana, dave, tess = await setup(stack)
    made, token = await make(stack, dana, note="logs of run 7")
    assert (made["state"], made["uploader"], made["org"], made["artifact"]) == ("active", "tess", "lab", None)
    src = tmp_path / "src" / "findings"
    log = write(src / "run7.log", 70_000, seed=1)
    poc = write(src / "poc" / "exploit.py", 65_536, seed=2)

    async with stack.client(tess) as c:
        view = await api.view(c, token)
        # The upload must be readable by every active developer of lab, and (added by the client)
        # the uploader; nobody else.
        assert sorted(r["name"] for r in view["recipients"]) == ["dana", "dave"]
        artifact_id = await upload(c, src, upload_link=token)
        detail = await artifacts_api.get(c, artifact_id)
    assert (detail["org"], detail["kind"], detail["created_by"], detail["status"]) == (
        "lab",
        "report",
        "tess",
        "complete",
    )
    # Every developer of the receiving organisation decrypts and verifies it, as does the uploader.
    for n, who in enumerate((dana, dave, tess)):
        out = tmp_path / f"out-{n}"
        out.mkdir()
        async with stack.client(who) as c:
            await download(c, artifact_id, out)
        assert (out / "findings" / "run7.log").read_bytes() == log
        assert (out / "findings" / "poc" / "exploit.py").read_bytes() == poc
    # Another tester of aisi, not the uploader, sees nothing of it.
    tom = await stack.principal("tom", "tester", org="aisi")
    async with stack.client(tom) as c:
        with pytest.raises(NotFound):
            await artifacts_api.get(c, artifact_id)

    async with stack.client(dana) as c:
        (listed,) = await api.list_upload_links(c)
    assert (listed["state"], listed["artifact"]) == ("used", artifact_id)
    events = await stack.events()
    (made_event,) = [e for e in events if e["action"] == "upload_link.create"]
    assert made_event["details"]["note"] == "logs of run 7"
    created = next(e for e in events if e["action"] == "artifact.create")
    assert created["details"]["upload_link"] == made["id"]
    assert created["details"]["recipients"] == ["dana", "dave", "tess"]
    assert [e["action"] for e in events if e["action"].startswith("upload_link.")] == [
        "upload_link.create",
        "upload_link.view",  # view() above
        "upload_link.view",  # the client's own, before starting
    ]
    assert token not in str(events)  # the capability itself is never logged


async def test_the_link_is_spent_once(stack: Stack, tmp_path: Path) -> None:
    dana, _, tess = await setup(stack)
    _, token = await make(stack, dana)
    src = tmp_path / "a.txt"
    write(src, 1000, seed=3)
    async with stack.client(tess) as c:
        await upload(c, src, upload_link=token)
        # Run again once the upload is complete: the client says so, and uploads nothing.
        with pytest.raises(Conflict) as used:
            await upload(c, src, name="again", upload_link=token)
        assert used.value.code == "link-used"
        # The service refuses a second upload through it whatever the client does.
        with pytest.raises(NotFound) as refused:
            await _create_directly(c, token)
        assert refused.value.code == "link-unavailable"
    assert (await refusal_reasons(stack))[-1] == "link-used"
    assert await stack.count("artifacts") == 1


async def _create_directly(c: Client, token: str, *, kind: str = "report", size: int = 10) -> Any:
    """An upload through the link, started by hand (with every header the service asks for)."""
    me = await c.whoami()
    names = [p["name"] for p in await c.list_principals(org="lab", role="developer")] + [me["name"]]
    key = age.generate_file_key()
    headers = {}
    for name in names:
        recipient = (await c.get_principal(name))["age_recipient"]
        headers[name] = age.wrap_file_key(key, [recipient]).to_bytes()
    return await artifacts_api.create(
        c,
        name="direct",
        kind=kind,
        files=[("x.bin", size, os.urandom(16))],
        headers=headers,
        upload_link=token,
    )


async def test_racing_uploads_one_wins(stack: Stack, tmp_path: Path) -> None:
    dana, _, tess = await setup(stack)
    _, token = await make(stack, dana)
    async with stack.client(tess) as c:
        me = await c.whoami()
        recipients = {r["name"]: r["age_recipient"] for r in (await api.view(c, token))["recipients"]}
        recipients[me["name"]] = me["age_recipient"]
        key = age.generate_file_key()
        headers = {n: age.wrap_file_key(key, [r]).to_bytes() for n, r in recipients.items()}

        async def attempt(i: int) -> str:
            try:
                await artifacts_api.create(
                    c,
                    name=f"race-{i}",
                    kind="report",
                    files=[("x.bin", 10, os.urandom(16))],
                    headers=headers,
                    upload_link=token,
                )
                return "won"
            except NotFound as exc:
                return exc.code
            except Conflict as exc:  # PostgreSQL: the loser's UPDATE waited, then found it spent
                return exc.code

        results = await asyncio.gather(*(attempt(i) for i in range(8)))
    assert results.count("won") == 1, results
    assert await stack.count("artifacts") == 1
    creations = [e for e in await stack.events() if e["action"] == "artifact.create"]
    assert [e["outcome"]["result"] for e in creations].count("allowed") == 1
    assert (
        sorted(e["outcome"].get("reason") for e in creations if e["outcome"]["result"] == "denied")
        == ["link-used"] * 7
    )


async def test_an_interrupted_upload_resumes_through_its_link(stack: Stack, tmp_path: Path) -> None:
    dana, _, tess = await setup(stack)
    _, token = await make(stack, dana, max_bytes=10_000_000)
    src = tmp_path / "big.bin"
    write(src, 3_000_000, seed=4)
    seen: list[str] = []

    def stop_after_start(artifact_id: str, total: int, resumed: bool) -> None:
        seen.append(artifact_id)
        raise Interrupted

    async with stack.client(tess) as c:
        with pytest.raises(Interrupted):
            await upload(c, src, upload_link=token, on_start=stop_after_start)
        starts: list[bool] = []
        artifact_id = await upload(
            c, src, upload_link=token, on_start=lambda _a, _t, resumed: starts.append(resumed)
        )
    assert artifact_id == seen[0] and starts == [True]
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(dana) as c:
        await download(c, artifact_id, out)
    assert (out / "big.bin").read_bytes() == src.read_bytes()


async def test_revoking_aborts_the_running_upload(stack: Stack, tmp_path: Path) -> None:
    dana, _, tess = await setup(stack)
    made, token = await make(stack, dana, max_bytes=10_000_000)
    src = tmp_path / "big.bin"
    write(src, 2_000_000, seed=5)

    def stop(artifact_id: str, total: int, resumed: bool) -> None:
        raise Interrupted

    async with stack.client(tess) as c:
        with pytest.raises(Interrupted):
            await upload(c, src, upload_link=token, on_start=stop)
    async with stack.client(dana) as c:
        revoked = await api.revoke(c, made["id"])
        with pytest.raises(Conflict):
            await api.revoke(c, made["id"])
    assert revoked["state"] == "revoked"
    async with stack.client(tess) as c:
        artifact = await artifacts_api.get(c, revoked["artifact"])
        assert artifact["status"] == "aborted"
        with pytest.raises(NotFound) as refused:
            await upload(c, src, upload_link=token)
        assert refused.value.code == "link-unavailable"
    assert (await refusal_reasons(stack))[-1] == "link-revoked"
    assert "artifact.abort" in [e["action"] for e in await stack.events()]


async def test_bad_uses_are_refused_and_change_nothing(
    stack: Stack, tmp_path: Path, clock: FakeClock
) -> None:
    dana, _, tess = await setup(stack)
    tom = await stack.principal("tom", "tester", org="aisi")
    ada = await stack.principal("ada", "auditor", org="lab")
    made, token = await make(stack, dana, max_bytes=1000, expires_in_s=60)
    before = await stack.count("artifacts")

    async with stack.client(tess) as c:
        with pytest.raises(ValidationError) as too_big:
            await _create_directly(c, token, size=1001)
        assert too_big.value.code == "upload-too-large"
        with pytest.raises(ValidationError) as wrong_kind:
            await _create_directly(c, token, kind="model-weights")
        assert "report" in wrong_kind.value.message
        write(tmp_path / "w.bin", 10, seed=6)
        with pytest.raises(ValidationError):  # the client checks the kind before anything is sent
            await upload(c, tmp_path / "w.bin", kind="dataset", upload_link=token)
        with pytest.raises(NotFound) as malformed:
            await api.view(c, "exu1_" + "A" * 42 + "B")  # 43 characters, but not canonical base64url
        assert malformed.value.code == "link-unavailable"
    # Someone else holding the URL gets the answer an unknown token gets.
    async with stack.client(tom) as c:
        with pytest.raises(NotFound) as stranger:
            await api.view(c, token)
        with pytest.raises(NotFound):
            await _create_directly(c, token)
        unknown_token = "exu1_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
        with pytest.raises(NotFound) as unknown:
            await api.view(c, unknown_token)
    assert stranger.value.message == unknown.value.message
    # Making links: developers only, for principals that may upload, within the bounds.
    async with stack.client(tess) as c:
        with pytest.raises(PermissionDenied):
            await api.create(c, "tess", kind="report", max_bytes=10)
    async with stack.client(dana) as c:
        with pytest.raises(ValidationError):
            await api.create(c, "tess", kind="report", max_bytes=0)
        with pytest.raises(ValidationError):
            await api.create(c, "tess", kind="report", max_bytes=10, expires_in_s=8 * 86400)
        with pytest.raises(Conflict) as auditor:
            await api.create(c, "ada", kind="report", max_bytes=10)
        assert auditor.value.code == "uploader-role"
        with pytest.raises(NotFound):
            await api.create(c, "nobody", kind="report", max_bytes=10)
    # Another organisation cannot revoke it; an auditor cannot either.
    for other in (tom, ada):
        async with stack.client(other) as c:
            with pytest.raises(NotFound):
                await api.revoke(c, made["id"])
    # Expired: refused with the uniform answer; the log keeps why.
    clock.advance(61)
    async with stack.client(tess) as c:
        with pytest.raises(NotFound):
            await _create_directly(c, token)
    assert await stack.count("artifacts") == before
    assert await stack.count("upload_links") == 1
    reasons = await refusal_reasons(stack)
    assert {"upload-too-large", "link-malformed", "not-the-uploader", "link-unknown", "link-expired"} <= set(
        reasons
    )
    assert not any(re.search(r"exu1_[A-Za-z0-9_-]{43}", str(e)) for e in await stack.events())

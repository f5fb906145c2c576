"""Grants and links end to end: real SeaweedFS, SQLite and PostgreSQL, the real `age` and `curl`.

Every way a link can be refused gets its own test: the answer (uniform for any state of a token),
the audit event with the precise reason, the source IP and user agent, and no bytes or URL.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import shutil
from pathlib import Path

import pytest
from nacl.signing import VerifyKey

from exchange.api.pages import asset_url
from exchange.client import artifacts as artifacts_api
from exchange.client import links as api
from exchange.client.transfer import download
from exchange.errors import AgeNoIdentityMatch, Conflict, NotFound, PermissionDenied, ValidationError
from exchange.format import age
from exchange.format.receipt import receipt_message
from exchange.identity import Identity
from tests.conftest import FakeClock, Stack, requires_age
from tests.links.conftest import USER_AGENT, fetch, make_link, proof, refusals, share


def token_of(url: str) -> str:
    found = re.search(r"exl1_[A-Za-z0-9_-]{43}", url)
    assert found is not None
    return found.group(0)


async def assert_refused(
    stack: Stack, url: str, reason: str, *, method: str = "GET", body: object = None
) -> None:
    """The uniform refusal: 404 link-unavailable, no Location, no bytes; the log says why."""
    before = len(await stack.events())
    answer = await fetch(method, url, body=body)
    assert answer.status == 404, answer.body
    assert "Location" not in answer.headers
    problem = answer.json()
    assert problem["code"] == "link-unavailable"
    assert set(problem) == {"type", "title", "status", "detail", "code", "request_id"}
    new = (await stack.events())[before:]
    assert len(new) == 1
    event = new[0]
    assert event["outcome"] == {"result": "denied", "reason": reason}
    assert event["source"] == {"ip": "127.0.0.1", "user_agent": USER_AGENT}
    assert token_of(url) not in str(event)  # the capability itself is never logged


async def test_grant_link_download_and_receipt(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=2)
    # The grantee sees the artifact's metadata and its own header; a stranger sees nothing.
    stranger = await stack.principal("sam", "tester", org="aisi")
    async with stack.client(shared.tester) as c:
        detail = await artifacts_api.get(c, shared.artifact_id)
        assert detail["status"] == "complete"
        assert [a["id"] for a in await artifacts_api.list_artifacts(c)] == [shared.artifact_id]
        own = await artifacts_api.header(c, shared.artifact_id)
        assert len(age.unwrap_file_key(own, [shared.tester.age_identity])) == 16
        # The grant alone lets the tester download with signed requests, too (a session of its
        # own, with its own receipt; not counted against the link).
        signed_out = tmp_path / "signed"
        signed_out.mkdir()
        await download(c, shared.artifact_id, signed_out)
        assert (signed_out / "weights.bin").read_bytes() == shared.data
    async with stack.client(stranger) as c:
        with pytest.raises(NotFound):
            await artifacts_api.get(c, shared.artifact_id)
        assert await artifacts_api.list_artifacts(c) == []
    # The recipient downloads through the link, with no signed request at all.
    server, token = api.split_link(url)
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(shared.tester) as c:
        c.server = server
        written, receipt = await api.download_link(c, token, out)
    assert written == [out / "weights.bin"]
    assert (out / "weights.bin").read_bytes() == shared.data
    # The receipt closes the chain of custody: uploader's manifest, recipient's signature.
    events = await stack.events()
    by_grant, event = [e for e in events if e["action"] == "artifact.receipt"]
    assert by_grant["details"]["via"] == "grant" and "link" not in by_grant["details"]
    assert event["actor"]["name"] == "tess" and "via" not in event["details"]
    digest = bytes.fromhex(event["details"]["manifest_sha256"])
    # An auditor rebuilds the signed message from the event alone and checks it with tess's key.
    message = receipt_message(
        artifact=event["resource"]["id"],
        link=event["details"]["link"],
        session=event["details"]["session"],
        manifest_sha256=digest,
    )
    VerifyKey(shared.tester.public.signing_public_key).verify(
        message, base64.b64decode(event["details"]["signature"])
    )
    assert event["resource"]["id"] == shared.artifact_id == receipt["artifact"]
    complete = next(e for e in events if e["action"] == "artifact.complete")
    assert complete["resource"]["sha256"] == digest.hex()
    assert [e["action"] for e in events if e["action"].startswith("link.")] == [
        "link.create",
        "link.challenge",  # the proof of tess's key, which then opens the session
        "link.session",
    ]
    # A download proven by the recipient's key is attributed to the recipient.
    assert {e["actor"]["name"] for e in events if e["action"] in ("link.session", "artifact.receipt")} == {
        "tess"
    }
    async with stack.client(shared.dev) as c:
        (listed,) = await api.list_links(c, shared.artifact_id)
    assert (listed["downloads"], listed["max_downloads"], listed["state"]) == (1, 2, "active")


@requires_age
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_and_age_are_enough(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=1)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "key.txt").write_text(shared.tester.age_key_file())
    # README's commands, as written there (the link's own page prints the same ones).
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("**No software of ours needed.**", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    script = f"LINK='{url}'\n" + block
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script, cwd=scratch, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert (scratch / "file-0").read_bytes() == shared.data
    # The proof opened (and counted) the one download the link allows; a new one is refused.
    assert await stack.db.fetchval("SELECT downloads FROM links") == 1
    await assert_refused(stack, f"{url}/challenge", "link-exhausted")


async def test_expired_link(stack: Stack, tmp_path: Path, clock: FakeClock) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, expires_in_s=3600)
    assert (await fetch("GET", url)).status == 200
    clock.advance(3600)
    await assert_refused(stack, url, "link-expired")
    await assert_refused(stack, f"{url}/header", "link-expired")
    await assert_refused(stack, f"{url}/files/0", "link-expired")


async def test_link_lifetime_is_bounded_by_the_server(stack: Stack, tmp_path: Path, clock: FakeClock) -> None:
    shared = await share(stack, tmp_path)
    async with stack.client(shared.dev) as c:
        with pytest.raises(ValidationError):
            await api.create_link(c, shared.artifact_id, "tess", expires_in_s=7 * 86400 + 1)
        made = await api.create_link(c, shared.artifact_id, "tess")
    assert made["expires_at_ms"] == clock.now_ms + 86400 * 1000  # the default lifetime
    (event,) = await refusals(stack, "link.create")
    assert event["outcome"]["reason"] == "invalid-input"


async def test_an_ip_allow_list(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    elsewhere = await make_link(stack, shared, allowed_networks=["203.0.113.0/24", "2001:db8::/32"])
    here = await make_link(stack, shared, allowed_networks=["127.0.0.1"])
    # The tests' requests come from 127.0.0.1: one link admits it, the other refuses it.
    await assert_refused(stack, elsewhere, "ip-not-allowed")
    await assert_refused(stack, f"{elsewhere}/header", "ip-not-allowed")
    await assert_refused(stack, f"{elsewhere}/files/0", "ip-not-allowed")
    assert (await fetch("GET", here)).status == 200
    assert (await fetch("GET", f"{here}/header?proof={await proof(here, shared.tester)}")).status == 200
    async with stack.client(shared.dev) as c:
        listed = {link["allowed_networks"][0] for link in await api.list_links(c)}
        assert listed == {"203.0.113.0/24", "127.0.0.1/32"}
        before = await stack.count("links")
        for bad in (["10.0.0.0/33"], ["example.com"], [""], [f"10.0.0.{i}" for i in range(33)]):
            with pytest.raises(ValidationError):
                await api.create_link(c, shared.artifact_id, "tess", allowed_networks=bad)
        assert await stack.count("links") == before


async def test_revoked_link(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared)
    async with stack.client(shared.dev) as c:
        (listed,) = await api.list_links(c)
        revoked = await api.revoke_link(c, listed["id"])
        assert revoked["state"] == "revoked"
        with pytest.raises(Conflict):
            await api.revoke_link(c, listed["id"])
    await assert_refused(stack, url, "link-revoked")
    await assert_refused(stack, f"{url}/challenge", "link-revoked")
    await assert_refused(stack, f"{url}/session", "link-revoked", method="POST", body={})
    # Unknown and revoked tokens get the same answer: it tells nothing about existence.
    unknown = url.rsplit("/", 1)[0] + "/" + api.split_link(url)[1][:-3] + "AAA"
    a, b = await fetch("GET", url), await fetch("GET", unknown)
    strip = lambda p: {k: v for k, v in p.items() if k != "request_id"}  # noqa: E731
    assert (a.status, strip(a.json())) == (b.status, strip(b.json()))


async def test_revoked_grant_kills_links_and_header(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared)
    async with stack.client(shared.dev) as c:
        answer = await api.revoke(c, shared.artifact_id, "tess")
        assert answer["links_revoked"] == 1
        with pytest.raises(NotFound):
            await api.revoke(c, shared.artifact_id, "tess")
    await assert_refused(stack, url, "link-revoked")
    async with stack.client(shared.tester) as c:
        with pytest.raises(NotFound):
            await artifacts_api.header(c, shared.artifact_id)
    assert await stack.db.fetchval("SELECT COUNT(*) FROM artifact_headers") == 1  # dana's alone
    revokes = [e for e in await stack.events() if e["action"] == "artifact.revoke"]
    assert [e["outcome"] for e in revokes] == [
        {"result": "allowed"},
        {"result": "denied", "reason": "no-grant"},
    ]
    assert revokes[0]["details"] == {"principal": "tess", "links_revoked": 1}


async def test_expired_grant(stack: Stack, tmp_path: Path, clock: FakeClock) -> None:
    shared = await share(stack, tmp_path, grant=False)
    async with stack.client(shared.dev) as c:
        await api.grant(c, shared.artifact_id, "tess", expires_in_s=60)
        link = await api.create_link(c, shared.artifact_id, "tess")
    url = stack.url + "/l/" + str(link["url"]).rsplit("/", 1)[1]
    assert (await fetch("GET", url)).status == 200
    clock.advance(60)
    await assert_refused(stack, url, "grant-expired")
    async with stack.client(shared.tester) as c:
        with pytest.raises(NotFound):
            await artifacts_api.get(c, shared.artifact_id)
    async with stack.client(shared.dev) as c:
        with pytest.raises(Conflict) as refused:
            await api.create_link(c, shared.artifact_id, "tess")
    assert refused.value.code == "not-granted"


async def test_one_download_past_the_count(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=1)
    first = await fetch("POST", f"{url}/session", body={"proof": await proof(url, shared.tester)})
    assert first.status == 200
    session = first.json()["session"]
    # The session's own requests are not counted again...
    again = await fetch("POST", f"{url}/session", body={"session": session})
    assert again.status == 200 and again.json()["session"] == session
    redirect = await fetch("GET", f"{url}/files/0?session={session}", headers={"Range": "bytes=0-99"})
    assert redirect.status == 307 and redirect.headers["Location"].startswith("http")
    # ...but a second download is refused, with no URL in the answer: no new challenge, no page,
    # no header, no session (a used-up link answers like any unusable one).
    await assert_refused(stack, url, "link-exhausted")
    await assert_refused(stack, f"{url}/challenge", "link-exhausted")
    await assert_refused(stack, f"{url}/session", "link-exhausted", method="POST", body={})
    await assert_refused(stack, f"{url}/header", "link-exhausted")
    await assert_refused(stack, f"{url}/files/0", "link-exhausted")
    # A session id of another link, or made up, opens nothing.
    await assert_refused(stack, f"{url}/files/0?session=ses_{secrets.token_hex(16)}", "session-unknown")


async def test_parallel_downloads_race_for_the_last_count(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=3)
    proofs = [await proof(url, shared.tester) for _ in range(12)]
    answers = await asyncio.gather(*(fetch("POST", f"{url}/session", body={"proof": p}) for p in proofs))
    assert sorted(a.status for a in answers) == [200] * 3 + [404] * 9
    assert len({a.json()["session"] for a in answers if a.status == 200}) == 3
    events = await stack.events()
    assert (
        len([e for e in events if e["action"] == "link.session" and e["outcome"]["result"] == "allowed"]) == 3
    )
    exhausted = [e for e in events if e["outcome"].get("reason") == "link-exhausted"]
    assert len(exhausted) == 9
    assert await stack.db.fetchval("SELECT downloads FROM links") == 3


async def test_the_wrong_recipients_key(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared)
    server, token = api.split_link(url)
    mallory = Identity.generate()
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(mallory) as c:
        c.server = server
        with pytest.raises(AgeNoIdentityMatch):
            await api.download_link(c, token, out)
        assert os.listdir(out) == []
        # Nothing was counted: mallory could not decrypt the challenge, so opened no session.
        assert await stack.db.fetchval("SELECT downloads FROM links") == 0
        # A receipt must be signed by the link's recipient (a session tess opened, say).
        session = (await api.open_session(c, token, proof=await proof(url, shared.tester)))["session"]
        digest = bytes.fromhex((await stack.db.fetchval("SELECT manifest_sha256 FROM artifacts")).hex())
        with pytest.raises(PermissionDenied) as refused:
            await api.send_receipt(c, token, session, mallory.signing_key.sign(digest).signature)
    assert refused.value.code == "receipt-signature"
    (event,) = await refusals(stack, "artifact.receipt")
    assert event["outcome"]["reason"] == "receipt-signature"
    assert not [
        e
        for e in await stack.events()
        if e["action"] == "artifact.receipt" and e["outcome"]["result"] == "allowed"
    ]


async def test_a_receipt_is_for_one_session(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=3)
    server, token = api.split_link(url)
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(shared.tester) as c:
        c.server = server
        await api.download_link(c, token, out)
        (event,) = [e for e in await stack.events() if e["action"] == "artifact.receipt"]
        first = base64.b64decode(event["details"]["signature"])
        digest = bytes.fromhex(event["details"]["manifest_sha256"])
        second = (await api.open_session(c, token, proof=await api.prove(c, token)))["session"]
        # The first session's receipt, replayed onto another session, does not verify there.
        with pytest.raises(PermissionDenied) as replayed:
            await api.send_receipt(c, token, second, first)
        # Nor does the recipient's signature over the bare digest (not domain-separated).
        with pytest.raises(PermissionDenied) as bare:
            await api.send_receipt(c, token, second, shared.tester.signing_key.sign(digest).signature)
        assert replayed.value.code == bare.value.code == "receipt-signature"
        # The receipt for that session is accepted, once.
        right = receipt_message(
            artifact=shared.artifact_id, link=event["details"]["link"], session=second, manifest_sha256=digest
        )
        await api.send_receipt(c, token, second, shared.tester.signing_key.sign(right).signature)
        with pytest.raises(Conflict):
            await api.send_receipt(c, token, second, shared.tester.signing_key.sign(right).signature)
    receipts = [
        e
        for e in await stack.events()
        if e["action"] == "artifact.receipt" and e["outcome"]["result"] == "allowed"
    ]
    assert [e["details"]["session"] for e in receipts] == [event["details"]["session"], second]


async def test_a_burst_of_guessed_tokens(stack: Stack, tmp_path: Path) -> None:
    base = stack.url + "/l/"
    burst = stack.settings.redeem_ip_burst_requests
    guesses = [
        base + "exl1_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode() for _ in range(burst)
    ]
    answers = [await fetch("GET", g) for g in guesses]
    assert {a.status for a in answers} == {404}
    limited = await fetch("GET", base + "exl1_" + "A" * 43)
    assert limited.status == 429 and limited.json()["code"] == "rate-limited"
    assert int(limited.headers["Retry-After"]) >= 1
    reasons = [e["outcome"]["reason"] for e in await refusals(stack, "link.view")]
    # The first few per (source, route, code) and window are events of their own; the rest, and
    # the 429, are counted into the window's summaries (tests/api/test_refusals.py).
    assert reasons == ["link-unknown"] * stack.settings.refusal_log_allowance_events


async def test_malformed_tokens_are_refused_before_any_lookup(stack: Stack) -> None:
    for bad in [
        "nope",
        "exl1_" + "A" * 42,
        "exl1_" + "A" * 42 + "B",
        "exl2_" + "A" * 43,
        "exl1_" + "A" * 42 + "%21",
    ]:
        answer = await fetch("GET", f"{stack.url}/l/{bad}")
        assert answer.status == 404 and answer.json()["code"] == "link-unavailable"
    reasons = {e["outcome"]["reason"] for e in await refusals(stack, "link.view")}
    assert reasons == {"link-malformed"}


async def test_a_link_to_an_upload_never_completed(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    await stack.principal("tess", "tester", org="aisi")
    file_key = age.generate_file_key()
    async with stack.client(dev) as c:
        header = age.wrap_file_key(file_key, [dev.public.age_recipient]).to_bytes()
        created = await artifacts_api.create(
            c, name="half", kind="other", files=[("half", 10, os.urandom(16))], headers={"dana": header}
        )
        with pytest.raises(Conflict) as refused:
            await api.create_link(c, created["id"], "tess")
    assert refused.value.code == "artifact-uploading"
    (event,) = await refusals(stack, "link.create")
    assert event["outcome"]["reason"] == "artifact-uploading"
    assert await stack.db.fetchval("SELECT COUNT(*) FROM links") == 0


async def test_a_range_beyond_the_end(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path, size=1000)
    url = await make_link(stack, shared, max_downloads=1)
    size = age.ciphertext_size(1000)
    key = await proof(url, shared.tester)
    before = len(await stack.events())
    answer = await fetch("GET", f"{url}/files/0?proof={key}", headers={"Range": f"bytes={size}-"})
    assert answer.status == 416 and answer.json()["code"] == "range-not-satisfiable"
    assert "Location" not in answer.headers
    (event,) = (await stack.events())[before:]
    assert (event["action"], event["outcome"]["reason"]) == ("link.file", "range-not-satisfiable")
    # Nothing was counted: the one download is still there, and a range inside the object works.
    ok = await fetch("GET", f"{url}/files/0?proof={key}", headers={"Range": f"bytes={size - 10}-{size + 99}"})
    assert ok.status == 307
    assert await stack.db.fetchval("SELECT downloads FROM links") == 1
    await assert_refused(stack, f"{url}/challenge", "link-exhausted")


async def test_a_browser_gets_a_small_safe_page(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=1)
    page = await fetch("GET", url, headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "no-referrer"
    text = page.body.decode()
    assert "weights.bin" in text and "age -d -i key.txt" in text and "exchange download" in text
    # The one script is the service's own (copy buttons), at a path that holds no token.
    assert re.findall(r"<script[^>]*>", text) == [f"<script src={asset_url('link.js')} defer>"]
    data = (await fetch("GET", url)).json()
    assert data["files"] == [
        {"index": 0, "path": "weights.bin", "size": 150_000, "ciphertext_size": age.ciphertext_size(150_000)}
    ]
    assert data["downloads"] == 0  # looking counts nothing


class Interrupted(Exception):
    """Stands in for a kill: raised from the progress callback once a part is written."""


async def test_a_resumed_link_download_is_not_counted_again(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=1)
    server, token = api.split_link(url)
    out = tmp_path / "out"
    out.mkdir()

    def interrupt(_n: int) -> None:
        raise Interrupted

    async with stack.client(shared.tester) as c:
        c.server = server
        with pytest.raises(Interrupted):
            await api.download_link(c, token, out, progress=interrupt)
        assert [p for p in out.iterdir() if p.name.endswith(api.SESSION_SUFFIX)] != []
        written, _ = await api.download_link(c, token, out)
    assert written[0].read_bytes() == shared.data
    assert sorted(os.listdir(out)) == ["weights.bin"]
    assert await stack.db.fetchval("SELECT downloads FROM links") == 1
    events = await stack.events()
    assert [e["action"] for e in events if e["action"] in ("link.session", "link.renew")] == [
        "link.session",
        "link.renew",
    ]


async def test_a_file_the_artifact_lacks(stack: Stack, tmp_path: Path) -> None:
    """A redirect reads only the file it is asked for; another index is a 404 naming the files
    there are, with its event, and counts nothing."""
    shared = await share(stack, tmp_path, size=1000)  # one file
    url = await make_link(stack, shared, max_downloads=1)
    key = await proof(url, shared.tester)
    for index in ("1", "999999999"):
        before = len(await stack.events())
        answer = await fetch("GET", f"{url}/files/{index}?proof={key}")
        assert answer.status == 404 and "Location" not in answer.headers
        problem = answer.json()
        assert problem["code"] == "no-such-file"
        assert f"files 0 to 0, not {index}" in problem["detail"]
        (event,) = (await stack.events())[before:]
        assert (event["action"], event["outcome"]["reason"]) == ("link.file", "no-such-file")
    assert await stack.db.fetchval("SELECT downloads FROM links") == 0
    assert (await fetch("GET", f"{url}/files/0?proof={key}")).status == 307  # the one download is still there

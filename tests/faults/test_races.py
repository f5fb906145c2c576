"""Races against the real app, on SQLite and PostgreSQL: what must happen exactly once does.

- A grant revoked while 100 link creations race it: no link is issued after the revocation
  committed (every `link.create` precedes the `artifact.revoke` in the log), and every link
  issued before it is dead afterwards.
- The completion of an upload sent early, twice at once (byte-identical and with fresh nonces)
  and replayed after success: one completion, one `artifact.complete` event, a clear 409 for the
  others, and the stored object intact.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from exchange.api.app import create_app
from exchange.client import artifacts as api
from exchange.client import links as links_api
from exchange.client.signing import sign_headers
from exchange.client.transfer import download
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import Conflict, ExchangeError
from exchange.format import age
from exchange.format.manifest import FileEntry, Manifest, ciphertext_digest, part_ranges
from exchange.identity import Identity
from exchange.storage import Part, PresignedRequest, Storage
from tests.artifacts.conftest import SMALL_PART_BYTES
from tests.artifacts.test_bad_input import HandUpload
from tests.conftest import FakeClock, Stack, start_stack
from tests.links.conftest import fetch, share
from tests.test_storage import send

MIB = 1024 * 1024
RACERS = 100


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    # Small parts, so that a 6 MiB file has two; redemption limits out of the way of 100 checks.
    s = await start_stack(
        tmp_path,
        database_url,
        seaweed,
        clock,
        upload_min_part_bytes=SMALL_PART_BYTES,
        redeem_ip_burst_requests=10_000,
        redeem_link_burst_requests=10_000,
    )
    yield s
    await s.server.close()


def allowed(events: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [e for e in events if e["action"] == action and e["outcome"]["result"] == "allowed"]


def denied(events: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [e for e in events if e["action"] == action and e["outcome"]["result"] == "denied"]


# -- a grant revoked while links are being made -------------------------------------------------------


async def test_no_link_is_issued_after_its_grant_is_revoked(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    first_done = asyncio.Event()
    revoked: dict[str, Any] = {}

    async with stack.client(shared.dev) as c:

        async def make() -> dict[str, Any] | ExchangeError:
            try:
                made = await links_api.create_link(c, shared.artifact_id, "tess")
            except ExchangeError as exc:
                return exc
            finally:
                first_done.set()
            return made

        async def revoke() -> None:
            # Revoke while the creations are in flight: once the first has been answered.
            await first_done.wait()
            revoked.update(await links_api.revoke(c, shared.artifact_id, "tess"))

        answers = await asyncio.gather(*(make() for _ in range(RACERS)), revoke())
    results = answers[:RACERS]
    made = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if not isinstance(r, dict)]
    assert made, "the revocation waited for a first link, so at least one was issued"
    for exc in refused:
        # Refused because the grant was gone: a 409 naming the reason, nothing else.
        assert isinstance(exc, Conflict) and exc.code in ("not-granted", "not-a-recipient"), exc
    assert revoked["links_revoked"] == len(made)

    events = await stack.events()
    [revoke_event] = allowed(events, "artifact.revoke")
    creations = allowed(events, "link.create")
    assert {e["resource"]["id"] for e in creations} == {m["id"] for m in made}
    # Every link issued was issued before the revocation, in the log's own order.
    assert all(e["idx"] < revoke_event["idx"] for e in creations)
    assert revoke_event["details"]["links_revoked"] == len(made)
    assert len(denied(events, "link.create")) == len(refused)
    # The database agrees: exactly those links exist, and every one of them is revoked.
    rows = await stack.db.fetchall("SELECT id, revoked_at_ms FROM links")
    assert {r["id"] for r in rows} == {m["id"] for m in made}
    assert all(r["revoked_at_ms"] is not None for r in rows)

    # And none of them opens anything: redeeming is refused with the one uniform answer.
    public = stack.settings.effective_public_url
    for m in made:
        url = stack.url + str(m["url"])[len(public) :]
        for suffix in ("", "/header"):
            answer = await fetch("GET", url + suffix, headers={"Accept": "application/json"})
            assert answer.status == 404, answer.body
            assert answer.json()["code"] == "link-unavailable"
    reasons = {e["outcome"]["reason"] for e in denied(await stack.events(), "link.view")} | {
        e["outcome"]["reason"] for e in denied(await stack.events(), "link.header")
    }
    assert reasons <= {"link-revoked", "grant-revoked"} and reasons


# -- completion replayed, duplicated, early --------------------------------------------------------------


def signed_completion(hand: HandUpload) -> bytes:
    """The body of the completion request `HandUpload.complete` would send."""
    m = hand.manifest()
    body = {
        "manifest": m.to_json(),
        "signature": base64.b64encode(m.sign(hand.identity.signing_key)).decode(),
    }
    return json.dumps(body).encode()


class Sender:
    """Sends completion requests as raw HTTP, to send the very same signed bytes more than once."""

    def __init__(
        self, stack: Stack, identity: Identity, artifact_id: str, body: bytes, *, base: str | None = None
    ) -> None:
        self.url = f"{base or stack.url}/v1/artifacts/{artifact_id}/complete"
        self.identity, self.body = identity, body

    def sign(self) -> dict[str, str]:
        return sign_headers(
            self.identity,
            method="POST",
            url=self.url,
            body=self.body,
            headers={"Content-Type": "application/json"},
        )

    async def send(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url, data=self.body, headers=headers, allow_redirects=False) as resp,
        ):
            return resp.status, json.loads(await resp.read())


async def completions(stack: Stack, artifact_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This artifact's completions, and every refused completion (refusals name no resource)."""
    events = await stack.events()
    done = [e for e in allowed(events, "artifact.complete") if e["resource"]["id"] == artifact_id]
    return done, denied(events, "artifact.complete")


async def test_a_completion_sent_early_twice_at_once_and_replayed_completes_once(
    stack: Stack, tmp_path: Path
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    data = os.urandom(6 * MIB)
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, data)
        detail = await hand.start()
        assert len(hand.ranges) == 2
        artifact_id = detail["id"]
        sender = Sender(stack, dev, artifact_id, signed_completion(hand))

        # Before every part is uploaded: refused, and nothing is assembled or half-completed.
        assert await hand.put(1) == 200
        status, problem = await sender.send(sender.sign())
        assert (status, problem["code"]) == (409, "parts-missing")
        assert (await api.get(c, artifact_id))["status"] == "uploading"

        # Then the rest, and the same completion four times at once: the very same signed bytes
        # twice, and twice more signed anew (same body, fresh nonces).
        assert await hand.put(2) == 200
        same = sender.sign()
        answers = await asyncio.gather(
            sender.send(same), sender.send(same), sender.send(sender.sign()), sender.send(sender.sign())
        )
        statuses = sorted(s for s, _ in answers)
        assert statuses.count(200) == 1, answers
        codes = sorted(p["code"] for s, p in answers if s != 200)
        # The byte-identical pair cannot both pass: one is a replayed nonce (whichever lost).
        assert "replayed-nonce" in codes, answers
        for s, p in answers:
            if s != 200:
                assert (s, p["code"]) in {
                    (401, "replayed-nonce"),
                    (409, "artifact-complete"),
                    (409, "artifact-not-uploading"),
                }, p
        [won] = [p for s, p in answers if s == 200]
        assert won["status"] == "complete"

        # Replayed after success, signed anew: a clear 409; and the old signed bytes: a replay.
        status, problem = await sender.send(sender.sign())
        assert (status, problem["code"]) == (409, "artifact-complete")
        assert "complete" in problem["detail"]
        status, problem = await sender.send(same)
        assert (status, problem["code"]) == (401, "replayed-nonce")

        # One completion, one event, the stored object whole.
        done, refused = await completions(stack, artifact_id)
        assert len(done) == 1
        signed = json.loads(sender.body)["manifest"]
        assert (
            done[0]["resource"]["sha256"]
            == hashlib.sha256(Manifest.from_json(signed).canonical()).hexdigest()
        )
        # Each refusal is in the log: early, the three losers, the replay signed anew, the replay.
        assert sorted(e["outcome"]["reason"] for e in refused) == sorted(
            ["parts-missing", *codes, "artifact-complete", "replayed-nonce"]
        )
        row = await stack.db.fetchone(
            "SELECT status, finished_at_ms FROM artifacts WHERE id = $1", artifact_id
        )
        assert row is not None and row["status"] == "complete"
        out = tmp_path / "out"
        out.mkdir()
        await download(c, artifact_id, out)
    assert (out / "hand.bin").read_bytes() == data


async def test_concurrent_completions_assemble_once(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds of three completions at once to one service: storage is asked to assemble once per
    artifact (completions of one artifact queue in the process), the others are refused with
    `artifact-complete` without touching storage, and the object is whole."""
    assemblies: list[str] = []
    real_complete = Storage.complete_multipart

    async def complete_multipart(self: Storage, key: str, upload_id: str, parts: list[Part]) -> None:
        assemblies.append(key)
        await real_complete(self, key, upload_id, parts)

    monkeypatch.setattr(Storage, "complete_multipart", complete_multipart)
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        for round_ in range(3):
            data = os.urandom(6 * MIB + round_)
            hand = HandUpload(c, dev, data)
            detail = await hand.start()
            assert await hand.put(1) == 200 and await hand.put(2) == 200
            sender = Sender(stack, dev, detail["id"], signed_completion(hand))
            answers = await asyncio.gather(*(sender.send(sender.sign()) for _ in range(3)))
            assert sorted(s for s, _ in answers) == [200, 409, 409], answers
            assert [p["code"] for s, p in answers if s == 409] == ["artifact-complete"] * 2
            assert assemblies == [f["object"] for f in detail["files"]]
            assemblies.clear()
            done, _ = await completions(stack, detail["id"])
            assert len(done) == 1
            out = tmp_path / f"out{round_}"
            out.mkdir()
            await download(c, detail["id"], out)
            assert (out / "hand.bin").read_bytes() == data


@pytest.mark.parametrize("store", ["repeats", "forgets"])
async def test_a_second_assembly_by_another_replica_is_harmless(
    stack: Stack, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """Two replicas (two apps on one database and one store) each get one completion. Force the
    worst interleaving: both list the stored parts while the upload is still open, then both ask
    storage to assemble it, one after the other. SeaweedFS repeats a completion; S3 proper may
    answer NoSuchUpload instead ("forgets": the second request then names an upload id storage
    does not know, and gets that answer from SeaweedFS for real)."""
    listed_twice, first_assembled = asyncio.Event(), asyncio.Event()
    calls = {"list": 0, "complete": 0}
    real_list, real_complete = Storage.list_parts, Storage.complete_multipart

    async def list_parts(self: Storage, key: str, upload_id: str) -> list[Part]:
        parts = await real_list(self, key, upload_id)
        calls["list"] += 1
        if calls["list"] == 2:
            listed_twice.set()
        return parts

    async def complete_multipart(self: Storage, key: str, upload_id: str, parts: list[Part]) -> None:
        calls["complete"] += 1
        if calls["complete"] == 1:
            await listed_twice.wait()
            await real_complete(self, key, upload_id, parts)
            first_assembled.set()
            return
        await first_assembled.wait()
        await real_complete(self, key, "gone-" + upload_id if store == "forgets" else upload_id, parts)

    monkeypatch.setattr(Storage, "list_parts", list_parts)
    monkeypatch.setattr(Storage, "complete_multipart", complete_multipart)
    dev = await stack.principal("dana", "developer", org="lab")
    data = os.urandom(6 * MIB)
    async with stack.client(dev) as c:
        hand = HandUpload(c, dev, data)
        detail = await hand.start()
        assert await hand.put(1) == 200 and await hand.put(2) == 200
        body = signed_completion(hand)
        replica = TestServer(create_app(stack.settings, clock=clock), host="127.0.0.1")
        await replica.start_server()
        try:
            one = Sender(stack, dev, detail["id"], body)
            two = Sender(stack, dev, detail["id"], body, base=str(replica.make_url("")).rstrip("/"))
            answers = await asyncio.gather(one.send(one.sign()), two.send(two.sign()))
        finally:
            await replica.close()
        assert calls == {"list": 2, "complete": 2}
        assert sorted(s for s, _ in answers) == [200, 409], answers
        [(_, lost)] = [a for a in answers if a[0] == 409]
        assert lost["code"] in ("artifact-complete", "artifact-not-uploading"), lost
        done, _ = await completions(stack, detail["id"])
        assert len(done) == 1
        out = tmp_path / "out"
        out.mkdir()
        await download(c, detail["id"], out)
    assert (out / "hand.bin").read_bytes() == data


class TwoFiles:
    """A two-file upload driven by hand: a.bin (one part) and b.bin (two parts)."""

    def __init__(self, client: Any, identity: Identity) -> None:
        self.client, self.identity = client, identity
        self.file_key = age.generate_file_key()
        self.data = {"two/a.bin": os.urandom(1000), "two/b.bin": os.urandom(6 * MIB)}
        self.nonces = {p: os.urandom(16) for p in self.data}
        self.ciphertext = {
            p: b"".join(age.encrypt_stream(self.file_key, [d], nonce=self.nonces[p]))
            for p, d in self.data.items()
        }

    async def start(self) -> dict[str, Any]:
        me = await self.client.whoami()
        header = age.wrap_file_key(self.file_key, [me["age_recipient"]]).to_bytes()
        self.detail = await api.create(
            self.client,
            name="two",
            kind="other",
            files=[(p, len(d), self.nonces[p]) for p, d in self.data.items()],
            headers={me["name"]: header},
        )
        self.index = {f["path"]: i for i, f in enumerate(self.detail["files"])}
        self.ranges = {p: part_ranges(len(d), self.detail["part_size"]) for p, d in self.data.items()}
        return self.detail

    def part(self, path: str, number: int) -> bytes:
        r = self.ranges[path][number - 1]
        return self.ciphertext[path][r.start : r.end]

    async def urls(self) -> dict[tuple[str, int], Any]:
        wanted = [(p, r.number) for p in self.data for r in self.ranges[p]]
        answer = await api.part_urls(
            self.client,
            self.detail["id"],
            [(self.index[p], n, hashlib.sha256(self.part(p, n)).digest()) for p, n in wanted],
        )
        by_index = {i: p for p, i in self.index.items()}
        return {(by_index[u["file"]], u["number"]): u for u in answer["parts"]}

    async def put(self, url: Any, path: str, number: int) -> int:
        status, _ = await asyncio.to_thread(
            send, PresignedRequest(url["method"], url["url"], url["headers"]), self.part(path, number)
        )
        return status

    def completion(self) -> bytes:
        entries = []
        for f in self.detail["files"]:
            p = f["path"]
            digests = [hashlib.sha256(self.part(p, r.number)).digest() for r in self.ranges[p]]
            entries.append(
                FileEntry(
                    p,
                    len(self.data[p]),
                    hashlib.sha256(self.data[p]).digest(),
                    self.nonces[p],
                    len(self.ciphertext[p]),
                    ciphertext_digest(digests),
                    f["object"],
                )
            )
        m = Manifest(
            artifact=self.detail["id"],
            org=self.detail["org"],
            name="two",
            kind="other",
            uploader=self.identity.key_id,
            part_size=self.detail["part_size"],
            files=tuple(entries),
        )
        signature = base64.b64encode(m.sign(self.identity.signing_key)).decode()
        return json.dumps({"manifest": m.to_json(), "signature": signature}).encode()


async def test_an_early_completion_that_assembled_one_file_leaves_the_upload_resumable(
    stack: Stack, tmp_path: Path
) -> None:
    """Completion assembles file by file: sent early, it assembles a.bin, then finds b.bin's part
    missing and is refused. The upload must stay resumable (its status lists a.bin as stored,
    where it used to answer 404 for the vanished multipart upload) and complete once, later."""
    dev = await stack.principal("dana", "developer", org="lab")
    async with stack.client(dev) as c:
        two = TwoFiles(c, dev)
        detail = await two.start()
        urls = await two.urls()
        assert len(urls) == 3
        assert await two.put(urls[("two/a.bin", 1)], "two/a.bin", 1) == 200
        assert await two.put(urls[("two/b.bin", 1)], "two/b.bin", 1) == 200
        sender = Sender(stack, dev, detail["id"], two.completion())
        status, problem = await sender.send(sender.sign())
        assert (status, problem["code"]) == (409, "parts-missing")
        assert "two/b.bin" in problem["detail"]
        # What a resuming client asks first: a.bin is whole, b.bin has part 1 of 2.
        state = await api.upload_status(c, detail["id"])
        stored = {f["path"]: [p["number"] for p in f["stored"]] for f in state["files"]}
        assert stored == {"two/a.bin": [1], "two/b.bin": [1]}
        assert await two.put(urls[("two/b.bin", 2)], "two/b.bin", 2) == 200
        status, won = await sender.send(sender.sign())
        assert status == 200 and won["status"] == "complete"
        status, problem = await sender.send(sender.sign())
        assert (status, problem["code"]) == (409, "artifact-complete")
        done, refused = await completions(stack, detail["id"])
        assert len(done) == 1
        assert sorted(e["outcome"]["reason"] for e in refused) == ["artifact-complete", "parts-missing"]
        out = tmp_path / "out"
        out.mkdir()
        await download(c, detail["id"], out)
    for path, data in two.data.items():
        assert (out / path).read_bytes() == data

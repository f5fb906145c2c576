"""Three `exchange serve` replicas behind HAProxy, on PostgreSQL and the SeaweedFS cluster (with
only the service's least-privilege S3 identity), one of them killed with SIGKILL mid-traffic.

Developers upload, grant and issue links; testers redeem and report findings; an auditor
queries: concurrently, all through the proxy's one URL with the SDK, while replica 1 is killed.
Afterwards (PostgreSQL read directly, and the audit CLI as an auditor runs it):

- everything acknowledged (2xx) is there: complete artifacts, grants, links, sessions, findings;
- every change has its event and every event its change (so an unacknowledged request, a 502
  from the proxy, either happened entirely or not at all), and the log has no gap and passes
  `exchange audit verify` against the pinned key;
- each link's stored count equals its sessions and its `link.session` events, at most its
  `max_downloads`, even for a link redeemed by many clients at once through different replicas;
- an upload completed three times at once through three replicas is one artifact with one
  `artifact.complete` event.

Requests that got a 502 are retried when repeating them is harmless (reads, grants, a
redemption with the same proof, an upload, which resumes); others (link creation, finding
submission) are counted as unknown and covered by the invariants above.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from exchange.client import Client, segment, transfer
from exchange.client import artifacts as artifacts_api
from exchange.client import findings as findings_api
from exchange.client import links as links_api
from exchange.client.audit import AuditClient
from exchange.client.signing import sign_headers
from exchange.db import connect
from exchange.dev.replicas import ReplicaSet
from exchange.dev.seaweed import S3Credentials
from exchange.dev.seaweedcluster import SeaweedCluster
from exchange.errors import AuthError, DependencyError, ExchangeError, NotFound, ServiceUnreachable
from exchange.identity import Identity
from tests.conftest import BUCKET, POSTGRES_DSN, PostgresDatabases

T = TypeVar("T")

#: How long the workers drive traffic, and when (after the start) replica 1 is killed.
DRIVE_S = 10.0
KILL_AFTER_S = 3.0
#: Redemptions racing for the race link's downloads.
RACE_MAX_DOWNLOADS = 5
RACE_CLIENTS = 16


def lost(exc: BaseException) -> bool:
    """An answer that says nothing about whether the request happened: the proxy's 502 when the
    replica died under it, or no answer at all. Also `replayed-nonce`: for a request after the
    first on a kept-alive connection HAProxy answers a dead replica by closing the connection
    (as the replica would have), and aiohttp then sends an idempotent request (a GET) again with
    the same signature, which the service refuses as a replay (the SDK should re-sign instead)."""
    return (
        isinstance(exc, ServiceUnreachable)
        or (isinstance(exc, DependencyError) and exc.extra.get("status") in (502, 503, 504))
        or (isinstance(exc, AuthError) and exc.code == "replayed-nonce")
    )


@dataclass
class Ledger:
    """What the clients were told."""

    artifacts: set[str] = field(default_factory=set)
    grants: set[tuple[str, str]] = field(default_factory=set)
    links: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # id -> (token, tester, artifact)
    sessions: dict[str, set[str]] = field(default_factory=dict)  # link id -> session ids
    findings: set[str] = field(default_factory=set)
    queries: int = 0
    unknown: Counter[str] = field(default_factory=Counter)  # lost non-idempotent requests, by kind
    lost: Counter[str] = field(default_factory=Counter)  # every lost answer, by kind
    surprises: list[str] = field(default_factory=list)


async def retried(ledger: Ledger, kind: str, call: Callable[[], Awaitable[T]], attempts: int = 6) -> T:
    """`call` again after a lost answer, for requests that may safely be repeated."""
    for attempt in range(attempts):
        try:
            return await call()
        except ExchangeError as exc:
            if not lost(exc) or attempt == attempts - 1:
                raise
            ledger.lost[kind] += 1
            await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def enrol(url: str, admin: Identity, name: str, role: str, org: str) -> Identity:
    async with Client(url, admin) as c:
        if org not in {o["name"] for o in await c.list_orgs()}:
            await c.create_org(org)
        invite = await c.create_invite(role=role, org=org)
    identity = Identity.generate()
    async with Client(url) as anon:
        await anon.enroll(invite["code"], name, identity)
    return identity


async def redeem(url: str, tester: Identity, token: str, ledger: Ledger, link_id: str) -> bool:
    """Open a counted session with a fresh proof; True if one was opened, False if the link is
    used up. The proof makes a retry after a lost answer harmless: it continues its session."""
    async with Client(url, tester, timeout_s=20) as c:
        try:
            proof = await retried(ledger, "challenge", lambda: links_api.prove(c, token))
            opened = await retried(ledger, "session", lambda: links_api.open_session(c, token, proof=proof))
        except NotFound:
            return False  # the uniform refusal: here, the link is used up
    ledger.sessions.setdefault(link_id, set()).add(opened["session"])
    return True


async def developer(
    url: str, me: Identity, tester: tuple[str, Identity], ledger: Ledger, src: Path, stop: asyncio.Event
) -> None:
    """Upload, grant to the tester, and issue a link, over and over."""
    rng = random.Random(src.name)
    n = 0
    async with Client(url, me, timeout_s=20) as c:
        while not stop.is_set():
            n += 1
            path = src / f"model-{n}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(3000))
            try:
                # An upload resumes where a lost answer left it, completion included.
                artifact_id = await retried(
                    ledger, "upload", lambda path=path: transfer.upload(c, path, kind="model-weights")
                )
                ledger.artifacts.add(artifact_id)
                await retried(ledger, "grant", lambda a=artifact_id: links_api.grant(c, a, tester[0]))
                ledger.grants.add((artifact_id, tester[0]))
                try:
                    made = await links_api.create_link(c, artifact_id, tester[0], max_downloads=2)
                except ExchangeError as exc:
                    if not lost(exc):
                        raise
                    ledger.unknown["link.create"] += 1
                    continue
                ledger.links[made["id"]] = (links_api.split_link(made["url"])[1], tester[0], artifact_id)
            except ExchangeError as exc:
                ledger.surprises.append(f"developer: {exc.__class__.__name__} {exc.code}: {exc}")


async def red_team(url: str, name: str, me: Identity, ledger: Ledger, stop: asyncio.Event) -> None:
    """Redeem every link issued to me (beyond its count too), and report a finding on each."""
    done: set[str] = set()
    async with Client(url, me, timeout_s=20) as c:
        while not stop.is_set():
            mine = [
                (i, t, a) for i, (t, who, a) in list(ledger.links.items()) if who == name and i not in done
            ]
            if not mine:
                await asyncio.sleep(0.1)
                continue
            for link_id, token, artifact_id in mine:
                done.add(link_id)
                try:
                    outcomes = [await redeem(url, me, token, ledger, link_id) for _ in range(3)]
                    assert outcomes == [True, True, False], outcomes  # max_downloads=2
                    try:
                        finding = await findings_api.submit(
                            c, artifact_id, title="jailbreak", severity="high", body=b"# It writes exploits\n"
                        )
                    except ExchangeError as exc:
                        if not lost(exc):
                            raise
                        ledger.unknown["finding.submit"] += 1
                        continue
                    ledger.findings.add(finding["id"])
                except ExchangeError as exc:
                    ledger.surprises.append(f"tester: {exc.__class__.__name__} {exc.code}: {exc}")


async def auditor(url: str, me: Identity, ledger: Ledger, stop: asyncio.Event) -> None:
    async with Client(url, me, timeout_s=20) as c:
        while not stop.is_set():
            try:
                await retried(
                    ledger, "query", lambda: _first_page(AuditClient(c), {"action": "artifact.complete"})
                )
                ledger.queries += 1
            except ExchangeError as exc:
                ledger.surprises.append(f"auditor: {exc.__class__.__name__} {exc.code}: {exc}")
            await asyncio.sleep(0.3)


async def _first_page(audit: AuditClient, filters: dict[str, str | int | None]) -> list[dict[str, Any]]:
    rows = []
    async for row in audit.query(filters, limit=20):
        rows.append(row)
        if len(rows) == 20:
            break
    return rows


async def signed_at(
    session: aiohttp.ClientSession, replica_url: str, public_url: str, me: Identity, path: str, body: Any
) -> int:
    """A signed POST sent to one replica directly (as the proxy would forward it): signed for the
    public URL, which is what the replicas check signatures against."""
    data = json.dumps(body).encode()
    headers = sign_headers(
        me, method="POST", url=public_url + path, body=data, headers={"Content-Type": "application/json"}
    )
    headers["X-Forwarded-For"] = "198.51.100.1"
    async with session.post(replica_url + path, data=data, headers=headers) as resp:
        await resp.read()
        return resp.status


@pytest.mark.slow
async def test_three_replicas_behind_haproxy_survive_a_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = PostgresDatabases(POSTGRES_DSN)
    database_url = await pg.create()
    # The storage is the SeaweedFS cluster (master, two volume servers holding a copy each, filer,
    # S3 gateway), and the replicas hold only its least-privilege service identity.
    cluster = SeaweedCluster(
        tmp_path / "storage",
        credentials=S3Credentials.generate(),
        service_credentials=S3Credentials.generate(),
        bucket=BUCKET,
    )
    replicas = ReplicaSet(
        tmp_path / "home",
        storage=cluster,
        credentials=cluster.service_credentials,
        database_url=database_url,
        replicas=3,
        bucket=BUCKET,
        manage_storage=True,
        settings={
            "EXCHANGE_SHUTDOWN_GRACE_S": "5",
            # Every client comes from 127.0.0.1: the per-source budgets are not what is tested.
            "EXCHANGE_REDEEM_IP_BURST_REQUESTS": "10000",
            "EXCHANGE_REDEEM_IP_REQUESTS_PER_MIN": "100000",
        },
    )
    await asyncio.to_thread(replicas.start)
    try:
        url = replicas.url
        admin = Identity.load(replicas.admin_path)
        devs = [await enrol(url, admin, f"dana{i}", "developer", "lab") for i in range(2)]
        testers = [await enrol(url, admin, f"tess{i}", "tester", "aisi") for i in range(2)]
        ada = await enrol(url, admin, "ada", "auditor", "audit")
        ledger = Ledger()

        # The race link: made before the traffic, redeemed by many clients at once during it.
        src = tmp_path / "race" / "weights.bin"
        src.parent.mkdir()
        src.write_bytes(random.randbytes(2000))
        async with Client(url, devs[0]) as c:
            race_artifact = await transfer.upload(c, src)
            await links_api.grant(c, race_artifact, "tess0")
            race = await links_api.create_link(c, race_artifact, "tess0", max_downloads=RACE_MAX_DOWNLOADS)
        race_token = links_api.split_link(race["url"])[1]

        await _wait_for_checkpoint(url, admin, 1)  # queries are pinned to one: none before the first
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(
                developer(url, devs[i], (f"tess{i}", testers[i]), ledger, tmp_path / f"d{i}", stop)
            )
            for i in range(2)
        ]
        workers += [
            asyncio.create_task(red_team(url, f"tess{i}", testers[i], ledger, stop)) for i in range(2)
        ]
        workers.append(asyncio.create_task(auditor(url, ada, ledger, stop)))
        started = time.monotonic()
        await asyncio.sleep(KILL_AFTER_S - 0.2)
        racers = [
            asyncio.create_task(redeem(url, testers[0], race_token, ledger, race["id"]))
            for _ in range(RACE_CLIENTS)
        ]
        await asyncio.sleep(0.2)
        await asyncio.to_thread(replicas.kill, 1)  # with requests (and the race) in flight
        race_won = await asyncio.gather(*racers)
        await asyncio.sleep(max(0.0, DRIVE_S - (time.monotonic() - started)))
        stop.set()
        await asyncio.gather(*workers)
        assert ledger.surprises == [], sorted(set(ledger.surprises))

        # Back in rotation; then one upload completed through three replicas at once.
        await asyncio.to_thread(replicas.restart, 1)
        statuses: list[int] = []
        original = artifacts_api.complete

        async def complete_everywhere(
            client: Client, artifact_id: str, manifest: Any, signature: bytes
        ) -> Any:
            body = {"manifest": manifest, "signature": base64.b64encode(signature).decode()}
            path = f"/v1/artifacts/{segment(artifact_id)}/complete"
            async with aiohttp.ClientSession() as session:
                statuses.extend(
                    await asyncio.gather(
                        *(signed_at(session, r, url, devs[1], path, body) for r in replicas.urls)
                    )
                )
            return await original(client, artifact_id, manifest, signature) if 200 not in statuses else {}

        monkeypatch.setattr(transfer.api, "complete", complete_everywhere)
        twice = tmp_path / "twice.bin"
        twice.write_bytes(random.randbytes(5000))
        async with Client(url, devs[1]) as c:
            twice_id = await transfer.upload(c, twice)
        monkeypatch.undo()
        assert sorted(statuses) == [200, 409, 409], statuses

        # -- what the database holds ------------------------------------------------------------
        db = await connect(database_url)
        try:
            complete = {
                r["id"] for r in await db.fetchall("SELECT id FROM artifacts WHERE status = 'complete'")
            }
            grants = {
                (r["artifact_id"], r["name"])
                for r in await db.fetchall(
                    "SELECT g.artifact_id, p.name FROM grants g JOIN principals p ON p.id = g.principal_id"
                )
            }
            links = {
                r["id"]: (r["downloads"], r["max_downloads"])
                for r in await db.fetchall("SELECT id, downloads, max_downloads FROM links")
            }
            sessions: dict[str, set[str]] = {}
            for r in await db.fetchall("SELECT id, link_id FROM link_sessions"):
                sessions.setdefault(r["link_id"], set()).add(r["id"])
            findings = {r["id"] for r in await db.fetchall("SELECT id FROM findings")}
            rows = await db.fetchall("SELECT idx, leaf FROM audit_events ORDER BY idx")
            head = await db.fetchval("SELECT size FROM audit_head")
        finally:
            await db.close()
        events = [json.loads(bytes(r["leaf"])) for r in rows]

        def of(action: str) -> list[dict[str, Any]]:
            return [e for e in events if e["action"] == action and e["outcome"]["result"] == "allowed"]

        # The traffic did real work on both sides of the kill, and the kill cost some answers.
        assert len(ledger.artifacts) >= 4 and len(ledger.findings) >= 2 and ledger.queries >= 4, ledger
        # Acknowledged ⊆ stored.
        assert ledger.artifacts | {race_artifact, twice_id} <= complete
        assert ledger.grants <= grants
        assert set(ledger.links) | {race["id"]} <= set(links)
        assert ledger.findings <= findings
        for link_id, acknowledged in ledger.sessions.items():
            assert acknowledged <= sessions.get(link_id, set())
        # Stored == events: every change has its one event, every event its change.
        completions = Counter(e["resource"]["id"] for e in of("artifact.complete"))
        assert set(completions) == complete and set(completions.values()) == {1}
        assert {(e["resource"]["id"], e["details"]["principal"]) for e in of("artifact.grant")} == grants
        assert {e["resource"]["id"] for e in of("link.create")} == set(links)
        assert {e["resource"]["id"] for e in of("finding.submit")} == findings
        session_events = Counter(e["details"]["link"] for e in of("link.session"))
        assert {e["details"]["session"] for e in of("link.session")} == set().union(*sessions.values())
        # Counts exact across replicas: stored count == sessions == events, within the maximum.
        for link_id, (downloads, max_downloads) in links.items():
            assert downloads == len(sessions.get(link_id, ())) == session_events[link_id]
            assert downloads <= max_downloads
        # The race: every racer got a definite answer (retrying lost ones with its proof), so
        # exactly the maximum was handed out, to exactly that many racers.
        assert sum(race_won) == RACE_MAX_DOWNLOADS == links[race["id"]][0]
        # Unknown outcomes were bounded by what was lost.
        assert len(links) <= len(ledger.links) + 1 + ledger.unknown["link.create"]
        assert len(findings) <= len(ledger.findings) + ledger.unknown["finding.submit"]
        # One log, no gap.
        assert [r["idx"] for r in rows] == list(range(len(rows))) and head == len(rows)
        assert len(of("audit.query")) >= ledger.queries

        # -- the auditor's own check, offline, against the pinned key --------------------------
        await _wait_for_checkpoint(url, admin, len(rows))
        bundle, state = tmp_path / "bundle", tmp_path / "audit-state.json"
        cli = [sys.executable, "-m", "exchange.cli"]
        export = subprocess.run(
            [
                *cli,
                "--server",
                url,
                "--identity",
                str(replicas.admin_path),
                "audit",
                "export",
                "--out",
                str(bundle),
                "--state",
                str(state),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert export.returncode == 0, export.stderr
        verify = subprocess.run(
            [
                *cli,
                "--json",
                "audit",
                "verify",
                "--bundle",
                str(bundle),
                "--state",
                str(state),
                "--vkey",
                replicas.verifier_key,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        report = json.loads(verify.stdout)
        assert report["verdict"] == "ok" and report["size"] >= len(rows)
    finally:
        await asyncio.to_thread(replicas.stop)
        await pg.drop(database_url)


async def _wait_for_checkpoint(url: str, admin: Identity, size: int) -> None:
    async with Client(url, admin) as c, asyncio.timeout(30):
        while True:
            try:
                if (await AuditClient(c).checkpoint())["size"] >= size:
                    return
            except NotFound:
                pass  # none published yet
            await asyncio.sleep(0.2)

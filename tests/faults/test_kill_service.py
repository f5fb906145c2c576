"""The service killed with SIGKILL in the middle of a burst of concurrent changes, round after
round at random moments. After each restart: every acknowledged (2xx) change is there with its
audit event, nothing unacknowledged is half-there, and the log's indices run without a gap."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from exchange.client import Client
from exchange.db import connect
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import ExchangeError
from exchange.identity import Identity
from tests.conftest import ServiceProcess, free_port, service_env

ROUNDS = 6


@pytest.mark.slow
async def test_sigkill_during_bursts(tmp_path: Path, database_url: str, seaweed: SeaweedFS) -> None:
    service = ServiceProcess(service_env(tmp_path, free_port(), seaweed, EXCHANGE_DATABASE_URL=database_url))
    admin_path = tmp_path / "admin.identity"
    service.init_admin(admin_path)
    admin = Identity.load(admin_path)
    acknowledged: set[str] = set()
    rng = random.Random(20261128)
    for round_ in range(ROUNDS):
        service.start()
        async with Client(service.url, admin, timeout_s=10) as client:

            async def burst(client: Client, prefix: str) -> None:
                for i in range(1000):
                    name = f"{prefix}-{i}"
                    try:
                        await client.create_org(name)
                    except ExchangeError:
                        return  # the service died under us: this one is unacknowledged
                    acknowledged.add(name)

            workers = [asyncio.create_task(burst(client, f"r{round_}-w{w}")) for w in range(6)]
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            await asyncio.to_thread(service.kill)
            await asyncio.gather(*workers)

    db = await connect(database_url)
    try:
        orgs = {r["name"] for r in await db.fetchall("SELECT name FROM orgs")} - {"operators"}
        rows = await db.fetchall("SELECT idx, leaf FROM audit_events ORDER BY idx")
        head = await db.fetchval("SELECT size FROM audit_head")
    finally:
        await db.close()
    events = [json.loads(bytes(r["leaf"])) for r in rows]
    created = {e["details"]["name"] for e in events if e["action"] == "org.create"}
    assert len(acknowledged) > ROUNDS * 6  # the bursts did real work before each kill
    assert acknowledged <= orgs  # nothing acknowledged was lost
    assert orgs == created  # every change has its event, and every event its change
    assert [r["idx"] for r in rows] == list(range(len(rows))) and head == len(rows)

"""PostgreSQL stopped with `pg_ctl stop -m immediate` while principals are being invited: requests
in flight get 503 (never a 500, never a success without its event), and the service recovers by
itself once the database is back — no restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from exchange.dev.seaweed import SeaweedFS
from exchange.errors import DependencyError
from tests.conftest import FakeClock, start_stack
from tests.faults.conftest import PrivatePostgres


@pytest.mark.slow
async def test_immediate_stop_during_invites(
    private_postgres: PrivatePostgres, tmp_path: Path, seaweed: SeaweedFS, clock: FakeClock
) -> None:
    stack = await start_stack(tmp_path, private_postgres.dsn, seaweed, clock)
    ok: list[str] = []
    unavailable = 0
    try:
        async with stack.client(stack.admin) as admin:
            await admin.create_org("lab")

            async def invite_loop(stop_at: float) -> None:
                nonlocal unavailable
                while time.monotonic() < stop_at:
                    try:
                        ok.append((await admin.create_invite(role="tester", org="lab"))["id"])
                    except DependencyError as exc:
                        assert exc.code in ("database-unavailable", "dependency-unavailable"), exc.code
                        unavailable += 1
                        await asyncio.sleep(0.05)

            stop_at = time.monotonic() + 4
            workers = [asyncio.create_task(invite_loop(stop_at)) for _ in range(8)]
            await asyncio.sleep(1)
            await asyncio.to_thread(private_postgres.stop_immediate)
            await asyncio.sleep(1)
            await asyncio.to_thread(private_postgres.start)
            await asyncio.gather(*workers)
            assert unavailable > 0, "the stop should have refused some requests"
            assert len(ok) > 8, "invites should have gone through before the stop"

            # Recovery without a restart: within a few seconds the same app serves again.
            deadline = time.monotonic() + 15
            while True:
                try:
                    ok.append((await admin.create_invite(role="tester", org="lab"))["id"])
                    break
                except DependencyError:
                    assert time.monotonic() < deadline, "the service did not recover"
                    await asyncio.sleep(0.2)

        rows = {r["id"] for r in await stack.db.fetchall("SELECT id FROM invites")}
        # Refusals recorded during the outage share the action but carry no resource: skip them.
        events = {
            e["resource"]["id"]
            for e in await stack.events()
            if e["action"] == "invite.create" and e["outcome"]["result"] == "allowed"
        }
        # Every acknowledged invite exists and has its event; nothing exists without an event.
        assert set(ok) <= rows
        assert rows == events
    finally:
        await stack.server.close()

"""`exchange admin migrate`, as the Kubernetes migration Job runs it: a fresh database is brought
to this version's schema, a second run changes nothing, and a bad database URL is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from exchange.db import connect
from exchange.db.migrate import migrations
from tests.conftest import EXCHANGE


def _migrate(home: Path, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    env |= {"EXCHANGE_HOME": str(home), "EXCHANGE_DATABASE_URL": url}
    return subprocess.run(
        [*EXCHANGE, "--json", "admin", "migrate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_migrate_brings_a_fresh_database_to_this_version(database_url: str, tmp_path: Path) -> None:
    latest = len(migrations())
    for _ in range(2):  # idempotent: the second run finds nothing to do
        done = _migrate(tmp_path, database_url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"schema_version": latest}
    db = await connect(database_url)
    try:
        applied = await db.fetchall("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in applied] == list(range(1, latest + 1))
        assert await db.fetchval("SELECT size FROM audit_head") == 0  # the schema, nothing else
    finally:
        await db.close()


def test_migrate_refuses_a_bad_database_url(tmp_path: Path) -> None:
    refused = _migrate(tmp_path, "mysql://nowhere/db")
    assert refused.returncode == 2, refused.stderr
    assert "database_url" in refused.stderr and "Traceback" not in refused.stderr

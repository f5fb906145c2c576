"""A dump of the database (SQLite's, or pg_dump's) holds no S3 secret, no invite code, no private key."""

from __future__ import annotations

import base64
import shutil
import sqlite3
import subprocess

import pytest

from tests.conftest import Stack


async def dump(stack: Stack) -> str:
    url = stack.settings.effective_database_url
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            text = "\n".join(conn.iterdump())
        conn.close()
        return text
    if shutil.which("pg_dump") is None:
        pytest.fail("pg_dump is not installed (Debian package postgresql-client)")
    return subprocess.run(["pg_dump", url], capture_output=True, text=True, check=True).stdout


async def test_no_secret_at_rest(stack: Stack) -> None:
    tester = await stack.principal("alice", "tester")
    async with stack.client(stack.admin) as admin:
        invite = await admin.create_invite(role="tester", org="lab")
    text = await dump(stack)
    assert "alice" in text  # the dump is real and complete enough to find a name
    secrets = {
        "S3 secret": stack.settings.s3_secret_access_key,
        "invite code": invite["code"],
        "admin age identity": stack.admin.age_identity,
        "tester age identity": tester.age_identity,
        "tester signing seed": base64.b64encode(tester.signing_seed).decode(),
        "tester signing seed (hex)": tester.signing_seed.hex(),
        "admin signing seed": base64.b64encode(stack.admin.signing_seed).decode(),
    }
    found = [name for name, value in secrets.items() if value and value in text]
    assert found == []

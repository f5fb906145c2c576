"""Shared fixtures: a real SeaweedFS for the session, real SQLite and PostgreSQL per test.

PostgreSQL: `EXCHANGE_TEST_POSTGRES_DSN` (default postgresql://postgres@127.0.0.1:5432/test).
Each test gets a database of its own, created from template0 and dropped afterwards. When no
server answers, PostgreSQL tests fail unless `EXCHANGE_TEST_SKIP_POSTGRES=1` says to skip them:
in CI they never skip (.ci/run starts a server).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from yarl import URL

from exchange.api.app import create_app
from exchange.api.connections import start_site
from exchange.client import Client
from exchange.db import Database, connect, migrate
from exchange.dev.seaweed import S3Credentials, SeaweedFS
from exchange.identity import Identity
from exchange.server import bootstrap_with_settings
from exchange.settings import Settings

#: Tests that run the reference `age` binary. Outside CI they skip when it is missing; in CI
#: (CI=true) they run and fail, since scripts/test installs it: a skip there would hide a gap.
requires_age = pytest.mark.skipif(
    shutil.which("age") is None and os.environ.get("CI") != "true",
    reason="the age binary is not installed (apt-get install age)",
)

POSTGRES_DSN = os.environ.get("EXCHANGE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BUCKET = "exchange-test"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the whole session, with credentials (unsigned requests are refused).

    Two identities, as in production: `seaweed.credentials` is the operator's (it made the
    bucket; tests inspect storage with it), `seaweed.service_credentials` the service's, which
    may only read and write objects in BUCKET. Every stack the suite starts gets the latter, so
    the suite passing shows the least-privilege identity suffices.
    """
    data = tmp_path_factory.mktemp("seaweed")
    store = SeaweedFS(
        data,
        credentials=S3Credentials.generate(),
        service_credentials=S3Credentials.generate(),
        bucket=BUCKET,
    )
    store.start()
    store.ensure_bucket()
    yield store
    store.stop()


class PostgresDatabases:
    """Creates and drops one throwaway database per test on the configured server."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def create(self) -> str:
        name = "exchange_t_" + secrets.token_hex(6)
        try:
            conn = await asyncpg.connect(self.dsn, timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            if os.environ.get("EXCHANGE_TEST_SKIP_POSTGRES") == "1":
                pytest.skip(f"PostgreSQL not available ({exc.__class__.__name__}) and skipping was asked for")
            raise
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()
        base, _, _ = self.dsn.rpartition("/")
        return f"{base}/{name}"

    async def drop(self, url: str) -> None:
        name = url.rpartition("/")[2]
        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database URL: once SQLite, once PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'exchange.db'}"
        return
    pg = PostgresDatabases(POSTGRES_DSN)
    url = await pg.create()
    try:
        yield url
    finally:
        await pg.drop(url)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await connect(database_url)
    await migrate(database)
    yield database
    await database.close()


class FakeClock:
    """Milliseconds since the epoch that move only when a test moves them."""

    def __init__(self, start_ms: int | None = None) -> None:
        import time

        self.now_ms = start_ms if start_ms is not None else time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


def service_keys(seaweed: SeaweedFS) -> S3Credentials:
    """The keys a service started on `seaweed` is given: the store's service identity.

    A store a test made for itself without one (to kill it, say) has only the operator's keys.
    """
    return seaweed.service_credentials if seaweed.bucket is not None else seaweed.credentials


def make_settings(tmp_path: Path, database_url: str, seaweed: SeaweedFS, **overrides: Any) -> Settings:
    base = Settings(
        home=tmp_path,
        database_url=database_url,
        s3_endpoint=seaweed.endpoint,
        s3_bucket=BUCKET,
        s3_access_key_id=service_keys(seaweed).access_key_id,
        s3_secret_access_key=service_keys(seaweed).secret_access_key,
    )
    return base.replace(**overrides) if overrides else base


class Stack:
    """A running app on a real TCP port, its database, and helpers to act as principals."""

    def __init__(self, server: ServedApp, settings: Settings, admin: Identity, tmp_path: Path) -> None:
        self.server = server
        self.settings = settings
        self.admin = admin
        self.tmp_path = tmp_path

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def app(self) -> Any:
        return self.server.app

    @property
    def db(self) -> Database:
        from exchange.api.keys import DB

        return self.server.app[DB]  # type: ignore[no-any-return]

    def client(self, identity: Identity | None = None) -> Client:
        return Client(self.url, identity)

    def own_storage(self) -> Any:
        """A `Storage` of its own on the stack's bucket, with the service's keys: what someone
        holding the store's credentials can do. Close it."""
        from exchange.storage import Storage

        return Storage(
            endpoint=self.settings.s3_endpoint,
            region="us-east-1",
            bucket=BUCKET,
            access_key_id=self.settings.s3_access_key_id,
            secret_access_key=self.settings.s3_secret_access_key,
        )

    async def principal(self, name: str, role: str, org: str = "lab") -> Identity:
        """Enrol a new principal through a real invite; return its identity."""
        async with self.client(self.admin) as admin:
            if org not in {o["name"] for o in await admin.list_orgs()}:
                await admin.create_org(org)
            invite = await admin.create_invite(role=role, org=org)
        identity = Identity.generate()
        async with self.client() as anon:
            await anon.enroll(invite["code"], name, identity)
        return identity

    async def count(self, table: str) -> int:
        assert table.isidentifier()
        return int(await self.db.fetchval(f"SELECT COUNT(*) FROM {table}"))  # noqa: S608 - fixed names

    async def events(self) -> list[dict[str, Any]]:
        import json

        rows = await self.db.fetchall("SELECT leaf FROM audit_events ORDER BY idx")
        return [json.loads(bytes(r["leaf"])) for r in rows]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def start_stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock, **overrides: Any
) -> Stack:
    """Bootstrap an admin, then serve an app on a free loopback port."""
    settings = make_settings(tmp_path, database_url, seaweed, **overrides)
    admin_path = tmp_path / "admin.identity"
    if not admin_path.exists():
        await bootstrap_with_settings(settings, identity_path=admin_path, name="admin", org_name="operators")
    server = ServedApp(create_app(settings, clock=clock), settings)
    await server.start_server()
    return Stack(server, settings, Identity.load(admin_path), tmp_path)


class ServedApp:
    """An app served the way `exchange serve` serves it (`api.connections.start_site`: the
    connection guard, and the HTTP parser's refusals as problem details), on a free loopback
    port; with the few members of aiohttp's TestServer that the tests use."""

    def __init__(self, app: web.Application, settings: Settings, host: str = "127.0.0.1") -> None:
        self.app = app
        self.settings = settings
        self.host = host
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start_server(self) -> None:
        self._runner, site = await start_site(self.app, self.settings, host=self.host, port=0)
        self.port = site.port

    def make_url(self, path: str) -> URL:
        return URL.build(scheme="http", host=self.host, port=self.port, path=path)

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path, database_url, seaweed, clock)
    yield s
    await s.server.close()


# -- the service as separate processes, as people run it ------------------------------------------

EXCHANGE = [sys.executable, "-m", "exchange.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    env: dict[str, str]
    admin: Path
    home: Path

    def run(
        self, *args: str, identity: Path | None = None, server: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*EXCHANGE]
        if server:
            cmd += ["--server", self.url]
        if identity is not None:
            cmd += ["--identity", str(identity)]
        return subprocess.run(
            [*cmd, *args], capture_output=True, text=True, env=self.client_env(), timeout=60, check=False
        )

    def client_env(self) -> dict[str, str]:
        """The environment a person's CLI runs in: no EXCHANGE_* settings, a home of its own."""
        return {k: v for k, v in self.env.items() if not k.startswith("EXCHANGE_")} | {"HOME": str(self.home)}

    def enrol(self, role: str, org: str, name: str, identity: Path) -> None:
        """Enrol `name` (a new identity file) as `role` of `org` through the CLI, as people do;
        the organisation is made first if it is new."""
        if org not in {
            o["name"] for o in json.loads(self.run("--json", "org", "ls", identity=self.admin).stdout)
        }:
            self.run("org", "create", org, identity=self.admin)
        invite = self.run("--json", "invite", "--role", role, "--org", org, identity=self.admin)
        assert invite.returncode == 0, invite.stderr
        done = self.run("enroll", json.loads(invite.stdout)["code"], "--name", name, identity=identity)
        assert done.returncode == 0, done.stderr


def service_env(home: Path, port: int, seaweed: SeaweedFS, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    return base | {
        "EXCHANGE_HOME": str(home),
        "EXCHANGE_PORT": str(port),
        "EXCHANGE_S3_ENDPOINT": seaweed.endpoint,
        "EXCHANGE_S3_BUCKET": BUCKET,
        "EXCHANGE_S3_ACCESS_KEY_ID": service_keys(seaweed).access_key_id,
        "EXCHANGE_S3_SECRET_ACCESS_KEY": service_keys(seaweed).secret_access_key,
        **extra,
    }


class ServiceProcess:
    """`exchange serve` as its own OS process, to stop, or kill, for real."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.home = Path(env["EXCHANGE_HOME"])
        self.url = f"http://127.0.0.1:{env['EXCHANGE_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def init_admin(self, identity: Path) -> None:
        init = subprocess.run(
            [*EXCHANGE, "--identity", str(identity), "init"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert init.returncode == 0, init.stderr

    def start(self, timeout: float = 30) -> None:
        with (self.home / "serve.log").open("a") as log:
            self.proc = subprocess.Popen(
                [*EXCHANGE, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):  # noqa: S310 - loopback
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError((self.home / "serve.log").read_text()) from None
                time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=15)


def serve_process(
    seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory, **extra: str
) -> Iterator[Served]:
    """`exchange serve` with a first admin, for as long as the generator runs; `extra`: settings."""
    home = tmp_path_factory.mktemp("cli")
    service = ServiceProcess(service_env(home, free_port(), seaweed, **extra))
    admin = home / "admin.identity"
    service.init_admin(admin)
    service.start()
    yield Served(url=service.url, env=service.env, admin=admin, home=home)
    assert service.stop() == 0


@pytest.fixture(scope="module")
def served(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve_process(seaweed, tmp_path_factory)

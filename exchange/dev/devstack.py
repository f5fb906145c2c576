"""`scripts/run`: the whole service on one machine with its embedded defaults.

Starts a local SeaweedFS (loopback only, two S3 key pairs generated on first run and kept in the
data directory: the operator's, `s3-credentials.json`, which creates the bucket, and the
service's, `s3-service-credentials.json`, which may only read and write objects in that bucket
and is the one the service is given), creates the bucket, migrates the SQLite database, creates
the first admin identity on first run, and serves the API until Ctrl-C or SIGTERM, when it stops
everything it started. A second run on the same `EXCHANGE_HOME` reuses all of it.

`--database postgresql` (or a postgresql:// URL) uses PostgreSQL instead, creating the database
if the server has none of that name. `--replicas N` (N > 1, PostgreSQL only) runs N `exchange
serve` processes behind HAProxy on the one public port (`dev.replicas`), with SeaweedFS as a
cluster (`dev.seaweedcluster`: master, two volume servers holding a copy each, filer, S3).
HAProxy is installed with apt-get when it is missing and we are root.

Not for production: there, run `exchange serve` against MinIO or AWS S3 and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TypeVar

from ..errors import DependencyError, ExchangeError
from ..server import bootstrap_with_settings, run_until_stopped
from ..services.auditlog import load_or_create_signer
from ..settings import Settings
from .replicas import HAPROXY_PACKAGE, ReplicaSet, ensure_database, find_haproxy
from .seaweed import S3Credentials, SeaweedFS
from .seaweedcluster import SeaweedCluster

__all__ = ["main"]

log = logging.getLogger("exchange.dev.devstack")


#: `--database postgresql` without EXCHANGE_DATABASE_URL: the local server, trust auth.
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/exchange"


def dev_settings(env: Mapping[str, str]) -> Settings:
    return Settings.from_mapping({"EXCHANGE_HOME": ".exchange", **env})


def _service_credentials(home: Path) -> tuple[S3Credentials, S3Credentials]:
    """(operator's, service's) S3 key pairs, made on first run and kept in the home."""
    return (
        S3Credentials.load_or_create(home / "s3-credentials.json"),
        S3Credentials.load_or_create(home / "s3-service-credentials.json"),
    )


_Store = TypeVar("_Store", SeaweedFS, SeaweedCluster)


def _prepare(settings: Settings, kind: type[_Store], directory: str) -> tuple[Path, S3Credentials, _Store]:
    """The private home (made 0700), the service's S3 keys, and the store (not started yet),
    which the operator's keys administer and the service's may only use for its bucket."""
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    operator, service = _service_credentials(home)
    store = kind(
        home / directory,
        credentials=operator,
        service_credentials=service,
        bucket=settings.s3_bucket,
        s3_port=settings.s3_port or None,
    )
    return home, service, store


async def _run(settings: Settings) -> None:
    home, service, store = _prepare(settings, SeaweedFS, "storage")
    await asyncio.to_thread(store.start)
    try:
        await asyncio.to_thread(store.ensure_bucket)
        settings = settings.replace(
            home=home,
            s3_endpoint=store.endpoint,
            s3_access_key_id=service.access_key_id,
            s3_secret_access_key=service.secret_access_key,
        )
        admin_path = home / "admin.identity"
        if not admin_path.exists():
            await bootstrap_with_settings(
                settings, identity_path=admin_path, name="admin", org_name="operators"
            )
            print(f"created the first admin: {admin_path}", flush=True)
        # Auditors pin the log's key out of band: this output is one such band.
        signer = load_or_create_signer(settings.effective_log_signing_key_file, settings.log_origin)
        print(
            "\nexchange is running. In another shell:\n\n"
            f"  export EXCHANGE_SERVER={shlex.quote(settings.effective_public_url)}"
            f" EXCHANGE_IDENTITY={shlex.quote(str(admin_path))}\n"
            "  .venv/bin/exchange whoami\n\n"
            "audit log verifier key (auditors pin it: exchange audit verify --vkey KEY):\n"
            f"  {signer.verifier_key()}\n\n"
            f"storage: SeaweedFS S3 at {store.endpoint} (data in {home / 'storage'})\n"
            "Ctrl-C stops the service and the storage.\n",
            flush=True,
        )
        await run_until_stopped(settings)
    finally:
        await asyncio.to_thread(store.stop)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description="Run exchange on this machine: SeaweedFS for storage, a database, the API."
        " With no options, exactly what it always did: one server, SQLite, all data in EXCHANGE_HOME"
        " (default ./.exchange). Ctrl-C stops everything it started; a second run reuses the data.",
        epilog="examples:\n"
        "  scripts/run                                       one server, SQLite\n"
        "  scripts/run --database postgresql                 one server, PostgreSQL on 127.0.0.1:5432\n"
        "  scripts/run --replicas 3 --database postgresql    three servers behind HAProxy\n"
        "\n"
        "environment: EXCHANGE_HOME (data directory), EXCHANGE_PORT (the public port, default 8080;"
        " with replicas the proxy's), EXCHANGE_S3_PORT (storage port), EXCHANGE_DATABASE_URL (what"
        " --database postgresql means), and any other EXCHANGE_* setting (see README).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--database",
        metavar="sqlite|postgresql|URL",
        help="sqlite: a file in EXCHANGE_HOME (the default, unless EXCHANGE_DATABASE_URL names one);"
        f" postgresql: EXCHANGE_DATABASE_URL if it is a postgresql:// URL, else {DEFAULT_POSTGRES_URL};"
        " or a sqlite:/// or postgresql:// URL. A PostgreSQL database that does not exist is created.",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="how many `exchange serve` processes (default 1: in this process, no proxy). More than"
        " one needs PostgreSQL (--database postgresql) and HAProxy (Debian package haproxy), which"
        " then serves the public port and spreads requests over them.",
    )
    return parser


def _database_url(choice: str | None, env: Mapping[str, str]) -> str | None:
    """The database URL `--database` asks for (None: leave the settings as they are)."""
    if choice is None:
        return None
    if choice == "sqlite":
        return ""  # the default: a file in the home
    if choice in ("postgresql", "postgres"):
        configured = env.get("EXCHANGE_DATABASE_URL", "")
        return configured if configured.startswith(("postgresql://", "postgres://")) else DEFAULT_POSTGRES_URL
    if choice.startswith(("sqlite:///", "postgresql://", "postgres://")):
        return choice
    raise ValueError(choice)


def _ensure_haproxy() -> None:
    """Install HAProxy with apt-get when it is missing and we may; otherwise say what to install."""
    if find_haproxy() is not None:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing the Debian package {HAPROXY_PACKAGE} ...", file=sys.stderr, flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", HAPROXY_PACKAGE]):
            subprocess.run(cmd, env=env, capture_output=True, check=False)  # noqa: S603 - fixed argv
    if find_haproxy() is None:
        raise DependencyError(
            f"--replicas needs HAProxy: install the Debian package {HAPROXY_PACKAGE}"
            f" (sudo apt-get install {HAPROXY_PACKAGE})"
        )


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _run_replicas(settings: Settings, replicas: int) -> None:
    """N replicas behind HAProxy, a SeaweedFS cluster, PostgreSQL; until Ctrl-C or SIGTERM."""
    _ensure_haproxy()
    home, service, store = _prepare(settings, SeaweedCluster, "storage-cluster")
    extra = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("EXCHANGE_")
        and k
        not in (
            "EXCHANGE_HOME",
            "EXCHANGE_PORT",
            "EXCHANGE_HOST",
            "EXCHANGE_PUBLIC_URL",
            "EXCHANGE_METRICS_PORT",
        )
    }
    stack = ReplicaSet(
        home,
        storage=store,
        credentials=service,
        database_url=settings.effective_database_url,
        replicas=replicas,
        port=settings.port,
        bucket=settings.s3_bucket,
        settings=extra,
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        stack.start()
        ports = "\n".join(
            f"  replica {r.index}: {r.url} (metrics on port {r.metrics_port}, log {r.log_path})"
            for r in stack.replicas
        )
        print(
            f"\nexchange is running: {replicas} replicas behind HAProxy at {stack.url}. In another shell:\n\n"
            f"  export EXCHANGE_SERVER={shlex.quote(stack.url)}"
            f" EXCHANGE_IDENTITY={shlex.quote(str(stack.admin_path))}\n"
            "  .venv/bin/exchange whoami\n\n"
            "audit log verifier key (auditors pin it: exchange audit verify --vkey KEY):\n"
            f"  {stack.verifier_key}\n\n"
            f"proxy: HAProxy listening on {stack.url} (config {stack.haproxy_config_path})\n"
            f"{ports}\n"
            "(replicas answer only requests that came through the proxy)\n"
            f"database: {_redacted(stack.database_url)}\n"
            f"storage: SeaweedFS cluster, S3 at {store.endpoint} (data in {home / 'storage-cluster'})\n"
            "Ctrl-C stops the replicas, the proxy and the storage.\n",
            flush=True,
        )
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


def _redacted(url: str) -> str:
    """A database URL without its password, for printing."""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        database_url = _database_url(args.database, os.environ)
    except ValueError:
        parser.error(
            f"--database {args.database}: use sqlite, postgresql, or a sqlite:/// or postgresql:// URL"
        )
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = dev_settings(os.environ)
        if database_url is not None:
            settings = settings.replace(database_url=database_url)
        url = settings.effective_database_url
        if args.replicas > 1 and not url.startswith(("postgresql://", "postgres://")):
            parser.error(
                f"--replicas {args.replicas} needs PostgreSQL, which every replica shares: add"
                " --database postgresql (or a postgresql:// URL); SQLite serves one process"
            )
        if url.startswith(("postgresql://", "postgres://")):
            ensure_database(url)
        if args.replicas > 1:
            _run_replicas(settings, args.replicas)
        else:
            asyncio.run(_run(settings))
    except ExchangeError as exc:  # SeaweedStartError included
        print(f"exchange: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""Running the service: `serve` (the API on its settings) and `bootstrap` (the first admin).

Both read settings once from the environment at this edge. `exchange serve` is the production
entry point; `scripts/run` goes through `devstack`, which first starts a local SeaweedFS and then
calls the same functions. Serving goes through `api.connections.start_site` (deadlines for slow
clients, caps on connections), with link tokens redacted from every log record
(`redaction.install_redaction`) and the descriptor limit raised to fit the connection cap.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .api.app import create_app, system_clock
from .api.connections import start_site
from .db import connect, migrate
from .errors import ValidationError
from .identity import Identity
from .redaction import install_redaction
from .services.audit import SYSTEM, AuditLog, Context
from .services.principals import bootstrap_admin, principal_json
from .settings import Settings

__all__ = ["bootstrap", "run_until_stopped", "serve"]

log = logging.getLogger("exchange.server")


async def bootstrap_with_settings(
    settings: Settings, *, identity_path: Path, name: str, org_name: str
) -> dict[str, Any]:
    """Create the first admin from the identity at `identity_path` (made if missing)."""
    identity = Identity.load(identity_path) if identity_path.exists() else Identity.generate()
    db = await connect(settings.effective_database_url)
    try:
        await migrate(db)
        principal = await bootstrap_admin(
            db,
            AuditLog(origin=settings.log_origin, clock=system_clock),
            Context(actor=SYSTEM),
            name=name,
            org_name=org_name,
            keys=identity.public,
            now_ms=system_clock(),
        )
    finally:
        await db.close()
    identity.with_enrolment(name=name, server=settings.effective_public_url).save(
        identity_path, overwrite=True
    )
    return principal_json(principal)


async def bootstrap(
    env: Mapping[str, str], *, identity_path: Path, name: str, org_name: str
) -> dict[str, Any]:
    return await bootstrap_with_settings(
        Settings.from_mapping(env), identity_path=identity_path, name=name, org_name=org_name
    )


#: Descriptors kept for everything but client connections: database, storage and witness
#: connections, the listening socket, log and key files.
_RESERVED_DESCRIPTORS = 256


def fit_descriptor_limit(settings: Settings) -> Settings:
    """Raise this process's soft descriptor limit so `http_max_connections` fits under it; when
    the hard limit does not allow that, lower the cap to what fits and say so.

    Without this, a flood of connections fails at the limit instead of at the cap: `accept`
    fails (and the listening socket with it), as does every file, database or storage call.
    """
    try:
        import resource
    except ImportError:  # Windows
        return settings
    wanted = settings.http_max_connections + _RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft != unlimited and soft < wanted:
        raised = wanted if hard == unlimited else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, raised, exc)
    if soft != unlimited and soft < wanted:
        fits = max(soft - _RESERVED_DESCRIPTORS, soft // 2, 1)
        log.warning(
            "the descriptor limit (%d, hard %s) cannot hold http_max_connections=%d and %d more;"
            " serving at most %d connections (raise the hard limit: ulimit -Hn, LimitNOFILE=)",
            soft,
            "unlimited" if hard == unlimited else hard,
            settings.http_max_connections,
            _RESERVED_DESCRIPTORS,
            fits,
        )
        return settings.replace(
            http_max_connections=fits,
            http_max_connections_per_source=min(settings.http_max_connections_per_source, fits),
        )
    return settings


async def run_until_stopped(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM; then close every resource the app opened.

    Every log record the process writes from here on passes through link-token redaction.
    """
    install_redaction()
    settings = fit_descriptor_limit(settings)
    app = create_app(settings)
    runner, _ = await start_site(app, settings)
    try:
        log.info("exchange API listening on %s", settings.effective_public_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(env: Mapping[str, str]) -> None:
    settings = Settings.from_mapping(env)
    if not settings.s3_endpoint:
        raise ValidationError("EXCHANGE_S3_ENDPOINT is not set (scripts/run starts a local store for you)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvloop's event loop (libuv) spends about a third less CPU per request than asyncio's own
    # (`scripts/bench-api`); the standard loop where uvloop is not installed (Windows).
    try:
        import uvloop
    except ImportError:
        asyncio.run(run_until_stopped(settings))
    else:
        uvloop.run(run_until_stopped(settings))

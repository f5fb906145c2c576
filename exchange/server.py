"""Running the service: `serve` (the API on its settings), `bootstrap` (the first admin) and
`rotate_log_key` (the operator's hand-over of the log to a new key).

Both read settings once from the environment at this edge. `exchange serve` is the production
entry point; `scripts/run` goes through `devstack`, which first starts a local SeaweedFS and then
calls the same functions. Serving goes through `api.connections.start_site` (deadlines for slow
clients, caps on connections), with link tokens redacted from every log record
(`redaction.install_redaction`) and the descriptor limit raised to fit the connection cap.
Logs are text or one JSON object a line (`log_format`), either way formatted from the already
redacted record. Metrics are served on a listener of their own (`metrics_port`, `api.metrics`).
On SIGTERM or SIGINT the listener closes at once, requests in flight get `shutdown_grace_s` to
finish, and then the app's cleanup context closes everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from .api.app import IN_FLIGHT, REQUEST_ID, create_app, system_clock
from .api.connections import start_site
from .api.metrics import start_metrics_site
from .db import connect, migrate
from .errors import ValidationError
from .identity import Identity
from .redaction import install_redaction
from .services import logrotation
from .services.audit import SYSTEM, AuditLog, Context
from .services.principals import bootstrap_admin, principal_json
from .settings import Settings

__all__ = ["JsonFormatter", "bootstrap", "rotate_log_key", "run_until_stopped", "serve"]

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


async def rotate_log_key(settings: Settings, *, new_origin: str, new_key_file: Path) -> dict[str, Any]:
    """Rotate the log signing key (`services.logrotation`): the new key is written to
    `new_key_file` (0600; an existing file is taken only if it is a key for `new_origin`, which
    is how a second run resumes), the rotation event appended, the old key's last checkpoint
    signed and cosigned. Returns what the operator needs next."""
    from .services.auditlog import Publisher, load_or_create_signer

    old_file = settings.effective_log_signing_key_file
    if not old_file.exists():
        raise ValidationError(f"there is no log signing key at {old_file} to rotate from", code="no-log-key")
    old = load_or_create_signer(old_file, settings.log_origin)
    if new_key_file.resolve() == old_file.resolve():
        raise ValidationError("the new key file must not be the current one", code="log-origin-unchanged")
    new = load_or_create_signer(new_key_file, new_origin)  # made 0600 and never overwritten
    db = await connect(settings.effective_database_url)
    try:
        await migrate(db)
        audit = AuditLog(origin=old.name, clock=system_clock)
        rotation = await logrotation.append_rotation(db, audit, old, new)
        publisher = Publisher(db, audit, old, settings, system_clock)
        await publisher.sign_last_word(rotation.size)
    finally:
        await db.close()
    return {
        "rotated_at_idx": rotation.idx,
        "last_checkpoint_size": rotation.size,
        "from_origin": rotation.from_origin,
        "to_origin": rotation.to_origin,
        "new_vkey": new.verifier_key(),
        "new_key_file": str(new_key_file),
        "next": {
            "EXCHANGE_LOG_ORIGIN": new.name,
            "EXCHANGE_LOG_SIGNING_KEY_FILE": str(new_key_file),
        },
    }


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


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the request id while a request is
    handled, and a traceback when there is one. It formats the record as the handler's filters
    left it (`RedactingFilter` runs first: filters run before the formatter)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False)


JsonFormatter.converter = time.gmtime


def configure_logging(settings: Settings) -> None:
    """The root handler, in the configured format; redaction goes on it in `run_until_stopped`."""
    if settings.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Access lines only where a log pipeline can use them (request ids, one object a line).
        logging.getLogger("exchange.access").setLevel(logging.WARNING)


async def run_until_stopped(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM; then stop accepting connections, give requests in flight
    `shutdown_grace_s` to finish (cancelling any left), and close every resource the app opened.

    Every log record the process writes from here on passes through link-token redaction.
    """
    install_redaction()
    settings = fit_descriptor_limit(settings)
    app = create_app(settings)
    runner, _ = await start_site(app, settings)
    metrics_runner: web.AppRunner | None = None
    try:
        if settings.metrics_port:
            metrics_runner, port = await start_metrics_site(
                app, host=settings.metrics_host, port=settings.metrics_port
            )
            log.info("metrics listening on %s port %d", settings.metrics_host, port)
        log.info("exchange API listening on %s", settings.effective_public_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # aiohttp's own cleanup would wait up to its fixed 60 s for handlers; ours is a setting.
        # Closing the listener first refuses new connections while the others finish.
        for site in list(runner.sites):
            await site.stop()
        in_flight = app[IN_FLIGHT]
        if in_flight.tasks:
            log.info(
                "stopping: waiting up to %g s for %d requests in flight",
                settings.shutdown_grace_s,
                len(in_flight.tasks),
            )
        cancelled = await in_flight.drain(settings.shutdown_grace_s)
        if cancelled:
            log.warning(
                "stopping: cancelled %d requests still running after %g s",
                cancelled,
                settings.shutdown_grace_s,
            )
    finally:
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    log.info("exchange API stopped")


def serve(env: Mapping[str, str]) -> None:
    settings = Settings.from_mapping(env)
    if not settings.s3_endpoint:
        raise ValidationError("EXCHANGE_S3_ENDPOINT is not set (scripts/run starts a local store for you)")
    configure_logging(settings)
    # uvloop's event loop (libuv) spends about a third less CPU per request than asyncio's own
    # (`scripts/bench-api`); the standard loop where uvloop is not installed (Windows).
    try:
        import uvloop
    except ImportError:
        asyncio.run(run_until_stopped(settings))
    else:
        uvloop.run(run_until_stopped(settings))

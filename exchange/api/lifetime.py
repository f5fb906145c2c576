"""Everything the service opens, runs and closes: one cleanup context, its order in code.

On start, each step needs the ones before it:

1. the database (migrated; timed into the app's metrics) and the storage client (timed too);
2. the log's signing key, loaded once: it signs checkpoints, and link proofs derive their key
   from it; its origin must be the log's (`logrotation.adopt_origin`: after a key rotation, a
   replica still configured with the old one refuses to start);
3. the limits: the redemption buckets and failure budgets (shared by every replica in the
   database, with this replica's memory of the empty ones) and the refusal ledger (this
   replica's counts not yet added to the shared ones);
4. the checkpoint publisher, after the log's start check (a damaged log starts failed closed);
   it signs only while it holds the signer lease, taken by its task at once if free;
5. the background tasks: nonce purging, the abandoned-upload sweep, the publisher, the refusal
   counts and summaries (which also purges full token buckets).

On stop, the reverse: the tasks are cancelled (newest first), the signer lease is released
(another replica takes over without waiting for it to expire) and the refusal counts still
pending are written while the database is open, then storage and the database close. A step that
fails on start undoes the steps before it.

What this module does not do: decide anything. Each task's work lives with its subject
(`artifacts.sweep_forever`, `refusals.flush_forever`, `auditlog.Publisher.run_forever`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..db import connect, migrate
from ..errors import DependencyError
from ..services import logrotation, nonces
from ..services.auditlog import load_or_create_signer
from ..storage import Storage
from . import artifacts, audit, links, metrics, refusals
from .keys import CLOCK, DB, SETTINGS, STORAGE
from .routing import running

__all__ = ["lifetime"]

log = logging.getLogger("exchange.api")

#: How often seen nonces that no signature could reuse any more are deleted.
NONCE_PURGE_INTERVAL_S = 60.0


async def lifetime(app: web.Application) -> AsyncIterator[None]:
    """The app's one cleanup context (see the module's docstring for the order)."""
    settings = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        # 1. the database and storage
        db = await connect(settings.effective_database_url)
        stack.push_async_callback(db.close)
        await migrate(db)
        counted = app[metrics.METRICS]
        app[DB] = db = metrics.TimedDatabase(db, counted)
        storage = Storage(
            endpoint=settings.s3_endpoint,
            public_endpoint=settings.effective_s3_public_endpoint,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            timeout_s=settings.storage_timeout_s,
            on_call=counted.observe_storage,
        )
        stack.push_async_callback(storage.close)
        app[STORAGE] = storage
        # 2. the log key
        signer = await asyncio.to_thread(
            load_or_create_signer, settings.effective_log_signing_key_file, settings.log_origin
        )
        # A replica configured for an origin the log rotated away from refuses to start.
        await logrotation.adopt_origin(db, signer)
        links.setup_proof_keys(app, signer)
        # 3. the limits; this replica's refusal counts are added before the database closes
        links.setup_limits(app)
        refusals.setup_ledger(app)
        stack.push_async_callback(refusals.final_flush, app)
        # 4. the publisher, after the log's start check
        publisher = await audit.start_publisher(app, signer)
        publisher.on_witness_call = counted.observe_witness
        publisher.on_checkpoint = lambda at_ms: setattr(counted, "checkpoint_at_ms", at_ms)
        counted.signer_fence = lambda: publisher.lease.fence
        await publisher.note_latest()
        # After the tasks stop, before the database closes: the next replica signs at once.
        stack.push_async_callback(publisher.release)
        # 5. the background tasks
        for task in (
            _purge_nonces_forever(app),
            artifacts.sweep_forever(app),
            publisher.run_forever(),
            refusals.flush_forever(app),
        ):
            await stack.enter_async_context(running(task))
        yield


async def _purge_nonces_forever(app: web.Application) -> None:
    while True:
        await asyncio.sleep(NONCE_PURGE_INTERVAL_S)
        try:
            await nonces.purge(app[DB], app[CLOCK]())
        except DependencyError:
            log.warning("nonce purge skipped: database unavailable")

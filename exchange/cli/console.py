"""`exchange audit console`: the auditors' console, a local web page over the verified log.

The command only starts and stops it: `exchange.console` verifies and serves. It prints the
one address (with its one-time key) to stdout and nothing else there, so a script can read it.
"""

from __future__ import annotations

import asyncio
import signal
import webbrowser
from pathlib import Path

import click
from aiohttp import web

from .. import auditverify
from ..client import Client
from ..console import Access, Console, create_console_app
from ..errors import InputError, PermissionDenied
from ._base import Options, fail, pass_opts, run
from .audit import _state_option, audit, pin_options, pinned_state

_HELP = """Open the auditors' console: a local web page over the audit log, verified as you read it.

\b
It shows the log's state (the signed checkpoint, verified as `exchange audit verify --tiles`
does, and saved in --state), the events with filters (each row's inclusion proof checked before
it is shown), an artifact's custody timeline, charts of downloads, refusals and findings, and
exports (JSONL with proofs, CSV, one event's tlog-proof). A failed check turns the page red and
keeps it red until the console is restarted: a tamper is evidence, not a glitch.

\b
It listens on 127.0.0.1 only (--port, default a free one) and prints one address,
http://127.0.0.1:PORT/?key=KEY, holding a one-time key: opening it sets a session cookie in
that browser and spends the key. Keep it to yourself until it is used. Your private key
stays in this process; the page gets only verified JSON. The log key must be pinned in --state
(by `exchange audit verify`) or given with --vkey. Stop it with Ctrl-C.

\b
Exit codes:
  0  stopped (Ctrl-C)
  2  bad usage: no pinned key and no --vkey, unreadable state, the port is in use
  3  the service did not accept your identity
  4  your identity is not an auditor's or an admin's
  7  the service cannot be reached
"""


@audit.command("console", help=_HELP)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port on 127.0.0.1 (0: a free one).",
)
@click.option("--open/--no-open", "open_browser", default=False, help="Open the address in a browser.")
@_state_option("Your verify state: the pinned log key and the last verified checkpoint.")
@pin_options
@pass_opts
def console(
    opts: Options,
    port: int,
    open_browser: bool,
    state_dir: Path,
    log_vkey: str | None,
    witness_vkeys: tuple[str, ...],
    quorum: int | None,
) -> None:
    state = pinned_state(opts, state_dir, log_vkey)
    if witness_vkeys:
        state.witness_vkeys = list(witness_vkeys)
    if quorum is not None:
        state.witness_quorum = quorum
    if state.witness_quorum > len(state.witness_vkeys):
        fail(InputError("the witness quorum is larger than the number of witness keys"), as_json=opts.json)
    run(opts, lambda: _serve(opts, state_dir, state, port, open_browser))


async def _serve(
    opts: Options, state_dir: Path, state: auditverify.State, port: int, open_browser: bool
) -> None:
    identity = opts.identity()
    async with Client(opts.server_url(identity), identity) as client:
        me = await client.whoami()
        if me.get("role") not in ("auditor", "admin"):
            raise PermissionDenied(
                "the console reads the audit log: it needs an auditor's or admin's identity"
            )
        access = Access()
        app = create_console_app(Console(client, state_dir, state, auditor=me), access)
        runner = web.AppRunner(app, access_log=None)  # the key travels in a query string
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port)
            try:
                await site.start()
            except OSError as exc:
                raise InputError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
            access.port = int(runner.addresses[0][1])
            click.echo(access.url())
            click.echo("exchange: audit console running; press Ctrl-C to stop it", err=True)
            if open_browser:
                webbrowser.open(access.url())
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            click.echo("exchange: audit console stopped", err=True)
        finally:
            await runner.cleanup()

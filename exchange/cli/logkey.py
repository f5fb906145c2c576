"""`exchange admin log-key rotate`: hand the audit log over to a new signing key and origin.

The work is `server.rotate_log_key` (`services.logrotation` says how a rotation is recorded and
followed); this module only parses, calls and prints what to do next.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ._base import Options, output, pass_opts, run
from .admin import admin
from .server import require_server


@admin.group("log-key")
def log_key() -> None:
    """The audit log's signing key."""


@log_key.command()
@click.option(
    "--new-origin",
    required=True,
    metavar="ORIGIN",
    help="The log's next origin, e.g. exchange.example.org/audit/2027"
    " (must differ from EXCHANGE_LOG_ORIGIN).",
)
@click.option(
    "--new-key-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the new signing key (mode 0600). An existing file is used, not"
    " overwritten, if it is a key for --new-origin: that is how an interrupted rotation resumes.",
)
@pass_opts
def rotate(opts: Options, new_origin: str, new_key_file: Path) -> None:
    """Rotate the log signing key; the old log's last event names the new origin and key.

    \b
    1. writes the new key to --new-key-file;
    2. appends `audit.log.rotated` (next_origin, next_vkey) as the last event under the old
       origin; every replica appends under the new origin from then on;
    3. signs the checkpoint ending with that event with the old key, with the witnesses'
       cosignatures (exit 7 and nothing stored if fewer than the quorum answer: run again).
    Then restart the replicas one by one with EXCHANGE_LOG_ORIGIN and
    EXCHANGE_LOG_SIGNING_KEY_FILE set to the new ones (a replica with the old ones refuses to
    start). Auditors run `exchange audit verify` as usual: it follows the rotation, because the
    old key signed it, and pins the new key. Safe while replicas run; run it once, from one place.
    """
    server = require_server(opts)

    async def work() -> dict[str, Any]:
        from ..settings import Settings

        settings = Settings.from_mapping(os.environ)
        return await server.rotate_log_key(  # type: ignore[no-any-return]
            settings, new_origin=new_origin, new_key_file=new_key_file
        )

    done = run(opts, work)

    def human() -> None:
        click.echo(
            f"the audit log rotated from {done['from_origin']} to {done['to_origin']} at event"
            f" {done['rotated_at_idx']}; the old key signed its last checkpoint (size"
            f" {done['last_checkpoint_size']})."
        )
        click.echo(f"new verifier key (publish it beside the old one): {done['new_vkey']}")
        click.echo("now restart every replica with:")
        for name, value in done["next"].items():
            click.echo(f"  {name}={value}")

    output(opts, done, human)

"""`exchange admin`: operator commands run beside the database (server side), not over the API.

`migrate`, `backup` and `restore` read the database URL from the EXCHANGE_* settings, as
`exchange init` does, and refuse in a client install as `exchange serve` does. The work is in
`db.migrate` and `services/backup.py`; this module only parses, calls and prints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from ..errors import ExchangeError, LocalFileError, NoteError, ValidationError
from ._base import Options, main, output, pass_opts, run
from .server import require_server


@main.group()
def admin() -> None:
    """Operator commands on the service's database (server side: EXCHANGE_* settings)."""


@admin.command()
@pass_opts
def migrate(opts: Options) -> None:
    """Bring the database's schema up to this version's, and print the version it is at.

    Idempotent, and safe beside running replicas (PostgreSQL: an advisory lock; SQLite: its one
    writer). Run it before replicas of a new version start (the Kubernetes Job in
    infra/k8s/job-migrate.yaml does); `exchange serve` migrates on start all the same.
    """
    require_server(opts)

    async def work() -> dict[str, Any]:
        from ..db import connect
        from ..db import migrate as migrate_schema
        from ..settings import Settings

        settings = Settings.from_mapping(os.environ)
        db = await connect(settings.effective_database_url)
        try:
            return {"schema_version": await migrate_schema(db)}
        finally:
            await db.close()

    done = run(opts, work)
    output(opts, done, lambda: click.echo(f"the database is at schema version {done['schema_version']}"))


@admin.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The backup file to write (never overwritten).",
)
@pass_opts
def backup(opts: Options, out: Path) -> None:
    """Back up the database to one engine-neutral file (JSON Lines with a manifest).

    Reads one consistent snapshot; safe while the service runs. Object storage (the encrypted
    artifacts) is not included: back the bucket up with the store's own tools, after this.
    """
    require_server(opts)

    async def work() -> dict[str, Any]:
        from ..services import backup as service
        from ..settings import Settings

        settings = Settings.from_mapping(os.environ)
        return await service.backup(settings.effective_database_url, out, now_ms=time.time_ns() // 1_000_000)

    made = run(opts, work)
    rows = sum(made["tables"].values())
    output(
        opts,
        made,
        lambda: click.echo(
            f"backed up {rows} rows of {len(made['tables'])} tables (schema {made['schema_version']},"
            f" checkpoint {made['checkpoint_size']}) to {out}"
        ),
    )


@admin.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--vkey",
    metavar="VKEY",
    help="Verify the backup's checkpoint with this log verifier key (default: the key of the"
    " log signing key file in the EXCHANGE_* settings).",
)
@pass_opts
def restore(opts: Options, file: Path, vkey: str | None) -> None:
    """Restore a backup into an empty database, then check its audit log (exit 8 if it fails).

    Refuses a file that does not match its own manifest, a backup of another schema version and
    a target database that holds anything; in every refusal nothing is written. The restore is
    not recorded in the audit log (it would change the log just checked); stop the service first.
    """
    require_server(opts)

    async def work() -> dict[str, Any]:
        from ..format.note import Signer, Verifier
        from ..services import backup as service
        from ..settings import Settings

        settings = Settings.from_mapping(os.environ)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise LocalFileError(f"cannot read {file}: {exc.strerror or exc.__class__.__name__}") from None
        verifier: Verifier | None = None
        try:
            if vkey is not None:
                verifier = Verifier.from_vkey(vkey)
            else:
                key_file = settings.effective_log_signing_key_file
                if key_file.exists():
                    verifier = Signer.from_skey(key_file.read_text(encoding="ascii").strip()).verifier()
        except (NoteError, OSError, UnicodeDecodeError) as exc:
            detail = exc.message if isinstance(exc, ExchangeError) else exc.__class__.__name__
            raise ValidationError(f"the log verifier key is unusable: {detail}") from None
        return await service.restore(settings.effective_database_url, data, verifier=verifier)

    made = run(opts, work)
    rows = sum(made["tables"].values())
    output(
        opts,
        made,
        lambda: click.echo(
            f"restored {rows} rows of {len(made['tables'])} tables; the audit log of"
            f" {made['log_size']} events verifies against checkpoint {made['checkpoint_size']}"
        ),
    )

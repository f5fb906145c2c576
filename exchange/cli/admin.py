"""`exchange admin`: operator commands run beside the database (server side), not over the API.

`migrate`, `backup` and `restore` read the database URL from the EXCHANGE_* settings, as
`exchange init` does, and refuse in a client install as `exchange serve` does. The work is in
`db.migrate` and `services/backup.py`; this module only parses, calls and prints.

`bucket setup` configures the service's S3 bucket with an operator's S3 credentials (the work
is in `services/bucketsetup.py`); it reads the bucket's name, region and endpoint from the same
settings and never touches the database.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from ..errors import ExchangeError, LocalFileError, NoteError, StorageUnavailable, ValidationError
from ._base import Options, fail, main, output, pass_opts, printable, run
from .server import require_server


@main.group()
def admin() -> None:
    """Operator commands on the service's database and bucket (server side: EXCHANGE_* settings)."""


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


@admin.group()
def bucket() -> None:
    """The service's S3 bucket, configured with an operator's S3 credentials (EXCHANGE_ADMIN_S3_*)."""


@bucket.command(name="setup")
@click.option(
    "--abort-uploads-after-days",
    type=click.IntRange(min=1),
    metavar="DAYS",
    envvar="EXCHANGE_ADMIN_S3_ABORT_UPLOADS_AFTER_DAYS",
    help="Abort multipart uploads still open this many days after they started. Default: the fewest"
    " whole days longer than EXCHANGE_UPLOAD_ABANDON_AFTER_S plus EXCHANGE_UPLOAD_SWEEP_INTERVAL_S"
    " (2 with the defaults); a shorter time is refused [env EXCHANGE_ADMIN_S3_ABORT_UPLOADS_AFTER_DAYS].",
)
@click.option(
    "--versioning/--no-versioning",
    default=False,
    show_default=True,
    help="Keep old object versions (see above). --no-versioning suspends versioning on a versioned bucket.",
)
@click.option(
    "--noncurrent-version-days",
    type=click.IntRange(min=1),
    metavar="DAYS",
    help="With --versioning: delete noncurrent versions (deleted artifacts) after this many days"
    " [default: 7].",
)
@click.option(
    "--endpoint",
    metavar="URL",
    envvar="EXCHANGE_ADMIN_S3_ENDPOINT",
    help="S3 endpoint to configure (default: EXCHANGE_S3_ENDPOINT) [env EXCHANGE_ADMIN_S3_ENDPOINT].",
)
@click.option(
    "--access-key-id",
    metavar="ID",
    envvar="EXCHANGE_ADMIN_S3_ACCESS_KEY_ID",
    help="The operator's S3 access key id [env EXCHANGE_ADMIN_S3_ACCESS_KEY_ID].",
)
@click.option(
    "--secret-access-key",
    metavar="KEY",
    envvar="EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY",
    help="The operator's S3 secret key; prefer the environment, as a command line is visible to"
    " other local users [env EXCHANGE_ADMIN_S3_SECRET_ACCESS_KEY].",
)
@click.option("--dry-run", is_flag=True, help="Read the bucket and print what would change; change nothing.")
@pass_opts
def setup(
    opts: Options,
    abort_uploads_after_days: int | None,
    versioning: bool,
    noncurrent_version_days: int | None,
    endpoint: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    dry_run: bool,
) -> None:
    """Create and configure the service's bucket (EXCHANGE_S3_BUCKET, EXCHANGE_S3_REGION), then
    read it back. Idempotent: a second run changes nothing and says so.

    \b
    What it sets:
      bucket      created in EXCHANGE_S3_REGION if missing.
      lifecycle   rule exchange-abort-incomplete-uploads: abort multipart uploads
                  still open after --abort-uploads-after-days. The service's own
                  sweep is the first line (every EXCHANGE_UPLOAD_SWEEP_INTERVAL_S it
                  aborts uploads older than EXCHANGE_UPLOAD_ABANDON_AFTER_S, with an
                  audit event); this rule is the backstop for uploads the database
                  lost track of, so it must never fire first. Other rules are kept.
      versioning  off by default: artifacts are immutable under server-chosen
                  keys, deletes are recorded in the audit log, and versions would
                  keep deleted ciphertext (delete must delete). --versioning keeps
                  deleted objects for --noncurrent-version-days (default 7), out of
                  reach of the service's identity, which cannot delete versions.
      anonymous   bucket-policy statements granting anything to anonymous callers
                  are removed. On AWS, also set Block Public Access and Object
                  Ownership with the AWS CLI (the report says how).
      encryption  default SSE-S3 unless the bucket has one (KMS is kept). Artifacts
                  are age-encrypted end to end: this is defence in depth, and a
                  store that does not implement it gets a warning, not a failure.

    Credentials: an operator's, allowed to create and configure the bucket
    (infra/s3/README.md lists the actions). Without them the service's own keys are
    used, with a warning: the service's identity should not be able to do this.
    Exit 7 if the store does not implement lifecycle rules (or versioning when asked
    for) or reads back otherwise, after the report; 3 for refused credentials, 4 for
    a refused operation (naming the IAM action), 6 for a name another account owns.
    """
    require_server(opts)

    async def work() -> Any:
        import asyncio

        from ..services import bucketsetup
        from ..settings import Settings

        settings = Settings.from_mapping(os.environ)
        config = bucketsetup.BucketConfig.from_settings(
            settings,
            abort_uploads_after_days=abort_uploads_after_days,
            versioning=versioning,
            noncurrent_version_days=noncurrent_version_days,
        )
        s3_endpoint = endpoint or settings.s3_endpoint
        if not s3_endpoint:
            raise ValidationError("no S3 endpoint: set EXCHANGE_S3_ENDPOINT or give --endpoint")
        credentials, warning = bucketsetup.operator_credentials(access_key_id, secret_access_key, settings)
        if warning and not opts.json:  # now, so that it is seen even if the store refuses these keys
            click.echo(printable(f"exchange: warning: {warning}"), err=True)
        report = await asyncio.to_thread(
            bucketsetup.set_up,
            config,
            endpoint=s3_endpoint,
            credentials=credentials,
            timeout_s=settings.storage_timeout_s,
            dry_run=dry_run,
        )
        made = report.to_json()
        if not opts.json:
            for line in made["warnings"]:
                click.echo(printable(f"exchange: warning: {line}"), err=True)
        elif warning:
            made["warnings"].insert(0, warning)
        return made

    made = run(opts, work)
    output(opts, made, lambda: _print_bucket_report(made))
    if made["problems"]:
        fail(
            StorageUnavailable(
                "the bucket is not set up as exchange expects: " + "; ".join(made["problems"]),
                code="bucket-setup-incomplete",
            ),
            as_json=opts.json,
        )


#: The report's `anonymous_policy_statements` in words, but for a count of granting statements.
_ANONYMOUS: dict[object, str] = {
    "unsupported": "the store has no bucket policies",
    0: "none granted by the bucket policy",
    None: "the bucket policy does not parse",
}


def _print_bucket_report(made: dict[str, Any]) -> None:
    where = f"bucket {made['bucket']} at {made['endpoint']}"
    changes = made["changes"]
    if not changes:
        click.echo(
            printable(f"{where}: already set up, nothing {'to change' if made['dry_run'] else 'changed'}")
        )
    else:
        click.echo(
            printable(f"{where}: {'would make' if made['dry_run'] else 'made'} {len(changes)} change(s)")
        )
        for change in changes:
            click.echo(printable(f"  {change['step']}: {change['detail']}"))
    state = made["state"]
    if not state["exists"]:
        click.echo("  the bucket does not exist yet")
    else:
        days = state["abort_incomplete_uploads_after_days"]
        sweep = made["service_sweep"]["abandon_and_sweep_s"]
        noncurrent = state["noncurrent_versions_expire_after_days"]
        anonymous = state["anonymous_policy_statements"]
        lines = {
            "abort incomplete uploads": (
                f"after {days} days (the service's own sweep: within {sweep} s)" if days else "no rule"
            ),
            "versioning": state["versioning"]
            + (f" (noncurrent versions expire after {noncurrent} days)" if noncurrent else ""),
            "default encryption": state["encryption"],
            "anonymous access": _ANONYMOUS.get(anonymous, f"{anonymous} policy statement(s) grant it"),
            "lifecycle rules": (
                ", ".join(state["lifecycle_rules"]) or "none"
                if isinstance(state["lifecycle_rules"], list)
                else "the store does not implement them"
            ),
        }
        for name, value in lines.items():
            click.echo(printable(f"  {name}: {value}"))
        if state["public_access_block"] != "no such setting":
            click.echo(printable(f"  AWS public access block: {state['public_access_block']}"))
    if made["dry_run"]:
        click.echo("dry run: nothing was changed")

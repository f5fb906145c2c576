"""Server-side commands: `exchange init` (the first admin) and `exchange serve`."""

from __future__ import annotations

import os
from typing import Any

import click

from ..errors import ExchangeError, ValidationError
from ._base import Options, fail, main, output, pass_opts, run

#: Packages only the server needs; a client install (`pip install exchange`) has none of them.
SERVER_PACKAGES = ("boto3", "botocore", "minio", "asyncpg", "jsonschema", "uvloop")


def require_server(opts: Options) -> Any:
    """`exchange.server`, or a clear refusal naming the extra to install (exit 2)."""
    try:
        from .. import server
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_PACKAGES:
            raise
        fail(
            ValidationError(
                f"this is a client install of exchange: the server needs {exc.name!r}, which the"
                " 'server' extra brings (pip install 'exchange[server]')",
                code="server-extra-missing",
            ),
            as_json=opts.json,
        )
    return server


# -- server side -----------------------------------------------------------------------------------


@main.command()
@click.option("--name", default="admin", show_default=True, help="Name of the first admin.")
@click.option("--org", "org_name", default="operators", show_default=True, help="The admin's organisation.")
@pass_opts
def init(opts: Options, name: str, org_name: str) -> None:
    """Create the first admin (server side: uses the EXCHANGE_* database settings).

    Writes a new identity to --identity unless one exists there, registers its public keys as
    the first admin, and refuses once the service has any principal.
    """
    server = require_server(opts)

    async def work() -> dict[str, Any]:
        made: dict[str, Any] = await server.bootstrap(
            os.environ, identity_path=opts.identity_path, name=name, org_name=org_name
        )
        return made

    p = run(opts, work)
    output(
        opts,
        p,
        lambda: click.echo(f"created admin {p['name']} of {p['org']}; identity: {opts.identity_path}"),
    )


@main.command()
@pass_opts
def serve(opts: Options) -> None:
    """Serve the API (server side: configured by EXCHANGE_* variables; see README)."""
    server = require_server(opts)
    try:
        server.serve(os.environ)
    except ExchangeError as exc:
        fail(exc, as_json=opts.json)

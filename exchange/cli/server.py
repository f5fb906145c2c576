"""Server-side commands: `exchange init` (the first admin) and `exchange serve`."""

from __future__ import annotations

import os
from typing import Any

import click

from ..errors import ExchangeError
from ._base import Options, fail, main, output, pass_opts, run

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
    from ..server import bootstrap

    async def work() -> dict[str, Any]:
        return await bootstrap(os.environ, identity_path=opts.identity_path, name=name, org_name=org_name)

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
    from ..server import serve as serve_api

    try:
        serve_api(os.environ)
    except ExchangeError as exc:
        fail(exc, as_json=opts.json)

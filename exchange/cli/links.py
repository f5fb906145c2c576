"""Grant and link commands: `grant`, `revoke`, `link create | ls | revoke`.

Downloads through a link are `exchange download URL` (in `cli.artifacts`), and grants at upload
`exchange upload PATH --to PRINCIPAL`.
"""

from __future__ import annotations

from typing import Any

import click

from ..client import links as api
from ..durations import parse_duration
from ..errors import ValidationError
from ._base import Options, fail, main, output, pass_opts, when, with_client


def _duration(opts: Options, text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        fail(ValidationError(f"{what}: {exc}"), as_json=opts.json)


@main.command()
@click.argument("artifact_id")
@click.argument("principal")
@click.option(
    "--until", "until", metavar="DURATION", help="End the grant after this long (90s, 15m, 24h, 7d)."
)
@pass_opts
def grant(opts: Options, artifact_id: str, principal: str, until: str | None) -> None:
    """Grant ARTIFACT_ID to the tester PRINCIPAL.

    Your client unwraps the file key with your key and wraps it for PRINCIPAL's registered age
    recipient; the service only ever sees the wrapped key.
    """
    seconds = _duration(opts, until, "--until")
    g = with_client(opts, lambda c: api.grant(c, artifact_id, principal, expires_in_s=seconds))
    ends = "no end" if g["expires_at_ms"] is None else f"until {when(g['expires_at_ms'])}"
    output(opts, g, lambda: click.echo(f"granted {artifact_id} to {principal} ({ends})"))


@main.command()
@click.argument("artifact_id")
@click.argument("principal")
@pass_opts
def revoke(opts: Options, artifact_id: str, principal: str) -> None:
    """Revoke PRINCIPAL's grant of ARTIFACT_ID: its header is removed and its links die at once."""
    g = with_client(opts, lambda c: api.revoke(c, artifact_id, principal))
    output(
        opts,
        g,
        lambda: click.echo(
            f"revoked {principal}'s grant of {artifact_id} ({g['links_revoked']} link(s) revoked)"
        ),
    )


@main.group()
def link() -> None:
    """Download links: capabilities bound to one recipient, expiring and countable."""


@link.command("create")
@click.argument("artifact_id")
@click.option(
    "--for", "recipient", required=True, metavar="PRINCIPAL", help="The recipient the link is bound to."
)
@click.option(
    "--expires",
    metavar="DURATION",
    help="Lifetime (90s, 15m, 24h, 7d); default and maximum are the server's.",
)
@click.option("--max-downloads", type=click.IntRange(min=1), help="Downloads the link allows.")
@pass_opts
def link_create(
    opts: Options, artifact_id: str, recipient: str, expires: str | None, max_downloads: int | None
) -> None:
    """Make a download link for ARTIFACT_ID and print its URL (shown only now)."""
    seconds = _duration(opts, expires, "--expires")
    made = with_client(
        opts,
        lambda c: api.create_link(
            c, artifact_id, recipient, expires_in_s=seconds, max_downloads=max_downloads
        ),
    )
    output(opts, made, lambda: click.echo(made["url"]))


@link.command("ls")
@click.argument("artifact_id", required=False)
@pass_opts
def link_ls(opts: Options, artifact_id: str | None) -> None:
    """List links (of one artifact), newest first. Tokens are never shown again."""
    items = with_client(opts, lambda c: api.list_links(c, artifact_id))
    output(opts, items, lambda: click.echo("\n".join(_row(item) for item in items)))


def _row(item: dict[str, Any]) -> str:
    limit = "-" if item["max_downloads"] is None else str(item["max_downloads"])
    return (
        f"{item['id']}\t{item['state']}\t{item['artifact']}\t{item['recipient']}"
        f"\t{item['downloads']}/{limit}\t{when(item['expires_at_ms'])}"
    )


@link.command("revoke")
@click.argument("link_id")
@pass_opts
def link_revoke(opts: Options, link_id: str) -> None:
    """Revoke a link at once."""
    revoked = with_client(opts, lambda c: api.revoke_link(c, link_id))
    output(opts, revoked, lambda: click.echo(f"revoked {revoked['id']}"))

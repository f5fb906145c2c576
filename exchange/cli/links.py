"""Grant and link commands: `grant`, `revoke`, `grants`, `link create | ls | revoke`,
`upload-link create | ls | revoke`.

Downloads through a link are `exchange download URL` (in `cli.artifacts`), and grants at upload
`exchange upload PATH --to PRINCIPAL`.
"""

from __future__ import annotations

from typing import Any

import click

from ..client import links as api
from ..client import uploadlinks as uploadlinks_api
from ..durations import parse_duration
from ..errors import ValidationError
from ..format.manifest import KINDS
from ..sizes import format_size, parse_size
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
@click.option(
    "--max-downloads",
    type=click.IntRange(1, 1_000_000),
    help="Downloads by id this grant gives (each a counted session; resuming one is not counted)."
    " Default: no limit.",
)
@pass_opts
def grant(
    opts: Options, artifact_id: str, principal: str, until: str | None, max_downloads: int | None
) -> None:
    """Grant ARTIFACT_ID to the tester PRINCIPAL.

    Your client unwraps the file key with your key and wraps it for PRINCIPAL's registered age
    recipient; the service only ever sees the wrapped key. Granting again renews the grant, and
    its download count starts over.
    """
    seconds = _duration(opts, until, "--until")
    g = with_client(
        opts,
        lambda c: api.grant(c, artifact_id, principal, expires_in_s=seconds, max_downloads=max_downloads),
    )
    ends = "no end" if g["expires_at_ms"] is None else f"until {when(g['expires_at_ms'])}"
    limit = "" if g["max_downloads"] is None else f", {g['max_downloads']} download(s)"
    output(opts, g, lambda: click.echo(f"granted {artifact_id} to {principal} ({ends}{limit})"))


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
@click.option(
    "--allow-ip",
    "allowed",
    multiple=True,
    metavar="CIDR",
    help="Redeem only from this address or network (203.0.113.7, 198.51.100.0/24); repeatable.",
)
@pass_opts
def link_create(
    opts: Options,
    artifact_id: str,
    recipient: str,
    expires: str | None,
    max_downloads: int | None,
    allowed: tuple[str, ...],
) -> None:
    """Make a download link for ARTIFACT_ID and print its URL (shown only now)."""
    seconds = _duration(opts, expires, "--expires")
    made = with_client(
        opts,
        lambda c: api.create_link(
            c,
            artifact_id,
            recipient,
            expires_in_s=seconds,
            max_downloads=max_downloads,
            allowed_networks=allowed or None,
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


@main.command("grants")
@click.argument("artifact_id")
@pass_opts
def grants_ls(opts: Options, artifact_id: str) -> None:
    """List the grants of ARTIFACT_ID: who holds it, since when, until when."""
    items = with_client(opts, lambda c: api.list_grants(c, artifact_id))
    output(opts, items, lambda: click.echo("\n".join(_grant_row(g) for g in items)))


def _grant_row(g: dict[str, Any]) -> str:
    if g["revoked_at_ms"] is not None:
        state = f"revoked {when(g['revoked_at_ms'])}"
    elif g["expires_at_ms"] is not None:
        state = f"until {when(g['expires_at_ms'])}"
    else:
        state = "no end"
    if g.get("needs_regrant"):
        state += " (needs re-grant: the grantee has new keys)"
    used = f"{g['downloads']} download(s)" + (
        "" if g["max_downloads"] is None else f" of {g['max_downloads']}"
    )
    return f"{g['principal']}\tgranted {when(g['created_at_ms'])} by {g['granted_by']}\t{state}\t{used}"


@main.group("upload-link")
def upload_link() -> None:
    """Upload links: the right for one named principal to upload one artifact into your
    organisation (a tester returning files), of one kind, up to a size, for a while.

    The uploader runs `exchange upload PATH --link URL`; its requests are signed, so the link is
    useless to anyone else. The upload is encrypted to your organisation's developers and to the
    uploader.
    """


@upload_link.command("create")
@click.option("--for", "uploader", required=True, metavar="PRINCIPAL", help="Who may upload.")
@click.option("--kind", type=click.Choice(KINDS), default="other", show_default=True)
@click.option(
    "--max-size", required=True, metavar="SIZE", help="Largest upload allowed (500MB, 10GiB, 2TiB)."
)
@click.option(
    "--expires",
    metavar="DURATION",
    help="How long the link can start an upload (90s, 15m, 24h, 7d); default and maximum are the server's.",
)
@click.option("--note", default="", help="A line for the uploader and the log (what to send).")
@pass_opts
def upload_link_create(
    opts: Options, uploader: str, kind: str, max_size: str, expires: str | None, note: str
) -> None:
    """Make an upload link and print its URL (shown only now)."""
    seconds = _duration(opts, expires, "--expires")
    try:
        max_bytes = parse_size(max_size)
    except ValueError as exc:
        fail(ValidationError(f"--max-size: {exc}"), as_json=opts.json)
    made = with_client(
        opts,
        lambda c: uploadlinks_api.create(
            c, uploader, kind=kind, max_bytes=max_bytes, note=note, expires_in_s=seconds
        ),
    )
    output(opts, made, lambda: click.echo(made["url"]))


@upload_link.command("ls")
@pass_opts
def upload_link_ls(opts: Options) -> None:
    """List upload links, newest first. Tokens are never shown again."""
    items = with_client(opts, uploadlinks_api.list_upload_links)
    output(
        opts,
        items,
        lambda: click.echo(
            "\n".join(
                f"{u['id']}\t{u['state']}\t{u['uploader']}\t{u['kind']}\t<= {format_size(u['max_bytes'])}"
                f"\t{u['artifact'] or '-'}\t{when(u['expires_at_ms'])}"
                for u in items
            )
        ),
    )


@upload_link.command("revoke")
@click.argument("link_id")
@pass_opts
def upload_link_revoke(opts: Options, link_id: str) -> None:
    """Revoke an upload link at once; an upload it started that is still running is aborted."""
    revoked = with_client(opts, lambda c: uploadlinks_api.revoke(c, link_id))
    output(opts, revoked, lambda: click.echo(f"revoked {revoked['id']}"))

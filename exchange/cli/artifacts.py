"""Artifact commands: upload, download, and `artifacts ls | show | abort`.

Progress bars (tqdm, on stderr) appear only when stderr is a terminal; otherwise the commands
are silent but for their result.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from ..client import Client
from ..client import artifacts as api
from ..client import links as links_api
from ..client import uploadlinks as uploadlinks_api
from ..client.transfer import download_with_receipt
from ..client.transfer import upload as upload_artifact
from ..errors import InputError, ValidationError
from ..format.manifest import KINDS
from ..sizes import format_size
from ._base import (
    EXIT_UNAVAILABLE,
    Options,
    fail,
    main,
    output,
    pass_opts,
    printable,
    run,
    table,
    when,
    with_client,
)


class _Bar:
    """A byte progress bar on stderr when it is a terminal, nothing otherwise.

    The bar is removed when the transfer ends; a transfer that completed leaves one line in its
    place (`download: 1.5 GiB in 12.0 s, 128.0 MiB/s`), and one that resumes says so first
    (`resuming: 1.0 GiB of 1.5 GiB already here`), as `aws s3 cp` and rsync do.
    """

    def __init__(self, description: str) -> None:
        self._description = description
        self._bar: tqdm[Any] | None = None
        self._started = 0.0
        self._done = 0
        self._initial = 0

    def start(self, total: int, initial: int = 0, *, resumed: bool = False) -> None:
        if not sys.stderr.isatty():
            return
        if initial:
            click.echo(f"resuming: {format_size(initial)} of {format_size(total)} already here", err=True)
        elif resumed:
            click.echo("resuming: the parts already stored are not sent again", err=True)
        self._started, self._initial, self._done = time.monotonic(), initial, initial
        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self._description,
            file=sys.stderr,
            leave=False,
        )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._done += n

    def close(self, *, completed: bool) -> None:
        if self._bar is None:
            return
        self._bar.close()
        if completed:
            seconds = max(time.monotonic() - self._started, 1e-6)
            moved = self._done - self._initial
            click.echo(
                f"{self._description}: {format_size(self._done)} in {seconds:.1f} s,"
                f" {format_size(int(moved / seconds))}/s",
                err=True,
            )


@contextlib.contextmanager
def _bar(description: str) -> Iterator[_Bar]:
    bar = _Bar(description)
    try:
        yield bar
    except BaseException:
        bar.close(completed=False)
        raise
    bar.close(completed=True)


#: Upload and download alike.
_workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Threads that encrypt, decrypt and hash at once (default: every core it may run on).",
)


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=True, dir_okay=True, path_type=Path))
@click.option("--name", help="Artifact name (default: the file or directory name).")
@click.option(
    "--kind", type=click.Choice(KINDS), help="What it is (default: other, or the upload link's kind)."
)
@click.option("--to", "grantees", multiple=True, metavar="PRINCIPAL", help="Grant it to this tester too.")
@click.option(
    "--link",
    "link_url",
    metavar="URL",
    help="An upload link (…/u/exu1_…) made for you: upload into the organisation that made it.",
)
@_workers_option
@pass_opts
def upload(
    opts: Options,
    path: Path,
    name: str | None,
    kind: str | None,
    grantees: tuple[str, ...],
    link_url: str | None,
    workers: int | None,
) -> None:
    """Encrypt and upload PATH (a file, or a directory of files) as an artifact; print its id.

    The file key is wrapped for every active developer of your organisation and for you, and,
    once the upload is complete, for each tester named by --to. With --link, the artifact goes to
    the organisation that made the link and is wrapped for its developers and for you. Run the
    same command again to resume an interrupted upload.
    """
    if link_url is not None and grantees:
        fail(
            ValidationError("--to cannot be used with --link: the receiving organisation grants"),
            as_json=opts.json,
        )

    async def work() -> str:
        identity = opts.identity()
        server, token = opts.server_url(identity), None
        if link_url is not None:
            server, token = uploadlinks_api.split_upload_link(link_url)
        with _bar("upload") as bar:
            async with Client(server, identity) as client:
                artifact_id = await upload_artifact(
                    client,
                    path,
                    name=name,
                    kind=kind,
                    progress=bar.update,
                    on_start=lambda _id, total, resumed: bar.start(total, resumed=resumed),
                    upload_link=token,
                    workers=workers,
                )
                for grantee in grantees:
                    await links_api.grant(client, artifact_id, grantee)
                return artifact_id

    artifact_id = run(opts, work)
    output(opts, {"id": artifact_id}, lambda: click.echo(artifact_id))


@main.command()
@click.argument("artifact_id", metavar="ARTIFACT_ID|LINK_URL")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, dir_okay=True, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to write into.",
)
@_workers_option
@pass_opts
def download(opts: Options, artifact_id: str, out_dir: Path, workers: int | None) -> None:
    """Download, decrypt and verify ARTIFACT_ID, or what a link URL holds, into a directory.

    Files are written under DIR/NAME.exchange-partial/ and moved into place only once every file
    matches the uploader's signed manifest. Run again to resume an interrupted download: it
    continues the same download session and is not counted again. Each download, by id or
    through a link, is one session and ends with a receipt signed by your key, recorded in the
    audit log; a grant with --max-downloads gives that many sessions (exit 4 once used up).
    """
    if "://" in artifact_id:
        _download_link(opts, artifact_id, out_dir, workers)
        return

    async def work() -> tuple[list[Path], dict[str, Any]]:
        identity = opts.identity()
        out_dir.mkdir(parents=True, exist_ok=True)
        with _bar("download") as bar:
            async with Client(opts.server_url(identity), identity) as client:
                return await download_with_receipt(
                    client,
                    artifact_id,
                    out_dir,
                    workers=workers,
                    progress=bar.update,
                    on_start=lambda info, done: bar.start(int(info["size"]), done),
                )

    written, receipt = run(opts, work)
    output(
        opts,
        {"id": artifact_id, "paths": [str(p) for p in written], "receipt": receipt},
        lambda: click.echo("\n".join(printable(p) for p in written)),
    )


@main.group()
def artifacts() -> None:
    """Artifacts of your organisation."""


@artifacts.command("ls")
@click.option(
    "--status", type=click.Choice(["uploading", "complete", "aborted", "deleted"]), help="Only this status."
)
@pass_opts
def artifacts_ls(opts: Options, status: str | None) -> None:
    """List artifacts, newest first."""
    items = with_client(opts, lambda c: api.list_artifacts(c, status=status))

    def human() -> None:
        if not items:
            click.echo("no artifacts" + (f" {status}" if status else ""), err=True)
            return
        rows = [
            (
                a["id"],
                a["status"],
                a["kind"],
                format_size(int(a["size"])),
                when(a["created_at_ms"]),
                a["name"],
            )
            for a in items
        ]
        click.echo(table(("ID", "STATUS", "KIND", "SIZE", "CREATED", "NAME"), rows, right={3}))

    output(opts, items, human)


@artifacts.command("show")
@click.argument("artifact_id")
@pass_opts
def artifacts_show(opts: Options, artifact_id: str) -> None:
    """Show an artifact: its files and its manifest."""
    a = with_client(opts, lambda c: api.get(c, artifact_id))
    output(opts, a, lambda: _print_artifact(a))


@artifacts.command("abort")
@click.argument("artifact_id")
@pass_opts
def artifacts_abort(opts: Options, artifact_id: str) -> None:
    """Abort an unfinished upload of yours and remove its parts."""
    a = with_client(opts, lambda c: api.abort(c, artifact_id))
    output(opts, a, lambda: click.echo(printable(f"aborted {a['id']} ({a['name']})")))


@artifacts.command("delete")
@click.argument("artifact_id")
@click.option("--reason", help="Why, for the audit log (logged as given; at most 500 characters).")
@click.option(
    "--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed when not on a terminal)."
)
@pass_opts
def artifacts_delete(opts: Options, artifact_id: str, reason: str | None, yes: bool) -> None:
    """Delete a complete artifact: its stored objects are removed for good.

    \b
    Kept: its records (name, files, sizes, signed manifest), its grants, links, sessions,
    receipts and findings, and every event: `artifacts show` shows a tombstone (when, who, why).
    From the moment it is deleted, its links are refused, downloads by id, new grants and new
    links too, and URLs handed out before stop working once the objects are gone. Testers keep
    what they already downloaded, and their findings about it are still accepted.
    Developers of the artifact's organisation and admins may delete. An unfinished upload is
    aborted instead (`exchange artifacts abort`).

    \b
    Exit codes: 0 deleted (and storage emptied); 7 deleted, but the store failed to remove the
    objects: run the same command again (the service's sweeper retries too); 4 not yours to
    delete; 5 no such artifact; 6 already deleted, or not complete.
    """
    if not yes:
        if not sys.stdin.isatty():
            fail(
                InputError("deleting needs confirmation: pass --yes when not on a terminal"),
                as_json=opts.json,
            )
        click.confirm(
            f"Delete {printable(artifact_id)} and remove its stored objects for good?", abort=True, err=True
        )
    a = with_client(opts, lambda c: api.delete(c, artifact_id, reason=reason))
    purged = a.get("deleted", {}).get("storage_purged", False)
    output(
        opts,
        a,
        lambda: click.echo(
            printable(f"deleted {a['id']} ({a['name']})")
            + ("" if purged else ": its stored objects remain; run this command again to remove them")
        ),
    )
    if not purged:
        sys.exit(EXIT_UNAVAILABLE)


def _print_artifact(a: dict[str, Any]) -> None:
    # Names and paths are data: printable() escapes what a terminal would act on (CR, ESC, U+202E).
    click.echo(printable(f"{a['id']}  {a['name']}  ({a['kind']}, {a['status']})"))
    click.echo(printable(f"organisation:  {a['org']}"))
    click.echo(printable(f"uploaded by:   {a['created_by']} at {when(a['created_at_ms'])}"))
    click.echo(f"size:          {a['size']} bytes in {a['file_count']} file(s)")
    gone = a.get("deleted")
    if gone:
        why = f": {gone['reason']}" if gone.get("reason") else ""
        left = "" if gone["storage_purged"] else " (its stored objects still wait to be removed)"
        click.echo(printable(f"DELETED:       at {when(gone['at_ms'])} by {gone['by']}{why}{left}"))
    manifest = a.get("manifest")
    sha = {f["path"]: f["sha256"] for f in manifest["files"]} if manifest else {}
    for f in a["files"]:
        click.echo(printable(f"  {f['size']:>14}  {sha.get(f['path'], '(not complete)'):<64}  {f['path']}"))


def _download_link(opts: Options, url: str, out_dir: Path, workers: int | None) -> None:
    async def work() -> tuple[list[Path], dict[str, Any]]:
        identity = opts.identity()
        server, token = links_api.split_link(url)
        out_dir.mkdir(parents=True, exist_ok=True)
        with _bar("download") as bar:
            async with Client(server, identity) as client:
                return await links_api.download_link(
                    client,
                    token,
                    out_dir,
                    workers=workers,
                    progress=bar.update,
                    on_start=lambda info, done: bar.start(int(info["size"]), done),
                )

    written, receipt = run(opts, work)
    output(
        opts,
        {"id": receipt["artifact"], "paths": [str(p) for p in written], "receipt": receipt},
        lambda: click.echo("\n".join(printable(p) for p in written)),
    )

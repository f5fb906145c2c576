"""Finding commands: `finding submit | ls | show | status | fetch | share | export`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..client import findings as api
from ..errors import LocalFileError, ValidationError
from ..format.finding import CATEGORIES, SEVERITIES, STATUSES
from ._base import Options, fail, main, output, pass_opts, printable, when, with_client


@main.group()
def finding() -> None:
    """Findings: what testers report about an artifact, encrypted to its developers.

    \b
    Lifecycle: submitted -> acknowledged -> validated -> remediated | wont-fix -> closed,
    and closed -> submitted (reopen). The owning organisation's developers acknowledge,
    validate, remediate or mark wont-fix; the reporter closes and reopens.
    """


@finding.command("submit")
@click.argument("artifact_id")
@click.option("--title", required=True, help="One line: what was found.")
@click.option("--severity", required=True, type=click.Choice(SEVERITIES))
@click.option(
    "--category",
    default="other",
    show_default=True,
    help=f"Free text; suggested: {', '.join(CATEGORIES)}.",
)
@click.option(
    "--body",
    "body_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The report, in Markdown ('-' reads standard input).",
)
@click.option(
    "--attach",
    "attachments",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file to attach (logs, transcripts, proofs of concept; any size). Repeatable.",
)
@pass_opts
def finding_submit(
    opts: Options,
    artifact_id: str,
    title: str,
    severity: str,
    category: str,
    body_file: Path,
    attachments: tuple[Path, ...],
) -> None:
    """Report a finding on ARTIFACT_ID (one granted to you) and print its id.

    The body and attachments are encrypted here, to every developer of the artifact's
    organisation, the clearinghouse the service names, and you; the service cannot read them.
    Run the same command again to resume an interrupted upload.
    """
    try:
        body = sys.stdin.buffer.read() if str(body_file) == "-" else body_file.read_bytes()
    except OSError as exc:
        fail(LocalFileError(f"cannot read {body_file}: {exc.strerror}"), as_json=opts.json)
    made = with_client(
        opts,
        lambda c: api.submit(
            c,
            artifact_id,
            title=title,
            severity=severity,
            category=category,
            body=body,
            attachments=attachments,
        ),
    )
    output(opts, made, lambda: click.echo(made["id"]))


@finding.command("ls")
@click.option("--artifact", "artifact_id", metavar="ID", help="Only findings on this artifact.")
@click.option("--status", type=click.Choice(STATUSES), help="Only this status.")
@click.option("--severity", type=click.Choice(SEVERITIES), help="Only this severity.")
@pass_opts
def finding_ls(opts: Options, artifact_id: str | None, status: str | None, severity: str | None) -> None:
    """List findings you may see, newest first."""
    items = with_client(
        opts, lambda c: api.list_findings(c, artifact_id=artifact_id, status=status, severity=severity)
    )
    output(
        opts,
        items,
        lambda: click.echo(
            "\n".join(
                f"{f['id']}\t{f['status']}\t{f['severity']}\t{f['artifact']}\t{f['reporter']}"
                f"\t{when(f['updated_at_ms'])}\t{printable(f['title'])}"
                for f in items
            )
        ),
    )


@finding.command("show")
@click.argument("finding_id")
@pass_opts
def finding_show(opts: Options, finding_id: str) -> None:
    """Show a finding: metadata, lifecycle, and the body and notes when you hold a key."""

    async def work(c: Any) -> dict[str, Any]:
        found = await api.get(c, finding_id)
        body, notes = await api.read(c, found)
        moves = [m | {"note": n} for m, n in zip(found["moves"], notes, strict=True)]
        return found | {"body_text": body, "moves": moves, "readable": body is not None}

    f = with_client(opts, work)
    output(opts, f, lambda: _print(f))


def _print(f: dict[str, Any]) -> None:
    click.echo(f"{f['id']}  {printable(f['title'])}")
    click.echo(
        f"severity:   {f['severity']}    category: {printable(f['category'])}    status: {f['status']}"
    )
    click.echo(f"artifact:   {f['artifact']} ({printable(f['artifact_name'])}) of {f['org']}")
    click.echo(f"reporter:   {f['reporter']} of {f['reporter_org']}, {when(f['created_at_ms'])}")
    click.echo(f"attachments: {f['attachments'] or 'none'}")
    click.echo("")
    for m in f["moves"]:
        note = "" if m["note"] is None else f": {printable(m['note'])}"
        click.echo(f"  {when(m['at_ms'])}  {m['from'] or '-'} -> {m['to']}  by {m['by']}{note}")
    click.echo("")
    if f["body_text"] is None:
        click.echo("(you hold no key to this finding: its body and notes are not shown)")
    else:
        click.echo("\n".join(printable(line) for line in f["body_text"].splitlines()))


@finding.command("status")
@click.argument("finding_id")
@click.argument("new_status", type=click.Choice(STATUSES))
@click.option("--note", help="A note on the move, encrypted here for the finding's readers.")
@pass_opts
def finding_status(opts: Options, finding_id: str, new_status: str, note: str | None) -> None:
    """Move FINDING_ID to NEW_STATUS along its lifecycle."""
    moved = with_client(opts, lambda c: api.move(c, finding_id, new_status, note=note))
    output(opts, moved, lambda: click.echo(f"{moved['id']} is {moved['status']}"))


@finding.command("fetch")
@click.argument("finding_id")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to write DIR/FINDING_ID/ into.",
)
@pass_opts
def finding_fetch(opts: Options, finding_id: str, out_dir: Path) -> None:
    """Download, decrypt and verify a finding's body and attachments into DIR/FINDING_ID/."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = with_client(opts, lambda c: api.fetch(c, finding_id, out_dir))
    output(
        opts,
        {"id": finding_id, "paths": [str(p) for p in written]},
        lambda: click.echo("\n".join(map(str, written))),
    )


@finding.command("share")
@click.argument("finding_id")
@click.argument("principal")
@pass_opts
def finding_share(opts: Options, finding_id: str, principal: str) -> None:
    """Give PRINCIPAL (a developer of your organisation who joined later) this finding's keys.

    Your client unwraps them with your key and wraps them for PRINCIPAL; the service never sees
    them."""
    shared = with_client(opts, lambda c: api.share(c, finding_id, principal))
    output(opts, shared, lambda: click.echo(f"{principal} can now read {shared['id']}"))


@finding.command("export")
@click.option("--artifact", "artifact_id", metavar="ID", help="Only findings on this artifact.")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True)
@click.option(
    "-o",
    "--output",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here instead of standard output.",
)
@pass_opts
def finding_export(opts: Options, artifact_id: str | None, fmt: str, out_file: Path | None) -> None:
    """Export every finding you may see: metadata for all, bodies and notes where you hold a key.

    CSV cells that a spreadsheet would run as formulas are prefixed with a quote."""
    if fmt not in ("json", "csv"):  # pragma: no cover - click checks the choice
        fail(ValidationError("--format is json or csv"), as_json=opts.json)
    text = with_client(opts, lambda c: api.export(c, artifact_id=artifact_id, fmt=fmt))
    if out_file is None:
        click.echo(text, nl=False)
    else:
        out_file.write_text(text, encoding="utf-8")

"""Audit commands: query, export and verify the log; run a witness.

`exchange audit verify` is offline: it reads a bundle and its own state directory and trusts
only the keys pinned there (`exchange.auditverify`). Everything else talks to the service;
`exchange audit query` prints only rows it verified against that same state directory.
`exchange audit verify --tiles` and `exchange audit monitor` follow the log through its tiles
instead, from the saved checkpoint on, and verify the same way (`auditverify.verify_tiles`);
the monitor repeats that every --interval seconds and stops with an ALERT and the verdict's exit
code on a fork, a rollback or a gap. It does not page anyone: run it under something that does.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from .. import auditverify
from ..client import Client
from ..client.audit import AuditClient, events_csv
from ..errors import ExchangeError, InputError, NoteError, ServiceUnreachable
from ..format import tiles
from ._base import (
    EXIT_USAGE,
    Options,
    current_profile_dir,
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

_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _time_ms(value: str | None, name: str) -> int | None:
    """A time as ms since the epoch: ISO 8601 (UTC unless it says otherwise) or a duration ago (`24h`)."""
    if value is None:
        return None
    match = _RELATIVE.fullmatch(value)
    if match:
        return int((time.time() - int(match.group(1)) * _UNIT_S[match.group(2)]) * 1000)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"--{name}: use an ISO 8601 time (2026-11-27T09:00Z) or a duration ago (24h)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def default_state_dir() -> Path:
    """The profile's audit state: ~/.config/exchange/audit-state, or under profiles/NAME/."""
    return current_profile_dir() / "audit-state"


F = TypeVar("F", bound=Callable[..., Any])


def _state_option(help_text: str) -> Callable[[F], F]:
    """`--state`: the auditor's verify state directory (pinned keys, last verified checkpoint)."""
    return click.option(
        "--state",
        "state_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=default_state_dir,
        show_default="~/.config/exchange/audit-state, or the profile's",
        help=help_text,
    )


def pin_options(f: F) -> F:
    """`--vkey`, `--witness-vkey`, `--quorum`: the keys a verifying command pins on first use."""
    f = click.option("--quorum", type=click.IntRange(0), help="Cosignatures required from those witnesses.")(
        f
    )
    f = click.option(
        "--witness-vkey", "witness_vkeys", multiple=True, help="A witness's cosigner key (repeatable)."
    )(f)
    return click.option(
        "--vkey", "log_vkey", help="The log's verifier key, obtained out of band (pinned on first use)."
    )(f)


def pinned_state(opts: Options, state_dir: Path, log_vkey: str | None) -> auditverify.State:
    """The verify state with its pinned log key (or `log_vkey`, pinned here only in memory); a
    usage error (exit 2) saying how to pin one when there is none, or the state is unreadable."""
    try:
        return auditverify.load_pinned(state_dir, log_vkey)
    except auditverify.VerifyFailure as exc:
        hint = (
            " (or pin it once with `exchange audit verify --vkey KEY`)" if "no log key" in exc.message else ""
        )
        fail(InputError(f"{exc.message}{hint}: {state_dir}"), as_json=opts.json)
    except (OSError, ValueError, KeyError) as exc:
        fail(InputError(f"cannot read the audit state in {state_dir}: {exc}"), as_json=opts.json)


@main.group()
def audit() -> None:
    """Query, export and verify the audit log (auditor or admin role).

    A filtered query shows what matched, each row verified to be in the signed log, but cannot
    prove that nothing else matched: only a full export, checked by `exchange audit verify`,
    proves completeness.
    """


@audit.command("query")
@click.option("--actor", help="Principal name or id.")
@click.option("--org", help="The actor's organisation.")
@click.option("--action", help="Action, e.g. invite.create or request.refused.")
@click.option("--resource", help="Resource TYPE or TYPE:ID.")
@click.option("--outcome", type=click.Choice(["allowed", "denied", "error"]))
@click.option("--since", help="From this time: ISO 8601, or a duration ago (24h).")
@click.option("--until", help="Before this time: ISO 8601, or a duration ago.")
@click.option("--size", type=int, help="Pin to the checkpoint of this size (default: the latest).")
@click.option("--proofs", is_flag=True, help="Print each row's inclusion proof (jsonl output).")
@click.option("--limit", type=click.IntRange(1), help="Page size.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default="table", show_default=True
)
@_state_option("Your verify state: the pinned log key and the last verified checkpoint.")
@click.option(
    "--vkey", "log_vkey", help="The log's verifier key, obtained out of band, if none is pinned yet."
)
@pass_opts
def query(
    opts: Options,
    actor: str | None,
    org: str | None,
    action: str | None,
    resource: str | None,
    outcome: str | None,
    since: str | None,
    until: str | None,
    size: int | None,
    proofs: bool,
    limit: int | None,
    fmt: str,
    state_dir: Path,
    log_vkey: str | None,
) -> None:
    """Events that match every given filter, pinned to one checkpoint; the query is itself logged.

    \b
    Every row is verified before anything is printed: the checkpoint is signed by the pinned
    log key (and witness quorum) and consistent with your saved one, each event matches the
    filters and its inclusion proof leads to the checkpoint's root. A row that fails is an
    integrity error (exit 8) and nothing is printed. The key is the one `exchange audit verify`
    pinned in --state; before that, give it with --vkey.
    """
    state = pinned_state(opts, state_dir, log_vkey)
    try:
        filters: dict[str, str | int | None] = {
            "actor": actor,
            "org": org,
            "action": action,
            "resource": resource,
            "outcome": outcome,
            "since": _time_ms(since, "since"),
            "until": _time_ms(until, "until"),
            "size": size,
        }
    except ExchangeError as exc:
        fail(exc, as_json=opts.json)

    async def call(client: Client) -> list[dict[str, Any]]:
        return [item async for item in AuditClient(client).verified_query(filters, state, limit=limit)]

    items = with_client(opts, call)
    if fmt == "jsonl" or opts.json:
        for item in items:
            row: dict[str, Any] = {"idx": item["idx"], "event": item["event"]}
            if proofs:
                row["proof"] = item["proof"]
                row["checkpoint_size"] = item["checkpoint"]["size"]
            click.echo(json.dumps(row, sort_keys=True))
    elif fmt == "csv":
        events_csv(sys.stdout, (item["event"] for item in items))
    else:
        if items:
            click.echo(table(_EVENT_COLUMNS, [_event_row(item["event"]) for item in items], right={0}))
        click.echo(
            f"{len(items)} events, each verified in the signed log. A filtered query cannot prove "
            "completeness; a verified export can.",
            err=True,
        )


_EVENT_COLUMNS = ("IDX", "TIME (UTC)", "ACTION", "OUTCOME", "ACTOR", "ORG", "RESOURCE")


def _event_row(e: dict[str, Any]) -> list[object]:
    """One event as the table's cells: every column its own, so none runs into the next."""
    outcome = e["outcome"]["result"] + (f": {e['outcome']['reason']}" if e["outcome"].get("reason") else "")
    actor = e.get("actor", {})
    resource = e.get("resource") or {}
    res = ":".join(str(resource[k]) for k in ("type", "id") if resource.get(k))
    return [
        e["idx"],
        when(e["time_ms"]).removesuffix(" UTC"),
        e["action"],
        outcome,
        actor.get("name") or actor.get("type", ""),
        actor.get("org", ""),
        res or "-",
    ]


@audit.command("checkpoint")
@pass_opts
def checkpoint(opts: Options) -> None:
    """Print the latest signed checkpoint (with witness cosignatures)."""

    async def call(client: Client) -> dict[str, Any]:
        return await AuditClient(client).checkpoint()

    cp = with_client(opts, call)
    output(opts, cp, lambda: click.echo(cp["note"], nl=False))


@audit.command("vkey")
@pass_opts
def vkey(opts: Options) -> None:
    """Print the log's verifier key as the service states it (pin it only after checking it out of band)."""

    async def call(client: Client) -> dict[str, Any]:
        return await AuditClient(client).vkey()

    data = with_client(opts, call, signed=False)
    output(opts, data, lambda: click.echo(data["vkey"]))


@audit.command("export")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle directory."
)
@_state_option("Your verify state: the consistency proof starts at its saved size.")
@pass_opts
def export(opts: Options, out: Path, state_dir: Path) -> None:
    """Write a bundle: every leaf up to the latest checkpoint and what proves it, for `audit verify`.

    \b
    Files: entries.jsonl (the exact leaves), events.csv (for reading), checkpoint (signed note
    and cosignatures), consistency.json (from your last verified size), log.vkey (the service's
    claim, for reference only), manifest.json (SHA-256 of each). Check it with `exchange audit verify`.
    """
    result = _export(opts, out, state_dir)
    output(opts, result, lambda: click.echo(f"wrote {result['size']} events to {result['out']}"))


def _export(opts: Options, out: Path, state_dir: Path) -> dict[str, Any]:
    """Export a bundle whose consistency proof starts at the size the state last verified."""
    saved = auditverify.State.load(state_dir)
    since = (saved.size or 0) if saved else 0

    async def call(client: Client) -> dict[str, Any]:
        return await AuditClient(client).export(out, since_size=since)

    return with_client(opts, call)


_VERIFY_HELP = """Check an export bundle offline against the keys pinned in the state directory.

Without --bundle, exports a fresh bundle from the service into a temporary directory first.
The log key is pinned on first use from --vkey (never from the bundle); witness keys and the
quorum likewise. On success the checkpoint is saved in the state directory, and the next run
must extend it.

\b
Exit codes:
  0  verified
  2  bad usage (no pinned key and no --vkey, unreadable state, bad arguments)
 10  bundle: a file is missing or does not match manifest.json
 11  signature: the checkpoint is not signed by the pinned log key
 12  quorum: too few valid cosignatures from the pinned witnesses
 13  entries: a gap, a wrong idx, a non-canonical or foreign leaf, a missing or extra leaf
 14  root: the leaves do not hash to the checkpoint's root
 15  fork: the checkpoint contradicts the saved one (rollback or rewritten history);
     both signed checkpoints are kept in STATE/evidence/
 16  proof: the bundle's consistency proof is malformed or does not verify
 17  rollback (--tiles): the log's signed checkpoint is smaller than the saved one
 18  gap (--tiles): a tile or entry bundle is missing, or an entry is not at its idx
"""


@audit.command("verify", help=_VERIFY_HELP)
@click.option(
    "--bundle", type=click.Path(file_okay=False, exists=True, path_type=Path), help="Bundle directory."
)
@click.option(
    "--tiles",
    "via_tiles",
    is_flag=True,
    help="Follow the log through its tlog-tiles from the saved checkpoint instead of a bundle: "
    "fetch only the new tiles and entries.",
)
@_state_option("Where pinned keys and the last verified checkpoint live.")
@pin_options
@pass_opts
def verify(
    opts: Options,
    bundle: Path | None,
    via_tiles: bool,
    state_dir: Path,
    log_vkey: str | None,
    witness_vkeys: tuple[str, ...],
    quorum: int | None,
) -> None:
    if via_tiles:
        if bundle is not None:
            fail(InputError("give --bundle or --tiles, not both"), as_json=opts.json)
        report, _ = run(opts, lambda: _follow(opts, state_dir, log_vkey, witness_vkeys, quorum))
        _verified(opts, report)
        return
    with tempfile.TemporaryDirectory(prefix="exchange-audit-") as tmp:
        if bundle is None:
            bundle = Path(tmp) / "bundle"
            _export(opts, bundle, state_dir)
        try:
            report = auditverify.run(
                bundle, state_dir, vkey=log_vkey, witness_vkeys=witness_vkeys, quorum=quorum
            )
        except auditverify.VerifyFailure as exc:
            _verdict(opts, {"verdict": exc.kind, "detail": exc.message}, exc.exit_code)
        except (OSError, ValueError, NoteError) as exc:
            _verdict(opts, {"verdict": "usage", "detail": str(exc)}, EXIT_USAGE)
    _verified(opts, report)


def _verified(opts: Options, report: auditverify.Report) -> None:
    data = {"verdict": "ok"} | report.to_json()
    output(
        opts,
        data,
        lambda: click.echo(
            f"verified: {report.origin} size {report.size}, root {report.root}, "
            f"{len(report.witnesses)} witness cosignatures"
            + (f", extends the saved size {report.previous_size}" if report.previous_size is not None else "")
        ),
    )


_ALERTS = ("fork", "rollback", "gap")


def _verdict(opts: Options, data: dict[str, Any], code: int) -> NoReturn:
    if opts.json:
        click.echo(json.dumps(data | {"exit_code": code}, sort_keys=True))
    elif data["verdict"] in _ALERTS:
        click.echo(
            printable(f"exchange: ALERT: the audit log misbehaves ({data['verdict']}): {data['detail']}"),
            err=True,
        )
    else:
        click.echo(printable(f"exchange: verify failed ({data['verdict']}): {data['detail']}"), err=True)
    sys.exit(code)


async def _follow(
    opts: Options,
    state_dir: Path,
    log_vkey: str | None,
    witness_vkeys: tuple[str, ...],
    quorum: int | None,
) -> tuple[auditverify.Report, list[bytes]]:
    """One step through the tiles: from the saved checkpoint to the latest; the new leaves too.

    A verdict other than ok exits with its code (`_verdict`); the service's own errors raise.
    """
    try:
        state = auditverify.load_pinned(state_dir, log_vkey)
        if witness_vkeys:
            state.witness_vkeys = list(witness_vkeys)
        if quorum is not None:
            state.witness_quorum = quorum
        if state.witness_quorum > len(state.witness_vkeys):
            raise auditverify.VerifyFailure(
                "usage", "the witness quorum is larger than the number of witness keys"
            )
        identity = opts.identity()
        async with Client(opts.server_url(identity), identity) as client:
            note, fetched, rotations = await AuditClient(client).follow(state.size)
        previous = state.size or 0
        report = auditverify.run_tiles(state_dir, state, note, fetched, rotations)
    except auditverify.VerifyFailure as exc:
        _verdict(opts, {"verdict": exc.kind, "detail": exc.message}, exc.exit_code)
    except (OSError, ValueError, NoteError) as exc:
        _verdict(opts, {"verdict": "usage", "detail": str(exc)}, EXIT_USAGE)
    new = [
        leaf
        for (level, index, _), data in sorted(fetched.items())
        if level < 0
        for position, leaf in enumerate(tiles.split_bundle(data), start=index * tiles.TILE_WIDTH)
        if position >= previous
    ]
    return report, new


def _summary(leaves: list[bytes]) -> dict[str, int]:
    """New events by action (the leaves are verified by then)."""
    counts: Counter[str] = Counter()
    for leaf in leaves:
        counts[str(json.loads(leaf).get("action"))] += 1
    return dict(sorted(counts.items()))


_MONITOR_HELP = """Follow the log through its tlog-tiles and alert on misbehaviour.

Each round fetches the latest checkpoint, checks its signature and witness quorum against the
state directory (as `audit verify`), fetches only the tiles and entry bundles new since the saved
checkpoint, checks that the new tree extends the saved one and that the new entries hash to it,
saves the new state and prints a summary of the new events. With --once, one round; otherwise
one every --interval seconds until interrupted (an unreachable service is reported and retried).

\b
On misbehaviour it stops with a message starting "ALERT" and the verdict's exit code:
 15  fork: the log's signed tree does not extend the saved one (both checkpoints kept in
     STATE/evidence/)
 17  rollback: the log's signed checkpoint is smaller than the saved one
 18  gap: a tile or entry bundle is missing, or an entry is not at its idx
and 11-14 as for `audit verify`.
"""


@audit.command("monitor", help=_MONITOR_HELP)
@_state_option("Where pinned keys and the last verified checkpoint live.")
@click.option(
    "--vkey", "log_vkey", help="The log's verifier key, obtained out of band (pinned on first use)."
)
@click.option("--witness-vkey", "witness_vkeys", multiple=True, help="A witness's cosigner key (repeatable).")
@click.option("--quorum", type=click.IntRange(0), help="Cosignatures required from those witnesses.")
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="Seconds between rounds.",
)
@click.option("--once", is_flag=True, help="One round, then exit.")
@pass_opts
def monitor(
    opts: Options,
    state_dir: Path,
    log_vkey: str | None,
    witness_vkeys: tuple[str, ...],
    quorum: int | None,
    interval_s: float,
    once: bool,
) -> None:
    async def rounds() -> None:
        while True:
            try:
                report, new = await _follow(opts, state_dir, log_vkey, witness_vkeys, quorum)
            except ServiceUnreachable as exc:
                if once:
                    raise
                click.echo(f"exchange: monitor: {exc}; retrying in {interval_s:g}s", err=True)
            else:
                summary = _summary(new)
                line = _monitor_line(report, summary)
                output(
                    opts,
                    {"verdict": "ok", "new_events": summary} | report.to_json(),
                    partial(click.echo, line),
                )
            if once:
                return
            await asyncio.sleep(interval_s)

    run(opts, rounds)


def _monitor_line(report: auditverify.Report, new_events: dict[str, int]) -> str:
    """One line per round. The origin and the actions come from the log being watched, whose
    operator the monitor does not trust: shown `printable`, they cannot act on the terminal."""
    if report.previous_size is not None and report.previous_size == report.size:
        return printable(f"{report.origin}: size {report.size}, no new events")
    actions = ", ".join(f"{action} {count}" for action, count in new_events.items())
    sizes = f"size {report.previous_size or 0} -> {report.size}"
    return printable(f"{report.origin}: {sizes}: {report.entries} new events ({actions})")


# -- witness --------------------------------------------------------------------------------------


@main.group()
def witness() -> None:
    """Run a tlog-witness that cosigns the audit log's checkpoints (for an auditor organisation)."""


@witness.command("keygen")
@click.option("--name", required=True, help="The witness's name, e.g. witness.auditor.example.")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@pass_opts
def witness_keygen(opts: Options, name: str, key_path: Path) -> None:
    """Create a witness key file (mode 0600) and print its cosigner vkey for the log's operator."""
    from ..witness import WitnessKey

    try:
        key = WitnessKey.generate(name)
        key.save(key_path)
    except FileExistsError:
        fail(InputError(f"{key_path} exists; refusing to overwrite a witness key"), as_json=opts.json)
    except NoteError as exc:
        fail(exc, as_json=opts.json)
    output(opts, {"vkey": key.vkey, "key_file": str(key_path)}, lambda: click.echo(key.vkey))


@witness.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--key", "key_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option(
    "--log-vkey", "log_vkeys", required=True, multiple=True, help="A log's verifier key (repeatable)."
)
@pass_opts
def witness_serve(
    opts: Options, host: str, port: int, state_dir: Path, key_path: Path, log_vkeys: tuple[str, ...]
) -> None:
    """Serve a tlog-witness (c2sp.org/tlog-witness) until interrupted.

    POST /add-checkpoint cosigns a checkpoint of a log whose --log-vkey it was given, if it is
    consistent with the last one it cosigned (kept in --state); GET /<origin hash>/checkpoint
    serves that last one to monitors.
    """
    import logging

    from aiohttp import web

    from ..witness import Witness, WitnessKey, WitnessState, create_witness_app

    try:
        key = WitnessKey.load(key_path)
        app = create_witness_app(Witness(key, WitnessState(state_dir), log_vkeys))
    except (NoteError, ValueError, OSError) as exc:
        fail(InputError(f"cannot start the witness: {exc}"), as_json=opts.json)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    click.echo(f"witness {key.name} on http://{host}:{port}; cosigner key: {key.vkey}", err=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None)

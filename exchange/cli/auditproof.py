"""`exchange audit prove` and `exchange audit check-proof`: proofs of one event a person can carry.

`prove` fetches one event's proof (its leaf, inclusion proof and the latest signed checkpoint)
and writes it as a c2sp.org/tlog-proof file (`.tlog-proof`, mode 0644, never over an existing
file): a tester proves what they received and when (`artifact.receipt`), a developer what they
handed over (`artifact.complete`), a reporter what they reported (`finding.submit`).
`check-proof` is offline: it trusts only the keys given on its command line
(`exchange.client.auditproof`) and exits with `exchange audit verify`'s codes.

What these commands do not do: pin keys in a state directory (the keys are given each time), or
show that the checkpoint is the log's latest (a proof says "this event is in this signed tree").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from .. import auditverify
from ..client import Client
from ..client.audit import AuditClient
from ..client.auditproof import CheckedProof, check_proof
from ..errors import InputError, LocalFileError
from ..files import write_atomic
from ._base import Options, fail, output, pass_opts, printable, when, with_client
from .audit import audit

#: Proof files are for handing out: readable by all, like a signature file.
_PROOF_MODE = 0o644


@audit.command("prove")
@click.argument("event")
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the proof (a new file; by convention NAME.tlog-proof).",
)
@pass_opts
def prove(opts: Options, event: str, out: Path) -> None:
    """Write a tlog-proof file of EVENT (its id or idx): proof that the log holds it.

    \b
    Auditors and admins may prove any event; anyone else, the events they are the actor or the
    subject of (their receipts, link sessions, uploads, grants, findings). The file holds the
    event's exact bytes, its inclusion proof and the log's signed checkpoint with witness
    cosignatures; anyone with the log's key checks it offline with `exchange audit check-proof`.
    """
    if out.exists():
        fail(InputError(f"{out} exists; refusing to overwrite it"), as_json=opts.json)

    async def call(client: Client) -> bytes:
        return await AuditClient(client).prove(event)

    data = with_client(opts, call)
    try:
        write_atomic(out, data, overwrite=False, mode=_PROOF_MODE)
    except FileExistsError:
        fail(InputError(f"{out} exists; refusing to overwrite it"), as_json=opts.json)
    except OSError as exc:
        fail(LocalFileError(f"cannot write {out}: {exc.strerror}"), as_json=opts.json)
    output(opts, {"out": str(out), "bytes": len(data)}, lambda: click.echo(f"wrote {out}"))


_CHECK_HELP = """Check a tlog-proof file offline: the event it carries is in the signed log.

No network. Checks the checkpoint's signature by the log key you give (--vkey, obtained out of
band; give every key you trust of a log that rotated: the checkpoint's origin picks one), the
cosignatures of the witnesses you give (--witness-vkey, --quorum), that the carried event is a
canonical event of this log at the proof's index, and that its inclusion proof leads to the
checkpoint's root. Then prints the event: who, what, when.

\b
Exit codes:
  0  the proof checks
  2  bad usage (no --vkey, a key that is not one, a quorum above the witnesses given)
 10  the file is not a tlog-proof, or carries no event
 11  signature: the checkpoint is not signed by the pinned key of its origin
 12  quorum: too few valid cosignatures from the given witnesses
 13  entries: the carried event is not a canonical event of this log at its index
 16  proof: the inclusion proof does not lead to the checkpoint's root
"""


@audit.command("check-proof", help=_CHECK_HELP)
@click.argument("proof_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--vkey",
    "log_vkeys",
    multiple=True,
    required=True,
    help="The log's verifier key, obtained out of band (repeatable: each key of a rotated log).",
)
@click.option("--witness-vkey", "witness_vkeys", multiple=True, help="A witness's cosigner key (repeatable).")
@click.option("--quorum", type=click.IntRange(0), default=0, show_default=True, help="Cosignatures required.")
@pass_opts
def check(
    opts: Options, proof_file: Path, log_vkeys: tuple[str, ...], witness_vkeys: tuple[str, ...], quorum: int
) -> None:
    try:
        data = proof_file.read_bytes()
    except OSError as exc:
        _verdict(opts, "usage", f"cannot read {proof_file}: {exc.strerror}")
    try:
        checked = check_proof(data, log_vkeys=log_vkeys, witness_vkeys=witness_vkeys, quorum=quorum)
    except auditverify.VerifyFailure as exc:
        _verdict(opts, exc.kind, exc.message)
    output(opts, {"verdict": "ok"} | checked.to_json(), lambda: _describe(checked))


def _verdict(opts: Options, kind: str, detail: str) -> NoReturn:
    code = auditverify.EXIT_CODES[kind]
    if opts.json:
        click.echo(json.dumps({"verdict": kind, "detail": detail, "exit_code": code}, sort_keys=True))
    else:
        click.echo(printable(f"exchange: check-proof failed ({kind}): {detail}"), err=True)
    sys.exit(code)


def _describe(checked: CheckedProof) -> None:
    """Who, what, when: the event as a person reads it (every string made safe for a terminal)."""
    e: dict[str, Any] = checked.event
    actor, outcome, resource = e.get("actor", {}), e.get("outcome", {}), e.get("resource", {})
    who = actor.get("name") or actor.get("id") or actor.get("type")
    if actor.get("org") or actor.get("role"):
        who = f"{who} ({', '.join(str(v) for v in (actor.get('role'), actor.get('org')) if v)})"
    what = e.get("action", "")
    if resource:
        what += " " + ":".join(str(resource[k]) for k in ("type", "id") if k in resource)
    result = outcome.get("result", "")
    if outcome.get("reason"):
        result += f" ({outcome['reason']})"
    cp = checked.checkpoint
    lines = [
        f"verified: event {checked.index} is in {cp.origin}'s log (checkpoint of size {cp.size})",
        f"when:     {when(e['time_ms']) if type(e.get('time_ms')) is int else '?'}",
        f"who:      {who}",
        f"what:     {what}",
        f"outcome:  {result}",
        f"id:       {e.get('id', '')}",
    ]
    if resource.get("sha256"):
        lines.append(f"sha256:   {resource['sha256']}")
    if e.get("details"):
        lines.append(f"details:  {json.dumps(e['details'], sort_keys=True, ensure_ascii=False)}")
    for line in lines:
        click.echo(printable(line))

"""The `exchange` group, its global options, and the one place errors become exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ..client import Client
from ..errors import (
    AuthError,
    Conflict,
    DependencyError,
    ExchangeError,
    FormatError,
    InputError,
    IntegrityFailure,
    NotFound,
    PermissionDenied,
)
from ..identity import Identity

T = TypeVar("T")

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  unexpected failure (a bug: please report it with the request id)
  2  bad usage or bad input (a flag, a file, a value the service refused as invalid)
  3  not authenticated (unknown key, bad signature, clock skew, replay)
  4  permission denied (role, grant, invite used or expired)
  5  not found
  6  conflict (already exists, already done)
  7  unavailable (service, database or storage not answering; try again)
  8  integrity failure (data that does not decrypt, verify or parse)
"""

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_AUTH, EXIT_DENIED = 0, 1, 2, 3, 4
EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_UNAVAILABLE, EXIT_INTEGRITY = 5, 6, 7, 8

#: One line per branch of the error tree (`exchange.errors`), and one per refinement of
#: InputError with an exit code of its own; the nearest one along the class's MRO decides.
_EXIT_CODES: dict[type[ExchangeError], int] = {
    InputError: EXIT_USAGE,
    NotFound: EXIT_NOT_FOUND,
    Conflict: EXIT_CONFLICT,
    FormatError: EXIT_INTEGRITY,  # bytes that do not parse or verify, whoever sent them
    AuthError: EXIT_AUTH,
    PermissionDenied: EXIT_DENIED,
    DependencyError: EXIT_UNAVAILABLE,
    IntegrityFailure: EXIT_INTEGRITY,
}


def exit_code_for(exc: ExchangeError) -> int:
    return next((_EXIT_CODES[cls] for cls in type(exc).__mro__ if cls in _EXIT_CODES), EXIT_BUG)


def default_identity_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "exchange" / "identity.json"


@dataclass
class Options:
    server: str | None
    identity_path: Path
    json: bool

    def identity(self) -> Identity:
        return Identity.load(self.identity_path)

    def server_url(self, identity: Identity | None = None) -> str:
        """The one rule for every command, signed or not: `--server` (or EXCHANGE_SERVER), else
        the server remembered in the identity file at enrolment."""
        if identity is None and not self.server:
            identity = self._identity_if_any()
        server = self.server or (identity.server if identity else None)
        if not server:
            raise InputError(
                "no server given: use --server URL or set EXCHANGE_SERVER"
                " (or enrol, which remembers the server in the identity file)"
            )
        return server

    def _identity_if_any(self) -> Identity | None:
        """The identity file for its remembered server only, in commands that sign nothing: one
        that is missing or unreadable is no error here (those commands need no identity)."""
        try:
            return Identity.load(self.identity_path)
        except (ExchangeError, OSError, ValueError):
            return None


def _width(text: str) -> int:
    """Columns `text` takes on a terminal: wide (CJK) characters two, combining marks none."""
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[int] = ()) -> str:
    """Rows as columns aligned under a header row, every cell made `printable` first; the
    columns in `right` (numbers, sizes) are aligned right. Human output only: `--json` is the
    form for programs. The last column is not padded, so a long name costs no trailing blanks."""
    cells = [[printable(h) for h in headers]] + [[printable(c) for c in row] for row in rows]
    widths = [max(_width(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - _width(cell))
            last = i == len(row) - 1
            parts.append(pad + cell if i in right else cell if last else cell + pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def printable(text: object) -> str:
    """`text` safe for a terminal: every character that is not printable (controls, CR and LF,
    ESC, C1, bidirectional overrides such as U+202E, zero-width and other format characters,
    line separators) is shown as a Python-style escape, and a backslash as two, so that what is
    shown reads back to exactly one string. Human output only: JSON output stays exact."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "".join(out)


def fail(exc: ExchangeError, *, as_json: bool) -> NoReturn:
    code = exit_code_for(exc)
    if as_json:
        click.echo(
            json.dumps({"error": {"code": exc.code, "detail": exc.message, **_jsonable(exc.extra)}}), err=True
        )
    else:
        hint = f" [{exc.code}]" if exc.code else ""
        rid = exc.extra.get("request_id")
        tail = f" (request id {rid})" if rid else ""
        click.echo(printable(f"exchange: error: {exc.message}{hint}{tail}"), err=True)
    sys.exit(code)


def _jsonable(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if isinstance(v, str | int | float | bool) or v is None}


def run(opts: Options, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(work())
    except ExchangeError as exc:
        fail(exc, as_json=opts.json)
    except KeyboardInterrupt:
        click.echo("exchange: interrupted", err=True)
        sys.exit(130)


def output(opts: Options, data: Any, human: Callable[[], None]) -> None:
    if opts.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human()


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def with_client(opts: Options, call: Callable[[Client], Awaitable[T]], *, signed: bool = True) -> T:
    async def work() -> T:
        identity = opts.identity() if signed else None
        async with Client(opts.server_url(identity), identity) as client:
            return await call(client)

    return run(opts, work)


pass_opts = click.make_pass_decorator(Options)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.option("--server", envvar="EXCHANGE_SERVER", metavar="URL", help="Service URL [env EXCHANGE_SERVER].")
@click.option(
    "--identity",
    "identity_path",
    envvar="EXCHANGE_IDENTITY",
    type=click.Path(dir_okay=False, path_type=Path),
    default=default_identity_path,
    show_default="~/.config/exchange/identity.json",
    help="Identity file with your private keys [env EXCHANGE_IDENTITY].",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.version_option(package_name="exchange")
@click.pass_context
def main(ctx: click.Context, server: str | None, identity_path: Path, as_json: bool) -> None:
    """Hand pre-release model artifacts to named testers, end-to-end encrypted, with a verifiable log.

    \b
    First steps:
      exchange keygen                      make your keys (private halves stay in the identity file)
      exchange enroll CODE --name NAME     register them with an invite from an admin
      exchange whoami                      check who the service thinks you are
    """
    ctx.obj = Options(server=server, identity_path=identity_path, json=as_json)

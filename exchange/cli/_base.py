"""The `exchange` group, its global options, and the one place errors become exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import re
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
from ..text import printable as printable  # re-exported: the commands show names through it

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


def config_dir() -> Path:
    """~/.config/exchange (or $XDG_CONFIG_HOME/exchange): the default profile's home."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "exchange"


def default_identity_path() -> Path:
    return config_dir() / "identity.json"


#: A profile's name: it becomes a directory name, so nothing a path gives a meaning to.
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def profile_dir(name: str | None) -> Path:
    """Where a profile keeps its identity file and audit state: ~/.config/exchange for the
    default profile (none named), ~/.config/exchange/profiles/NAME for NAME."""
    if name is None:
        return config_dir()
    if not PROFILE_NAME.fullmatch(name):
        raise InputError(
            f"{name!r} is not a profile name: 1 to 64 letters, digits and . _ -,"
            " starting with a letter or digit"
        )
    return config_dir() / "profiles" / name


def current_profile_dir() -> Path:
    """The profile directory of the command being run (the default one outside a command)."""
    ctx = click.get_current_context(silent=True)
    opts = ctx.find_object(Options) if ctx is not None else None
    return profile_dir(opts.profile if opts is not None else None)


@dataclass
class Options:
    server: str | None
    identity_path: Path
    json: bool
    profile: str | None = None

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
@click.option(
    "--profile",
    envvar="EXCHANGE_PROFILE",
    metavar="NAME",
    help="Act as another of your identities: its identity file and audit state live in"
    " ~/.config/exchange/profiles/NAME/ [env EXCHANGE_PROFILE]. `exchange profiles` lists them.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.version_option(package_name="exchange")
@click.pass_context
def main(
    ctx: click.Context, server: str | None, identity_path: Path, profile: str | None, as_json: bool
) -> None:
    """Hand pre-release model artifacts to named testers, end-to-end encrypted, with a verifiable log.

    \b
    First steps:
      exchange keygen                      make your keys (private halves stay in the identity file)
      exchange enroll CODE --name NAME     register them with an invite from an admin
      exchange whoami                      check who the service thinks you are
    """
    if profile is not None:
        if ctx.get_parameter_source("identity_path") is not click.core.ParameterSource.DEFAULT:
            fail(InputError("--identity and --profile both name an identity file: give one"), as_json=as_json)
        try:
            identity_path = profile_dir(profile) / "identity.json"
        except InputError as exc:
            fail(exc, as_json=as_json)
    ctx.obj = Options(server=server, identity_path=identity_path, json=as_json, profile=profile)

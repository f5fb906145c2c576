"""Identity commands: keys, enrolment, organisations, invites, principals."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from ..client import Client
from ..durations import parse_duration
from ..errors import ExchangeError, InputError, LocalFileError
from ..files import write_atomic
from ..identity import Identity
from ._base import Options, fail, main, output, pass_opts, printable, run, when, with_client

# -- keys -----------------------------------------------------------------------------------------


@main.command()
@click.option("--force", is_flag=True, help="Replace an existing identity file (its keys are lost).")
@pass_opts
def keygen(opts: Options, force: bool) -> None:
    """Create an identity file: an Ed25519 signing key and an X25519 age identity.

    The file is written with mode 0600. Prints the public halves, which are safe to share.
    """
    identity = Identity.generate()
    try:
        identity.save(opts.identity_path, overwrite=force)
    except ExchangeError as exc:
        fail(exc, as_json=opts.json)
    public = identity.public.to_json() | {"identity_file": str(opts.identity_path)}
    output(opts, public, lambda: _print_public(public))


def _print_public(public: dict[str, str]) -> None:
    click.echo(f"identity file:  {public['identity_file']}")
    click.echo(f"key id:         {public['key_id']}")
    click.echo(f"signing key:    {public['signing_public_key']}")
    click.echo(f"age recipient:  {public['age_recipient']}")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@main.command()
@click.option(
    "--age-secret", is_flag=True, help="Export the age identity as an age key file (for `age -d -i`)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --age-secret: write the key file here, mode 0600, never over an existing file"
    " (without it, the key is printed to standard output).",
)
@pass_opts
def identity(opts: Options, age_secret: bool, out: Path | None) -> None:
    """Show your public keys, or export your age identity for the `age` tool.

    \b
    exchange identity --age-secret --out key.txt
    age -d -i key.txt file.age > file
    """
    if out is not None and not age_secret:
        fail(InputError("--out writes the age key file: use it with --age-secret"), as_json=opts.json)
    try:
        ident = opts.identity()
        if out is not None:
            try:
                write_atomic(out, ident.age_key_file().encode("ascii"), overwrite=False, mode=0o600)
            except FileExistsError:
                raise InputError(f"{out} exists; refusing to overwrite it", code="file-exists") from None
            except OSError as exc:
                raise LocalFileError(f"cannot write {out}: {exc.strerror or exc}") from None
    except ExchangeError as exc:
        fail(exc, as_json=opts.json)
    if out is not None:
        output(
            opts, {"age_key_file": str(out)}, lambda: click.echo(f"wrote your age identity to {out} (0600)")
        )
        return
    if age_secret:
        click.echo(ident.age_key_file(), nl=False)
        return
    public = ident.public.to_json() | {"identity_file": str(opts.identity_path)}
    if ident.name:
        public["name"] = ident.name
    output(opts, public, lambda: _print_public(public))


@main.command()
@click.argument("code")
@click.option("--name", required=True, help="Your principal name (letters, digits, . _ @ -).")
@pass_opts
def enroll(opts: Options, code: str, name: str) -> None:
    """Register your public keys with a one-time invite CODE.

    Creates the identity file first if there is none. The request is signed with the key it
    registers, which proves you hold it.
    """
    ident = opts.identity() if opts.identity_path.exists() else Identity.generate()
    server = opts.server_url(ident) if opts.server or ident.server else None
    if server is None:
        fail(InputError("no server given: use --server URL or set EXCHANGE_SERVER"), as_json=opts.json)

    async def work() -> dict[str, Any]:
        async with Client(server, ident) as client:
            return await client.enroll(code, name, ident)

    principal = run(opts, work)
    ident.with_enrolment(name=name, server=server).save(opts.identity_path, overwrite=True)
    output(
        opts,
        principal,
        lambda: click.echo(
            f"enrolled {principal['name']} as {principal['role']} of {principal['org']}\n"
            f"identity file: {opts.identity_path}"
        ),
    )


@main.command()
@pass_opts
def whoami(opts: Options) -> None:
    """Ask the service who signed this request."""
    me = with_client(opts, lambda c: c.whoami())
    output(opts, me, lambda: _print_principal(me))


def _print_principal(p: dict[str, Any]) -> None:
    click.echo(f"{p['name']} ({p['role']}, org {p['org']})")
    click.echo(f"key id:         {p['key_id']}")
    click.echo(f"age recipient:  {p['age_recipient']}")


# -- organisations, invites, principals ------------------------------------------------------------


@main.group()
def org() -> None:
    """Organisations (admin)."""


@org.command("create")
@click.argument("name")
@pass_opts
def org_create(opts: Options, name: str) -> None:
    """Create an organisation NAME."""
    created = with_client(opts, lambda c: c.create_org(name))
    output(opts, created, lambda: click.echo(f"created organisation {created['name']} ({created['id']})"))


@org.command("ls")
@pass_opts
def org_ls(opts: Options) -> None:
    """List organisations."""
    orgs = with_client(opts, lambda c: c.list_orgs())
    output(opts, orgs, lambda: click.echo("\n".join(f"{o['name']}\t{o['id']}" for o in orgs)))


@main.command()
@click.option("--role", required=True, type=click.Choice(["admin", "developer", "tester", "auditor"]))
@click.option("--org", "org_name", required=True, help="Organisation the new principal joins.")
@click.option("--expires", default="24h", show_default=True, help="Lifetime: 90s, 15m, 24h, 7d.")
@pass_opts
def invite(opts: Options, role: str, org_name: str, expires: str) -> None:
    """Issue a one-time invite (admin). Prints the code to hand to the new principal."""
    try:
        lifetime = parse_duration(expires)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires") from None
    inv = with_client(opts, lambda c: c.create_invite(role=role, org=org_name, expires_in_s=lifetime))
    # The whole command, server included, so that it works as printed on another machine. Both
    # values are quoted for a POSIX shell; NAME is the one word the new principal replaces.
    server = opts.server_url(opts.identity())
    command = f"exchange --server {shlex.quote(server)} enroll {shlex.quote(inv['code'])} --name NAME"
    output(
        opts,
        inv | {"server": server, "enroll_command": command},
        lambda: click.echo(
            f"{inv['code']}\n\none-time invite for {_article(inv['role'])} {inv['role']} of {inv['org']},"
            f" valid until {when(inv['expires_at_ms'])}\n"
            f"the new principal runs (with its own name for NAME):\n  {printable(command)}",
            err=False,
        ),
    )


@main.group()
def principals() -> None:
    """Principals and their public keys."""


@principals.command("ls")
@click.option("--org", "org_name", help="Only this organisation.")
@click.option(
    "--role", type=click.Choice(["admin", "developer", "tester", "auditor"]), help="Only this role."
)
@pass_opts
def principals_ls(opts: Options, org_name: str | None, role: str | None) -> None:
    """List principals."""
    items = with_client(opts, lambda c: c.list_principals(org=org_name, role=role))
    output(
        opts,
        items,
        lambda: click.echo("\n".join(f"{p['name']}\t{p['role']}\t{p['org']}\t{p['key_id']}" for p in items)),
    )


@principals.command("show")
@click.argument("name")
@pass_opts
def principals_show(opts: Options, name: str) -> None:
    """Show one principal's public keys."""
    p = with_client(opts, lambda c: c.get_principal(name))
    output(opts, p, lambda: _print_principal(p))

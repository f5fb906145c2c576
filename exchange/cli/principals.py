"""Identity commands: keys, enrolment, organisations, invites, principals."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from ..client import Client, Rewrapped
from ..durations import parse_duration
from ..errors import AuthError, DependencyError, ExchangeError, InputError, LocalFileError
from ..files import write_atomic
from ..identity import Identity
from ._base import (
    Options,
    config_dir,
    fail,
    main,
    output,
    pass_opts,
    printable,
    profile_dir,
    run,
    table,
    when,
    with_client,
)

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


@main.command()
@pass_opts
def profiles(opts: Options) -> None:
    """List your profiles: the default one and each ~/.config/exchange/profiles/NAME.

    \b
    Each profile is an identity file and its own audit state. Make one with
      exchange --profile NAME keygen            (or: enroll CODE --name PRINCIPAL)
    and use it with --profile NAME or EXCHANGE_PROFILE=NAME on any command. Nothing here
    talks to a server: the server and principal shown are those the identity file remembers.
    """
    names: list[str | None] = [None]
    root = config_dir() / "profiles"
    if root.is_dir():
        names += sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "identity.json").exists())
    rows = []
    for name in names:
        path = profile_dir(name) / "identity.json"
        entry: dict[str, Any] = {"profile": name, "identity_file": str(path), "current": name == opts.profile}
        try:
            identity = Identity.load(path)
            entry |= {
                "server": identity.server,
                "principal": identity.name,
                "key_id": identity.public.key_id,
                "exists": True,
            }
        except (ExchangeError, OSError, ValueError):
            entry |= {"server": None, "principal": None, "key_id": None, "exists": False}
        rows.append(entry)
    output(
        opts,
        rows,
        lambda: click.echo(
            table(
                ["", "PROFILE", "PRINCIPAL", "SERVER", "KEY ID", "IDENTITY FILE"],
                [
                    [
                        "*" if r["current"] else "",
                        r["profile"] or "(default)",
                        r["principal"] or "-",
                        r["server"] or "-",
                        r["key_id"] or ("-" if r["exists"] else "(no identity yet)"),
                        r["identity_file"],
                    ]
                    for r in rows
                ],
            )
        ),
    )


def _print_public(public: dict[str, str]) -> None:
    click.echo(f"identity file:  {public['identity_file']}")
    click.echo(f"key id:         {public['key_id']}")
    click.echo(f"signing key:    {public['signing_public_key']}")
    click.echo(f"age recipient:  {public['age_recipient']}")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@main.group(invoke_without_command=True)
@click.option(
    "--age-secret", is_flag=True, help="Export the age identity as an age key file (for `age -d -i`)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --age-secret: write the key file here, mode 0600, never over an existing file"
    " (without it, the key is printed to standard output).",
)
@click.pass_context
@pass_opts
def identity(opts: Options, ctx: click.Context, age_secret: bool, out: Path | None) -> None:
    """Show your public keys, or export your age identity for the `age` tool; `identity rotate`
    replaces your keys.

    \b
    exchange identity --age-secret --out key.txt
    age -d -i key.txt file.age > file
    """
    if ctx.invoked_subcommand is not None:
        if age_secret or out is not None:
            fail(InputError("--age-secret and --out go without a subcommand"), as_json=opts.json)
        return
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


# -- key rotation ---------------------------------------------------------------------------------
#
# The identity file is replaced only once the service took the new keys, and nothing is ever
# lost to a crash: the new identity is first written beside it (identity.json.next); the old one
# is kept as identity.json.retired-KEYID until every header it opens is re-wrapped. A run finds
# what an interrupted one left and carries on from there.


def _next_path(path: Path) -> Path:
    return path.with_name(path.name + ".next")


def _retired_paths(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".retired-*"))


async def _key_works(server: str, identity: Identity) -> bool:
    async with Client(server, identity) as probe:
        try:
            await probe.whoami()
        except AuthError:
            return False
    return True


async def _change_keys(client: Client, new: Identity, pending: Path, *, resumed: bool) -> bool:
    """Have the service take `new` (unless it already did: a run that stopped after asking);
    True if this call changed them. A refusal removes the pending identity: nothing changed.

    Only a resumed rotation, or one whose old key was refused, asks whether the new key works
    already: a key made this run cannot, and each refused signature spends this address's
    authentication-failure budget."""
    if resumed and await _key_works(client.server, new):
        return False
    try:
        await client.rotate_keys(new)
    except DependencyError:
        raise  # the answer may be lost, not the change: keep the pending identity for a re-run
    except AuthError:
        # The old key refused: retired by this very request if its answer was lost and it was
        # sent again (its nonce then replayed), or long ago. Only the first keeps the new keys.
        if await _key_works(client.server, new):
            return False
        pending.unlink(missing_ok=True)
        raise
    except ExchangeError:
        pending.unlink(missing_ok=True)
        raise
    return True


def _swap_in(path: Path, current: Identity, new: Identity, pending: Path) -> None:
    """Keep the old identity as a retired file, then put the new one in its place."""
    if current.key_id != new.key_id:
        retired = path.with_name(f"{path.name}.retired-{current.key_id}")
        if not retired.exists():
            current.save(retired)
        new.save(path, overwrite=True)
    pending.unlink(missing_ok=True)


@identity.command("rotate")
@click.option(
    "--resume",
    is_flag=True,
    help="Make no new keys: finish what an interrupted rotation left (take the pending keys into"
    " use, re-wrap what is left).",
)
@click.option(
    "--no-rewrap",
    is_flag=True,
    help="Only change the keys; re-wrap your headers later with `exchange identity rotate --resume`.",
)
@pass_opts
def identity_rotate(opts: Options, resume: bool, no_rewrap: bool) -> None:
    """Replace your signing key and age key with new ones, and re-wrap what was shared with you.

    \b
    The service takes the new keys on the word of the old one (the request is signed by it) and
    the new signing key's own proof. From then on only the new keys work; what your old key
    signed (your artifacts' manifests) still verifies. Every artifact header wrapped for your
    old age key is then re-wrapped for the new one by this command (nothing new is disclosed:
    you already held each file key). Events: principal.rotate, artifact.rewrap.

    \b
    Files: the new identity is written to IDENTITY.next first; once the service took it, the old
    one moves to IDENTITY.retired-KEYID (0600) and the new one takes its place. The retired file
    is deleted when every header is re-wrapped. If a run stops, run it again (or with --resume):
    it continues where it stopped, never losing access.
    """
    path = opts.identity_path
    pending = _next_path(path)
    try:
        current = opts.identity()
        server = opts.server_url(current)
        resumed = pending.exists()
        if resumed:
            new: Identity | None = Identity.load(pending)
        elif resume:
            new = None
        else:
            new = Identity.generate()
            if current.name:
                new = new.with_enrolment(name=current.name, server=current.server or server)
            new.save(pending)
    except ExchangeError as exc:
        fail(exc, as_json=opts.json)

    async def work() -> dict[str, Any]:
        result: dict[str, Any] = {"old_key_id": current.key_id, "key_id": current.key_id, "changed": False}
        if new is not None:
            async with Client(server, current) as client:
                result["changed"] = await _change_keys(client, new, pending, resumed=resumed)
            _swap_in(path, current, new, pending)
            result["key_id"] = new.key_id
        if no_rewrap:
            return result
        ident = Identity.load(path)
        retired_files = _retired_paths(path)
        retired = [Identity.load(p) for p in retired_files]
        async with Client(server, ident) as client:
            done: Rewrapped = await client.rewrap_own_headers(retired)
            result["name"] = (await client.whoami())["name"]
        if not done.unopenable:
            for p in retired_files:
                p.unlink(missing_ok=True)
        return result | {
            "rewrapped": done.rewrapped,
            "already_current": done.current,
            "unopenable": done.unopenable,
            "retired_identity_files": [str(p) for p in retired_files if p.exists()],
        }

    result = run(opts, work)
    output(opts, result, lambda: _print_rotation(result))


def _print_rotation(r: dict[str, Any]) -> None:
    if r["old_key_id"] != r["key_id"]:
        click.echo(f"new keys in use: key id {r['old_key_id']} -> {r['key_id']}")
    else:
        click.echo(f"key id {r['key_id']} (no new keys made)")
    if "rewrapped" not in r:
        click.echo("headers not re-wrapped yet: run `exchange identity rotate --resume`")
        return
    click.echo(f"re-wrapped {len(r['rewrapped'])} header(s); {r['already_current']} already for the new key")
    if r["unopenable"]:
        click.echo(
            f"{len(r['unopenable'])} header(s) no key of yours opens (ask their uploader to grant"
            f" again): {', '.join(printable(a) for a in r['unopenable'])}"
        )
        for p in r["retired_identity_files"]:
            click.echo(f"kept the retired identity {printable(p)}")


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
    output(
        opts,
        orgs,
        lambda: click.echo(
            table(["NAME", "ID", "CREATED"], [[o["name"], o["id"], when(o["created_at_ms"])] for o in orgs])
        ),
    )


@org.command("members")
@click.argument("name")
@pass_opts
def org_members(opts: Options, name: str) -> None:
    """Everyone in organisation NAME: name, role, status and key id (admin, auditor: everyone;
    others see principals as `exchange principals ls` does)."""
    items = with_client(opts, lambda c: c.list_principals(org=name))
    output(opts, items, lambda: click.echo(_principal_table(items)))


@main.command()
@click.option("--role", type=click.Choice(["admin", "developer", "tester", "auditor"]))
@click.option("--org", "org_name", help="Organisation the new principal joins.")
@click.option(
    "--reenroll",
    metavar="NAME",
    help="Instead: replace the lost keys of principal NAME (its role and organisation stay).",
)
@click.option("--expires", default="24h", show_default=True, help="Lifetime: 90s, 15m, 24h, 7d.")
@pass_opts
def invite(opts: Options, role: str | None, org_name: str | None, reenroll: str | None, expires: str) -> None:
    """Issue a one-time invite (admin). Prints the code to hand to the new principal.

    \b
    With --reenroll NAME (no --role, no --org) the invite replaces the keys of NAME, who lost
    them: NAME runs `exchange enroll CODE --name NAME` with a new identity. What was granted to
    the lost age key cannot be re-wrapped by anyone but its uploader: those headers are dropped,
    `exchange grants ART` shows each such grant as "needs re-grant", and the uploader runs
    `exchange grant ART NAME` again. Events: invite.reenroll, principal.reenroll.
    """
    if (reenroll is not None and (role or org_name)) or (reenroll is None and not (role and org_name)):
        fail(
            InputError("give --role and --org for a new principal, or --reenroll NAME alone"),
            as_json=opts.json,
        )
    try:
        lifetime = parse_duration(expires)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires") from None
    if reenroll is not None:
        inv = with_client(opts, lambda c: c.create_reenroll_invite(reenroll, expires_in_s=lifetime))
    else:
        assert role is not None and org_name is not None
        inv = with_client(opts, lambda c: c.create_invite(role=role, org=org_name, expires_in_s=lifetime))
    # The whole command, server included, so that it works as printed on another machine. Both
    # values are quoted for a POSIX shell; NAME is the one word the new principal replaces.
    server = opts.server_url(opts.identity())
    who = shlex.quote(reenroll) if reenroll is not None else "NAME"
    command = f"exchange --server {shlex.quote(server)} enroll {shlex.quote(inv['code'])} --name {who}"
    if reenroll is not None:
        what = f"one-time re-enrol invite replacing the keys of {reenroll} ({inv['role']} of {inv['org']})"
        runs = f"{reenroll} runs, with a new identity file:"
    else:
        what = f"one-time invite for {_article(inv['role'])} {inv['role']} of {inv['org']}"
        runs = "the new principal runs (with its own name for NAME):"
    output(
        opts,
        inv | {"server": server, "enroll_command": command},
        lambda: click.echo(
            f"{inv['code']}\n\n{printable(what)}, valid until {when(inv['expires_at_ms'])}\n"
            f"{printable(runs)}\n  {printable(command)}",
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
    output(opts, items, lambda: click.echo(_principal_table(items)))


def _principal_table(items: list[dict[str, Any]]) -> str:
    rows = [[p["name"], p["role"], p["org"], p["status"], p["key_id"]] for p in items]
    return table(["NAME", "ROLE", "ORG", "STATUS", "KEY ID"], rows)


_STATUS_HELP = """

\b
Disabled, NAME's signatures are refused at once on every replica; links issued to NAME cannot
be redeemed and NAME can be neither granted nor sent a link. Nothing NAME did is lost: its
artifacts, findings, receipts and events stay, and what NAME granted or linked to others stays
too (revoke it with `exchange revoke` / `exchange links revoke` if it should not). Re-enabling
restores exactly that access. Each change is an audit event (principal.disable /
principal.enable) with the reason given. An admin cannot disable itself, nor the last admin.

\b
Exit codes: 0 done, 4 not an admin, 5 no such principal, 6 already in that state, or the
last admin.
"""


@principals.command("disable", help="Disable (offboard) principal NAME (admin)." + _STATUS_HELP)
@click.argument("name")
@click.option("--reason", help="Why, for the audit log (logged as given; at most 500 characters).")
@pass_opts
def principals_disable(opts: Options, name: str, reason: str | None) -> None:
    p = with_client(opts, lambda c: c.disable_principal(name, reason=reason))
    output(
        opts, p, lambda: click.echo(f"disabled {printable(p['name'])} ({p['role']} of {printable(p['org'])})")
    )


@principals.command("enable", help="Re-enable principal NAME (admin)." + _STATUS_HELP)
@click.argument("name")
@click.option("--reason", help="Why, for the audit log (logged as given; at most 500 characters).")
@pass_opts
def principals_enable(opts: Options, name: str, reason: str | None) -> None:
    p = with_client(opts, lambda c: c.enable_principal(name, reason=reason))
    output(
        opts, p, lambda: click.echo(f"enabled {printable(p['name'])} ({p['role']} of {printable(p['org'])})")
    )


@principals.command("show")
@click.argument("name")
@pass_opts
def principals_show(opts: Options, name: str) -> None:
    """Show one principal's public keys."""
    p = with_client(opts, lambda c: c.get_principal(name))
    output(opts, p, lambda: _print_principal(p))

"""Organisations, principals and invites: who exists, in which role, with which public keys.

A principal is a name, a role, an organisation and two public keys. It comes into being in one
of two ways: the very first admin through `bootstrap_admin` (run on the server by
`exchange init`), everyone else through a one-time invite an admin issued. Each change and its
audit event commit together.

Decisions (may this principal do that?) are the small pure functions at the top; the rest
fetches and persists around them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from ..db import Connection, Database, Row
from ..errors import Conflict, NotFound, PermissionDenied
from ..identity import PublicKeys
from .audit import Actor, AuditLog, Context

__all__ = [
    "ROLES",
    "Invite",
    "Org",
    "Principal",
    "bootstrap_admin",
    "check_key_unused",
    "create_invite",
    "create_org",
    "create_reenroll_invite",
    "enroll",
    "get_principal",
    "insert_key",
    "list_orgs",
    "list_principals",
    "principal_by_key_id",
    "require_role",
    "set_status",
    "swap_keys",
]

ROLES = ("admin", "developer", "tester", "auditor")
_INVITE_PREFIX = "exinv1_"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


@dataclass(frozen=True)
class Org:
    id: str
    name: str
    created_at_ms: int

    @classmethod
    def from_row(cls, row: Row) -> Org:
        return cls(id=row["id"], name=row["name"], created_at_ms=row["created_at_ms"])


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    org_id: str
    org_name: str
    role: str
    key_id: str
    signing_public_key: bytes
    age_recipient: str
    status: str
    created_at_ms: int

    @classmethod
    def from_row(cls, row: Row) -> Principal:
        return cls(
            id=row["id"],
            name=row["name"],
            org_id=row["org_id"],
            org_name=row["org_name"],
            role=row["role"],
            key_id=row["key_id"],
            signing_public_key=bytes(row["signing_public_key"]),
            age_recipient=row["age_recipient"],
            status=row["status"],
            created_at_ms=row["created_at_ms"],
        )

    @property
    def actor(self) -> Actor:
        return Actor(
            type="principal",
            id=self.id,
            name=self.name,
            org=self.org_name,
            role=self.role,
            key_id=self.key_id,
        )


@dataclass(frozen=True)
class Invite:
    id: str
    role: str
    org_name: str
    expires_at_ms: int


# -- decisions ------------------------------------------------------------------------------------


def require_role(principal: Principal, *roles: str) -> None:
    if principal.role not in roles:
        raise PermissionDenied(
            f"this needs the role {' or '.join(roles)}; {principal.name} is {principal.role}",
            code="role-required",
        )


def hash_invite_code(code: str) -> bytes:
    return hashlib.sha256(code.encode("utf-8")).digest()


def _check_invite(row: Row | None, now_ms: int) -> Row:
    if row is None:
        raise PermissionDenied("this invite code is not valid", code="invite-invalid")
    if row["used_at_ms"] is not None:
        raise PermissionDenied("this invite code has already been used", code="invite-used")
    if row["expires_at_ms"] <= now_ms:
        raise PermissionDenied(
            "this invite code has expired; ask an admin for a new one", code="invite-expired"
        )
    return row


# -- reads ----------------------------------------------------------------------------------------

_PRINCIPAL_SELECT = (
    "SELECT p.id, p.name, p.org_id, o.name AS org_name, p.role, p.key_id, p.signing_public_key,"
    " p.age_recipient, p.status, p.created_at_ms FROM principals p JOIN orgs o ON o.id = p.org_id"
)


async def principal_by_key_id(db: Database, key_id: str) -> Principal | None:
    row = await db.fetchone(_PRINCIPAL_SELECT + " WHERE p.key_id = $1", key_id)
    return None if row is None else Principal.from_row(row)


async def get_principal(db: Database, name: str) -> Principal:
    row = await db.fetchone(_PRINCIPAL_SELECT + " WHERE p.name = $1", name)
    if row is None:
        raise NotFound(f"no principal named {name!r}")
    return Principal.from_row(row)


async def list_principals(
    db: Database, *, org: str | None = None, role: str | None = None, limit: int, after: str | None = None
) -> list[Principal]:
    # Each filter is a bound parameter; a NULL parameter switches its filter off.
    rows = await db.fetchall(
        _PRINCIPAL_SELECT
        + " WHERE (CAST($1 AS TEXT) IS NULL OR o.name = $1) AND (CAST($2 AS TEXT) IS NULL OR p.role = $2)"
        " AND (CAST($3 AS TEXT) IS NULL OR p.name > $3) ORDER BY p.name LIMIT $4",
        org,
        role,
        after,
        limit,
    )
    return [Principal.from_row(r) for r in rows]


async def list_orgs(db: Database) -> list[Org]:
    return [Org.from_row(r) for r in await db.fetchall("SELECT * FROM orgs ORDER BY name")]


async def _org_by_name(conn: Connection, name: str) -> Org:
    row = await conn.fetchone("SELECT * FROM orgs WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no organisation named {name!r} (create it with `exchange org create`)")
    return Org.from_row(row)


# -- changes --------------------------------------------------------------------------------------


async def _insert_org(conn: Connection, name: str, now_ms: int) -> Org:
    if await conn.fetchone("SELECT id FROM orgs WHERE name = $1", name) is not None:
        raise Conflict(f"an organisation named {name!r} already exists", code="org-exists")
    org = Org(id=new_id("org"), name=name, created_at_ms=now_ms)
    await conn.execute(
        "INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)", org.id, org.name, now_ms
    )
    return org


async def create_org(
    db: Database, audit: AuditLog, ctx: Context, actor: Principal, name: str, now_ms: int
) -> Org:
    require_role(actor, "admin")
    async with db.transaction() as conn:
        org = await _insert_org(conn, name, now_ms)
        await audit.append(
            conn, ctx, action="org.create", resource={"type": "org", "id": org.id}, details={"name": name}
        )
    return org


async def create_invite(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    actor: Principal,
    *,
    role: str,
    org_name: str,
    lifetime_s: int,
    now_ms: int,
) -> tuple[Invite, str]:
    """Issue a one-time invite; return it and its code, which is shown once and stored hashed."""
    require_role(actor, "admin")
    code = _INVITE_PREFIX + secrets.token_urlsafe(32)
    async with db.transaction() as conn:
        org = await _org_by_name(conn, org_name)
        invite = Invite(
            id=new_id("inv"), role=role, org_name=org.name, expires_at_ms=now_ms + lifetime_s * 1000
        )
        await conn.execute(
            "INSERT INTO invites (id, code_hash, role, org_id, created_by, created_at_ms, expires_at_ms)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            invite.id,
            hash_invite_code(code),
            role,
            org.id,
            actor.id,
            now_ms,
            invite.expires_at_ms,
        )
        await audit.append(
            conn,
            ctx,
            action="invite.create",
            resource={"type": "invite", "id": invite.id},
            details={"role": role, "org": org.name, "expires_at_ms": invite.expires_at_ms},
        )
    return invite, code


async def check_key_unused(conn: Connection, keys: PublicKeys) -> None:
    """Refuse a signing key any principal holds or ever held (`principal_keys` keeps them all):
    a key id names one key of one principal, for good."""
    if await conn.fetchone("SELECT key_id FROM principal_keys WHERE key_id = $1", keys.key_id) is not None:
        raise Conflict("this signing key is already enrolled", code="key-enrolled")
    if await conn.fetchone("SELECT id FROM principals WHERE key_id = $1", keys.key_id) is not None:
        raise Conflict("this signing key is already enrolled", code="key-enrolled")


async def insert_key(conn: Connection, principal_id: str, keys: PublicKeys, now_ms: int) -> None:
    """Record `keys` in the principal's key history as held from `now_ms` on."""
    await conn.execute(
        "INSERT INTO principal_keys (key_id, principal_id, signing_public_key, age_recipient,"
        " valid_from_ms, valid_until_ms) VALUES ($1, $2, $3, $4, $5, NULL)",
        keys.key_id,
        principal_id,
        keys.signing_public_key,
        keys.age_recipient,
        now_ms,
    )


async def swap_keys(
    conn: Connection, target: Principal, keys: PublicKeys, now_ms: int, *, active_only: bool
) -> Principal:
    """Replace `target`'s keys with `keys` (unused by anyone, ever), guarded by its current key
    id (and its being active, if `active_only`): of two swaps racing, one wins. The old key's
    history row is closed at `now_ms` and the new one opened; return the principal as it is now."""
    await check_key_unused(conn, keys)
    changed = await conn.execute(
        "UPDATE principals SET key_id = $1, signing_public_key = $2, age_recipient = $3"
        " WHERE id = $4 AND key_id = $5 AND ($6 = FALSE OR status = 'active')",
        keys.key_id,
        keys.signing_public_key,
        keys.age_recipient,
        target.id,
        target.key_id,
        active_only,
    )
    if changed != 1:
        raise Conflict(f"{target.name} changed meanwhile; try again", code="principal-changed")
    await conn.execute(
        "UPDATE principal_keys SET valid_until_ms = $1 WHERE principal_id = $2 AND valid_until_ms IS NULL",
        now_ms,
        target.id,
    )
    await insert_key(conn, target.id, keys, now_ms)
    return dataclasses.replace(
        target,
        key_id=keys.key_id,
        signing_public_key=keys.signing_public_key,
        age_recipient=keys.age_recipient,
    )


async def _insert_principal(
    conn: Connection, *, name: str, org: Org, role: str, keys: PublicKeys, now_ms: int
) -> Principal:
    if await conn.fetchone("SELECT id FROM principals WHERE name = $1", name) is not None:
        raise Conflict(f"the name {name!r} is taken", code="name-taken")
    await check_key_unused(conn, keys)
    principal = Principal(
        id=new_id("prn"),
        name=name,
        org_id=org.id,
        org_name=org.name,
        role=role,
        key_id=keys.key_id,
        signing_public_key=keys.signing_public_key,
        age_recipient=keys.age_recipient,
        status="active",
        created_at_ms=now_ms,
    )
    await conn.execute(
        "INSERT INTO principals (id, name, org_id, role, key_id, signing_public_key, age_recipient,"
        " status, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        principal.id,
        principal.name,
        org.id,
        role,
        principal.key_id,
        principal.signing_public_key,
        principal.age_recipient,
        principal.status,
        now_ms,
    )
    await insert_key(conn, principal.id, keys, now_ms)
    return principal


async def _spend_invite(conn: Connection, invite_id: str, principal_id: str, now_ms: int) -> None:
    """Mark the invite used by `principal_id`; the used_at_ms guard makes a concurrent second
    spend of the same code change nothing (and refuses it)."""
    spent = await conn.execute(
        "UPDATE invites SET used_at_ms = $1, used_by = $2 WHERE id = $3 AND used_at_ms IS NULL",
        now_ms,
        principal_id,
        invite_id,
    )
    if spent != 1:
        raise PermissionDenied("this invite code has already been used", code="invite-used")


async def enroll(
    db: Database, audit: AuditLog, ctx: Context, *, code: str, name: str, keys: PublicKeys, now_ms: int
) -> Principal:
    """Spend an invite: register `keys` under `name` in the invite's role and organisation, or,
    with a re-enrol invite, as the new keys of the principal it names (`_reenroll`)."""
    async with db.transaction() as conn:
        row = _check_invite(
            await conn.fetchone(
                "SELECT i.*, o.name AS org_name FROM invites i JOIN orgs o ON o.id = i.org_id"
                " WHERE i.code_hash = $1",
                hash_invite_code(code),
            ),
            now_ms,
        )
        if row["principal_id"] is not None:
            principal = await _reenroll(conn, audit, ctx, row, name=name, keys=keys, now_ms=now_ms)
            return principal
        org = await _org_by_name(conn, row["org_name"])
        principal = await _insert_principal(
            conn, name=name, org=org, role=row["role"], keys=keys, now_ms=now_ms
        )
        await _spend_invite(conn, row["id"], principal.id, now_ms)
        await audit.append(
            conn,
            ctx,
            action="principal.enroll",
            actor=principal.actor,
            resource={"type": "principal", "id": principal.id},
            details={"invite": row["id"], "role": principal.role, "org": org.name, "name": name},
        )
    return principal


async def bootstrap_admin(
    db: Database, audit: AuditLog, ctx: Context, *, name: str, org_name: str, keys: PublicKeys, now_ms: int
) -> Principal:
    """Create the first admin (and its organisation). Refused once any principal exists."""
    async with db.transaction() as conn:
        if await conn.fetchval("SELECT COUNT(*) FROM principals") != 0:
            raise Conflict("the service already has principals; invite new ones instead", code="initialised")
        org_row = await conn.fetchone("SELECT * FROM orgs WHERE name = $1", org_name)
        org = Org.from_row(org_row) if org_row else await _insert_org(conn, org_name, now_ms)
        principal = await _insert_principal(conn, name=name, org=org, role="admin", keys=keys, now_ms=now_ms)
        await audit.append(
            conn,
            ctx,
            action="principal.bootstrap",
            resource={"type": "principal", "id": principal.id},
            details={"name": name, "org": org.name, "role": "admin"},
        )
    return principal


_ACTIVE_ADMINS = "SELECT id FROM principals WHERE role = 'admin' AND status = 'active' ORDER BY id"
_ACTIVE_ADMINS_LOCKED = _ACTIVE_ADMINS + " FOR UPDATE"

#: The two states an admin moves a principal between, and the action each move is logged as.
STATUS_ACTIONS = {"disabled": "principal.disable", "active": "principal.enable"}


async def set_status(
    db: Database,
    audit: AuditLog,
    ctx: Context,
    actor: Principal,
    name: str,
    status: str,
    *,
    reason: str | None = None,
) -> Principal:
    """Disable (offboard) or re-enable the principal `name` (admin only), with its event.

    Disabled, its signatures are refused at once on every replica (authentication reads the
    status from the shared database on every request), links issued to it cannot be redeemed and
    it can be neither granted nor sent a link; what it did stays: its artifacts, findings,
    receipts and events, and what it granted or linked to others (the organisation's decision,
    revoked separately). Re-enabling restores exactly that access. An admin cannot disable
    itself, and the last active admin cannot be disabled: the service would have no one left to
    undo it.
    """
    require_role(actor, "admin")
    async with db.transaction() as conn:
        row = await conn.fetchone(_PRINCIPAL_SELECT + " WHERE p.name = $1", name)
        if row is None:
            raise NotFound(f"no principal named {name!r}")
        target = Principal.from_row(row)
        if target.status == status:
            word = "disabled" if status == "disabled" else "active"
            raise Conflict(f"{name} is already {word}", code=f"principal-already-{word}")
        if status == "disabled" and target.role == "admin":
            if target.id == actor.id:
                raise Conflict("an admin cannot disable itself; ask another admin", code="disable-self")
            # Lock the active admins (PostgreSQL; SQLite has one writer at a time anyway), so two
            # admins disabling each other at once cannot leave none.
            admins = await conn.fetchall(
                _ACTIVE_ADMINS_LOCKED if db.dialect == "postgresql" else _ACTIVE_ADMINS
            )
            if not any(a["id"] != target.id for a in admins):
                raise Conflict("the last active admin cannot be disabled", code="last-admin")
        changed = await conn.execute(
            "UPDATE principals SET status = $1 WHERE id = $2 AND status = $3",
            status,
            target.id,
            target.status,
        )
        if changed != 1:
            raise Conflict(f"{name} changed meanwhile; try again", code="principal-changed")
        details: dict[str, Any] = {"name": target.name, "org": target.org_name, "role": target.role}
        if reason:
            details["reason"] = reason
        await audit.append(
            conn,
            ctx,
            action=STATUS_ACTIONS[status],
            resource={"type": "principal", "id": target.id},
            details=details,
        )
    return dataclasses.replace(target, status=status)


def principal_json(p: Principal) -> dict[str, Any]:
    keys = PublicKeys(signing_public_key=p.signing_public_key, age_recipient=p.age_recipient)
    return {
        "id": p.id,
        "name": p.name,
        "org": p.org_name,
        "role": p.role,
        "status": p.status,
        **keys.to_json(),
        "created_at_ms": p.created_at_ms,
    }


# -- lost keys: an admin's re-enrol invite ---------------------------------------------------------


async def create_reenroll_invite(
    db: Database, audit: AuditLog, ctx: Context, actor: Principal, *, name: str, lifetime_s: int, now_ms: int
) -> tuple[Invite, str]:
    """Issue a one-time invite that replaces the keys of the existing principal `name` (admin):
    the answer to keys that are lost, when no old key can authorise a rotation. Its code is
    shown once and stored hashed, like any invite's."""
    require_role(actor, "admin")
    code = _INVITE_PREFIX + secrets.token_urlsafe(32)
    async with db.transaction() as conn:
        row = await conn.fetchone(_PRINCIPAL_SELECT + " WHERE p.name = $1", name)
        if row is None:
            raise NotFound(f"no principal named {name!r}")
        target = Principal.from_row(row)
        invite = Invite(
            id=new_id("inv"),
            role=target.role,
            org_name=target.org_name,
            expires_at_ms=now_ms + lifetime_s * 1000,
        )
        await conn.execute(
            "INSERT INTO invites (id, code_hash, role, org_id, created_by, created_at_ms, expires_at_ms,"
            " principal_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            invite.id,
            hash_invite_code(code),
            target.role,
            target.org_id,
            actor.id,
            now_ms,
            invite.expires_at_ms,
            target.id,
        )
        await audit.append(
            conn,
            ctx,
            action="invite.reenroll",
            resource={"type": "principal", "id": target.id},
            details={
                "invite": invite.id,
                "name": target.name,
                "role": target.role,
                "org": target.org_name,
                "expires_at_ms": invite.expires_at_ms,
            },
        )
    return invite, code


async def _reenroll(
    conn: Connection, audit: AuditLog, ctx: Context, invite: Row, *, name: str, keys: PublicKeys, now_ms: int
) -> Principal:
    """Spend a re-enrol invite (inside `enroll`'s transaction): `keys` replace the keys of the
    principal it names, and every age header stored for that principal goes.

    The old age identity is lost, so nothing wrapped for it can be re-wrapped by its holder; the
    headers are dropped rather than kept, so that the service holds nothing the principal cannot
    open and each grant shows as needing a re-grant (its uploader grants again, wrapping the file
    key for the new recipient). The grants themselves, and links to the principal, stay: they
    work again once re-granted."""
    row = await conn.fetchone(_PRINCIPAL_SELECT + " WHERE p.id = $1", invite["principal_id"])
    assert row is not None  # a foreign key
    target = Principal.from_row(row)
    if name != target.name:
        raise PermissionDenied(
            "this invite replaces the keys of another principal: enrol with the name it was issued for",
            code="invite-other-principal",
        )
    principal = await swap_keys(conn, target, keys, now_ms, active_only=False)
    dropped = await conn.execute("DELETE FROM artifact_headers WHERE principal_id = $1", target.id)
    await _spend_invite(conn, invite["id"], target.id, now_ms)
    await audit.append(
        conn,
        ctx,
        action="principal.reenroll",
        actor=principal.actor,
        resource={"type": "principal", "id": target.id},
        details={
            "invite": invite["id"],
            "name": target.name,
            "old_key_id": target.key_id,
            "new_key_id": keys.key_id,
            "age_recipient": keys.age_recipient,
            "headers_dropped": dropped,
        },
    )
    return principal

"""Organisations, principals and invites: who exists, in which role, with which public keys.

A principal is a name, a role, an organisation and two public keys. It comes into being in one
of two ways: the very first admin through `bootstrap_admin` (run on the server by
`exchange init`), everyone else through a one-time invite an admin issued. Each change and its
audit event commit together.

Decisions (may this principal do that?) are the small pure functions at the top; the rest
fetches and persists around them.
"""

from __future__ import annotations

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
    "create_invite",
    "create_org",
    "enroll",
    "get_principal",
    "list_orgs",
    "list_principals",
    "principal_by_key_id",
    "require_role",
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


async def _insert_principal(
    conn: Connection, *, name: str, org: Org, role: str, keys: PublicKeys, now_ms: int
) -> Principal:
    if await conn.fetchone("SELECT id FROM principals WHERE name = $1", name) is not None:
        raise Conflict(f"the name {name!r} is taken", code="name-taken")
    if await conn.fetchone("SELECT id FROM principals WHERE key_id = $1", keys.key_id) is not None:
        raise Conflict("this signing key is already enrolled", code="key-enrolled")
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
    return principal


async def enroll(
    db: Database, audit: AuditLog, ctx: Context, *, code: str, name: str, keys: PublicKeys, now_ms: int
) -> Principal:
    """Spend an invite: register `keys` under `name` in the invite's role and organisation."""
    async with db.transaction() as conn:
        row = _check_invite(
            await conn.fetchone(
                "SELECT i.*, o.name AS org_name FROM invites i JOIN orgs o ON o.id = i.org_id"
                " WHERE i.code_hash = $1",
                hash_invite_code(code),
            ),
            now_ms,
        )
        org = await _org_by_name(conn, row["org_name"])
        principal = await _insert_principal(
            conn, name=name, org=org, role=row["role"], keys=keys, now_ms=now_ms
        )
        # The used_at_ms guard makes a concurrent second spend of the same code change nothing.
        spent = await conn.execute(
            "UPDATE invites SET used_at_ms = $1, used_by = $2 WHERE id = $3 AND used_at_ms IS NULL",
            now_ms,
            principal.id,
            row["id"],
        )
        if spent != 1:
            raise PermissionDenied("this invite code has already been used", code="invite-used")
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

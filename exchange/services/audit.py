"""Appending audit events: one leaf per state change, refusal or audited read.

An event is written in the same transaction as the change it records (the caller passes its
`Connection`), so there is no change without its event and no event without its change. Its
bytes are the RFC 8785 (JCS) canonical JSON of the event, stored verbatim in `leaf`: a later
verifier hashes exactly those bytes and never re-serialises. `idx` is the event's position in the
log, taken from `audit_head` inside the transaction, so indices have no gaps.

The event schema (version 1):

    type      "exchange.audit.event/v1"
    origin    the log's origin name
    idx       position in the log (0-based), equal to the leaf index in the Merkle tree
    id        random UUID
    time_ms   UTC time in milliseconds
    action    e.g. "invite.create", "principal.enroll", "request.refused"
    actor     {type: principal|anonymous|system, id?, name?, org?, role?, key_id?}
    source    {ip?, user_agent?}
    resource  {type, id?, sha256?} or absent
    request_id
    outcome   {result: allowed|denied|error, reason?}
    details   small object of strings, integers and booleans (never secrets, never floats)

This module does not build the Merkle tree or sign checkpoints; that is the log's own layer.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import rfc8785

from ..db import Connection

__all__ = ["ANONYMOUS", "EVENT_TYPE", "MAX_LEAF_BYTES", "SYSTEM", "Actor", "AuditLog", "Context", "Outcome"]

EVENT_TYPE = "exchange.audit.event/v1"
#: A leaf stays well under what a verifier must be willing to hash.
MAX_LEAF_BYTES = 64 * 1024
#: Attacker-chosen strings (user agents, claimed key ids) are cut to this many characters.
_MAX_FREE_TEXT = 512
_MAX_IDX = 2**53 - 1

Outcome = Literal["allowed", "denied", "error"]


@dataclass(frozen=True)
class Actor:
    type: Literal["principal", "anonymous", "system"]
    id: str | None = None
    name: str | None = None
    org: str | None = None
    role: str | None = None
    key_id: str | None = None

    def to_json(self) -> dict[str, str]:
        data = {
            "type": self.type,
            "id": self.id,
            "name": self.name,
            "org": self.org,
            "role": self.role,
            "key_id": self.key_id,
        }
        return {k: v for k, v in data.items() if v is not None}


ANONYMOUS = Actor(type="anonymous")
SYSTEM = Actor(type="system")


@dataclass(frozen=True)
class Context:
    """Who asks, from where, under which request id: what every event records."""

    actor: Actor = ANONYMOUS
    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


def _clean(value: Any, path: str = "details") -> Any:
    """Refuse floats and unknown types; cut long strings. A bug here must fail loudly."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if abs(value) > 2**53 - 1:
            raise ValueError(f"{path}: integer outside the range JSON keeps exact")
        return value
    if isinstance(value, str):
        return value[:_MAX_FREE_TEXT]
    if isinstance(value, Mapping):
        return {str(k): _clean(v, f"{path}.{k}") for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_clean(v, f"{path}[]") for v in value]
    raise TypeError(f"{path}: {type(value).__name__} is not allowed in an audit event")


class AuditLog:
    def __init__(self, *, origin: str, clock: Callable[[], int]) -> None:
        self.origin = origin
        self._clock = clock

    async def append(
        self,
        conn: Connection,
        ctx: Context,
        *,
        action: str,
        outcome: Outcome = "allowed",
        reason: str | None = None,
        resource: Mapping[str, Any] | None = None,
        details: Mapping[str, Any] | None = None,
        actor: Actor | None = None,
    ) -> int:
        """Append one event inside the caller's transaction; return its index."""
        actor = actor or ctx.actor
        event: dict[str, Any] = {
            "type": EVENT_TYPE,
            "origin": self.origin,
            "idx": _MAX_IDX,
            "id": str(uuid.uuid4()),
            "time_ms": self._clock(),
            "action": action,
            "actor": actor.to_json(),
            "source": _clean({"ip": ctx.ip, "user_agent": ctx.user_agent}, "source"),
            "outcome": {"result": outcome} | ({"reason": reason} if reason else {}),
        }
        if ctx.request_id:
            event["request_id"] = ctx.request_id
        if resource:
            event["resource"] = _clean(resource, "resource")
        if details:
            event["details"] = _clean(details)
        # Check the size with the widest index before taking one: a refused event takes no index.
        if len(rfc8785.dumps(event)) > MAX_LEAF_BYTES:
            raise ValueError(f"audit event {action} is over {MAX_LEAF_BYTES} bytes")
        size = await conn.fetchval("UPDATE audit_head SET size = size + 1 WHERE id = 1 RETURNING size")
        idx = event["idx"] = int(size) - 1
        leaf = rfc8785.dumps(event)
        res = event.get("resource", {})
        await conn.execute(
            "INSERT INTO audit_events (idx, id, time_ms, action, outcome, reason, actor_id, actor_org,"
            " resource_type, resource_id, request_id, leaf)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            idx,
            event["id"],
            event["time_ms"],
            action,
            outcome,
            reason,
            actor.id,
            actor.org,
            res.get("type"),
            res.get("id"),
            ctx.request_id,
            leaf,
        )
        return idx

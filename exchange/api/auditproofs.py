"""Handler for proofs a person can carry: one event's leaf, inclusion proof and signed checkpoint.

`GET /v1/audit/proofs/{event}` (event: its UUIDv7 id or its idx) answers what a
c2sp.org/tlog-proof file of that event needs; `exchange audit prove` writes the file and
`exchange audit check-proof` checks it offline. Who may ask is decided in
`services.auditproofs` (auditors and admins: any event; anyone: events it is the actor or the
subject of); every answer is an audited read (`audit.prove`), every refusal an audited 403.

What it does not do: build the tlog-proof text (the client does, so that the file is made
where it is kept), or sign a checkpoint for a proof (it uses the latest published one).
"""

from __future__ import annotations

import base64

from aiohttp import web

from ..errors import ValidationError
from ..services import auditproofs as svc
from ..settings import Settings
from .audit import fail_closed_on_damage
from .keys import AUDIT, DB
from .routing import CTX, PRINCIPAL, Route, path_param
from .schemas import INT, STR, Schema, obj

__all__ = ["ROUTES", "schemas"]


async def event_proof(request: web.Request) -> web.Response:
    ref = svc.parse_event_ref(request.match_info["event"])
    if ref is None:
        raise ValidationError("the event is named by its id (a UUID) or its idx (a decimal)", field="event")
    app = request.app
    with fail_closed_on_damage(app):
        found = await svc.event_proof(app[DB], app[AUDIT], request[CTX], request[PRINCIPAL], ref)
    return web.json_response(
        {
            "idx": found.idx,
            "id": found.id,
            "leaf": found.leaf.decode("utf-8"),
            "proof": [base64.b64encode(h).decode("ascii") for h in found.proof],
            "checkpoint": {"size": found.size, "note": found.note.decode("utf-8")},
        }
    )


ROUTES = [
    Route(
        "GET",
        "/v1/audit/proofs/{event}",
        event_proof,
        "audit.prove",
        "One event's leaf, inclusion proof and latest signed checkpoint, for a tlog-proof "
        "(auditor, admin: any event; others: events they are the actor or subject of; logged)",
        "audit",
        response="AuditEventProof",
        parameters=(path_param("event", "the event's id (UUIDv7) or idx"),),
        errors=(403, 404, 409),
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    return {
        "AuditEventProof": obj(
            {
                "idx": INT,
                "id": STR,
                "leaf": {"type": "string", "description": "the exact leaf (canonical JSON event)"},
                "proof": {"type": "array", "items": {"type": "string", "description": "SHA-256, base64"}},
                "checkpoint": obj(
                    {"size": INT, "note": {"type": "string", "description": "signed note and cosignatures"}},
                    ["size", "note"],
                ),
            },
            ["idx", "id", "leaf", "proof", "checkpoint"],
        )
    }

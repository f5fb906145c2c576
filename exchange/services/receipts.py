"""A download session's end: the recipient's signed receipt, checked and recorded with its event.

Both kinds of session end here — a link's (`link_sessions`) and a download by id
(`download_sessions`) — with one check: the recipient's Ed25519 signature over
`format.receipt.receipt_message` (artifact, the link or `via grant`, session, manifest digest),
against the recipient's registered key; one receipt per session (a guarded UPDATE); and one
event, `artifact.receipt`, carrying every value of the message so an auditor can check the
signature without trusting the service.
"""

from __future__ import annotations

import base64
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ..db import Connection
from ..errors import Conflict, PermissionDenied
from ..format.receipt import receipt_message
from .audit import AuditLog, Context
from .principals import Principal

__all__ = ["record"]

#: Where each kind of session keeps its receipt: constants, chosen by whether a link is named.
_CLOSE_LINK_SESSION = (
    "UPDATE link_sessions SET receipt_at_ms = $1, receipt_signature = $2"
    " WHERE id = $3 AND receipt_at_ms IS NULL"
)
_CLOSE_DOWNLOAD_SESSION = (
    "UPDATE download_sessions SET receipt_at_ms = $1, receipt_signature = $2"
    " WHERE id = $3 AND receipt_at_ms IS NULL"
)


async def record(
    conn: Connection,
    audit: AuditLog,
    ctx: Context,
    *,
    recipient: Principal,
    artifact_id: str,
    link_id: str | None,
    session: str,
    signature: bytes,
    now_ms: int,
) -> dict[str, Any]:
    """Check and record `recipient`'s receipt of `session` (a link's, or with `link_id` None a
    download by id), in the caller's transaction; return what was recorded."""
    digest = bytes(await conn.fetchval("SELECT manifest_sha256 FROM artifacts WHERE id = $1", artifact_id))
    message = receipt_message(artifact=artifact_id, link=link_id, session=session, manifest_sha256=digest)
    try:
        VerifyKey(recipient.signing_public_key).verify(message, signature)
    except (BadSignatureError, ValueError):
        raise PermissionDenied(
            f"the receipt is not signed by {recipient.name}, the session's recipient, over this session",
            code="receipt-signature",
        ) from None
    done = await conn.execute(
        _CLOSE_DOWNLOAD_SESSION if link_id is None else _CLOSE_LINK_SESSION, now_ms, signature, session
    )
    if done != 1:
        raise Conflict("this download's receipt was already recorded", code="receipt-exists")
    details: dict[str, Any] = ({"via": "grant"} if link_id is None else {"link": link_id}) | {
        "session": session,
        "recipient": recipient.name,
        "recipient_key_id": recipient.key_id,
        "manifest_sha256": digest.hex(),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    await audit.append(
        conn,
        ctx,
        action="artifact.receipt",
        resource={"type": "artifact", "id": artifact_id, "sha256": digest.hex()},
        details=details,
        actor=recipient.actor,
    )
    return {"artifact": artifact_id, "received_at_ms": now_ms} | details

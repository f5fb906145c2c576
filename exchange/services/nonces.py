"""Seen request-signature nonces: one use each, shared by every replica through the database.

A nonce is kept until a signature carrying it could no longer pass the skew check (its `created`
plus twice the allowed skew), then purged. Recording one that is already there is a replay.

What this module does not do: verify signatures (`api/auth.py` does, and records the nonce only
after everything else passed, so someone who cannot sign cannot burn a principal's nonces).
"""

from __future__ import annotations

from ..db import Database
from ..errors import Conflict, ReplayedNonce

__all__ = ["purge", "record"]


async def record(db: Database, key_id: str, nonce: str, *, expires_at_ms: int) -> None:
    """Remember `nonce` for `key_id` until `expires_at_ms`; ReplayedNonce if it was seen before."""
    try:
        await db.execute(
            "INSERT INTO seen_nonces (key_id, nonce, expires_at_ms) VALUES ($1, $2, $3)",
            key_id,
            nonce,
            expires_at_ms,
        )
    except Conflict as exc:
        raise ReplayedNonce("this signature's nonce was already used; sign every request anew") from exc


async def purge(db: Database, now_ms: int) -> int:
    """Forget the nonces no signature could reuse any more; return how many."""
    return await db.execute("DELETE FROM seen_nonces WHERE expires_at_ms < $1", now_ms)

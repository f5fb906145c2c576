"""Proofs a person can carry: build a c2sp.org/tlog-proof file of one event, and check one offline.

`build_proof` packs the service's answer for one event (its exact leaf, inclusion proof and the
signed checkpoint, `GET /v1/audit/proofs/{event}`) into a `.tlog-proof` file
(`exchange.format.tlogproof`) whose `extra` line is the base64 of the leaf: one standard file
holds the entry and everything that proves it. `check_proof` trusts none of it. With no network
and only the keys the person pinned, it checks, in order (the first failure is the verdict, a
`VerifyFailure` whose kind and exit code are `exchange.auditverify`'s):

    bundle     10  the file is not a tlog-proof, or carries no leaf in its extra data
    signature  11  the checkpoint is not signed by the pinned key of its origin, or its origin is
                   none of the pinned keys'
    quorum     12  fewer valid cosignatures from the pinned witnesses than the quorum
    entries    13  the leaf is not a canonical event of this log at the proof's index
    proof      16  the leaf's inclusion proof does not lead to the checkpoint's root

A log that rotated its key: give every key of the log you trust (`log_vkeys`); the checkpoint is
opened with the one whose name is the checkpoint's origin, and an event may carry the origin of
any of them (events written before a rotation keep the old origin; the tree, and the proof,
run on). A proof stays checkable for ever: it is pinned to its own checkpoint, whatever was
appended since.

What it does not do: prove that the checkpoint is the log's latest, or consistent with one the
person saw before (that needs the log, or `exchange audit verify`'s state); judge the event's
meaning (a receipt's signature by the recipient is in its details, for whoever checks it).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import auditverify
from ..auditverify import VerifyFailure
from ..errors import AuditEventUnverified, FormatError, NoteError
from ..format import merkle
from ..format.checkpoint import Checkpoint
from ..format.note import decode_vkey, parse_note
from ..format.tlogproof import TlogProof

__all__ = ["CheckedProof", "build_proof", "check_proof"]


@dataclass(frozen=True)
class CheckedProof:
    """A tlog-proof that checked: the event, the checkpoint it is in, and the leaf's index."""

    event: dict[str, Any]
    checkpoint: Checkpoint
    index: int

    def to_json(self) -> dict[str, Any]:
        return {
            "idx": self.index,
            "event": self.event,
            "checkpoint": {
                "origin": self.checkpoint.origin,
                "size": self.checkpoint.size,
                "root": base64.b64encode(self.checkpoint.root_hash).decode("ascii"),
            },
        }


def build_proof(answer: Mapping[str, Any]) -> bytes:
    """The tlog-proof file of the service's answer for one event, once its parts hold together.

    The inclusion proof must lead from the leaf to the root the checkpoint states (its signature
    is the reader's to check, with the key they pinned): a service answer that fails is
    AuditEventUnverified, and no file is made of it.
    """
    try:
        idx = answer["idx"]
        leaf = str(answer["leaf"]).encode("utf-8")
        note = str(answer["checkpoint"]["note"]).encode("utf-8")
        proof = tuple(base64.b64decode(h, validate=True) for h in answer["proof"])
        if type(idx) is not int:
            raise TypeError("idx is not an integer")
        checkpoint = Checkpoint.parse(parse_note(note).text)
        merkle.verify_inclusion(merkle.leaf_hash(leaf), idx, checkpoint.size, proof, checkpoint.root_hash)
        return TlogProof(index=idx, proof=proof, checkpoint=note, extra=leaf).to_bytes()
    except (KeyError, TypeError, ValueError, FormatError) as exc:  # ProofError, NoteError included
        raise AuditEventUnverified(
            f"the service's proof of the event does not hold together: {exc}", check="proof"
        ) from exc


def _pinned_key(note: bytes, log_vkeys: Sequence[str]) -> str:
    """The pinned key named after the checkpoint's origin (read unverified, only to choose)."""
    try:
        origin = Checkpoint.parse(parse_note(note).text).origin
    except NoteError as exc:
        raise VerifyFailure("signature", f"the proof's checkpoint is not a signed checkpoint: {exc}") from exc
    for vkey in log_vkeys:
        if auditverify.vkey_name(vkey) == origin:
            return vkey
    raise VerifyFailure(
        "signature", f"the checkpoint is for the log {origin!r}; none of the pinned log keys is for it"
    )


def check_proof(
    data: bytes, *, log_vkeys: Sequence[str], witness_vkeys: Sequence[str] = (), quorum: int = 0
) -> CheckedProof:
    """Check a tlog-proof file offline against the pinned keys; VerifyFailure with the verdict.

    `log_vkeys`: the log's keys the person trusts (one, or each key of a log that rotated);
    `witness_vkeys` and `quorum`: the witnesses whose cosignatures count and how many must sign.
    A bad pinned key or a quorum above the witness keys given is VerifyFailure("usage").
    """
    if not log_vkeys:
        raise VerifyFailure("usage", "give the log's key (--vkey): a proof is checked against a pinned key")
    origins = [auditverify.vkey_name(v) for v in log_vkeys]  # VerifyFailure("usage") if one is bad
    for witness in witness_vkeys:
        try:
            decode_vkey(witness)
        except NoteError as exc:
            raise VerifyFailure("usage", f"a witness key is not a valid vkey: {exc}") from exc
    if quorum > len(witness_vkeys):
        raise VerifyFailure("usage", "the witness quorum is larger than the number of witness keys")
    try:
        parsed = TlogProof.parse(data)
    except FormatError as exc:
        raise VerifyFailure("bundle", f"the file is not a tlog-proof: {exc.message}") from exc
    if parsed.extra is None:
        raise VerifyFailure("bundle", "the proof carries no event: its extra data (the leaf) is missing")
    vkey = _pinned_key(parsed.checkpoint, log_vkeys)
    state = auditverify.State(log_vkey=vkey, witness_vkeys=list(witness_vkeys), witness_quorum=quorum)
    checkpoint = auditverify.open_checkpoint(parsed.checkpoint, state)
    earlier = [origin for origin in origins if origin != checkpoint.origin]
    event = auditverify.check_query_row(
        parsed.extra, parsed.index, parsed.proof, checkpoint, {}, earlier_origins=earlier
    )
    return CheckedProof(event=event, checkpoint=checkpoint, index=parsed.index)

"""Proofs a person can carry, on a real stack (SeaweedFS, SQLite and PostgreSQL).

A tester proves the receipt of what it downloaded, a developer the upload it completed and the
grant it gave; each proof is a c2sp.org/tlog-proof file checked offline against the log's key
alone. Who may prove what, the refusals (audited, and the same for someone else's event as for
no event), a proof pinned to its checkpoint while the log grows, and every tampering's verdict.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from exchange.api.audit import SIGNER
from exchange.api.keys import OPENAPI
from exchange.auditverify import EXIT_CODES, VerifyFailure
from exchange.client import links as links_api
from exchange.client.audit import AuditClient
from exchange.client.auditproof import check_proof
from exchange.errors import Conflict, NotFound, PermissionDenied, ValidationError
from exchange.format.checkpoint import cosign, cosigner_vkey
from exchange.format.note import Signature, Signer, parse_note
from exchange.format.tlogproof import TlogProof
from exchange.identity import Identity
from tests.audit.conftest import Auditor, add_events, publish
from tests.conftest import Stack
from tests.links.conftest import Shared, make_link, share


async def _received(stack: Stack, tmp_path: Path) -> Shared:
    """dana uploads and grants tess an artifact; tess downloads it through a link (with receipt)."""
    shared = await share(stack, tmp_path)
    server, token = links_api.split_link(await make_link(stack, shared))
    out = tmp_path / "out"
    out.mkdir()
    async with stack.client(shared.tester) as c:
        c.server = server
        await links_api.download_link(c, token, out)
    return shared


async def _event(stack: Stack, action: str) -> dict[str, object]:
    (event,) = [
        e for e in await stack.events() if e["action"] == action and e["outcome"]["result"] == "allowed"
    ]
    return event


async def _prove(stack: Stack, who: Identity, event: str | int) -> bytes:
    async with stack.client(who) as c:
        return await AuditClient(c).prove(event)


def _vkey(stack: Stack) -> str:
    return str(stack.app[SIGNER].verifier_key())


def _verdict(data: bytes, stack: Stack, **kwargs: object) -> str:
    try:
        check_proof(data, log_vkeys=[_vkey(stack)], **kwargs)  # type: ignore[arg-type]
    except VerifyFailure as exc:
        return exc.kind
    return "ok"


async def test_a_tester_proves_its_receipt_and_a_developer_its_upload(
    stack: Stack, auditor: Auditor, tmp_path: Path
) -> None:
    shared = await _received(stack, tmp_path)
    await publish(stack)
    receipt = await _event(stack, "artifact.receipt")
    complete = await _event(stack, "artifact.complete")
    grant = await _event(stack, "artifact.grant")

    # tess: its receipt, by id, checked offline against the log's key alone.
    data = await _prove(stack, shared.tester, str(receipt["id"]))
    checked = check_proof(data, log_vkeys=[_vkey(stack)])
    assert checked.event == receipt
    assert checked.event["actor"]["name"] == "tess"
    assert checked.checkpoint.origin == stack.settings.log_origin
    assert TlogProof.parse(data).extra is not None
    # dana: what it handed over (the completed upload, with the manifest's hash) and its grant.
    for event in (complete, grant):
        proved = check_proof(await _prove(stack, shared.dev, int(event["idx"])), log_vkeys=[_vkey(stack)])  # type: ignore[call-overload]
        assert proved.event == event
    assert complete["resource"]["sha256"] == receipt["details"]["manifest_sha256"]  # type: ignore[index]
    # tess is the grant's subject (details.principal), so it may prove that one as well.
    assert (
        check_proof(await _prove(stack, shared.tester, str(grant["id"])), log_vkeys=[_vkey(stack)]).event
        == grant
    )
    # Each proof served is an audited read, attributed to whoever asked.
    proves = [e for e in await stack.events() if e["action"] == "audit.prove"]
    assert [(e["actor"]["name"], e["details"]["idx"]) for e in proves] == [
        ("tess", receipt["idx"]),
        ("dana", complete["idx"]),
        ("dana", grant["idx"]),
        ("tess", grant["idx"]),
    ]
    assert proves[0]["resource"] == {"type": "audit_event", "id": receipt["id"]}
    # The answer is the one the OpenAPI document describes.
    async with stack.client(shared.tester) as c:
        answer = await c.request("GET", f"/v1/audit/proofs/{receipt['id']}")
    schemas = stack.app[OPENAPI]["components"]["schemas"]
    Draft202012Validator(schemas["AuditEventProof"]).validate(answer)
    assert set(answer) == {"idx", "id", "leaf", "proof", "checkpoint"}


async def test_who_may_prove_what(stack: Stack, auditor: Auditor, tmp_path: Path) -> None:
    shared = await _received(stack, tmp_path)
    sam = await stack.principal("sam", "tester", org="aisi")
    await publish(stack)
    receipt = await _event(stack, "artifact.receipt")
    missing = "01890000-0000-7000-8000-000000000000"

    # Another tester: refused alike for tess's receipt and for an event that does not exist.
    refusals = []
    for ref in (str(receipt["id"]), int(receipt["idx"]), missing, 10**9):  # type: ignore[call-overload]
        with pytest.raises(PermissionDenied) as refused:
            await _prove(stack, sam, ref)
        refusals.append((refused.value.code, refused.value.message))
    assert len(set(refusals)) == 1 and refusals[0][0] == "proof-refused"
    denied = [e for e in await stack.events() if e["action"] == "audit.prove"]
    assert [(e["actor"]["name"], e["outcome"]) for e in denied] == [
        ("sam", {"result": "denied", "reason": "proof-refused"})
    ] * 4
    # The developer is neither actor nor subject of tess's receipt either.
    with pytest.raises(PermissionDenied):
        await _prove(stack, shared.dev, str(receipt["id"]))
    # An auditor (and an admin) proves any event; for one that does not exist, it is told so.
    assert check_proof(await _prove(stack, auditor.identity, str(receipt["id"])), log_vkeys=[_vkey(stack)])
    assert check_proof(await _prove(stack, stack.admin, 0), log_vkeys=[_vkey(stack)]).index == 0
    for ref in (missing, 10**9):
        with pytest.raises(NotFound):
            await _prove(stack, auditor.identity, ref)
    # Not an event reference at all: refused before any request is sent, and by the service.
    with pytest.raises(ValidationError):
        await _prove(stack, auditor.identity, "../checkpoint")
    async with stack.client(auditor.identity) as c:
        with pytest.raises(ValidationError):
            await c.request("GET", "/v1/audit/proofs/not-an-event")


async def test_an_event_newer_than_the_checkpoint_waits_for_the_next(stack: Stack, auditor: Auditor) -> None:
    await publish(stack)
    await add_events(stack, 3)
    size = await stack.db.fetchval("SELECT size FROM audit_head WHERE id = 1")
    with pytest.raises(Conflict) as waiting:
        await _prove(stack, auditor.identity, int(size) - 1)
    assert waiting.value.code == "not-yet-checkpointed"
    await publish(stack)
    assert check_proof(await _prove(stack, auditor.identity, int(size) - 1), log_vkeys=[_vkey(stack)])


async def test_a_proof_stays_pinned_to_its_checkpoint(stack: Stack, auditor: Auditor) -> None:
    await add_events(stack, 5)
    first = await publish(stack)
    old = await _prove(stack, auditor.identity, 3)
    await add_events(stack, 40)
    second = await publish(stack)
    new = await _prove(stack, auditor.identity, 3)
    assert check_proof(old, log_vkeys=[_vkey(stack)]).checkpoint.size == first
    assert check_proof(new, log_vkeys=[_vkey(stack)]).checkpoint.size == second > first
    assert (
        check_proof(old, log_vkeys=[_vkey(stack)]).event == check_proof(new, log_vkeys=[_vkey(stack)]).event
    )


def _with(data: bytes, **changes: object) -> bytes:
    proof = TlogProof.parse(data)
    fields = {
        "index": proof.index,
        "proof": proof.proof,
        "checkpoint": proof.checkpoint,
        "extra": proof.extra,
    }
    return TlogProof(**(fields | changes)).to_bytes()  # type: ignore[arg-type]


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]


async def test_tampering_gets_its_verdict(stack: Stack, auditor: Auditor) -> None:
    await add_events(stack, 20)
    await publish(stack)
    data = await _prove(stack, auditor.identity, 9)
    proof = TlogProof.parse(data)
    assert proof.extra is not None and proof.proof
    note = parse_note(proof.checkpoint)
    # A witness cosigns the checkpoint (as a real one would): with its key pinned, a quorum of 1.
    seed = bytes(range(32))
    witness = cosigner_vkey("witness.example", seed)
    cosigned = proof.checkpoint + cosign(note.text, "witness.example", seed, 1_700_000_000).to_line().encode()
    good = _with(data, checkpoint=cosigned)
    assert _verdict(good, stack, witness_vkeys=[witness], quorum=1) == "ok"
    assert _verdict(data, stack) == "ok"

    leaf = proof.extra
    size = check_proof(data, log_vkeys=[_vkey(stack)]).checkpoint.size
    assert proof.checkpoint.count(b"\n%d\n" % size) == 1
    (log_sig,) = note.signatures
    forged_sig = Signature(log_sig.name, log_sig.key_id, _flip(log_sig.sig, 5)).to_line().encode()
    cosig = cosign(note.text, "witness.example", seed, 1_700_000_000)
    forged_cosig = Signature(cosig.name, cosig.key_id, _flip(cosig.sig, 40)).to_line().encode()
    cases = {
        # Any byte of the leaf: no longer canonical JSON, or no longer the leaf the tree holds.
        "leaf byte (JSON)": (_with(data, extra=leaf.replace(b'"idx":9', b'"idx": 9')), "entries"),
        "leaf byte (value)": (_with(data, extra=leaf.replace(b"test.event", b"test.evenT")), "proof"),
        "proof hash": (_with(data, proof=(_flip(proof.proof[0], 0), *proof.proof[1:])), "proof"),
        "index": (_with(data, index=8), "entries"),
        "checkpoint signature": (
            _with(data, checkpoint=note.text.encode() + b"\n" + forged_sig),
            "signature",
        ),
        "checkpoint text": (
            _with(data, checkpoint=proof.checkpoint.replace(b"\n%d\n" % size, b"\n%d\n" % (size + 1))),
            "signature",
        ),
        "not a proof": (data.replace(b"tlog-proof@v1", b"tlog-proof@v9"), "bundle"),
        "no leaf": (_with(data, extra=None), "bundle"),
    }
    for name, (bad, verdict) in cases.items():
        assert _verdict(bad, stack) == verdict, name
    # Missing quorum: the witness's cosignature absent, another witness pinned, or one forged.
    assert _verdict(data, stack, witness_vkeys=[witness], quorum=1) == "quorum"
    stranger = cosigner_vkey("witness2.example", bytes(32))
    assert _verdict(good, stack, witness_vkeys=[stranger], quorum=1) == "quorum"
    assert _verdict(good, stack, witness_vkeys=[witness, stranger], quorum=2) == "quorum"
    assert (
        _verdict(
            _with(data, checkpoint=proof.checkpoint + forged_cosig), stack, witness_vkeys=[witness], quorum=1
        )
        == "quorum"
    )
    # A key of another log: the checkpoint is none of its business.
    other_log = Signer("other.example/log", bytes(32)).verifier_key()
    with pytest.raises(VerifyFailure) as wrong_log:
        check_proof(data, log_vkeys=[other_log])
    assert wrong_log.value.kind == "signature"
    assert {EXIT_CODES[k] for k in ("bundle", "signature", "quorum", "entries", "proof")} == {
        10,
        11,
        12,
        13,
        16,
    }

"""`exchange audit prove` and `check-proof` against a real `exchange serve`, and check-proof's exit
codes offline; a rotated log's proofs, checked with the key of the checkpoint's origin."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner, Result

from exchange.auditverify import EVENT_TYPE, ROTATION_ACTION, canonical_json
from exchange.auditverify import VerifyFailure as Failure
from exchange.cli import main
from exchange.client.auditproof import check_proof
from exchange.format import merkle
from exchange.format.checkpoint import Checkpoint
from exchange.format.note import Signer, sign_note
from exchange.format.tlogproof import TlogProof
from tests.conftest import Served


def _cli(served: Served | None, *args: str, identity: Path | None = None) -> Result:
    prefix = (["--server", served.url] if served else []) + (
        ["--identity", str(identity)] if identity else []
    )
    return CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)


def _prove_when_checkpointed(served: Served, event: str, out: Path) -> Result:
    deadline = time.monotonic() + 15
    while True:
        got = _cli(served, "audit", "prove", event, "-o", str(out), identity=served.admin)
        if got.exit_code != 6:  # 409 not-yet-checkpointed: the publisher has not signed yet
            return got
        assert time.monotonic() < deadline, got.output
        time.sleep(0.2)


def test_prove_and_check_proof(served: Served) -> None:
    vkey = _cli(served, "audit", "vkey").stdout.strip()
    out = served.home / "bootstrap.tlog-proof"
    made = _prove_when_checkpointed(served, "0", out)
    assert made.exit_code == 0, made.output
    assert out.stat().st_mode & 0o777 == 0o644
    assert out.read_bytes().startswith(b"c2sp.org/tlog-proof@v1\nextra ")
    again = _cli(served, "audit", "prove", "0", "-o", str(out), identity=served.admin)
    assert again.exit_code == 2 and "refusing to overwrite" in again.stderr

    # Offline from here on: no --server, no identity.
    human = _cli(None, "audit", "check-proof", str(out), "--vkey", vkey)
    assert human.exit_code == 0, human.output
    assert "verified: event 0 is in exchange.local/audit's log" in human.stdout
    assert "principal.bootstrap" in human.stdout and "who:" in human.stdout
    machine = _cli(None, "--json", "audit", "check-proof", str(out), "--vkey", vkey)
    report = json.loads(machine.stdout)
    assert report["verdict"] == "ok" and report["idx"] == 0
    assert report["event"]["action"] == "principal.bootstrap"

    proof = TlogProof.parse(out.read_bytes())
    tampered = served.home / "tampered.tlog-proof"
    cases = [
        (
            TlogProof(index=1, proof=proof.proof, checkpoint=proof.checkpoint, extra=proof.extra).to_bytes(),
            [],
            13,
        ),
        (out.read_bytes().replace(b"@v1", b"@v0"), [], 10),
        (out.read_bytes(), ["--witness-vkey", _witness_vkey(), "--quorum", "1"], 12),
        (out.read_bytes(), ["--quorum", "1"], 2),
        (out.read_bytes(), ["--witness-vkey", "not-a-key"], 2),
    ]
    for data, extra, code in cases:
        tampered.write_bytes(data)
        got = _cli(None, "--json", "audit", "check-proof", str(tampered), "--vkey", vkey, *extra)
        assert got.exit_code == code, got.output
        assert json.loads(got.stdout)["exit_code"] == code
    other = Signer("other.example/log", bytes(32)).verifier_key()
    wrong = _cli(None, "audit", "check-proof", str(out), "--vkey", other)
    assert wrong.exit_code == 11 and "check-proof failed (signature)" in wrong.stderr
    assert _cli(None, "audit", "check-proof", str(out)).exit_code == 2  # no key: usage


def _witness_vkey() -> str:
    from exchange.format.checkpoint import cosigner_vkey

    return cosigner_vkey("witness.example", bytes(range(32)))


def test_check_proof_help_lists_the_exit_codes() -> None:
    helped = CliRunner().invoke(main, ["audit", "check-proof", "--help"])
    assert helped.exit_code == 0
    for code in ("10", "11", "12", "13", "16"):
        assert f" {code}  " in helped.output


# -- a rotated log, built by hand ------------------------------------------------------------------


def _event(idx: int, origin: str, action: str = "test.event", **details: str) -> bytes:
    event = {"type": EVENT_TYPE, "origin": origin, "idx": idx, "id": f"e{idx}", "time_ms": 1000 + idx}
    return canonical_json(event | {"action": action, "actor": {"type": "system"}, "details": details})


def _proof(leaves: list[bytes], index: int, size: int, signer: Signer) -> bytes:
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves[:size]]
    nodes: dict[tuple[int, int], bytes] = {}
    for n, h in enumerate(hashes):
        for level, i, node in merkle.nodes_completed_by_append(n, h, lambda level, i: nodes[level, i]):
            nodes[level, i] = node
    path = merkle.inclusion_proof(index, size, lambda level, i: nodes[level, i])
    note = sign_note(Checkpoint(signer.name, size, merkle.root(hashes)).to_text(), [signer])
    return TlogProof(index=index, proof=tuple(path), checkpoint=note, extra=leaves[index]).to_bytes()


def test_a_rotated_logs_proofs_check_against_the_key_of_their_checkpoints_origin() -> None:
    old, new = Signer("example.com/log", bytes(32)), Signer("example.com/log2", bytes([1]) * 32)
    leaves = [_event(i, old.name) for i in range(3)]
    leaves.append(_event(3, old.name, ROTATION_ACTION, next_origin=new.name, next_vkey=new.verifier_key()))
    leaves += [_event(i, new.name) for i in range(4, 7)]
    both = [old.verifier_key(), new.verifier_key()]

    before = _proof(leaves, 1, 4, old)  # made before the rotation: the old key's checkpoint
    after_old_event = _proof(leaves, 1, 7, new)  # the same event, proved after it
    after_new_event = _proof(leaves, 5, 7, new)
    for data in (before, after_old_event, after_new_event):
        assert check_proof(data, log_vkeys=both).event["idx"] in (1, 5)
    assert check_proof(before, log_vkeys=[old.verifier_key()]).checkpoint.origin == old.name
    assert check_proof(after_new_event, log_vkeys=[new.verifier_key()]).checkpoint.origin == new.name
    # The checkpoint's origin picks the key: a key of the other origin alone does not open it.
    for data, keys in ((before, [new.verifier_key()]), (after_new_event, [old.verifier_key()])):
        try:
            check_proof(data, log_vkeys=keys)
        except Failure as exc:
            assert exc.kind == "signature"
        else:
            raise AssertionError("a checkpoint opened with another origin's key")
    # An event of the old origin counts as this log's only when the old key is pinned too.
    try:
        check_proof(after_old_event, log_vkeys=[new.verifier_key()])
    except Failure as exc:
        assert exc.kind == "entries"
    else:
        raise AssertionError("an event of an origin nobody pinned was accepted")

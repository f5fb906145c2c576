"""exchange.format.checkpoint: tlog-checkpoint bodies and cosignature/v1, with published examples.

Data sources (values transcribed, no code copied):

- C2SP/C2SP @ 5ba5ee830903e91240fc6f9f3a7a9293d49e69c9: `tlog-checkpoint.md` and
  `tlog-cosignature.md`, the example.com/behind-the-sofa checkpoint, its log signature and the
  witness.example.com/w1 cosignature (no keys are published for them, so they are parsed and
  decoded here, not verified), and the example signed message ("time 1679315147").
- transparency-dev/formats @ 0b850f1a7b4a5b70deeacac6535e4b8023809d21, `log/checkpoint_test.go`:
  the malformed checkpoint bodies of TestUnmarshalLogState.
"""

from __future__ import annotations

import base64
import hashlib

import nacl.signing
import pytest

from exchange.errors import NoteError
from exchange.format.checkpoint import (
    MAX_TIMESTAMP,
    MAX_TREE_SIZE,
    Checkpoint,
    cosign,
    cosignature_message,
    cosigner_key_id,
    cosigner_vkey,
    verify_cosignature,
)
from exchange.format.merkle import EMPTY_ROOT
from exchange.format.note import Signature, Signer, Verifier, open_note, parse_note, sign_note

# C2SP tlog-checkpoint.md / tlog-cosignature.md.
SOFA_TEXT = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
SOFA_LOG_SIG = (
    "\u2014 example.com/behind-the-sofa "
    "Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
)
SOFA_COSIG = (
    "\u2014 witness.example.com/w1 "
    "jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
)
SOFA_COSIG_TIME = 1679315147  # tlog-cosignature.md, the example signed message's "time" line

ORIGIN = "exchange.example/audit"
LOG_SEED = hashlib.sha256(b"test log key").digest()
WITNESS_SEED = hashlib.sha256(b"test witness key").digest()
OTHER_WITNESS_SEED = hashlib.sha256(b"another witness key").digest()
WITNESS = "witness.example/w1"
ROOT = hashlib.sha256(b"some root").digest()


def checkpoint(size: int = 70, *extensions: str) -> Checkpoint:
    return Checkpoint(ORIGIN, size, ROOT, tuple(extensions))


# --- the body -------------------------------------------------------------------------------


def test_published_checkpoint_round_trips() -> None:
    cp = Checkpoint.parse(SOFA_TEXT)
    assert cp.origin == "example.com/behind-the-sofa"
    assert cp.size == 20852163
    assert cp.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.extensions == ()
    assert cp.to_text() == SOFA_TEXT


def test_published_cosigned_checkpoint_parses() -> None:
    note = parse_note((SOFA_TEXT + "\n" + SOFA_LOG_SIG + SOFA_COSIG).encode())
    assert Checkpoint.parse(note.text).to_text() == SOFA_TEXT
    log_sig, cosig = note.signatures
    assert log_sig.name == "example.com/behind-the-sofa"  # the log's key is named after the origin
    assert len(log_sig.sig) == 64
    assert cosig.name == "witness.example.com/w1"
    # timestamped_signature: u64 timestamp || 64-byte Ed25519 signature.
    assert len(cosig.sig) == 8 + 64
    assert int.from_bytes(cosig.sig[:8], "big") == SOFA_COSIG_TIME
    assert cosig.key_id.hex() == "8d66cf3f"


def test_round_trip_with_extensions_and_edges() -> None:
    for cp in [
        checkpoint(),
        checkpoint(1, "ext one", "ext two"),
        Checkpoint(ORIGIN, 0, EMPTY_ROOT),
        Checkpoint(ORIGIN, MAX_TREE_SIZE, ROOT),
        Checkpoint("origin with spaces is allowed", 5, ROOT),  # SHOULD, not MUST
    ]:
        text = cp.to_text()
        assert text.endswith("\n")
        assert Checkpoint.parse(text) == cp
        assert Checkpoint.parse(text).to_text() == text


def test_text_layout() -> None:
    assert checkpoint(7, "x").to_text() == f"{ORIGIN}\n7\n{base64.b64encode(ROOT).decode()}\nx\n"


R = base64.b64encode(ROOT).decode()
URLSAFE_ROOT = base64.urlsafe_b64encode(b"\xfb" * 32).decode()  # "-" and "_" instead of "+" and "/"
MALFORMED = {
    # transparency-dev/formats log/checkpoint_test.go TestUnmarshalLogState, the invalid ones:
    "insufficient-lines": "Head\n9944\n",
    "empty-header": f"\n9944\n{R}\n",
    "missing-newline-on-root": f"Log\n123\n{R}",
    "size-not-a-number": f"Log\nbananas\n{R}\n",
    "size-negative": f"Log\n-34\n{R}\n",
    "size-too-large": f"Log\n3438945738945739845734895735\n{R}\n",
    "root-not-base64": "Log\n123\nThisIsn'tBase64\n",
    # ... and two it accepts that we refuse: a 7-byte root, and empty trailing lines.
    "root-not-32-bytes": "Log\n123\nYmFuYW5hcw==\n",
    "empty-trailing-lines": f"Log\n9944\n{R}\n\n\n\n",
    # Further strictness.
    "size-leading-zero": f"Log\n0123\n{R}\n",
    "size-double-zero": f"Log\n00\n{R}\n",
    "size-plus-sign": f"Log\n+5\n{R}\n",
    "size-minus-zero": f"Log\n-0\n{R}\n",
    "size-leading-space": f"Log\n 5\n{R}\n",
    "size-trailing-space": f"Log\n5 \n{R}\n",
    "size-underscore": f"Log\n1_000\n{R}\n",
    "size-arabic-indic-digit": f"Log\n\u0665\n{R}\n",
    "size-2^63": f"Log\n{2**63}\n{R}\n",
    "size-huge": "Log\n" + "9" * 5000 + f"\n{R}\n",
    "size-empty": f"Log\n\n{R}\n",
    "root-31-bytes": f"Log\n5\n{base64.b64encode(ROOT[:31]).decode()}\n",
    "root-33-bytes": f"Log\n5\n{base64.b64encode(ROOT + b'x').decode()}\n",
    "root-unpadded": f"Log\n5\n{R.rstrip('=')}\n",
    "root-stray-bits": f"Log\n5\n{R[:-2]}{chr(ord(R[-2]) + 1)}=\n",
    "root-urlsafe": f"Log\n5\n{URLSAFE_ROOT}\n",
    "empty-extension-line": f"Log\n5\n{R}\n\next\n",
    "crlf": f"Log\r\n5\r\n{R}\r\n",
    "control-char-in-origin": f"Lo\x00g\n5\n{R}\n",
    "tab-in-extension": f"Log\n5\n{R}\na\tb\n",
    "empty": "",
    "newline-only": "\n",
}


@pytest.mark.parametrize("text", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(text)


def test_constructor_refusals() -> None:
    with pytest.raises(NoteError, match="origin must not be empty"):
        Checkpoint("", 1, ROOT)
    with pytest.raises(NoteError, match="one line"):
        Checkpoint("a\nb", 1, ROOT)
    with pytest.raises(NoteError, match="integer"):
        Checkpoint(ORIGIN, True, ROOT)
    with pytest.raises(NoteError, match="between 0 and"):
        Checkpoint(ORIGIN, -1, ROOT)
    with pytest.raises(NoteError, match="between 0 and"):
        Checkpoint(ORIGIN, MAX_TREE_SIZE + 1, ROOT)
    with pytest.raises(NoteError, match="32 bytes"):
        Checkpoint(ORIGIN, 1, ROOT[:-1])
    with pytest.raises(NoteError, match="extension line must not be empty"):
        Checkpoint(ORIGIN, 1, ROOT, ("",))
    with pytest.raises(NoteError, match="one line"):
        Checkpoint(ORIGIN, 1, ROOT, ("a\nb",))
    with pytest.raises(NoteError, match="tuple"):
        Checkpoint(ORIGIN, 1, ROOT, ["x"])  # type: ignore[arg-type]


# --- the log's signature ---------------------------------------------------------------------


def signed_checkpoint(cp: Checkpoint | None = None) -> bytes:
    return sign_note((cp or checkpoint()).to_text(), [Signer(ORIGIN, LOG_SEED)])


def log_verifier() -> Verifier:
    return Signer(ORIGIN, LOG_SEED).verifier()


def test_signed_checkpoint_opens() -> None:
    note = open_note(signed_checkpoint(), [log_verifier()])
    assert Checkpoint.parse(note.text) == checkpoint()


def test_checkpoint_signed_by_unknown_key_is_refused() -> None:
    forged = sign_note(checkpoint().to_text(), [Signer(ORIGIN, b"\x07" * 32)])
    with pytest.raises(NoteError, match="not signed by any known key"):
        open_note(forged, [log_verifier()])


def test_corrupted_log_signature_is_refused() -> None:
    data = bytearray(signed_checkpoint())
    # Flip a base64 character inside the signature (past the key ID) for another valid one.
    at = data.rindex(b" ") + 20
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    with pytest.raises(NoteError, match="does not verify"):
        open_note(bytes(data), [log_verifier()])
    # And the body changed under a valid signature.
    moved = signed_checkpoint().replace(b"\n70\n", b"\n71\n")
    with pytest.raises(NoteError, match="does not verify"):
        open_note(moved, [log_verifier()])


def test_extra_unknown_signature_line_is_accepted() -> None:
    text = checkpoint().to_text()
    witness_line = cosign(text, WITNESS, WITNESS_SEED, 1700000000).to_line()
    stranger_line = Signer("stranger.example", b"\x09" * 32).sign(text).to_line()
    data = signed_checkpoint() + witness_line.encode() + stranger_line.encode()
    note = open_note(data, [log_verifier()])
    assert [s.name for s in note.signatures] == [ORIGIN]
    assert len(parse_note(data).signatures) == 3


# --- cosignatures --------------------------------------------------------------------------------


def test_cosigner_key_id_uses_type_0x04() -> None:
    public_key = bytes(nacl.signing.SigningKey(WITNESS_SEED).verify_key)
    # tlog-cosignature: SHA-256(<name> || "\n" || 0x04 || 32-byte Ed25519 public key)[:4].
    expected = hashlib.sha256(WITNESS.encode() + b"\n" + b"\x04" + public_key).digest()[:4]
    assert cosigner_key_id(WITNESS, public_key) == expected
    vkey = cosigner_vkey(WITNESS, WITNESS_SEED)
    material = base64.b64encode(b"\x04" + public_key).decode()
    assert vkey == f"{WITNESS}+{expected.hex()}+{material}"
    # The same key as a note signer has another key ID, so a note verifier never mistakes a
    # cosignature for a note signature.
    assert Signer(WITNESS, WITNESS_SEED).key_id != expected


def test_cosignature_message_layout() -> None:
    text = checkpoint().to_text()
    assert cosignature_message(text, 1679315147) == b"cosignature/v1\ntime 1679315147\n" + text.encode()
    assert cosignature_message(text, 0).startswith(b"cosignature/v1\ntime 0\n")


def test_cosignature_round_trip() -> None:
    text = checkpoint(70, "an extension").to_text()
    sig = cosign(text, WITNESS, WITNESS_SEED, SOFA_COSIG_TIME)
    assert sig.name == WITNESS
    assert sig.sig[:8] == SOFA_COSIG_TIME.to_bytes(8, "big")
    assert verify_cosignature(text, sig, cosigner_vkey(WITNESS, WITNESS_SEED)) == SOFA_COSIG_TIME
    # Checked independently of the module: Ed25519 over the spec's message.
    public_key = nacl.signing.SigningKey(WITNESS_SEED).verify_key
    public_key.verify(f"cosignature/v1\ntime {SOFA_COSIG_TIME}\n{text}".encode(), sig.sig[8:])
    # Through a note: the cosignature line survives parse_note unchanged.
    data = signed_checkpoint(checkpoint(70, "an extension")) + sig.to_line().encode()
    parsed = [s for s in parse_note(data).signatures if s.name == WITNESS]
    assert parsed == [sig]
    assert verify_cosignature(text, parsed[0], cosigner_vkey(WITNESS, WITNESS_SEED)) == SOFA_COSIG_TIME


def test_cosignature_timestamp_edges() -> None:
    text = checkpoint().to_text()
    vkey = cosigner_vkey(WITNESS, WITNESS_SEED)
    for t in (0, MAX_TIMESTAMP):
        assert verify_cosignature(text, cosign(text, WITNESS, WITNESS_SEED, t), vkey) == t
    for t in (-1, MAX_TIMESTAMP + 1):
        with pytest.raises(NoteError, match="timestamp"):
            cosign(text, WITNESS, WITNESS_SEED, t)


def test_cosignature_tamper() -> None:
    text = checkpoint(70, "ext").to_text()
    vkey = cosigner_vkey(WITNESS, WITNESS_SEED)
    sig = cosign(text, WITNESS, WITNESS_SEED, 1700000000)

    def with_sig(raw: bytes) -> Signature:
        return Signature(sig.name, sig.key_id, raw)

    later = (1700000001).to_bytes(8, "big") + sig.sig[8:]
    flipped = bytearray(sig.sig)
    flipped[40] ^= 1
    cases: list[tuple[str, str, Signature, str]] = [
        ("the size", checkpoint(71, "ext").to_text(), sig, "does not verify"),
        ("the root", Checkpoint(ORIGIN, 70, EMPTY_ROOT, ("ext",)).to_text(), sig, "does not verify"),
        ("an extension line", checkpoint(70, "other").to_text(), sig, "does not verify"),
        ("the timestamp", text, with_sig(later), "does not verify"),
        ("a signature bit", text, with_sig(bytes(flipped)), "does not verify"),
        ("the length", text, with_sig(sig.sig[:-1]), "not a timestamp and an Ed25519"),
        ("the length", text, with_sig(sig.sig + b"\x00"), "not a timestamp and an Ed25519"),
        ("the timestamp's range", text, with_sig(b"\xff" * 8 + sig.sig[8:]), "beyond 2\\^63"),
        ("the name", text, Signature("other.example", sig.key_id, sig.sig), "not from the cosigner"),
        ("the key ID", text, Signature(WITNESS, b"\x00\x00\x00\x00", sig.sig), "not from the cosigner"),
    ]
    for what, body, bad, message in cases:
        with pytest.raises(NoteError, match=message):
            verify_cosignature(body, bad, vkey)
            pytest.fail(f"altered {what} verified")


def test_cosignature_from_another_cosigner_key() -> None:
    text = checkpoint().to_text()
    sig = cosign(text, WITNESS, WITNESS_SEED, 1700000000)
    # Same name, different key: the key IDs differ, so it is someone else's signature.
    with pytest.raises(NoteError, match="not from the cosigner"):
        verify_cosignature(text, sig, cosigner_vkey(WITNESS, OTHER_WITNESS_SEED))


def test_cosignature_needs_a_cosigner_vkey() -> None:
    text = checkpoint().to_text()
    sig = cosign(text, WITNESS, WITNESS_SEED, 1700000000)
    note_vkey = Signer(WITNESS, WITNESS_SEED).verifier_key()  # type 0x01
    with pytest.raises(NoteError, match="not a cosignature/v1 key"):
        verify_cosignature(text, sig, note_vkey)
    with pytest.raises(NoteError):
        verify_cosignature(text, sig, "not a vkey")


def test_cosignature_is_only_over_checkpoints() -> None:
    with pytest.raises(NoteError):
        cosign("just some text\n", WITNESS, WITNESS_SEED, 1700000000)
    text = checkpoint().to_text()
    sig = cosign(text, WITNESS, WITNESS_SEED, 1700000000)
    with pytest.raises(NoteError):
        verify_cosignature(text.rstrip("\n"), sig, cosigner_vkey(WITNESS, WITNESS_SEED))


def test_cosigner_key_refusals() -> None:
    with pytest.raises(NoteError, match="32 bytes"):
        cosigner_vkey(WITNESS, b"short")
    with pytest.raises(NoteError, match="space"):
        cosign(checkpoint().to_text(), "bad name", WITNESS_SEED, 0)


def test_note_verifier_ignores_cosignatures_of_the_same_key() -> None:
    # A log verifier built from the witness's own key material (type 0x01) does not accept the
    # witness's cosignature as a note signature: different key ID, different message.
    text = checkpoint().to_text()
    data = signed_checkpoint() + cosign(text, WITNESS, WITNESS_SEED, 1).to_line().encode()
    same_key_as_note_verifier = Signer(WITNESS, WITNESS_SEED).verifier()
    with pytest.raises(NoteError, match="not signed by any known key"):
        open_note(data, [same_key_as_note_verifier])

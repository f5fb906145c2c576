"""exchange.format.note against published signed-note examples, plus its refusals.

Data sources (values transcribed, no code copied):

- golang.org/x/mod (github.com/golang/mod) @ fe2ec04f7c3c3aa6fad97631aafcff6e49e2d1db,
  `sumdb/note/note_test.go` and `example_test.go`: the PeterNeumann skey and vkey, the
  EnochRoot vkey, their signatures over the two-line Peter Neumann text, and the malformed
  notes of TestOpen.
- C2SP/C2SP @ 5ba5ee830903e91240fc6f9f3a7a9293d49e69c9, `signed-note.md`: the example.com/foo
  vkey and signed note ("Verifier keys" / "Example"), and the quasimodo note at the top, whose
  text contains an empty line.
"""

from __future__ import annotations

import base64

import pytest

from exchange.errors import NoteError
from exchange.format.note import (
    MAX_SIGNATURES,
    Note,
    Signature,
    Signer,
    Verifier,
    b64decode_canonical,
    compute_key_id,
    decode_vkey,
    open_note,
    parse_note,
    sign_note,
)

# golang.org/x/mod sumdb/note/note_test.go
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = (
    "\u2014 PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot "
    "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
)

# C2SP signed-note.md, "Example".
FOO_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
FOO_NOTE = (
    "This is an example message.\n"
    "\n"
    "\u2014 example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)
# C2SP signed-note.md, the opening example (no vkey is published for it).
QUASIMODO_NOTE = (
    "Ognuno sta solo sul cuor della terra\n"
    "trafitto da un raggio di sole:\n"
    "\n"
    "ed \u00e8 subito sera.\n"
    "\n"
    "\u2014 quasimodo.example/salvatore "
    "NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
)


def note_bytes(text: str, *sig_lines: str) -> bytes:
    return (text + "\n" + "".join(sig_lines)).encode("utf-8")


def peter() -> Verifier:
    return Verifier.from_vkey(PETER_VKEY)


def enoch() -> Verifier:
    return Verifier.from_vkey(ENOCH_VKEY)


# --- keys ---------------------------------------------------------------------------------------


def test_published_keys_parse() -> None:
    v = peter()
    assert v.name == "PeterNeumann"
    assert v.key_id == bytes.fromhex("c74f20a3")
    assert v.vkey() == PETER_VKEY
    s = Signer.from_skey(PETER_SKEY)
    assert s.name == "PeterNeumann"
    assert s.key_id == v.key_id
    assert s.public_key == v.public_key
    assert s.verifier_key() == PETER_VKEY
    assert s.signer_key() == PETER_SKEY
    assert enoch().key_id == bytes.fromhex("af0cfe78")
    assert Verifier.from_vkey(FOO_VKEY).key_id == bytes.fromhex("530d903a")


def test_key_id_derivation() -> None:
    # c2sp.org/signed-note: SHA-256(name || 0x0A || 0x01 || 32-byte key)[:4].
    v = peter()
    assert compute_key_id("PeterNeumann", 0x01, v.public_key) == v.key_id
    assert compute_key_id("PeterNeumann", 0x04, v.public_key) != v.key_id


def mangled(key: str) -> set[str]:
    """Every proper substring and every one-character increment of a key string."""
    out = {key[i:j] for i in range(len(key) + 1) for j in range(i + 1, len(key) + 1)} - {key}
    out |= {key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :] for i in range(len(key))}
    return out


def test_mangled_vkeys_are_refused() -> None:
    # golang.org/x/mod TestNewVerifier: every substring and every incremented byte fails.
    for bad in sorted(mangled(PETER_VKEY)):
        with pytest.raises(NoteError):
            Verifier.from_vkey(bad)
            pytest.fail(f"accepted {bad!r}")


def test_published_bad_vkeys_are_refused() -> None:
    # golang.org/x/mod TestNewVerifier: wrong key length, and unknown algorithm, both with an
    # adjusted key hash.
    with pytest.raises(NoteError):
        Verifier.from_vkey("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    with pytest.raises(NoteError):
        Verifier.from_vkey("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


def test_mangled_skeys_are_refused() -> None:
    # golang.org/x/mod TestNewSigner.
    for bad in sorted(mangled(PETER_SKEY)):
        with pytest.raises(NoteError):
            Signer.from_skey(bad)
            pytest.fail(f"accepted {bad!r}")


def test_vkey_refusals_have_reasons() -> None:
    cases = {
        "three parts": "PeterNeumann+c74f20a3",
        "8 lowercase hex": "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "does not match its key": "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "canonical base64": "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T",
        "must not be empty": "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "contains a space": "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    }
    for reason, vkey in cases.items():
        with pytest.raises(NoteError, match=reason):
            Verifier.from_vkey(vkey)


def test_cosigner_vkey_is_not_a_note_verifier() -> None:
    public_key = peter().public_key
    material = base64.b64encode(b"\x04" + public_key).decode()
    vkey = f"w.example/1+{compute_key_id('w.example/1', 0x04, public_key).hex()}+{material}"
    assert decode_vkey(vkey) == ("w.example/1", 0x04, public_key)
    with pytest.raises(NoteError, match="verify_cosignature"):
        Verifier.from_vkey(vkey)


def test_signer_round_trip_and_secrecy() -> None:
    seed = bytes(range(32))
    s = Signer("log.example/audit", seed)
    again = Signer.from_skey(s.signer_key())
    assert (again.name, again.key_id, again.public_key) == (s.name, s.key_id, s.public_key)
    v = Verifier.from_vkey(s.verifier_key())
    assert v.key_id == s.key_id
    # The seed never shows in a repr (reprs end up in logs).
    assert s.signer_key() not in repr(s)
    assert seed.hex() not in repr(s)
    assert base64.b64encode(seed).decode()[:20] not in repr(s)


def test_signer_refusals() -> None:
    with pytest.raises(NoteError, match="32 bytes"):
        Signer("a", b"\x00" * 31)
    with pytest.raises(NoteError, match="'\\+'"):
        Signer("a+b", b"\x00" * 32)
    with pytest.raises(NoteError, match="must not be empty"):
        Signer("", b"\x00" * 32)
    with pytest.raises(NoteError, match="space"):
        Signer("a\u00a0b", b"\x00" * 32)  # a no-break space is a Unicode space too
    with pytest.raises(NoteError, match="valid Unicode"):
        Signer("a\ud800", b"\x00" * 32)


def test_verifier_verify() -> None:
    peter_sig, enoch_sig = parse_note(note_bytes(TEXT, PETER_SIG, ENOCH_SIG)).signatures
    assert peter().verify(TEXT, peter_sig)
    assert not peter().verify(TEXT, enoch_sig)  # another key
    assert not peter().verify(TEXT + "x\n", peter_sig)  # another text
    assert not peter().verify(TEXT, Signature(peter_sig.name, peter_sig.key_id, peter_sig.sig[:-1]))
    assert enoch().verify(TEXT, enoch_sig)


# --- signing --------------------------------------------------------------------------------


def test_sign_matches_published_note() -> None:
    # golang.org/x/mod TestSign / ExampleSign: Ed25519 is deterministic, so byte for byte.
    assert sign_note(TEXT, [Signer.from_skey(PETER_SKEY)]) == note_bytes(TEXT, PETER_SIG)


def test_sign_with_two_signers_in_order() -> None:
    second = Signer("EnochRoot", bytes(32))
    signed = sign_note(TEXT, [Signer.from_skey(PETER_SKEY), second])
    assert signed.startswith(note_bytes(TEXT, PETER_SIG))
    note = open_note(signed, [peter(), second.verifier()], require=2)
    assert [s.name for s in note.signatures] == ["PeterNeumann", "EnochRoot"]


def test_sign_refusals() -> None:
    s = Signer.from_skey(PETER_SKEY)
    cases = [
        ("end with a newline", "abc"),
        ("empty line", "a\n\nb\n"),
        ("empty line", "\nabc\n"),
        ("control characters", "a\tb\n"),
    ]
    for reason, text in cases:
        with pytest.raises(NoteError, match=reason):
            sign_note(text, [s])
    with pytest.raises(NoteError, match="at least one signer"):
        sign_note(TEXT, [])
    with pytest.raises(NoteError, match="given twice"):
        sign_note(TEXT, [s, Signer.from_skey(PETER_SKEY)])
    with pytest.raises(NoteError, match="valid Unicode"):
        sign_note("\ud800\n", [s])


# --- parsing ----------------------------------------------------------------------------------


def test_parse_published_notes() -> None:
    note = parse_note(note_bytes(TEXT, PETER_SIG, ENOCH_SIG))
    assert note.text == TEXT
    assert [(s.name, s.key_id.hex()) for s in note.signatures] == [
        ("PeterNeumann", "c74f20a3"),
        ("EnochRoot", "af0cfe78"),
    ]
    assert all(len(s.sig) == 64 for s in note.signatures)
    # The signature lines print back exactly.
    assert [s.to_line() for s in note.signatures] == [PETER_SIG, ENOCH_SIG]


def test_parse_text_with_empty_line_splits_at_the_last_blank_line() -> None:
    # C2SP signed-note.md: "the text is separated from the signatures by the last empty line".
    note = parse_note(QUASIMODO_NOTE.encode("utf-8"))
    assert (
        note.text
        == "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned \u00e8 subito sera.\n"
    )
    assert [s.name for s in note.signatures] == ["quasimodo.example/salvatore"]
    # Readable, but not something we would sign.
    with pytest.raises(NoteError, match="empty line"):
        sign_note(note.text, [Signer.from_skey(PETER_SKEY)])


# golang.org/x/mod TestOpen "Invalid encoded message syntax", plus further strictness.
MALFORMED = {
    "text-only": TEXT.encode(),
    "text-and-blank-line": (TEXT + "\n").encode(),
    "no-final-newline": note_bytes(TEXT, PETER_SIG[:-1]),
    "control-char-0x01": b"\x01" + note_bytes(TEXT, PETER_SIG),
    "invalid-utf8-0xff": b"\xff" + note_bytes(TEXT, PETER_SIG),
    "name-with-space": note_bytes(TEXT, PETER_SIG.replace("PeterNeumann", "Bad Name")),
    "unexpected-line-after-signatures": note_bytes(TEXT, PETER_SIG, "Unexpected line.\n"),
    "crlf-line-ending": note_bytes(TEXT, PETER_SIG[:-1] + "\r\n"),
    "hyphen-instead-of-em-dash": note_bytes(TEXT, "-" + PETER_SIG[1:]),
    "no-space-after-dash": note_bytes(TEXT, PETER_SIG.replace("\u2014 ", "\u2014", 1)),
    "two-spaces-before-signature": note_bytes(TEXT, PETER_SIG.replace(" x08go", "  x08go")),
    "unpadded-base64": note_bytes(TEXT, PETER_SIG.replace("AM=\n", "AM\n")),
    # 68 bytes of signature leave 2 stray bits in the last base64 character: 'N' sets one,
    # which a lenient decoder ignores and a canonical one refuses.
    "stray-bits-in-base64": note_bytes(TEXT, PETER_SIG.replace("AM=\n", "AN=\n")),
    "key-id-without-signature": note_bytes(TEXT, "\u2014 PeterNeumann x08gow==\n"),
    "shorter-than-a-key-id": note_bytes(TEXT, "\u2014 PeterNeumann x08g\n"),
    "empty-signature": note_bytes(TEXT, "\u2014 PeterNeumann \n"),
    "plus-in-name": note_bytes(TEXT, PETER_SIG.replace("PeterNeumann", "Peter+Neumann")),
    "overlong-utf8": note_bytes(TEXT, PETER_SIG).replace(b"If", b"\xc1\x89f"),
    "surrogate-in-utf8": b"\xed\xa0\x80" + note_bytes(TEXT, PETER_SIG),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_notes_are_refused(data: bytes) -> None:
    with pytest.raises(NoteError):
        parse_note(data)
    with pytest.raises(NoteError):
        open_note(data, [peter()])


def test_signature_limit() -> None:
    # golang.org/x/mod TestOpen: 101 signatures is too many, whoever signed them.
    at_limit = note_bytes(TEXT, *[PETER_SIG] * MAX_SIGNATURES)
    assert len(parse_note(at_limit).signatures) == MAX_SIGNATURES
    assert len(open_note(at_limit, [peter()]).signatures) == 1
    over = note_bytes(TEXT, *[PETER_SIG] * (MAX_SIGNATURES + 1))
    with pytest.raises(NoteError, match="at most 100"):
        parse_note(over)
    with pytest.raises(NoteError, match="at most 100"):
        open_note(over, [peter()])


def test_signature_dataclass_checks() -> None:
    with pytest.raises(NoteError):
        Signature("a", b"\x00" * 3, b"sig")
    with pytest.raises(NoteError):
        Signature("a", b"\x00" * 4, b"")
    with pytest.raises(NoteError):
        Signature("a b", b"\x00" * 4, b"sig")


def test_canonical_base64() -> None:
    assert b64decode_canonical("AAEC", what="x") == b"\x00\x01\x02"
    for bad in ["AAE", "AAF=", "AA==AA==", "AA=A", " AAEC", "AAEC\n", "AA-_", "AB=="]:
        with pytest.raises(NoteError, match="canonical base64"):
            b64decode_canonical(bad, what="x")


# --- opening ----------------------------------------------------------------------------------


def test_open_published_c2sp_example() -> None:
    note = open_note(FOO_NOTE.encode(), [Verifier.from_vkey(FOO_VKEY)])
    assert note.text == "This is an example message.\n"
    assert [s.name for s in note.signatures] == ["example.com/foo"]


def test_open_one_known_one_unknown() -> None:
    # golang.org/x/mod TestOpen: Peter verifies, Enoch is unknown and ignored.
    note = open_note(note_bytes(TEXT, PETER_SIG, ENOCH_SIG), [peter()])
    assert note == Note(TEXT, (parse_note(note_bytes(TEXT, PETER_SIG)).signatures[0],))


def test_open_both_known() -> None:
    note = open_note(note_bytes(TEXT, PETER_SIG, ENOCH_SIG), [peter(), enoch()], require=2)
    assert [s.name for s in note.signatures] == ["PeterNeumann", "EnochRoot"]


def test_open_no_known_key() -> None:
    with pytest.raises(NoteError, match="not signed by any known key"):
        open_note(note_bytes(TEXT, PETER_SIG, ENOCH_SIG), [Verifier.from_vkey(FOO_VKEY)])


def test_open_signed_by_unknown_key_only() -> None:
    stranger = Signer("PeterNeumann", bytes(range(1, 33)))  # same name, another key ID
    with pytest.raises(NoteError, match="not signed by any known key"):
        open_note(sign_note(TEXT, [stranger]), [peter()])


def test_open_extra_unknown_signature_is_accepted() -> None:
    # An unknown line that collides with a known key on name only, or on key ID only, is
    # ignored, as the spec requires; so is a plain unknown one.
    key_id_only = PETER_SIG.replace("PeterNeumann", "SomeoneElse")
    name_only = "\u2014 PeterNeumann " + base64.b64encode(b"\x00\x00\x00\x00" + b"\x01" * 64).decode() + "\n"
    data = note_bytes(TEXT, ENOCH_SIG, key_id_only, PETER_SIG, name_only)
    note = open_note(data, [peter()])
    assert [(s.name, s.key_id.hex()) for s in note.signatures] == [("PeterNeumann", "c74f20a3")]


def test_open_corrupted_known_signature_rejects_the_note() -> None:
    # golang.org/x/mod TestOpen "Invalid signature": base64 characters inserted mid-signature.
    bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(NoteError, match="PeterNeumann\\+c74f20a3 does not verify"):
        open_note(note_bytes(TEXT, bad), [peter()])
    # A flipped bit in the signature, with a valid signature by the same key next to it.
    raw = bytearray(base64.b64decode(PETER_SIG.split()[2]))
    raw[10] ^= 1
    flipped = "\u2014 PeterNeumann " + base64.b64encode(bytes(raw)).decode() + "\n"
    with pytest.raises(NoteError, match="does not verify"):
        open_note(note_bytes(TEXT, PETER_SIG, flipped), [peter()])
    # The text altered under a valid signature.
    with pytest.raises(NoteError, match="does not verify"):
        open_note(note_bytes(TEXT.replace("problem", "problems", 1), PETER_SIG), [peter()])


def test_open_duplicates_counted_once() -> None:
    # golang.org/x/mod TestOpen "Duplicated verified and unverified signatures".
    bad_enoch = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    data = note_bytes(TEXT, PETER_SIG, PETER_SIG, ENOCH_SIG, ENOCH_SIG, bad_enoch)
    note = open_note(data, [peter()])
    assert [s.name for s in note.signatures] == ["PeterNeumann"]
    # The same key twice does not make a quorum of two.
    with pytest.raises(NoteError, match="1 known keys; 2 are required"):
        open_note(note_bytes(TEXT, PETER_SIG, PETER_SIG), [peter(), enoch()], require=2)


def test_open_policy_errors() -> None:
    data = note_bytes(TEXT, PETER_SIG)
    with pytest.raises(ValueError, match="require >= 1"):
        open_note(data, [peter()], require=0)
    with pytest.raises(ValueError, match="only 1 keys are known"):
        open_note(data, [peter(), peter()], require=2)  # the same key twice is one key
    impostor = Verifier("PeterNeumann", enoch().public_key)
    impostor._key_id = peter().key_id  # a forced key ID collision
    with pytest.raises(ValueError, match="share the name and key ID"):
        open_note(data, [peter(), impostor])
    with pytest.raises(ValueError):
        open_note(data, [])

"""C2SP signed-note (c2sp.org/signed-note): text signed by one or more Ed25519 keys.

A signed note is its text (UTF-8, ending in a newline), a blank line, and one signature line
per signature:

    <text, ending in \\n>
    \\n
    — <key name> base64(key ID (4 bytes) || signature)\\n
    ...

The key ID is SHA-256(key name || 0x0A || signature type || public key)[:4], with signature
type 0x01 for Ed25519 note signatures. Keys travel as strings: a verifier key ("vkey")
`<name>+<hex key ID>+base64(0x01 || public key)` and a signer key ("skey")
`PRIVATE+KEY+<name>+<hex key ID>+base64(0x01 || seed)`, the formats of golang.org/x/mod/sumdb/note.

The audit log's checkpoints are signed notes (see `exchange.format.checkpoint`, which adds the
tlog-checkpoint body and the witnesses' cosignature/v1 signatures, type 0x04).

Rules this module enforces, beyond the C2SP text:

- Parsing is strict: valid UTF-8, no ASCII control character other than newline, canonical
  base64 (padded, no stray bits), key names without Unicode spaces or "+", at most
  `MAX_SIGNATURES` signature lines, a vkey's key ID equal to the one its key implies, and
  lowercase hex key IDs as the spec's encoding says.
- Opening a note (`open_note`) ignores signature lines from unknown keys, as the spec requires
  (that is how witness cosignatures and key rotation coexist), but rejects the whole note if a
  line names a known key (name *and* key ID) and does not verify, and requires a minimum number
  of distinct known keys to have signed.
- We only sign what we can read back unambiguously: `sign_note` refuses text with an empty
  line, although `parse_note` accepts one (the spec splits text from signatures at the last
  blank line).

What it deliberately does not do: no key generation or storage (seeds come from the caller, who
keeps them secret), no file or network I/O, no clock, no signature types other than Ed25519
(0x01) for notes; it does not interpret the text. Errors are `NoteError`, with a sentence that
names the problem; programming errors (an impossible policy) are `ValueError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from exchange.errors import NoteError

__all__ = [
    "ED25519",
    "KEY_ID_SIZE",
    "MAX_SIGNATURES",
    "Note",
    "Signature",
    "Signer",
    "Verifier",
    "b64decode_canonical",
    "check_key_name",
    "compute_key_id",
    "decode_vkey",
    "encode_vkey",
    "open_note",
    "parse_note",
    "sign_note",
]

ED25519 = 0x01
"""Signature type byte of Ed25519 note signatures (c2sp.org/signed-note, "Signature types")."""

MAX_SIGNATURES = 100
"""Most signature lines a note may carry; the spec asks verifiers for a limit of at least 16."""

KEY_ID_SIZE = 4
"""Bytes of a key ID at the start of every signature."""

_ED25519_KEY_SIZE = 32
_ED25519_SIG_SIZE = 64

_SIG_PREFIX = "\u2014 "  # em dash, space
_SKEY_PREFIX = "PRIVATE+KEY+"
_HEX_KEY_ID = re.compile(r"[0-9a-f]{8}")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# ASCII control characters (below U+0020) other than newline.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")


def b64decode_canonical(text: str, *, what: str) -> bytes:
    """Decode standard, padded base64 (RFC 4648 section 4), refusing every other spelling.

    Python's decoder is lenient (it ignores stray bits in the last character); a signature or
    root hash must have exactly one text form, or the same bytes could be written two ways.
    """
    if not _BASE64.fullmatch(text):
        raise NoteError(f"The {what} is not canonical base64.")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:  # pragma: no cover - the pattern above already excludes it
        raise NoteError(f"The {what} is not canonical base64.") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"The {what} is not canonical base64.")
    return raw


def check_key_name(name: str) -> None:
    """Refuse a key name the spec forbids: empty, or with a Unicode space or a "+"."""
    if not name:
        raise NoteError("A key name must not be empty.")
    # isspace covers the Unicode spaces (Zs) and the ASCII whitespace controls.
    if "+" in name or any(ch.isspace() for ch in name) or _CONTROL.search(name):
        raise NoteError(f"The key name {name!r} contains a space, a control character or a '+'.")
    if not name.isprintable() and any(0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        raise NoteError("A key name must be valid Unicode.")


def compute_key_id(name: str, key_type: int, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || key type || public key)[:4], the signed-note key ID."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([key_type]) + public_key).digest()
    return digest[:KEY_ID_SIZE]


def encode_vkey(name: str, key_type: int, public_key: bytes) -> str:
    """The vkey string `<name>+<hex key ID>+base64(key type || public key)`."""
    check_key_name(name)
    key_id = compute_key_id(name, key_type, public_key)
    material = base64.b64encode(bytes([key_type]) + public_key).decode("ascii")
    return f"{name}+{key_id.hex()}+{material}"


def decode_vkey(vkey: str) -> tuple[str, int, bytes]:
    """Parse a vkey into (name, key type, public key), checking the key ID it states.

    The key ID must be the one the name, type and key imply: a vkey is pasted by people into
    configuration, and a mismatch means it was mangled or belongs to another scheme.
    """
    # At most two splits: the base64 key material may itself contain '+'.
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise NoteError("A verifier key has three parts separated by '+': name, key ID and key.")
    name, hex_id, material = parts
    check_key_name(name)
    if not _HEX_KEY_ID.fullmatch(hex_id):
        raise NoteError("The verifier key's key ID is not 8 lowercase hex digits.")
    raw = b64decode_canonical(material, what="verifier key's key material")
    if len(raw) < 2:
        raise NoteError("The verifier key has no key material.")
    key_type, public_key = raw[0], raw[1:]
    if compute_key_id(name, key_type, public_key).hex() != hex_id:
        raise NoteError(f"The verifier key for {name} states a key ID that does not match its key.")
    return name, key_type, public_key


def _check_text(text: str) -> bytes:
    """The UTF-8 bytes of a note text we are about to sign, after checking it is one."""
    if not text.endswith("\n"):
        raise NoteError("A note text must end with a newline.")
    if text.startswith("\n") or "\n\n" in text:
        raise NoteError("A note text we sign must not contain an empty line.")
    if _CONTROL.search(text):
        raise NoteError("A note text must not contain control characters other than newline.")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise NoteError("A note text must be valid Unicode.") from exc


@dataclass(frozen=True)
class Signature:
    """One signature line: key name, 4-byte key ID, and the signature bytes after the key ID."""

    name: str
    key_id: bytes
    sig: bytes

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if len(self.key_id) != KEY_ID_SIZE:
            raise NoteError(f"A key ID is {KEY_ID_SIZE} bytes.")
        if not self.sig:
            raise NoteError("A signature must not be empty.")

    def to_line(self) -> str:
        """The signature line, newline included: `— <name> base64(key ID || sig)`."""
        return f"{_SIG_PREFIX}{self.name} {base64.b64encode(self.key_id + self.sig).decode('ascii')}\n"


@dataclass(frozen=True)
class Note:
    """A note's text (final newline included) and its signatures, in the order they appear."""

    text: str
    signatures: tuple[Signature, ...]


class Verifier:
    """An Ed25519 (type 0x01) note verifier key: its name, key ID and public key."""

    def __init__(self, name: str, public_key: bytes) -> None:
        check_key_name(name)
        if len(public_key) != _ED25519_KEY_SIZE:
            raise NoteError(f"An Ed25519 public key is {_ED25519_KEY_SIZE} bytes.")
        self._name = name
        self._public_key = public_key
        self._key_id = compute_key_id(name, ED25519, public_key)
        self._key = nacl.signing.VerifyKey(public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> Verifier:
        """Parse a vkey `<name>+<hex key ID>+base64(0x01 || public key)`."""
        name, key_type, public_key = decode_vkey(vkey)
        if key_type != ED25519:
            raise NoteError(
                f"The verifier key for {name} has signature type {key_type:#04x}; note signatures are "
                f"Ed25519 ({ED25519:#04x}). Witness cosigner keys (0x04) are checked with "
                "exchange.format.checkpoint.verify_cosignature."
            )
        return cls(name, public_key)

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._key_id

    @property
    def public_key(self) -> bytes:
        return self._public_key

    def vkey(self) -> str:
        """This key as a vkey string."""
        return encode_vkey(self._name, ED25519, self._public_key)

    def verify(self, text: str, sig: Signature) -> bool:
        """Whether `sig` is this key's valid signature over `text`.

        False for a signature from another key (name or key ID differ) and for one of the wrong
        length, as well as for one that does not verify.
        """
        if sig.name != self._name or sig.key_id != self._key_id or len(sig.sig) != _ED25519_SIG_SIZE:
            return False
        try:
            self._key.verify(text.encode("utf-8"), sig.sig)
        except (nacl.exceptions.BadSignatureError, UnicodeEncodeError):
            return False
        return True

    def __repr__(self) -> str:
        return f"Verifier({self.vkey()!r})"


class Signer:
    """An Ed25519 note signing key, from its name and 32-byte seed. Keep it secret."""

    def __init__(self, name: str, seed: bytes) -> None:
        check_key_name(name)
        if len(seed) != _ED25519_KEY_SIZE:
            raise NoteError(f"An Ed25519 seed is {_ED25519_KEY_SIZE} bytes.")
        self._name = name
        self._seed = bytes(seed)
        self._key = nacl.signing.SigningKey(self._seed)
        self._public_key = bytes(self._key.verify_key)
        self._key_id = compute_key_id(name, ED25519, self._public_key)

    @classmethod
    def from_skey(cls, skey: str) -> Signer:
        """Parse a signer key `PRIVATE+KEY+<name>+<hex key ID>+base64(0x01 || seed)`."""
        # Messages never echo the skey: it is a secret.
        if not skey.startswith(_SKEY_PREFIX):
            raise NoteError("A signer key starts with 'PRIVATE+KEY+'.")
        parts = skey[len(_SKEY_PREFIX) :].split("+", 2)
        if len(parts) != 3:
            raise NoteError("A signer key has the form PRIVATE+KEY+<name>+<key ID>+<key>.")
        name, hex_id, material = parts
        check_key_name(name)
        if not _HEX_KEY_ID.fullmatch(hex_id):
            raise NoteError("The signer key's key ID is not 8 lowercase hex digits.")
        raw = b64decode_canonical(material, what="signer key's key material")
        if len(raw) != 1 + _ED25519_KEY_SIZE or raw[0] != ED25519:
            raise NoteError("The signer key is not an Ed25519 (type 0x01) seed.")
        signer = cls(name, raw[1:])
        if signer.key_id.hex() != hex_id:
            raise NoteError(f"The signer key for {name} states a key ID that does not match its key.")
        return signer

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._key_id

    @property
    def public_key(self) -> bytes:
        return self._public_key

    def sign(self, text: str) -> Signature:
        """Sign a note text (it must end with a newline and have no empty line)."""
        signed = self._key.sign(_check_text(text)).signature
        return Signature(self._name, self._key_id, bytes(signed))

    def verifier(self) -> Verifier:
        return Verifier(self._name, self._public_key)

    def verifier_key(self) -> str:
        """The public vkey to hand to verifiers."""
        return encode_vkey(self._name, ED25519, self._public_key)

    def signer_key(self) -> str:
        """The secret skey string; store it like a password."""
        material = base64.b64encode(bytes([ED25519]) + self._seed).decode("ascii")
        return f"{_SKEY_PREFIX}{self._name}+{self._key_id.hex()}+{material}"

    def derive_key(self, label: bytes) -> bytes:
        """A 32-byte secret for another purpose of the same service, named by `label`: HKDF-SHA256
        (RFC 5869) of the seed with an all-zero salt. Different labels give unrelated keys, and
        none of them tells anything about the seed or the signatures it makes."""
        prk = hmac.new(b"\x00" * 32, self._seed, hashlib.sha256).digest()
        return hmac.new(prk, label + b"\x01", hashlib.sha256).digest()

    def __repr__(self) -> str:
        # Never the seed: reprs end up in logs and tracebacks.
        return f"Signer(name={self._name!r}, key_id={self._key_id.hex()!r})"


def sign_note(text: str, signers: Sequence[Signer]) -> bytes:
    """The signed note: text, a blank line, then one signature line per signer, in order.

    At least one signer (an unsigned note is not a note), and no two with the same name and key
    ID (verifiers count each key once).
    """
    if not signers:
        raise NoteError("A note needs at least one signer.")
    seen: set[tuple[str, bytes]] = set()
    for signer in signers:
        if (signer.name, signer.key_id) in seen:
            raise NoteError(f"The key {signer.name}+{signer.key_id.hex()} is given twice.")
        seen.add((signer.name, signer.key_id))
    body = _check_text(text)
    lines = "".join(signer.sign(text).to_line() for signer in signers)
    return body + b"\n" + lines.encode("utf-8")


def _parse_signature_line(line: str) -> Signature:
    if not line.startswith(_SIG_PREFIX):
        raise NoteError("A signature line must start with an em dash and a space.")
    name, space, encoded = line[len(_SIG_PREFIX) :].partition(" ")
    if not space:
        raise NoteError("A signature line is '— <key name> <base64 signature>'.")
    check_key_name(name)
    raw = b64decode_canonical(encoded, what=f"signature by {name}")
    if len(raw) <= KEY_ID_SIZE:
        raise NoteError(f"The signature by {name} is too short to hold a key ID and a signature.")
    return Signature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


def parse_note(data: bytes) -> Note:
    """Split a signed note into text and signature lines, strictly, verifying nothing.

    The signatures are returned as written, unknown keys and duplicates included; use
    `open_note` to trust anything in it.
    """
    try:
        message = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError("The note is not valid UTF-8.") from exc
    if _CONTROL.search(message):
        raise NoteError("The note contains a control character other than newline.")
    # The text ends at the last blank line: signature lines are never empty, text lines may be.
    split = message.rfind("\n\n")
    if split < 0:
        raise NoteError("The note has no blank line between its text and its signatures.")
    text, block = message[: split + 1], message[split + 2 :]
    if not block:
        raise NoteError("The note has no signatures.")
    if not block.endswith("\n"):
        raise NoteError("The note's last signature line does not end with a newline.")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        # Counted before parsing, so a huge note costs no base64 work.
        raise NoteError(f"The note has {len(lines)} signatures; at most {MAX_SIGNATURES} are accepted.")
    return Note(text, tuple(_parse_signature_line(line) for line in lines))


def open_note(data: bytes, verifiers: Sequence[Verifier], *, require: int = 1) -> Note:
    """Parse a note and check its signatures against the known keys.

    Returns the note with only the signatures that verified, one per known key, in the order
    they appear. Signature lines from unknown keys are ignored (a key is known when both its
    name and key ID match). Raises NoteError if the note does not parse, if a line from a known
    key does not verify, or if fewer than `require` distinct known keys signed.

    `require` must be at least 1 and at most the number of distinct keys given: a policy that
    accepts unsigned notes, or that no note can meet, is a bug (ValueError).
    """
    if require < 1:
        raise ValueError("open_note needs require >= 1: a note nobody trusted signed is not accepted.")
    known: dict[tuple[str, bytes], Verifier] = {}
    for verifier in verifiers:
        key = (verifier.name, verifier.key_id)
        other = known.get(key)
        if other is not None and other.public_key != verifier.public_key:
            # Two keys that the note format cannot tell apart: refuse rather than guess.
            raise ValueError(
                "Two different verifier keys share the name and key ID "
                f"{verifier.name}+{verifier.key_id.hex()}."
            )
        known[key] = verifier
    if require > len(known):
        raise ValueError(f"open_note requires {require} signatures but only {len(known)} keys are known.")

    note = parse_note(data)
    verified: dict[tuple[str, bytes], Signature] = {}
    for sig in note.signatures:
        signer = known.get((sig.name, sig.key_id))
        if signer is None:
            continue
        # Every line from a known key is checked, duplicates included: a bad line from a key we
        # trust means the note was tampered with, even if another line from it is fine.
        if not signer.verify(note.text, sig):
            raise NoteError(
                f"The signature by {sig.name}+{sig.key_id.hex()} does not verify: "
                "the note was altered or forged."
            )
        verified.setdefault((sig.name, sig.key_id), sig)
    if not verified:
        raise NoteError("The note is not signed by any known key.")
    if len(verified) < require:
        raise NoteError(f"The note is signed by {len(verified)} known keys; {require} are required.")
    return Note(note.text, tuple(verified.values()))

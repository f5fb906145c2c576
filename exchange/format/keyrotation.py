"""Key rotation proofs: the new signing key's word that it replaces the old one, for whom.

A principal rotates its keys by asking, signed by its *old* key (the authorisation), that a new
signing key and age recipient replace the old pair. The new signing key must prove it is held
by the same caller, or anyone could hand the service a public key they do not hold (and later
disown what is signed with it). The proof is an Ed25519 signature by the new key over this text,
every line ending in a line feed:

    exchange key rotation v1
    principal <principal id>
    old <old key id>
    new <new key id>
    age <new age recipient>

Binding the principal and the old key id keeps a proof made for one rotation from serving
another (another principal, or the same principal's later rotation); binding the age recipient
keeps a relay from swapping in an age key of its own choosing. The new key id is the one
`identity.key_id_for` derives from the new public key, so the signature also covers the key.

This module is pure: it builds and checks the message; who may rotate, and when, is the key
rotation service's business.
"""

from __future__ import annotations

import re

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from ..errors import FormatError

__all__ = ["KeyRotationError", "rotation_message", "sign_rotation", "verify_rotation"]

_DOMAIN = "exchange key rotation v1\n"
_KEY_ID = re.compile(r"[0-9a-f]{32}")
#: A principal id as the service makes them (`prn_` and 20 hex digits); nothing else is signed.
_PRINCIPAL_ID = re.compile(r"prn_[0-9a-f]{20}")
_AGE_RECIPIENT = re.compile(r"age1[02-9ac-hj-np-z]{58}")
_SIGNATURE_BYTES = 64


class KeyRotationError(FormatError):
    """A rotation proof that cannot be built or does not verify; `reason` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code="rotation-proof-invalid")
        self.reason = reason


def rotation_message(*, principal_id: str, old_key_id: str, new_key_id: str, age_recipient: str) -> bytes:
    """The exact bytes a rotation proof signs. Each field is checked against its one spelling,
    so no value can carry a line feed into the next line."""
    if not _PRINCIPAL_ID.fullmatch(principal_id):
        raise KeyRotationError("bad-principal", "not a principal id (prn_ and 20 hex digits)")
    for what, key_id in (("old", old_key_id), ("new", new_key_id)):
        if not _KEY_ID.fullmatch(key_id):
            raise KeyRotationError("bad-key-id", f"the {what} key id is not 32 lowercase hex digits")
    if not _AGE_RECIPIENT.fullmatch(age_recipient):
        raise KeyRotationError("bad-recipient", "the age recipient is not an age1… X25519 recipient")
    text = f"{_DOMAIN}principal {principal_id}\nold {old_key_id}\nnew {new_key_id}\nage {age_recipient}\n"
    return text.encode("ascii")


def sign_rotation(
    new_key: SigningKey, *, principal_id: str, old_key_id: str, new_key_id: str, age_recipient: str
) -> bytes:
    """The 64-byte proof: `new_key`'s signature over `rotation_message(...)`."""
    message = rotation_message(
        principal_id=principal_id, old_key_id=old_key_id, new_key_id=new_key_id, age_recipient=age_recipient
    )
    return bytes(new_key.sign(message).signature)


def verify_rotation(
    new_public_key: bytes,
    proof: bytes,
    *,
    principal_id: str,
    old_key_id: str,
    new_key_id: str,
    age_recipient: str,
) -> None:
    """Raise KeyRotationError unless `proof` is `new_public_key`'s signature over the message."""
    message = rotation_message(
        principal_id=principal_id, old_key_id=old_key_id, new_key_id=new_key_id, age_recipient=age_recipient
    )
    if len(proof) != _SIGNATURE_BYTES:
        raise KeyRotationError("bad-proof", f"a rotation proof is {_SIGNATURE_BYTES} bytes")
    try:
        VerifyKey(new_public_key).verify(message, proof)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise KeyRotationError(
            "bad-proof", "the proof is not the new signing key's signature over this rotation"
        ) from exc

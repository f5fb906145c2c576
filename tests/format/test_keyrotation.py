"""The key rotation proof: its exact message, and every way a proof must fail to verify."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from exchange.format.keyrotation import KeyRotationError, rotation_message, sign_rotation, verify_rotation
from exchange.identity import key_id_for

PRINCIPAL = "prn_0123456789abcdef0123"
OLD = "00112233445566778899aabbccddeeff"
RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def _fields(new: SigningKey, **changes: str) -> dict[str, str]:
    fields = {
        "principal_id": PRINCIPAL,
        "old_key_id": OLD,
        "new_key_id": key_id_for(bytes(new.verify_key)),
        "age_recipient": RECIPIENT,
    }
    return fields | changes


def test_the_message_is_the_documented_text() -> None:
    message = rotation_message(
        principal_id=PRINCIPAL, old_key_id=OLD, new_key_id="ff" * 16, age_recipient=RECIPIENT
    )
    assert message == (
        b"exchange key rotation v1\n"
        b"principal prn_0123456789abcdef0123\n"
        b"old 00112233445566778899aabbccddeeff\n"
        b"new ffffffffffffffffffffffffffffffff\n"
        b"age age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\n"
    )


def test_a_proof_verifies_for_exactly_its_rotation() -> None:
    new = SigningKey(bytes(range(32)))
    proof = sign_rotation(new, **_fields(new))
    assert len(proof) == 64
    verify_rotation(bytes(new.verify_key), proof, **_fields(new))
    # Any other principal, old key, new key id or age recipient: the same proof fails.
    other_recipient = "age1lggyhqrw2nlhcxprm67z43rta597azn8gknawjehu9d9dl0jq3yqqvfafg"
    for change in (
        {"principal_id": "prn_ffffffffffffffffffff"},
        {"old_key_id": "ff" * 16},
        {"new_key_id": "ee" * 16},
        {"age_recipient": other_recipient},
    ):
        with pytest.raises(KeyRotationError) as err:
            verify_rotation(bytes(new.verify_key), proof, **_fields(new, **change))
        assert err.value.reason == "bad-proof", change


def test_a_proof_by_another_key_fails() -> None:
    new, intruder = SigningKey(bytes(range(32))), SigningKey(bytes(range(1, 33)))
    forged = sign_rotation(intruder, **_fields(new))
    with pytest.raises(KeyRotationError) as err:
        verify_rotation(bytes(new.verify_key), forged, **_fields(new))
    assert err.value.reason == "bad-proof"


@pytest.mark.parametrize("proof", [b"", b"\x00" * 63, b"\x00" * 65, b"\x00" * 64])
def test_a_proof_of_the_wrong_shape_fails(proof: bytes) -> None:
    new = SigningKey(bytes(range(32)))
    with pytest.raises(KeyRotationError) as err:
        verify_rotation(bytes(new.verify_key), proof, **_fields(new))
    assert err.value.reason == "bad-proof"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"principal_id": "prn_0123456789abcdef0123\nold " + OLD}, "bad-principal"),
        ({"principal_id": "alice"}, "bad-principal"),
        ({"old_key_id": OLD.upper()}, "bad-key-id"),
        ({"new_key_id": OLD + "\n"}, "bad-key-id"),
        ({"age_recipient": RECIPIENT + "\nage x"}, "bad-recipient"),
        ({"age_recipient": "AGE-SECRET-KEY-1"}, "bad-recipient"),
    ],
)
def test_no_field_can_carry_another_line(change: dict[str, str], reason: str) -> None:
    new = SigningKey(bytes(range(32)))
    with pytest.raises(KeyRotationError) as err:
        sign_rotation(new, **_fields(new, **change))
    assert err.value.reason == reason

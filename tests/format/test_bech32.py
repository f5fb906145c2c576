"""Bech32 against the BIP 173 test vectors, plus the two ways age departs from BIP 173."""

from __future__ import annotations

import os

import pytest

from exchange.format import bech32

# BIP 173 "valid Bech32" strings; every one has a data part that converts to bytes.
BIP173_VALID = [
    "A12UEL5L",
    "a12uel5l",
    "an83characterlonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1tt5tgs",
    "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
    "11" + "q" * 82 + "c8247j",
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
    "?1ezyfcl",
]

# BIP 173 "invalid Bech32" strings, each with the reason; the over-long one is left out
# because age lifts the 90-character limit (tested below).
BIP173_INVALID = {
    "\x201nwldj5": "HRP character out of range",
    "\x7f1axkwrx": "HRP character out of range",
    "\x801eym55h": "HRP character out of range",
    "pzry9x0s0muk": "no separator",
    "1pzry9x0s0muk": "empty HRP",
    "x1b4n0q5v": "invalid data character",
    "li1dgmt3": "too short checksum",
    "de1lg7wt\xff": "invalid character in checksum",
    "A1G7SGD8": "checksum calculated with uppercase form of HRP",
    "10a06t8": "empty HRP",
    "1qzzfhee": "empty HRP",
}


@pytest.mark.parametrize("text", BIP173_VALID)
def test_bip173_valid_strings_decode_and_reencode(text: str) -> None:
    hrp, data = bech32.decode(text)
    assert bech32.encode(hrp, data) == text


@pytest.mark.parametrize(("text", "reason"), BIP173_INVALID.items())
def test_bip173_invalid_strings_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError):
        bech32.decode(text)


def test_there_is_no_90_character_limit() -> None:
    # BIP 173 refuses this one only for its length; age keys are longer than 90 characters.
    text = "an84characterslonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1569pvx"
    assert len(text) > 90
    assert bech32.decode(text)[1] == b""
    long = bech32.encode("age", os.urandom(600))
    assert bech32.decode(long)[0] == "age"


def test_bech32_not_bech32m() -> None:
    # The BIP 350 (Bech32m) vector "a1lqfn3a" has a valid Bech32m checksum only.
    with pytest.raises(ValueError, match="checksum"):
        bech32.decode("a1lqfn3a")


@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 100])
def test_round_trip_keeps_case_of_hrp(size: int) -> None:
    data = os.urandom(size)
    lower = bech32.encode("age", data)
    upper = bech32.encode("AGE-SECRET-KEY-", data)
    assert lower == lower.lower() and upper == upper.upper()
    assert bech32.decode(lower) == ("age", data)
    assert bech32.decode(upper) == ("AGE-SECRET-KEY-", data)


def test_mixed_case_is_refused() -> None:
    text = bech32.encode("age", os.urandom(32))
    with pytest.raises(ValueError, match="mixes"):
        bech32.decode(text[:5] + text[5:].upper())
    with pytest.raises(ValueError, match="mixes"):
        bech32.encode("Age", b"")


def test_every_single_character_change_is_caught() -> None:
    # Bech32 detects every error in up to four characters; check all single substitutions.
    text = bech32.encode("age", bytes(range(32)))
    for i in range(len(text)):
        for c in "qpzry9x8gf2tvdw0s3jn54khce6mua7l":
            if c != text[i]:
                with pytest.raises(ValueError):
                    bech32.decode(text[:i] + c + text[i + 1 :])


def test_non_canonical_padding_is_refused() -> None:
    # One byte is 8 bits: two 5-bit groups with 2 padding bits. Spell it with a non-zero
    # padding bit, and with a superfluous third group, each with a correct checksum.
    values_bad_padding = [0, 1]  # 00000 00001: padding bit set
    values_extra_group = [0, 0, 0]  # 15 bits for one byte
    for values in (values_bad_padding, values_extra_group):
        text = _encode_values("age", values)
        with pytest.raises(ValueError, match="padding"):
            bech32.decode(text)


def test_non_ascii_is_refused() -> None:
    with pytest.raises(ValueError):
        bech32.decode("age1\u0130qqqqqq")


def _encode_values(hrp: str, values: list[int]) -> str:
    # Build a string from raw 5-bit values with a correct checksum, bypassing encode().
    charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    checksum = bech32._checksum(hrp, values)
    return hrp + "1" + "".join(charset[v] for v in [*values, *checksum])

"""Bech32 (BIP 173) text encoding, as age uses it for keys.

age writes its keys as Bech32 strings: recipients as `age1…`, identities as
`AGE-SECRET-KEY-1…`. This module converts between a human-readable part (HRP) plus
bytes and that text form, strictly:

- the checksum is the original BIP 173 Bech32 constant, not Bech32m (BIP 350);
- there is no 90-character limit, because age identities and post-quantum
  recipients are longer than that (the age spec lifts the limit explicitly);
- a string is all lowercase or all uppercase, never mixed, and the checksum is
  always computed over the lowercase form;
- the data part must convert back to bytes exactly: at most four padding bits, all
  zero, so every byte string has exactly one encoding.

It deliberately does not know about age: which HRP, which case and which length a
key must have is checked by `exchange.format.age_keys`. Errors are `ValueError`,
which the age code translates into its own exception types.
"""

from __future__ import annotations

__all__ = ["decode", "encode"]

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_REV = {c: i for i, c in enumerate(_CHARSET)}
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_CHECKSUM_LENGTH = 6


def _polymod(values: list[int]) -> int:
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i, gen in enumerate(_GENERATOR):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _checksum(hrp: str, values: list[int]) -> list[int]:
    mod = _polymod([*_hrp_expand(hrp), *values, 0, 0, 0, 0, 0, 0]) ^ 1
    return [(mod >> (5 * (5 - i))) & 31 for i in range(_CHECKSUM_LENGTH)]


def _to_5bit(data: bytes) -> list[int]:
    out: list[int] = []
    acc = 0
    bits = 0
    for byte in data:
        acc = (acc << 8) | byte
        bits += 8
        while bits >= 5:
            bits -= 5
            out.append((acc >> bits) & 31)
    if bits:
        out.append((acc << (5 - bits)) & 31)
    return out


def _from_5bit(values: list[int]) -> bytes:
    out = bytearray()
    acc = 0
    bits = 0
    for value in values:
        acc = (acc << 5) | value
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    # Canonical form only: the encoder pads with fewer than 5 zero bits, so a whole
    # spare 5-bit group, or a non-zero padding bit, means a second spelling of the
    # same bytes, which we refuse rather than silently accept.
    if bits >= 5:
        raise ValueError("Bech32 data part has a superfluous padding group")
    if acc & ((1 << bits) - 1):
        raise ValueError("Bech32 data part has non-zero padding bits")
    return bytes(out)


def _check_hrp(hrp: str) -> None:
    if not hrp:
        raise ValueError("Bech32 human-readable part is empty")
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise ValueError("Bech32 human-readable part has a character outside printable ASCII")


def encode(hrp: str, data: bytes) -> str:
    """Encode `data` under `hrp`; the result has the case of `hrp` (all lower or all upper)."""
    _check_hrp(hrp)
    if hrp.lower() == hrp:
        upper = False
    elif hrp.upper() == hrp:
        upper = True
    else:
        raise ValueError("Bech32 human-readable part mixes upper and lower case")
    lower_hrp = hrp.lower()
    values = _to_5bit(data)
    text = lower_hrp + "1" + "".join(_CHARSET[v] for v in [*values, *_checksum(lower_hrp, values)])
    return text.upper() if upper else text


def decode(s: str) -> tuple[str, bytes]:
    """Decode a Bech32 string into its HRP (in the case it was written) and data bytes.

    Raises ValueError for mixed case, characters outside the alphabet, a misplaced
    separator, a bad checksum or non-canonical padding.
    """
    # Only ASCII can be Bech32; checking first also keeps str.lower() from changing
    # the string's length (it does for some non-ASCII letters).
    if not s.isascii():
        raise ValueError("Bech32 string has a non-ASCII character")
    lower = s.lower()
    if lower != s and s.upper() != s:
        raise ValueError("Bech32 string mixes upper and lower case")
    pos = lower.rfind("1")
    if pos < 1:
        raise ValueError("Bech32 string has no human-readable part before the '1' separator")
    if len(lower) - pos - 1 < _CHECKSUM_LENGTH:
        raise ValueError("Bech32 string is too short to hold a checksum")
    hrp = s[:pos]
    _check_hrp(hrp)
    try:
        values = [_CHARSET_REV[c] for c in lower[pos + 1 :]]
    except KeyError:
        raise ValueError("Bech32 data part has a character outside the Bech32 alphabet") from None
    if _polymod([*_hrp_expand(lower[:pos]), *values]) != 1:
        raise ValueError("Bech32 checksum does not verify")
    return hrp, _from_5bit(values[:-_CHECKSUM_LENGTH])

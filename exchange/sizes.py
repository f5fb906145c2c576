"""Sizes as people write them: `500MB`, `10GiB`, `2TiB`, or bare bytes (`1048576`).

A whole number and one unit: decimal (kB, MB, GB, TB: powers of 1000) or binary (KiB, MiB, GiB,
TiB: powers of 1024), case as written here or all lower case. No fractions, no signs.
"""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"([0-9]{1,16})\s*([A-Za-z]{0,3})")


def parse_size(text: str) -> int:
    """Bytes in `text`; ValueError with a sentence saying what is accepted."""
    match = _PATTERN.fullmatch(text.strip())
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"not a size: {text!r} (write it like 500MB, 10GiB or 2TiB)")
    return int(match.group(1)) * unit


def format_size(size: int) -> str:
    """A short human form in binary units: 1536 -> '1.5 KiB', 10 -> '10 B'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover

"""Durations as people write them: `90s`, `15m`, `24h`, `7d` (or bare seconds: `3600`).

One unit per value, a whole number before it; no fractions, no signs, no combinations such as
`1h30m`: a typo in a lifetime should be refused, not guessed at.
"""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PATTERN = re.compile(r"([0-9]{1,12})([smhd]?)")
#: Far beyond any lifetime the service allows; keeps arithmetic on the result boring.
_MAX_SECONDS = 100 * 365 * 86400


def parse_duration(text: str) -> int:
    """Seconds in `text`; ValueError with a sentence saying what is accepted."""
    match = _PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (write it like 90s, 15m, 24h or 7d)")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds > _MAX_SECONDS:
        raise ValueError(f"duration {text!r} is longer than 100 years")
    return seconds


def format_duration(seconds: int) -> str:
    """The shortest exact form: 86400 -> '1d', 5400 -> '90m', 61 -> '61s'."""
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"

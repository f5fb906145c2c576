"""Text somebody else chose, made safe to show a person: one rule for the terminal and the page."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: object) -> str:
    """`text` safe to show: every character that is not printable (controls, CR and LF, ESC, C1,
    bidirectional overrides such as U+202E, zero-width and other format characters, line
    separators) is shown as a Python-style escape, and a backslash as two, so that what is shown
    reads back to exactly one string. For people only: JSON output stays exact."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "".join(out)

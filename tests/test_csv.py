"""exchange.client._csv.safe_cell, the one CSV-injection guard, and the exports that use it."""

from __future__ import annotations

import csv
import io

import pytest

from exchange.client._csv import safe_cell
from exchange.client.audit import events_csv


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://evil")', '\'=HYPERLINK("http://evil")'),
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("+1+cmd", "'+1+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("\t=1+1", "'\t=1+1"),
        ("\r=1+1", "'\r=1+1"),
        ("\0=1+1", "'\0=1+1"),
        ("'already quoted", "'already quoted"),  # a quote starts no formula: left alone, not doubled
        ("a=b", "a=b"),  # only the first character matters
        (" =1+1", " =1+1"),  # a leading space is text to Excel, LibreOffice and Sheets
        ("", ""),
        ("curl/8.5", "curl/8.5"),
        (None, ""),
        (0, 0),
        (42, 42),
        (-5, -5),  # a number is written as digits and read back as a number
        (1.5, 1.5),
        (True, "True"),
        (["=1+1"], "['=1+1']"),  # odd values from a leaf are made text first, then judged
        ({"a": 1}, "{'a': 1}"),
    ],
)
def test_safe_cell(value: object, cell: object) -> None:
    assert safe_cell(value) == cell


def test_audit_events_csv_guards_every_column() -> None:
    event = {
        "idx": 7,
        "time_ms": 1,
        "action": "=a",
        "outcome": {"result": "+r", "reason": "-x"},
        "actor": {
            "type": "@t",
            "id": "\tid",
            "name": '=HYPERLINK("http://evil")',
            "org": "\ro",
            "key_id": "k",
        },
        "source": {"ip": "=ip"},
        "resource": {"type": "artifact", "id": "@id"},
        "request_id": "-req",
        "id": "evt",
    }
    out = io.StringIO()
    events_csv(out, [event])
    header, row = list(csv.reader(io.StringIO(out.getvalue())))
    assert header[0] == "idx" and row[0] == "7" and row[-1] == "evt" and "k" in row and "artifact" in row
    risky = [cell for cell in row if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert risky == [], risky
    assert len([cell for cell in row if cell.startswith("'")]) == 10

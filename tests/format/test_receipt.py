"""The receipt message: exact bytes, and values that could blur its lines refused."""

from __future__ import annotations

import pytest

from exchange.format.receipt import receipt_message


def test_the_exact_message() -> None:
    message = receipt_message(
        artifact="art_1", link="lnk_2", session="ses_3", manifest_sha256=bytes(range(32))
    )
    assert message == (
        b"exchange receipt v1\nartifact art_1\nlink lnk_2\nsession ses_3\n"
        b"manifest-sha256 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
    )


@pytest.mark.parametrize(
    "values",
    [
        {"artifact": "art_1\nlink lnk_x"},  # a newline would let one value forge the next line
        {"link": ""},
        {"session": "ses 3"},
        {"manifest_sha256": b"\x00" * 31},
    ],
)
def test_refused_values(values: dict[str, object]) -> None:
    args: dict[str, object] = {
        "artifact": "art_1",
        "link": "lnk_2",
        "session": "ses_3",
        "manifest_sha256": b"\x00" * 32,
    }
    with pytest.raises(ValueError):
        receipt_message(**(args | values))  # type: ignore[arg-type]

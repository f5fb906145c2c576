"""The pure parts: token parsing and Range checks, without any I/O (the token buckets, shared in
the database, are tested in tests/api/test_shared_limits.py)."""

from __future__ import annotations

import base64

import pytest

from exchange.errors import RangeNotSatisfiable
from exchange.services import links, tokens, uploadlinks
from exchange.services.links import check_range
from exchange.services.tokens import LinkRefused, hash_token, new_token, parse_token


def test_tokens_carry_256_bits_and_parse_canonically() -> None:
    token = new_token()
    assert token.startswith("exl1_") and len(token) == 48
    assert len(base64.urlsafe_b64decode(token[5:] + "=")) == 32
    assert parse_token(token) == hash_token(token)
    assert new_token() != token


@pytest.mark.parametrize(
    "text",
    [
        "",
        "exl1_",
        "exl1_" + "A" * 42,
        "exl1_" + "A" * 44,
        "exl2_" + "A" * 43,
        "EXL1_" + "A" * 43,
        "exl1_" + "A" * 42 + "B",  # non-zero padding bits: a second spelling of a token
        "exl1_" + "A" * 42 + "=",
        "exl1_" + "A" * 41 + "+/",
        "exl1_" + "A" * 42 + "\n",
    ],
)
def test_malformed_tokens(text: str) -> None:
    with pytest.raises(LinkRefused) as refused:
        parse_token(text)
    assert refused.value.reason == "link-malformed" and refused.value.code == "link-unavailable"


def test_links_and_upload_links_share_one_token_codec() -> None:
    # One codec: download links and upload links both parse with `tokens`, each with its prefix.
    assert tokens.TOKEN_PREFIX != uploadlinks.TOKEN_PREFIX
    upload_token = new_token(uploadlinks.TOKEN_PREFIX)
    assert uploadlinks.parse_upload_token(upload_token) == hash_token(upload_token)
    with pytest.raises(LinkRefused) as refused:
        uploadlinks.parse_upload_token(new_token())
    assert refused.value.reason == "link-malformed"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-99", (0, 99)),
        ("bytes=10-", (10, 999)),
        ("bytes=990-5000", (990, 999)),
        ("bytes=-10", (990, 999)),
        ("bytes=-5000", (0, 999)),
        ("bytes=999-999", (999, 999)),
    ],
)
def test_ranges_inside(header: str | None, expected: tuple[int, int] | None) -> None:
    assert check_range(header, 1000) == expected


@pytest.mark.parametrize(
    "header",
    ["bytes=1000-", "bytes=1000-2000", "bytes=5-4", "bytes=-0", "bytes=-", "bytes=0-1,5-6", "items=0-1"],
)
def test_ranges_refused(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        check_range(header, 1000)


def test_ip_allow_lists() -> None:
    networks = links.parse_networks(["198.51.100.0/24", " 2001:db8::/32 ", "203.0.113.7"])
    assert [str(n) for n in networks] == ["198.51.100.0/24", "2001:db8::/32", "203.0.113.7/32"]
    assert links.ip_allowed(networks, "198.51.100.200")
    assert links.ip_allowed(networks, "::ffff:203.0.113.7")  # an IPv4 client on a dual-stack socket
    assert links.ip_allowed(networks, "2001:db8:1::5")
    assert not links.ip_allowed(networks, "203.0.113.8")
    assert not links.ip_allowed(networks, None)
    assert not links.ip_allowed(networks, "not an address")
    assert links.ip_allowed(None, None)  # no list: from anywhere

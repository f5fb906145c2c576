"""Settings: environment over TOML over defaults; units; refusals with the setting's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from exchange.durations import format_duration, parse_duration
from exchange.errors import ValidationError
from exchange.settings import Settings


def test_defaults() -> None:
    s = Settings.from_mapping({})
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.effective_public_url == "http://127.0.0.1:8080"
    assert s.effective_database_url.startswith("sqlite:///") and s.effective_database_url.endswith(
        "exchange.db"
    )
    assert s.signature_max_skew_s == 300


def test_environment_over_file_over_defaults(tmp_path: Path) -> None:
    config = tmp_path / "exchange.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\ninvite_default_lifetime_s = "2h"\n')
    s = Settings.from_mapping({"EXCHANGE_CONFIG": str(config), "EXCHANGE_PORT": "9100"})
    assert s.port == 9100  # environment wins
    assert s.host == "0.0.0.0"  # file beats default  # noqa: S104
    assert s.invite_default_lifetime_s == 7200  # durations accept units


def test_durations_in_environment() -> None:
    s = Settings.from_mapping({"EXCHANGE_PRESIGN_TTL_S": "15m", "EXCHANGE_STORAGE_TIMEOUT_S": "3"})
    assert s.presign_ttl_s == 900 and s.storage_timeout_s == 3.0


def test_secret_is_not_in_repr() -> None:
    s = Settings.from_mapping({"EXCHANGE_S3_SECRET_ACCESS_KEY": "very-secret-value"})
    assert "very-secret-value" not in repr(s)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"EXCHANGE_PORT": "eighty"}, "port"),
        ({"EXCHANGE_PORT": "70000"}, "port"),
        ({"EXCHANGE_PRESIGN_TTL_S": "-5s"}, "presign_ttl_s"),
        ({"EXCHANGE_PRESIGN_TTL_S": "1h30m"}, "presign_ttl_s"),
        ({"EXCHANGE_DATABASE_URL": "mysql://x"}, "database_url"),
        ({"EXCHANGE_S3_ENDPOINT": "ftp://storage"}, "s3_endpoint"),
        ({"EXCHANGE_S3_ENDPOINT": "http://user:pw@storage"}, "credentials"),
        ({"EXCHANGE_INVITE_DEFAULT_LIFETIME_S": "60d"}, "invite_default_lifetime_s"),
    ],
)
def test_bad_settings_are_refused_with_their_name(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings.from_mapping(env)
    assert needle in str(err.value)


def test_unknown_keys_in_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "exchange.toml"
    config.write_text("prot = 8080\n")
    with pytest.raises(ValidationError, match="prot"):
        Settings.from_mapping({"EXCHANGE_CONFIG": str(config)})


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read config"):
        Settings.from_mapping({"EXCHANGE_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("45", 45)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1.5h", "-1s", "1w", "1h30m", "h", "99999999999999d"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (86400, 5400, 61, 0)] == ["1d", "90m", "61s", "0s"]

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


# -- list settings: parsed once, on loading ------------------------------------------------------

LISTS = ("witness_urls", "witness_vkeys", "finding_clearinghouse")


def test_list_settings_default_to_empty_tuples() -> None:
    s = Settings.from_mapping({})
    assert all(getattr(s, name) == () for name in LISTS)


def test_a_comma_string_from_the_environment_is_a_tuple() -> None:
    s = Settings.from_mapping(
        {
            "EXCHANGE_WITNESS_URLS": "https://w1.example, https://w2.example/witness",
            "EXCHANGE_WITNESS_VKEYS": "w1+abcd+AAAA,w2+ef01+BBBB",
            "EXCHANGE_FINDING_CLEARINGHOUSE": "clara",
        }
    )
    assert s.witness_urls == ("https://w1.example", "https://w2.example/witness")
    assert s.witness_vkeys == ("w1+abcd+AAAA", "w2+ef01+BBBB")
    assert s.finding_clearinghouse == ("clara",)


def test_a_toml_array_from_the_file_is_a_tuple(tmp_path: Path) -> None:
    config = tmp_path / "exchange.toml"
    config.write_text(
        'witness_urls = ["https://w1.example", " https://w2.example "]\n'
        'finding_clearinghouse = ["clara", "", "clearing,house"]\n'
        'witness_vkeys = "w1+abcd+AAAA, w2+ef01+BBBB"\n'  # a string in the file is split as in the env
    )
    s = Settings.from_mapping({"EXCHANGE_CONFIG": str(config)})
    assert s.witness_urls == ("https://w1.example", "https://w2.example")
    assert s.finding_clearinghouse == ("clara", "clearing,house")  # an array item is not split again
    assert s.witness_vkeys == ("w1+abcd+AAAA", "w2+ef01+BBBB")
    # The environment still wins over the file, whole: the lists are not merged.
    s = Settings.from_mapping({"EXCHANGE_CONFIG": str(config), "EXCHANGE_FINDING_CLEARINGHOUSE": "carl"})
    assert s.finding_clearinghouse == ("carl",)


@pytest.mark.parametrize(
    "text",
    [" clara ,, carl ,", ",clara,carl", "clara,\tcarl\n", " , clara , , carl , "],
)
def test_whitespace_and_empty_items_are_dropped(text: str) -> None:
    assert Settings.from_mapping({"EXCHANGE_FINDING_CLEARINGHOUSE": text}).finding_clearinghouse == (
        "clara",
        "carl",
    )


@pytest.mark.parametrize("blank", ["", " ", ",", " , ,"])
def test_a_blank_list_is_empty(blank: str) -> None:
    assert Settings.from_mapping({"EXCHANGE_WITNESS_VKEYS": blank}).witness_vkeys == ()


@pytest.mark.parametrize(
    "toml",
    [
        "witness_urls = [1, 2]",
        'witness_urls = ["https://w.example", 2]',
        "witness_vkeys = [true]",
        'finding_clearinghouse = [["clara"]]',
        'finding_clearinghouse = [{name = "clara"}]',
        "finding_clearinghouse = 7",
        'finding_clearinghouse = {name = "clara"}',
    ],
)
def test_items_that_are_not_strings_are_refused(toml: str, tmp_path: Path) -> None:
    config = tmp_path / "exchange.toml"
    config.write_text(toml + "\n")
    name = toml.split(" ")[0]
    with pytest.raises(ValidationError) as err:
        Settings.from_mapping({"EXCHANGE_CONFIG": str(config)})
    assert (
        err.value.message.startswith(f"setting {name}: cannot use") and "list of strings" in err.value.message
    )


@pytest.mark.parametrize("value", ["https://w.example", ["https://w.example"], ("https://w.example", 3)])
def test_the_constructor_takes_only_tuples_of_strings(value: object) -> None:
    # A string would otherwise be taken letter by letter: "h", "t", "t", ...
    with pytest.raises(ValidationError, match="witness_urls must be a tuple of strings"):
        Settings(witness_urls=value)  # type: ignore[arg-type]
    assert Settings(witness_urls=("https://w.example",)).witness_urls == ("https://w.example",)


def test_witness_urls_are_still_checked_item_by_item(tmp_path: Path) -> None:
    config = tmp_path / "exchange.toml"
    config.write_text('witness_urls = ["https://w.example", "ftp://w.example"]\n')
    with pytest.raises(ValidationError, match="setting witness_urls must be an http"):
        Settings.from_mapping({"EXCHANGE_CONFIG": str(config)})
    with pytest.raises(ValidationError, match=r"setting witness_urls: .* private"):
        Settings(witness_urls=("https://w.example", "http://127.0.0.1:8090"))

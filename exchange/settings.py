"""Service settings: one frozen object, loaded once at the edge, then passed in.

`Settings.from_mapping` reads `EXCHANGE_*` names from any mapping (normally `os.environ`), on top
of an optional TOML file named by `EXCHANGE_CONFIG` (keys are the setting names in lower case,
without the prefix). The environment wins over the file; the file wins over the defaults.

Every limit is a named setting with its unit in its name. There is no global settings object:
`create_app(settings)` and the CLI receive one explicitly. Secrets (the S3 secret key) are kept
out of `repr()` so that logging a settings object cannot leak them.

This module does not touch the network, the database or the storage.
"""

from __future__ import annotations

import dataclasses
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .durations import parse_duration
from .errors import ValidationError

__all__ = ["Settings"]

_PREFIX = "EXCHANGE_"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob of the service. README's settings table is generated from these docs."""

    #: Data directory: SQLite database, dev storage, generated credentials, admin identity.
    home: Path = Path(".exchange")
    #: Address the API listens on. Loopback by default: put a TLS proxy in front for anything else.
    host: str = "127.0.0.1"
    #: TCP port of the API.
    port: int = 8080
    #: Base URL clients use to reach the API (written into links). Default: http://HOST:PORT.
    public_url: str = ""
    #: Database: `sqlite:///path/to.db` or `postgresql://user@host:port/db`. Default: SQLite in HOME.
    database_url: str = ""
    #: Name of this log in audit events and checkpoints (a schema-less URL-like string).
    log_origin: str = "exchange.local/audit"

    #: S3 endpoint the service talks to. Empty: the dev stack's SeaweedFS (scripts/run fills it in).
    s3_endpoint: str = ""
    #: S3 endpoint written into presigned URLs, when clients reach storage by another address.
    s3_public_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_bucket: str = "exchange"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = field(default="", repr=False)
    #: Fixed S3 port for the dev stack's SeaweedFS (0: pick a free one).
    s3_port: int = 0
    #: Timeout of one call from the service to storage.
    storage_timeout_s: float = 10.0

    #: Largest JSON request body the API accepts.
    max_body_bytes: int = 1024 * 1024
    #: How far a request signature's `created` time may be from the server clock.
    signature_max_skew_s: int = 300
    #: Lifetime of an invite when the admin names none.
    invite_default_lifetime_s: int = 24 * 3600
    #: Longest lifetime an invite may be given.
    invite_max_lifetime_s: int = 30 * 24 * 3600
    #: Lifetime of a presigned storage URL.
    presign_ttl_s: int = 300
    #: Longest principal or organisation name, in characters.
    name_max_chars: int = 64
    #: Default page size of list endpoints, and the most a caller may ask for.
    page_size_default: int = 100
    page_size_max: int = 1000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ValidationError(f"setting {f.name} must not be negative (got {value})")
        if not 0 <= self.port <= 65535 or not 0 <= self.s3_port <= 65535:
            raise ValidationError("ports must be between 0 and 65535")
        if self.signature_max_skew_s == 0:
            raise ValidationError("signature_max_skew_s must be positive")
        if self.invite_default_lifetime_s > self.invite_max_lifetime_s:
            raise ValidationError("invite_default_lifetime_s exceeds invite_max_lifetime_s")
        if self.page_size_default == 0 or self.page_size_default > self.page_size_max:
            raise ValidationError("page_size_default must be between 1 and page_size_max")
        for name in ("public_url", "s3_endpoint", "s3_public_endpoint"):
            value = getattr(self, name)
            if value:
                _check_http_url(name, value)
        if self.database_url and not self.database_url.startswith(
            ("sqlite:///", "postgresql://", "postgres://")
        ):
            raise ValidationError("database_url must start with sqlite:/// or postgresql://")

    # -- derived values -------------------------------------------------------------------------

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'exchange.db').resolve()}"

    @property
    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def effective_s3_public_endpoint(self) -> str:
        return self.s3_public_endpoint or self.s3_endpoint

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from `EXCHANGE_*` names, over the TOML file `EXCHANGE_CONFIG` names."""
        values: dict[str, Any] = {}
        config = env.get(_PREFIX + "CONFIG")
        if config:
            try:
                with open(config, "rb") as fh:
                    data = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ValidationError(f"cannot read config file {config}: {exc}") from exc
            for key, raw in data.items():
                values[key] = _coerce(key, raw)
        for f in fields(cls):
            raw = env.get(_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, raw)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValidationError(f"unknown settings in config file: {', '.join(sorted(unknown))}")
        return cls(**values)


_DURATION_SETTINGS = {f.name for f in fields(Settings) if f.name.endswith("_s")}


def _coerce(name: str, raw: Any) -> Any:
    types = {f.name: f.type for f in fields(Settings)}
    kind = types.get(name)
    if kind is None:
        return raw  # reported as unknown by the caller
    try:
        if name in _DURATION_SETTINGS:
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                seconds: float = float(raw)
            else:
                seconds = parse_duration(str(raw))
            return seconds if kind == "float" else int(seconds)
        if kind == "int":
            if isinstance(raw, bool):
                raise TypeError
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(str(raw))
        if not isinstance(raw, str):
            raise TypeError
        return raw
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"setting {name}: cannot use {raw!r} as {kind}") from exc


def _check_http_url(name: str, value: str) -> None:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValidationError(f"setting {name} must be an http(s) URL with a host")
    if parsed.username or parsed.password:
        raise ValidationError(f"setting {name} must not carry credentials in the URL")
    if parsed.query or parsed.fragment:
        raise ValidationError(f"setting {name} must not have a query or fragment")

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
import ipaddress
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .durations import parse_duration
from .errors import ValidationError

__all__ = ["Settings", "is_internal_address"]

_PREFIX = "EXCHANGE_"
#: The annotation of list settings (the module's annotations are strings).
_LIST = "tuple[str, ...]"


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

    # -- operations -----------------------------------------------------------------------------
    #: Port of the Prometheus `/metrics` listener, apart from the API's (0: no listener). Off by
    #: default: it answers anyone who can reach it, so the operator chooses where it listens.
    metrics_port: int = 0
    #: Address the metrics listener binds. Loopback by default: scrape through a sidecar, or set
    #: the pod's address where only the monitoring network reaches it.
    metrics_host: str = "127.0.0.1"
    #: Log line format of `exchange serve`: `text`, or `json` (one object a line, with request ids).
    log_format: str = "text"
    #: On SIGTERM, how long requests in flight may take to finish before they are cancelled; no
    #: new connection is accepted meanwhile. Below Kubernetes' default 30 s grace period.
    shutdown_grace_s: float = 25.0

    # -- connections ----------------------------------------------------------------------------
    #: A connection must deliver a request's complete headers this long after it opened, or after
    #: the first byte of a later request on it; otherwise it is closed (slow-header clients).
    http_header_timeout_s: float = 10.0
    #: A kept-alive connection with no request under way is closed after this long. Above the
    #: 60 s idle timeout of common load balancers, so the proxy, not the service, closes first.
    http_keepalive_timeout_s: float = 75.0
    #: Longest time to receive one request body; a slower body is answered 408.
    http_body_timeout_s: float = 60.0
    #: Most open client connections in total (clamped to what the file-descriptor limit allows).
    http_max_connections: int = 10_000
    #: Most open client connections from one source: an IPv4 address, or an IPv6 /64.
    http_max_connections_per_source: int = 256
    #: Reverse proxies whose `X-Forwarded-For` names the client: networks (CIDR, or one address), a
    #: list (comma-separated in the environment). From a peer inside them the header is required
    #: and its rightmost address outside them is the client (rate limits, audit `ip`), and the
    #: per-source connection cap does not apply to the peer. Empty: no forwarding header is trusted.
    trusted_proxies: tuple[str, ...] = ()
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

    #: File holding the audit log's Ed25519 checkpoint signing key (mode 0600, made on first start;
    #: every replica must share it). Default: HOME/log-signing.key.
    log_signing_key_file: str = ""
    #: How often the service checks whether the log grew and, if so, publishes a checkpoint.
    audit_checkpoint_interval_s: float = 1.0
    #: After this long without an event, the log appends an `audit.heartbeat` event (0: never).
    audit_heartbeat_s: int = 60
    #: One replica at a time signs checkpoints and appends heartbeats: it holds a lease in the
    #: database for this long, renewed every third of it; when it dies, another takes over
    #: within this plus a third. A graceful stop hands the lease over at once.
    audit_signer_lease_s: float = 10.0
    #: Most events one entries (export) request returns; clients page through longer ranges.
    audit_export_max_entries: int = 100_000
    #: Witnesses (c2sp.org/tlog-witness) asked to cosign each checkpoint: URL prefixes (a list;
    #: comma-separated in the environment).
    witness_urls: tuple[str, ...] = ()
    #: The witnesses' cosigner verifier keys (type 0x04 vkeys): a list, comma-separated in the environment.
    witness_vkeys: tuple[str, ...] = ()
    #: A checkpoint is published only with this many cosignatures from the keys above.
    witness_quorum: int = 0
    #: How long the publisher waits for the witnesses, asked all at once: a witness that has not
    #: answered by then (a 409's second call included) is left out of this checkpoint.
    witness_timeout_s: float = 5.0
    #: Allow witness URLs on loopback, private, link-local or metadata addresses (127/8, 10/8,
    #: 172.16/12, 192.168/16, 169.254/16, ::1, fc00::/7, 0.0.0.0, localhost). Off: such a witness
    #: is refused when configured, and a name that resolves to one is refused at every connection.
    #: For local development and tests; a witness is another organisation's public service.
    witness_allow_private: bool = False

    # -- artifacts --------------------------------------------------------------------------------
    #: An upload not completed this long after it started is aborted and its parts removed.
    upload_abandon_after_s: int = 24 * 3600
    #: How often the service looks for abandoned uploads.
    upload_sweep_interval_s: int = 300
    #: Smallest part of a multipart upload (rounded up to whole encrypted chunks; S3 wants >= 5 MiB).
    upload_min_part_bytes: int = 8 * 1024 * 1024
    #: Most part URLs one request may ask for.
    upload_part_urls_max: int = 1000
    #: Most files in one artifact.
    artifact_max_files: int = 10_000
    #: Largest artifact, in plaintext bytes over all its files.
    artifact_max_bytes: int = 64 * 1024**4

    # -- grants and links --
    #: Lifetime of a download link when its creator names none.
    link_default_lifetime_s: int = 24 * 3600
    #: Longest lifetime a download link may be given.
    link_max_lifetime_s: int = 7 * 24 * 3600
    #: Lifetime of the presigned storage URLs a link redemption hands out. Short, because a URL
    #: already handed out keeps working until it expires, even after the link is revoked; a long
    #: download renews its URLs within its (already counted) session.
    link_presign_ttl_s: int = 60
    #: How long after its challenge a link proof may open a download session. A proof that already
    #: opened one keeps continuing it (it names that session), however old.
    link_proof_max_age_s: int = 600
    #: Link redemptions one client IP may make per minute (token bucket, shared by all replicas),
    #: and its burst.
    redeem_ip_requests_per_min: int = 120
    redeem_ip_burst_requests: int = 60
    #: Redemptions of one link per minute (token bucket, shared by all replicas), and its burst.
    redeem_link_requests_per_min: int = 600
    redeem_link_burst_requests: int = 120

    # -- refusals ---------------------------------------------------------------------------------
    #: Refused unauthenticated requests (failed signature, unknown route, refused enrolment) one
    #: source (IPv4 address or IPv6 /64) may make per minute, and its burst (token bucket, shared
    #: by all replicas). Past it, that source's requests needing a signature get 429 before any work.
    auth_failure_requests_per_min: int = 120
    auth_failure_burst_requests: int = 60
    #: How long such a source's 429 waits before it is sent: a flood on N connections then gets
    #: N answers per this long instead of the event loop's attention (0: answer at once).
    auth_failure_delay_s: float = 1.0
    #: Window over which anonymous refusals are counted per (source, route, code) for the log.
    refusal_log_window_s: int = 60
    #: Refusals per (source, route, code) and window appended as events of their own; the rest
    #: (and every 429) are counted into one `http.refusals` summary event at the window's end.
    refusal_log_allowance_events: int = 10
    #: Most (source, route, code) keys counted per window (across all replicas); further keys
    #: share one `other` summary.
    refusal_log_max_keys: int = 10_000

    # -- findings --
    #: Largest finding body (Markdown, plaintext bytes; attachments are artifacts, of any size).
    finding_body_max_bytes: int = 1024 * 1024
    #: Largest encrypted note on a lifecycle move.
    finding_note_max_bytes: int = 64 * 1024
    #: Principals every finding is also encrypted to (a clearinghouse): names, a list (comma-separated
    #: in the environment).
    finding_clearinghouse: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == _LIST and not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                # A comma string here would be iterated letter by letter; lists are parsed on loading.
                raise ValidationError(
                    f"setting {f.name} must be a tuple of strings, not {type(value).__name__}"
                )
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ValidationError(f"setting {f.name} must not be negative (got {value})")
        if (
            not 0 <= self.port <= 65535
            or not 0 <= self.s3_port <= 65535
            or not 0 <= self.metrics_port <= 65535
        ):
            raise ValidationError("ports must be between 0 and 65535")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValidationError("metrics_port must differ from port: metrics are never served on the API")
        if self.log_format not in ("text", "json"):
            raise ValidationError("log_format must be text or json")
        if not self.shutdown_grace_s < float("inf"):  # NaN fails too
            raise ValidationError("shutdown_grace_s must be a finite number of seconds")
        if self.signature_max_skew_s == 0:
            raise ValidationError("signature_max_skew_s must be positive")
        if self.invite_default_lifetime_s > self.invite_max_lifetime_s:
            raise ValidationError("invite_default_lifetime_s exceeds invite_max_lifetime_s")
        if self.upload_min_part_bytes < 5 * 1024 * 1024:
            raise ValidationError(
                "upload_min_part_bytes must be at least 5 MiB (5242880), S3's smallest part"
            )
        if (
            self.upload_part_urls_max == 0
            or self.artifact_max_files == 0
            or self.upload_sweep_interval_s == 0
        ):
            raise ValidationError(
                "upload_part_urls_max, artifact_max_files and upload_sweep_interval_s must be positive"
            )
        if self.link_presign_ttl_s == 0 or self.link_proof_max_age_s == 0:
            raise ValidationError("link_presign_ttl_s and link_proof_max_age_s must be positive")
        if self.link_default_lifetime_s == 0 or self.link_default_lifetime_s > self.link_max_lifetime_s:
            raise ValidationError("link_default_lifetime_s must be positive and at most link_max_lifetime_s")
        if 0 in (
            self.redeem_ip_requests_per_min,
            self.redeem_ip_burst_requests,
            self.redeem_link_requests_per_min,
            self.redeem_link_burst_requests,
        ):
            raise ValidationError("the redeem_* rate limits must be positive")
        if 0 in (
            self.auth_failure_requests_per_min,
            self.auth_failure_burst_requests,
            self.refusal_log_window_s,
            self.refusal_log_max_keys,
        ):
            raise ValidationError(
                "auth_failure_requests_per_min, auth_failure_burst_requests, refusal_log_window_s"
                " and refusal_log_max_keys must be positive"
            )
        if not 0 <= self.auth_failure_delay_s <= 60:  # NaN fails too
            raise ValidationError("auth_failure_delay_s must be between 0 and 60 s")
        if self.page_size_default == 0 or self.page_size_default > self.page_size_max:
            raise ValidationError("page_size_default must be between 1 and page_size_max")
        if self.audit_checkpoint_interval_s == 0:
            raise ValidationError("audit_checkpoint_interval_s must be positive")
        if not 0 < self.audit_signer_lease_s < float("inf"):  # NaN fails too
            raise ValidationError("audit_signer_lease_s must be a positive, finite number")
        if not 0 < self.witness_timeout_s < float("inf"):  # NaN fails too
            raise ValidationError("witness_timeout_s must be a positive, finite number")
        for name in (
            "http_header_timeout_s",
            "http_keepalive_timeout_s",
            "http_body_timeout_s",
            "http_max_connections",
            "http_max_connections_per_source",
        ):
            if not 0 < getattr(self, name) < float("inf"):  # NaN fails too
                raise ValidationError(f"{name} must be a positive, finite number")
        for name in ("public_url", "s3_endpoint", "s3_public_endpoint"):
            value = getattr(self, name)
            if value:
                _check_http_url(name, value)
        for network in self.trusted_proxies:
            try:
                ipaddress.ip_network(network, strict=True)
            except ValueError:
                raise ValidationError(
                    f"setting trusted_proxies: {network!r} is not a network in CIDR form (10.0.0.0/8,"
                    " 2001:db8::/32, or one address) with no bits set past its prefix"
                ) from None
        for url in self.witness_urls:
            _check_http_url("witness_urls", url)
            if not self.witness_allow_private:
                _check_public_host("witness_urls", url)
        if self.database_url and not self.database_url.startswith(
            ("sqlite:///", "postgresql://", "postgres://")
        ):
            raise ValidationError("database_url must start with sqlite:/// or postgresql://")

    # -- derived values -------------------------------------------------------------------------

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'exchange.db').resolve()}"

    @property
    def effective_log_signing_key_file(self) -> Path:
        return Path(self.log_signing_key_file) if self.log_signing_key_file else self.home / "log-signing.key"

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
_BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


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
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in _BOOLEANS:
                return _BOOLEANS[raw.strip().lower()]
            raise ValueError("use true or false (or 1 or 0)")
        if kind == "int":
            if isinstance(raw, bool):
                raise TypeError
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(str(raw))
        if kind == _LIST:
            return _list(raw)
        if not isinstance(raw, str):
            raise TypeError
        return raw
    except (TypeError, ValueError) as exc:
        what = "a list of strings (or a comma-separated string)" if kind == _LIST else kind
        raise ValidationError(f"setting {name}: cannot use {raw!r} as {what}") from exc


def _list(raw: Any) -> tuple[str, ...]:
    """A list setting: a comma-separated string (the environment) or an array of strings (TOML).
    Items are stripped and empty ones dropped, so `"a, b,"` and `["a", " b"]` are both (a, b)."""
    if isinstance(raw, str):
        items: list[Any] = raw.split(",")
    elif isinstance(raw, list | tuple):
        items = list(raw)
        if not all(isinstance(item, str) for item in items):
            raise TypeError("every item must be a string")
    else:
        raise TypeError("a list of strings, or a comma-separated string")
    return tuple(item.strip() for item in items if item.strip())


def _check_http_url(name: str, value: str) -> None:
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValidationError(f"setting {name} must not contain spaces or control characters")
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValidationError(f"setting {name} must be an http(s) URL with a host")
    if "@" in parsed.netloc:
        raise ValidationError(f"setting {name} must not carry credentials in the URL")
    if parsed.query or parsed.fragment or "#" in value or "?" in value:
        raise ValidationError(f"setting {name} must not have a query or fragment")
    try:
        parsed.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ValidationError(f"setting {name} has an invalid port") from None
    host = parsed.hostname.rstrip(".")
    # inet_aton's forms ("127.1", "0x7f.1", "2130706433") are addresses to most resolvers, which
    # would hide what the URL points at.
    if _NUMERIC_HOST.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValidationError(
                f"setting {name}: {host!r} is a numeric address in a non-standard form; write it as"
                " a dotted quad or use a name"
            ) from None


#: Names that always mean this machine, whatever DNS says.
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}")
#: NAT64's well-known prefix embeds an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_internal_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Is `ip` anything but a public unicast address? Loopback, private (10/8, 172.16/12,
    192.168/16, fc00::/7), link-local (169.254/16 with the cloud metadata service, fe80::/10),
    shared (100.64/10), unspecified (0.0.0.0, ::), multicast, reserved; also when embedded in an
    IPv6 address (IPv4-mapped, 6to4, NAT64)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and is_internal_address(embedded):
            return True
    return not ip.is_global or ip.is_multicast


def _check_public_host(name: str, url: str) -> None:
    """Refuse a URL whose host is an internal address literal or a name for this machine; other
    names are checked each time they are resolved (see `exchange.witness.PublicResolver`)."""
    host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if (ip is not None and is_internal_address(ip)) or host in _LOCAL_NAMES or host.endswith(".localhost"):
        raise ValidationError(
            f"setting {name}: {url!r} points at a loopback, private, link-local or metadata address;"
            " witnesses must be public services (set witness_allow_private = true, env"
            " EXCHANGE_WITNESS_ALLOW_PRIVATE=1, only for local development and tests)"
        )

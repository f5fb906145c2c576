"""Several `exchange serve` processes behind HAProxy on one public port: the stateless-replica
claim, run on one machine (`scripts/run --replicas N --database postgresql`, and the tests).

`ReplicaSet` starts, in order:

1. the storage it is given, unless the caller runs it (anything with `endpoint`, `start()`,
   `stop()` and `ensure_bucket(name)`: `seaweed.SeaweedFS`, or a cluster of the same surface),
   and the bucket;
2. the PostgreSQL database named by the DSN, created when the server has none of that name;
3. the first admin, once (`exchange init`, which also migrates), and the audit log's signing key
   in the shared `EXCHANGE_HOME`, so that every replica loads the one key (checkpoints, link
   proofs) and the verifier key can be printed;
4. N `exchange serve` child processes, each on its own port and metrics port, all with the same
   database, storage credentials and home, `EXCHANGE_PUBLIC_URL` the proxy's URL (signatures
   cover it, links are written with it) and `EXCHANGE_TRUSTED_PROXIES=127.0.0.1/32` (the proxy
   connects from loopback; `api.forwarded` then takes the client from its header);
5. HAProxy in front, on the one public port, from a generated `haproxy.cfg` in the home.

The proxy's configuration, and why:

- `http-request set-header X-Forwarded-For %[src]`: the header is *overwritten* with the address
  the proxy saw, never appended to, so a client's own header never reaches a replica;
- `balance leastconn`, health checks on `/readyz` (which checks database and storage), sent with
  the header the replicas require of a trusted peer;
- retries only when a connection to a replica could not be made (`retry-on conn-failure`,
  `option redispatch`: the retry goes to another replica). A request that reached a replica is
  never sent again: when that replica dies the client gets a 502 and decides itself whether the
  request may be repeated;
- timeouts from the service's settings: headers within `http_header_timeout_s`, a kept-alive
  client idle at most `http_keepalive_timeout_s`, a client or replica silent mid-request at most
  `http_body_timeout_s`; the proxy's idle connections to replicas are dropped after HAProxy's
  5 s purge delay, well before a replica's idle timeout, so the proxy never reuses a connection
  the replica is closing;
- per-source limits the replicas no longer apply to the proxy's connections: a stick table counts
  each source's open connections (an IPv4 address, or an IPv6 /64, as `ratelimit.source_key`)
  and refuses one over `http_max_connections_per_source`; `maxconn` is `http_max_connections`;
- the stats socket is a Unix socket in the home (mode 0600), not a TCP port or page.

`kill(i)` sends SIGKILL to replica i (the proxy's retries and health checks route around it);
`restart(i)` starts it again on the same port and waits until the proxy routes to it; `stop()`
sends SIGTERM to every replica and waits for them to drain, then stops the proxy (and the
storage, if it started it). Children run in sessions of their own, so a Ctrl-C at the terminal
reaches the caller alone, which stops them in that order.

What this module does not do: TLS (put a TLS-terminating proxy in front, as in `infra/`), more
than one machine, SQLite (one file cannot be shared by replicas on several machines, and the
point is to show what production runs), or restart a replica that died by itself. It is
development tooling: nothing in the service imports it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import http.client
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import asyncpg

from ..errors import DatabaseUnavailable, DependencyError, ValidationError
from ..services.auditlog import load_or_create_signer
from ..settings import Settings

log = logging.getLogger("exchange.dev.replicas")

__all__ = ["HAPROXY_PACKAGE", "Replica", "ReplicaSet", "ensure_database", "find_haproxy", "haproxy_config"]

#: The Debian package that brings HAProxy.
HAPROXY_PACKAGE = "haproxy"
#: How long the proxy waits for a replica's answer to start (there is no service setting for how
#: long a handler may take; completing a large multipart upload is the slowest).
_SERVER_TIMEOUT_S = 300
#: How long the proxy waits for a TCP connection to a replica before it tries another.
_CONNECT_TIMEOUT_S = 2
#: Health check interval, and checks in a row that take a replica out or put it back.
_CHECK_INTERVAL_S = 1
_CHECK_FALL = 2
_CHECK_RISE = 1
#: Where the proxy's connections come from, as the replicas are told.
_PROXY_PEER = "127.0.0.1/32"
#: Descriptors HAProxy keeps for itself (listeners, checks, the stats socket, logs).
_PROXY_RESERVED_DESCRIPTORS = 200
_DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class Storage(Protocol):
    """What a `ReplicaSet` needs of its S3 store."""

    @property
    def endpoint(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def ensure_bucket(self, name: str) -> None: ...


class Credentials(Protocol):
    """An S3 key pair (`seaweed.S3Credentials`): the identity the replicas use."""

    @property
    def access_key_id(self) -> str: ...

    @property
    def secret_access_key(self) -> str: ...


def find_haproxy() -> Path | None:
    """The HAProxy binary on PATH or where Debian puts it, or None."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    return Path(found) if found else None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _seconds(value: float) -> str:
    """A duration as HAProxy reads it, in milliseconds (it has no fractional seconds)."""
    return f"{max(1, round(value * 1000))}ms"


def proxy_maxconn(settings: Settings) -> int:
    """`http_max_connections`, or fewer when the descriptor limit cannot hold that many: HAProxy
    needs two descriptors a connection (client and replica) and refuses to start otherwise."""
    try:
        import resource
    except ImportError:  # Windows
        return settings.http_max_connections
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return settings.http_max_connections
    fits = max(1, (hard - _PROXY_RESERVED_DESCRIPTORS) // 2)
    if fits < settings.http_max_connections:
        log.warning(
            "the descriptor limit (%d) holds %d proxy connections, not %d",
            hard,
            fits,
            settings.http_max_connections,
        )
    return min(settings.http_max_connections, fits)


def haproxy_config(
    settings: Settings, *, bind: tuple[str, int], replicas: list[tuple[str, int]], stats_socket: Path
) -> str:
    """The proxy's configuration for replicas at `replicas` (host, port), serving on `bind`."""
    host, port = bind
    maxconn = proxy_maxconn(settings)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    servers = "\n".join(
        f"    server r{i} {f'[{h}]' if ':' in h else h}:{p}" for i, (h, p) in enumerate(replicas)
    )
    return f"""\
# Generated by exchange.dev.replicas: rewritten at every start.
global
    maxconn {maxconn}
    stats socket {stats_socket} mode 600 level admin

defaults
    mode http
    timeout connect {_seconds(_CONNECT_TIMEOUT_S)}
    timeout http-request {_seconds(settings.http_header_timeout_s)}
    timeout http-keep-alive {_seconds(settings.http_keepalive_timeout_s)}
    timeout client {_seconds(settings.http_body_timeout_s)}
    timeout server {_seconds(_SERVER_TIMEOUT_S)}
    timeout check {_seconds(settings.storage_timeout_s)}
    # Only a connection that could not be made is retried, on another replica: a request that
    # reached one is never sent twice.
    retries 3
    retry-on conn-failure
    option redispatch 1

frontend public
    bind {address}
    maxconn {maxconn}
    # Open connections per source: an IPv4 address, or an IPv6 /64 (as the service counts them).
    stick-table type ipv6 size 100k expire 10m store conn_cur
    tcp-request connection track-sc0 src,ipmask(32,64)
    tcp-request connection reject if {{ sc0_conn_cur gt {settings.http_max_connections_per_source} }}
    # Overwrite, never append: what a client says it is never reaches a replica.
    http-request set-header X-Forwarded-For %[src]
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost hdr X-Forwarded-For 127.0.0.1
    http-check expect status 200
    default-server check inter {_seconds(_CHECK_INTERVAL_S)} fall {_CHECK_FALL} rise {_CHECK_RISE} \
maxconn {settings.http_max_connections}
{servers}
"""


async def _ensure_database(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    name = urllib.parse.unquote(parsed.path.lstrip("/"))
    if not _DATABASE_NAME.fullmatch(name):
        raise ValidationError(f"database name {name!r}: use letters, digits and underscores")
    admin_dsn = urllib.parse.urlunsplit(parsed._replace(path="/postgres"))
    try:
        conn = await asyncpg.connect(admin_dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(
            f"cannot reach PostgreSQL at {parsed.hostname}:{parsed.port or 5432}"
            f" ({exc.__class__.__name__}); start it, or name another with --database"
        ) from exc
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        # An identifier cannot be a bound parameter; the name was checked above.
        with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # made meanwhile by someone else
            await conn.execute(f'CREATE DATABASE "{name}"')
        return True
    except asyncpg.PostgresError as exc:
        raise DatabaseUnavailable(f"cannot create the database {name!r}: {exc.__class__.__name__}") from exc
    finally:
        await conn.close()


def ensure_database(url: str) -> bool:
    """Create the PostgreSQL database `url` names, unless it exists; True if it was created."""
    return asyncio.run(_ensure_database(url))


@dataclass
class Replica:
    """One `exchange serve` child process."""

    index: int
    host: str
    port: int
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ReplicaSet:
    """N `exchange serve` processes sharing one PostgreSQL database and one S3 store, behind
    HAProxy on one public port."""

    def __init__(
        self,
        home: Path,
        *,
        storage: Storage,
        credentials: Credentials,
        database_url: str,
        replicas: int = 3,
        port: int = 0,
        bucket: str = "exchange",
        settings: Mapping[str, str] | None = None,
        manage_storage: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        """`settings`: more settings for every replica, as `EXCHANGE_*` environment names;
        `port`: the proxy's (0: a free one); `manage_storage`: start and stop `storage` here (off
        when the caller runs it)."""
        if replicas < 1:
            raise ValidationError("a replica set needs at least one replica")
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ValidationError(
                "replicas share one PostgreSQL database: give a postgresql:// URL (SQLite serves one process)"
            )
        if not ipaddress.ip_address(host).is_loopback:
            raise ValidationError("the replica set serves on loopback only; put a TLS proxy in front")
        self.home = Path(home).resolve()
        self.storage = storage
        self.credentials = credentials
        self.database_url = database_url
        self.bucket = bucket
        self.host = host
        self.manage_storage = manage_storage
        self._extra = dict(settings or {})
        if any(not name.startswith("EXCHANGE_") for name in self._extra):
            raise ValidationError("settings for the replicas are EXCHANGE_* environment names")
        self.port = port or _free_port(host)
        self.replicas = [
            Replica(i, host, _free_port(host), _free_port(host), self.home / f"replica-{i}.log")
            for i in range(replicas)
        ]
        self._proxy: subprocess.Popen[bytes] | None = None
        self._verifier_key: str | None = None
        self._storage_started = False

    # -- what callers read ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The one public URL: the proxy's."""
        return f"http://{self.host}:{self.port}"

    @property
    def urls(self) -> list[str]:
        """Each replica's own URL (reachable from loopback only with an X-Forwarded-For header,
        and signed requests must still be signed for `url`)."""
        return [r.url for r in self.replicas]

    @property
    def admin_path(self) -> Path:
        return self.home / "admin.identity"

    @property
    def haproxy_config_path(self) -> Path:
        return self.home / "haproxy.cfg"

    @property
    def stats_socket(self) -> Path:
        return self.home / "haproxy.sock"

    @property
    def verifier_key(self) -> str:
        """The audit log's verifier key (auditors pin it: `exchange audit verify --vkey`)."""
        if self._verifier_key is None:
            raise RuntimeError("the replica set has not been started")
        return self._verifier_key

    def env(self, index: int | None = None) -> dict[str, str]:
        """The environment of replica `index` (None: what they share, for `exchange init`)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "AWS_"))}
        env = (
            base
            | self._extra
            | {
                "EXCHANGE_HOME": str(self.home),
                "EXCHANGE_HOST": self.host,
                "EXCHANGE_PUBLIC_URL": self.url,
                "EXCHANGE_DATABASE_URL": self.database_url,
                "EXCHANGE_S3_ENDPOINT": self.storage.endpoint,
                "EXCHANGE_S3_BUCKET": self.bucket,
                "EXCHANGE_S3_ACCESS_KEY_ID": self.credentials.access_key_id,
                "EXCHANGE_S3_SECRET_ACCESS_KEY": self.credentials.secret_access_key,
                "EXCHANGE_TRUSTED_PROXIES": _PROXY_PEER,
            }
        )
        if index is not None:
            replica = self.replicas[index]
            env |= {"EXCHANGE_PORT": str(replica.port), "EXCHANGE_METRICS_PORT": str(replica.metrics_port)}
        return env

    def settings(self) -> Settings:
        """The settings every replica runs with (checked here, before any process starts)."""
        return Settings.from_mapping(self.env(0))

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Bring up storage, database, admin, replicas and proxy; return once the proxy answers
        `/readyz` with every replica in its rotation. On failure, stop what was started."""
        haproxy = find_haproxy()
        if haproxy is None:
            raise DependencyError(
                f"HAProxy is not installed: install the Debian package {HAPROXY_PACKAGE}"
                f" (sudo apt-get install {HAPROXY_PACKAGE})"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        atexit.register(self._kill_all)
        try:
            if self.manage_storage:
                self.storage.start()
                self._storage_started = True
            self.storage.ensure_bucket(self.bucket)
            settings = self.settings()
            ensure_database(self.database_url)
            if not self.admin_path.exists():
                self._init_admin()
            signer = load_or_create_signer(settings.effective_log_signing_key_file, settings.log_origin)
            self._verifier_key = signer.verifier_key()
            for replica in self.replicas:
                self._spawn(replica)
            deadline = time.monotonic() + timeout
            for replica in self.replicas:
                self._wait_ready(replica, deadline)
            self._start_proxy(haproxy, settings, deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every replica and wait for it to drain, then stop the proxy and the storage
        (if this set started it)."""
        grace = timeout if timeout is not None else self._grace_s() + 5
        running = [r for r in self.replicas if r.running]
        for replica in running:
            assert replica.proc is not None
            replica.proc.send_signal(signal.SIGTERM)
        for replica in running:
            assert replica.proc is not None
            try:
                replica.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait(timeout=10)
        if self._proxy is not None and self._proxy.poll() is None:
            self._proxy.terminate()
            try:
                self._proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proxy.kill()
                self._proxy.wait(timeout=10)
        self._proxy = None
        if self._storage_started:
            self._storage_started = False
            self.storage.stop()
        atexit.unregister(self._kill_all)

    def kill(self, index: int) -> None:
        """SIGKILL replica `index`: no drain, no cleanup, requests in flight cut off."""
        replica = self.replicas[index]
        if replica.proc is None:
            raise RuntimeError(f"replica {index} was never started")
        replica.proc.kill()
        replica.proc.wait(timeout=10)

    def restart(self, index: int, timeout: float = 60) -> None:
        """Start replica `index` again (it must be down) on its port; return once the proxy
        routes requests to it."""
        replica = self.replicas[index]
        if replica.running:
            raise RuntimeError(f"replica {index} is running; kill or stop it first")
        self._spawn(replica)
        deadline = time.monotonic() + timeout
        self._wait_ready(replica, deadline)
        self._wait_in_rotation({index}, deadline)

    def in_rotation(self) -> set[int]:
        """The replicas the proxy currently routes to (from its stats socket)."""
        up = set()
        for line in self._proxy_command("show stat").splitlines():
            fields = line.split(",")
            # Columns 0, 1 and 17 of HAProxy's CSV: proxy, server, status.
            if (
                len(fields) > 17
                and fields[0] == "replicas"
                and fields[1][:1] == "r"
                and fields[17][:2] == "UP"
            ):
                up.add(int(fields[1][1:]))
        return up

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the parts -----------------------------------------------------------------------------

    def _grace_s(self) -> float:
        try:
            return self.settings().shutdown_grace_s
        except ValidationError:
            return Settings().shutdown_grace_s

    def _init_admin(self) -> None:
        # S603 here and below: our own argv lists (interpreter or binary path and flags), no shell.
        made = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "exchange.cli", "--identity", str(self.admin_path), "init"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if made.returncode != 0:
            raise DependencyError(f"could not create the first admin: {made.stderr.strip()[-2000:]}")

    def _spawn(self, replica: Replica) -> None:
        with replica.log_path.open("ab") as log:
            replica.proc = subprocess.Popen(
                [sys.executable, "-m", "exchange.cli", "serve"],
                env=self.env(replica.index),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches the caller, who stops us in order
            )

    def _log_tail(self, path: Path, limit: int = 3000) -> str:
        try:
            return path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def _wait_ready(self, replica: Replica, deadline: float) -> None:
        while True:
            if _get_status(replica.host, replica.port, "/readyz", {"X-Forwarded-For": "127.0.0.1"}) == 200:
                return
            if replica.proc is None or replica.proc.poll() is not None or time.monotonic() > deadline:
                raise DependencyError(
                    f"replica {replica.index} did not become ready:\n{self._log_tail(replica.log_path)}"
                )
            time.sleep(0.1)

    def _start_proxy(self, haproxy: Path, settings: Settings, deadline: float) -> None:
        config = haproxy_config(
            settings,
            bind=(self.host, self.port),
            replicas=[(r.host, r.port) for r in self.replicas],
            stats_socket=self.stats_socket,
        )
        self.haproxy_config_path.write_text(config)
        with contextlib.suppress(FileNotFoundError):
            self.stats_socket.unlink()  # left by a proxy that was killed
        log_path = self.home / "haproxy.log"
        with log_path.open("ab") as log:
            self._proxy = subprocess.Popen(  # noqa: S603
                [str(haproxy), "-db", "-f", str(self.haproxy_config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        while _get_status(self.host, self.port, "/readyz", {}) != 200:
            if self._proxy.poll() is not None or time.monotonic() > deadline:
                raise DependencyError(f"HAProxy did not come up:\n{self._log_tail(log_path)}")
            time.sleep(0.1)
        self._wait_in_rotation(set(range(len(self.replicas))), deadline)

    def _wait_in_rotation(self, indices: set[int], deadline: float) -> None:
        while not indices <= self.in_rotation():
            if time.monotonic() > deadline:
                raise DependencyError(f"the proxy does not route to replicas {sorted(indices)}")
            time.sleep(0.1)

    def _proxy_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def _kill_all(self) -> None:
        """At interpreter exit, if `stop` was never called: no orphaned replicas or proxy."""
        for proc in [r.proc for r in self.replicas] + [self._proxy]:
            if proc is not None and proc.poll() is None:
                proc.kill()


def _get_status(host: str, port: int, path: str, headers: Mapping[str, str]) -> int | None:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path, headers=dict(headers))
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()

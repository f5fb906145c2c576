"""scripts/bench-api: the running service under concurrent clients on loopback, against a bare
aiohttp handler on the same machine as the ceiling.

The parent starts a throwaway SeaweedFS, `exchange init` and `exchange serve` (SQLite, durable
commits; or `--database postgresql`, a throwaway database whose CPU per request is reported
too) in a temporary directory, and a bare aiohttp app in a process of its own. It enrols a
developer and a tester (another organisation) through invites, uploads a small artifact as the
developer, grants it to the tester, makes two links (one whose download session it opens) and
then drives each scenario for a bounded time from a load generator in a process of its own, so
that the generator's CPU is not the server's: keep-alive connections speaking raw HTTP/1.1, with
every signed request signed before the timed window (each needs a unique nonce). It prints
requests/s, p50 and p99 latency, the statuses seen, the server's CPU seconds per request (from
/proc/PID/stat: what matters for capacity) and its RSS and descriptors before and after. For the
scenarios that write it checks that every success has its event, and counts how the refusals
were accounted for: the first few per (source, route, code) and window as events of their own,
the rest (and every 429) in one `http.refusals` summary per window (`api.refusals`); once the
server has stopped (its last summaries written) the two must add up to the refusals answered.

Link redemption is rate-limited per client IP and per link; from one loopback address the
throughput scenarios need those limits raised, so the server is restarted with
EXCHANGE_REDEEM_* raised after one short scenario at the default limits, which must show 429 as
the only refusal.

The scenarios run closed loop (each connection sends again as soon as its answer came: the
server's ceiling, with the latency of a queue of `--concurrency` requests), then those named in
`--rates` (by default the issue's targets, issue=300,redeem=1000) open loop: sent at that rate
whatever the answers do, latency counted from each request's due time, so p99 is the latency at
that load.

`--soak 10m` instead runs issuance, redemption and audit queries together for that long and
samples the server's RSS and descriptors as it goes: they must stay flat.

The `flood` scenario (last, and with `--only flood` alone) measures what an unsigned flood
costs: signed `GET /v1/whoami` from a second loopback address (127.0.0.2, 8 connections) alone
for the duration, as the baseline, then the same beside unsigned `GET /v1/whoami` from
127.0.0.1 on `--concurrency` connections (closed loop, or `--flood-rate` requests a second).
It prints both signed throughputs, the flood's statuses, and, after stopping the server so that
its last summaries are written, the audit events and bytes the flood added (leaf bytes, and the
growth of the pages of the audit tables and their indexes) with `/proc/loadavg` before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from exchange.client import Client
from exchange.client import links as links_api
from exchange.client.signing import sign_headers
from exchange.client.transfer import upload
from exchange.dev.seaweed import S3Credentials, SeaweedFS
from exchange.durations import parse_duration
from exchange.format.linkproof import make_proof
from exchange.identity import Identity
from exchange.services.auditlog import load_or_create_signer
from exchange.services.links import ProofKeys

EXCHANGE = [sys.executable, "-m", "exchange.cli"]
#: Redemption limits for the throughput scenarios (one client address, one link).
RAISED_LIMITS = {
    "EXCHANGE_REDEEM_IP_REQUESTS_PER_MIN": "100000000",
    "EXCHANGE_REDEEM_IP_BURST_REQUESTS": "100000000",
    "EXCHANGE_REDEEM_LINK_REQUESTS_PER_MIN": "100000000",
    "EXCHANGE_REDEEM_LINK_BURST_REQUESTS": "100000000",
}
#: The scenarios, by the names --only and --rates take.
SCENARIOS = ("healthz", "whoami", "invite", "issue", "redeem", "counted", "challenge", "query", "flood")
#: A signed request older than this is signed afresh (the server allows 300 s of skew).
RESIGN_AFTER_S = 240
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited early")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def process_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open descriptors) of a process."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


#: PostgreSQL's own processes that work for every database (the rest are backends, one a client).
_POSTGRES_AUXILIARY = ("checkpointer", "background writer", "walwriter", "wal writer", "autovacuum")


def postgres_cpu(database: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL process working for `database`: its backends (the service's
    pool) and the server's auxiliary processes. Compared pid by pid between two readings, so a
    backend that exits meanwhile (another client's, or the bench's own psql) is neither counted
    nor subtracted; the machine-wide sum went negative when other clients' backends exited."""
    out: dict[int, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        if not name.startswith("postgres"):
            continue
        if f" {database} " in title or any(aux in title for aux in _POSTGRES_AUXILIARY):
            fields = rest.split()
            out[int(proc.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `postgres_cpu` readings, by the processes alive at the second."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


class Postgres:
    """A throwaway PostgreSQL database for one run, read with `psql` (the bench's own reads)."""

    def __init__(self, dsn: str) -> None:
        self.server = dsn.rsplit("/", 1)[0]
        self.name = f"bench_api_{secrets.token_hex(4)}"
        self.url = f"{self.server}/{self.name}"
        self._psql(dsn, f"CREATE DATABASE {self.name}")

    def _psql(self, url: str, sql: str) -> list[list[str]]:
        out = subprocess.run(
            ["psql", "-X", "-A", "-t", "-F", "\t", "-d", url, "-c", sql],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def query(self, sql: str) -> list[list[str]]:
        return self._psql(self.url, sql)

    def drop(self) -> None:
        self._psql(f"{self.server}/postgres", f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


class AuditTables:
    """The bench's read-only look at the audit log, in SQLite (the file) or PostgreSQL."""

    def __init__(self, sqlite_file: Path, postgres: Postgres | None) -> None:
        self.file = sqlite_file
        self.postgres = postgres

    def _rows(self, sql: str, *args: int) -> list[tuple[Any, ...]]:
        if self.postgres is None:
            with sqlite3.connect(f"file:{self.file}?mode=ro", uri=True) as conn:
                return [tuple(r) for r in conn.execute(sql, args).fetchall()]
        # psql takes no bound parameters; the bench's only ones are its own integer indices.
        text = sql.replace("?", "{}").format(*(int(a) for a in args))
        return [tuple(r) for r in self.postgres.query(text)]

    def size(self) -> int:
        return int(self._rows("SELECT size FROM audit_head")[0][0])

    def growth(self, since: int) -> AuditGrowth:
        ((events, leaf_bytes),) = self._rows(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(leaf)), 0) FROM audit_events WHERE idx >= ?", since
        )
        ((allowed, refused),) = self._rows(
            "SELECT COALESCE(SUM(CASE WHEN outcome = 'allowed' THEN 1 ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN outcome != 'allowed' THEN 1 ELSE 0 END), 0)"
            " FROM audit_events WHERE idx >= ? AND action NOT IN ('http.refusals', 'audit.heartbeat')",
            since,
        )
        if self.postgres is None:
            leaves = [
                bytes(r[0])
                for r in self._rows(
                    "SELECT leaf FROM audit_events WHERE idx >= ? AND action = 'http.refusals'", since
                )
            ]
        else:
            leaves = [
                bytes.fromhex(r[0])
                for r in self._rows(
                    "SELECT encode(leaf, 'hex') FROM audit_events"
                    " WHERE idx >= ? AND action = 'http.refusals'",
                    since,
                )
            ]
        suppressed = sum(int(json.loads(leaf)["details"]["suppressed"]) for leaf in leaves)
        return AuditGrowth(int(events), int(allowed), int(refused), len(leaves), suppressed, int(leaf_bytes))

    def bytes(self) -> int:
        """The bytes of the pages holding the audit log: events, tree nodes, checkpoints and their
        indexes (SQLite's dbstat, the write-ahead log read through; PostgreSQL's relation sizes).
        Other tables, such as the nonces of signed requests, are left out."""
        if self.postgres is None:
            sql = (
                "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat"
                " WHERE name LIKE 'audit%' OR name LIKE 'sqlite_autoindex_audit%'"
            )
        else:
            sql = (
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " WHERE c.relkind = 'r' AND c.relname LIKE 'audit%'"
            )
        return int(self._rows(sql)[0][0])


@dataclass(frozen=True)
class AuditGrowth:
    """The events appended since some index, by kind, and their leaves' bytes."""

    events: int
    allowed: int
    refused: int
    summaries: int
    suppressed: int
    leaf_bytes: int


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


# -- requests: signed ahead of time, sent as raw HTTP/1.1 -----------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    """One kind of request; `signer` (seed, key id) if it must be signed, each time anew."""

    method: str
    url: str
    body: bytes = b""
    content_type: str | None = None
    signer: tuple[bytes, str] | None = None
    #: (the service's proof key, the link's id): each request carries a fresh `?proof=`, as the
    #: recipient gets one from the link's challenge, so each opens (and counts) a session.
    prover: tuple[bytes, str] | None = None


def _wire(method: str, url: str, headers: dict[str, str], body: bytes) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class FastSigner:
    """RFC 9421 signatures as `exchange.client.signing.sign_headers` makes them, byte for byte
    (Ed25519 is deterministic; checked against it once), at a twentieth of the cost."""

    def __init__(self, seed: bytes, key_id: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.key_id = key_id

    def headers(self, spec: RequestSpec, *, created: int, nonce: str) -> dict[str, str]:
        digest = "sha-256=:" + base64.b64encode(hashlib.sha256(spec.body).digest()).decode() + ":"
        params = (
            '("@method" "@target-uri" "content-digest")'
            f';created={created};keyid="{self.key_id}";alg="ed25519";nonce="{nonce}"'
        )
        base = (
            f'"@method": {spec.method}\n"@target-uri": {spec.url}\n"content-digest": {digest}\n'
            f'"@signature-params": {params}'
        )
        signature = base64.b64encode(self._key.sign(base.encode())).decode()
        out = {"Content-Type": spec.content_type} if spec.content_type else {}
        return out | {
            "Content-Digest": digest,
            "Signature-Input": f"exchange={params}",
            "Signature": f"exchange=:{signature}:",
        }

    def wire(self, spec: RequestSpec) -> bytes:
        headers = self.headers(spec, created=int(time.time()), nonce=secrets.token_urlsafe(18))
        return _wire(spec.method, spec.url, headers, spec.body)


def check_fast_signer(identity: Identity) -> None:
    import datetime

    spec = RequestSpec("POST", "http://127.0.0.1:1/v1/links?x=1", b'{"a": 1}', "application/json")
    created, nonce = 1_700_000_000, "n" * 24
    slow = sign_headers(
        identity,
        method=spec.method,
        url=spec.url,
        body=spec.body,
        headers={"Content-Type": "application/json"},
        created=datetime.datetime.fromtimestamp(created, datetime.UTC),
        nonce=nonce,
    )
    fast = FastSigner(identity.signing_seed, identity.key_id).headers(spec, created=created, nonce=nonce)
    if fast != slow:
        raise SystemExit(f"the benchmark's signer disagrees with the client's:\n{fast}\n{slow}")


def _proved(spec: RequestSpec) -> bytes:
    """The request with a fresh link proof, minted with the service's own key: what the link's
    challenge would have given the recipient, without the round trip (the challenge has a
    scenario of its own)."""
    assert spec.prover is not None
    key, link_id = spec.prover
    proof = make_proof(key, link_id, time.time_ns() // 1_000_000)
    return _wire(spec.method, f"{spec.url}?proof={proof}", {}, spec.body)


class Source:
    """Request bytes to send: the same bytes each time, or freshly signed ones from a pool."""

    def __init__(self, spec: RequestSpec, presign: int) -> None:
        self.spec = spec
        self.signed_in_window = 0
        self._make: Callable[[RequestSpec], bytes]
        if spec.prover is not None:
            self._fixed = None
            self._make = _proved
            self._pool = [_proved(spec) for _ in range(presign)]
            self._pool.reverse()
            self._signed_at = time.monotonic()
        elif spec.signer is None:
            self._fixed: bytes | None = _wire(
                spec.method,
                spec.url,
                {"Content-Type": spec.content_type} if spec.content_type else {},
                spec.body,
            )
            self._pool: list[bytes] = []
        else:
            self._fixed = None
            self._make = FastSigner(*spec.signer).wire
            self._pool = [self._make(spec) for _ in range(presign)]
            self._pool.reverse()
            self._signed_at = time.monotonic()

    def next(self) -> bytes:
        if self._fixed is not None:
            return self._fixed
        if self._pool and time.monotonic() - self._signed_at < RESIGN_AFTER_S:
            return self._pool.pop()
        self.signed_in_window += 1
        return self._make(self.spec)


@dataclass(frozen=True)
class Stream:
    """`connections` keep-alive connections sending `spec`: each as soon as the last answer came
    (closed loop: the throughput ceiling), or, with `rate`, at that many requests a second in all
    (open loop: the latency at a given load). `presign`: signed requests prepared ahead."""

    name: str
    spec: RequestSpec
    connections: int
    presign: int = 0
    rate: float | None = None
    #: The address the connections are made from (another loopback address is another source).
    local_addr: str | None = None


@dataclass
class StreamResult:
    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    signed_in_window: int = 0

    @property
    def answered(self) -> int:
        return len(self.latencies)

    def count(self, low: int, high: int) -> int:
        return sum(n for s, n in self.statuses.items() if low <= s < high)

    def rps(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        lat = sorted(self.latencies) or [0.0]
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000


class Pacer:
    """Send times for an open-loop stream: request n is due at start + n / rate, whether or not
    the answers before it have come. Latency counts from the due time, so a server that falls
    behind shows it in p99 (no coordinated omission) instead of quietly slowing the generator."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.perf_counter()
        self.sent = 0

    def next_due(self) -> float:
        self.sent += 1
        return self.start + self.sent / self.rate


async def _connection(
    host: str,
    port: int,
    source: Source,
    result: StreamResult,
    stop: float,
    pacer: Pacer | None,
    local_addr: str | None,
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    bind = (local_addr, 0) if local_addr else None
    while time.monotonic() < stop:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port, local_addr=bind)
            assert reader is not None
            data = source.next()
            if pacer is None:
                started = time.perf_counter()
            else:
                started = pacer.next_due()
                if started > stop - time.monotonic() + time.perf_counter():
                    break  # due after the window
                if (delay := started - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
            writer.write(data)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif name == b"transfer-encoding":
                    raise ValueError("chunked answers are not read by this generator")
            if length:
                await reader.readexactly(length)
            result.latencies.append(time.perf_counter() - started)
            result.statuses[status] += 1
            if close:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            result.errors += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


def generate(streams: list[Stream], host: str, port: int, seconds: float) -> list[StreamResult]:
    """The load generator, in a process of its own: every stream runs at once for `seconds`."""
    sources = [Source(stream.spec, stream.presign) for stream in streams]

    async def main() -> list[StreamResult]:
        results = [StreamResult(stream.name) for stream in streams]
        stop = time.monotonic() + seconds
        started = time.monotonic()
        pacers = [None if stream.rate is None else Pacer(stream.rate) for stream in streams]
        await asyncio.gather(
            *(
                _connection(host, port, source, result, stop, pacer, stream.local_addr)
                for stream, source, result, pacer in zip(streams, sources, results, pacers, strict=True)
                for _ in range(stream.connections)
            )
        )
        for source, result in zip(sources, results, strict=True):
            result.seconds = time.monotonic() - started
            result.signed_in_window = source.signed_in_window
        return results

    return asyncio.run(main())


def ceiling_app(port: int) -> None:
    """The bare handler: what aiohttp itself does on this machine, for comparison."""
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/", ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the stack --------------------------------------------------------------------------------------


@dataclass
class Fixture:
    """What the scenarios use: the principals and the links."""

    admin: Identity
    developer: Identity
    tester: Identity
    artifact: str
    session_token: str
    session: str
    counted_token: str
    counted_link: str
    proof_key: bytes


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.postgres = Postgres(args.postgres_dsn) if args.database == "postgresql" else None
        self.audit = AuditTables(work / "exchange.db", self.postgres)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen[bytes] | None = None
        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def start_server(self, env: dict[str, str], *, profile: str | None = None) -> None:
        log = (self.work / "serve.log").open("a")
        cmd = [*EXCHANGE, "serve"]
        if profile:
            cmd = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "exchange.cli", "serve"]
        self.server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/healthz", self.server)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.send_signal(signal.SIGINT)
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.server = None

    async def run(
        self,
        streams: list[Stream],
        seconds: float,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> list[StreamResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, generate, streams, host, port or self.port, seconds)


async def setup(url: str, admin: Identity, work: Path) -> Fixture:
    """A developer and a tester (other organisation) enrolled through invites, a small artifact
    uploaded and granted, one link with an open download session and one without a limit."""
    async with Client(url, admin) as c:
        for org in ("dev", "test"):
            await c.create_org(org)
        invites = {
            "dev": await c.create_invite(role="developer", org="dev"),
            "tess": await c.create_invite(role="tester", org="test"),
        }
    ids = {name: Identity.generate() for name in invites}
    async with Client(url) as anon:
        for name, invite in invites.items():
            await anon.enroll(invite["code"], name, ids[name])
    model = work / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(256 * 1024))
    (model / "config.json").write_text('{"layers": 2}')
    async with Client(url, ids["dev"]) as dev:
        artifact = await upload(dev, model)
        await links_api.grant(dev, artifact, "tess")
        session_link = await links_api.create_link(dev, artifact, "tess", expires_in_s=86400)
        counted_link = await links_api.create_link(dev, artifact, "tess", expires_in_s=86400)
    _, session_token = links_api.split_link(session_link["url"])
    _, counted_token = links_api.split_link(counted_link["url"])
    async with Client(url, ids["tess"]) as tess:
        # A counted session needs a proof that the recipient holds its key (the link's challenge).
        opened = await links_api.open_session(
            tess, session_token, proof=await links_api.prove(tess, session_token)
        )
    # The key the service makes link proofs with: derived from its log key, in its home.
    signer = load_or_create_signer(work / "log-signing.key", "exchange.local/audit")
    return Fixture(
        admin,
        ids["dev"],
        ids["tess"],
        artifact,
        session_token,
        str(opened["session"]),
        counted_token,
        str(counted_link["id"]),
        ProofKeys.from_signer(signer, max_age_s=600).mac_key,
    )


def signed(identity: Identity, method: str, url: str, body: dict[str, Any] | None = None) -> RequestSpec:
    data = b"" if body is None else json.dumps(body).encode()
    return RequestSpec(
        method,
        url,
        data,
        "application/json" if body is not None else None,
        (identity.signing_seed, identity.key_id),
    )


HEADER = (
    f"{'scenario':<40} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'srv CPU ms/req':>14}"
    f"   statuses, server RSS MiB and fds before->after"
)


def report(
    result: StreamResult, cpu: float | None, stats: tuple[tuple[float, int], tuple[float, int]] | None
) -> str:
    per = f"{cpu / result.answered * 1000:14.2f}" if cpu is not None and result.answered else f"{'-':>14}"
    statuses = ",".join(f"{s}:{n}" for s, n in sorted(result.statuses.items()))
    line = (
        f"{result.name:<40} {result.rps():7.0f} {result.percentile(0.5):7.1f} {result.percentile(0.99):7.1f}"
        f" {per}   {statuses} errors:{result.errors}"
    )
    if stats:
        (rss0, fds0), (rss1, fds1) = stats
        line += f"  RSS {rss0:.0f}->{rss1:.0f} fds {fds0}->{fds1}"
    if result.signed_in_window:
        line += f"  ({result.signed_in_window} signed in the window)"
    return line


async def scenario(
    bench: Bench,
    name: str,
    spec: RequestSpec,
    *,
    seconds: float,
    concurrency: int,
    writes: bool,
    presign: int = 0,
    events_per_success: int = 1,
    rate: float | None = None,
) -> StreamResult:
    assert bench.server is not None
    pid = bench.server.pid
    events0 = bench.audit.size()
    stats0, cpu0, threads0 = process_stats(pid), cpu_seconds(pid), thread_cpu_seconds(pid)
    pg0 = postgres_cpu(bench.postgres.name) if bench.postgres else {}
    (result,) = await bench.run([Stream(name, spec, concurrency, presign, rate)], seconds)
    cpu1, stats1, threads1 = cpu_seconds(pid), process_stats(pid), thread_cpu_seconds(pid)
    pg1 = postgres_cpu(bench.postgres.name) if bench.postgres else {}
    print(report(result, cpu1 - cpu0, (stats0, stats1)), flush=True)
    if result.answered:
        loop = threads1.get(pid, 0.0) - threads0.get(pid, 0.0)
        pg = cpu_delta(pg0, pg1)
        database = f", PostgreSQL {pg / result.answered * 1000:.2f}" if bench.postgres else ""
        print(
            f"{'':<40} CPU ms/request: {loop / result.answered * 1000:.2f} in the event loop,"
            f" {(cpu1 - cpu0 - loop) / result.answered * 1000:.2f} in other threads (database, storage)"
            f"{database}",
            flush=True,
        )
    if writes:
        # Each success is one event; refusals are events of their own up to the allowance, the
        # rest (a 429 always) counted into summaries, some pending until their window ends.
        grown = bench.audit.growth(events0)
        ok = result.count(200, 400)
        refused = result.answered - ok
        verdict = "equal" if grown.allowed == ok * events_per_success else "MISMATCH"
        each = f" x {events_per_success}" if events_per_success != 1 else ""
        print(
            f"{'':<40} audit events +{grown.events}: {grown.allowed} for {ok} successes{each} ({verdict});"
            f" {refused} refusals: {grown.refused} events of their own, {grown.suppressed} counted in"
            f" {grown.summaries} summaries so far",
            flush=True,
        )
    return result


def accounted(bench: Bench, since: int, refused: int) -> str:
    """After the server stopped (its last summaries written): do events and counts add up?"""
    grown = bench.audit.growth(since)
    total = grown.refused + grown.suppressed
    verdict = "equal" if total == refused else "MISMATCH"
    return (
        f"{refused} refusals: {grown.refused} events of their own + {grown.suppressed} counted in"
        f" {grown.summaries} summaries = {total}: {verdict}"
    )


async def run(args: argparse.Namespace, work: Path) -> None:
    store = SeaweedFS(
        work / "storage",
        credentials=S3Credentials.generate(),
        service_credentials=S3Credentials.generate(),  # the service's least-privilege keys
        bucket="exchange",
    )
    store.start()
    bench = Bench(args, work)
    ceiling_proc: subprocess.Popen[bytes] | None = None
    try:
        store.ensure_bucket("exchange")
        env = (
            {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
            | {
                "EXCHANGE_HOME": str(work),
                "EXCHANGE_PORT": str(bench.port),
                "EXCHANGE_S3_ENDPOINT": store.endpoint,
                "EXCHANGE_S3_ACCESS_KEY_ID": store.service_credentials.access_key_id,
                "EXCHANGE_S3_SECRET_ACCESS_KEY": store.service_credentials.secret_access_key,
            }
            | ({"EXCHANGE_DATABASE_URL": bench.postgres.url} if bench.postgres else {})
        )
        admin_path = work / "admin.identity"
        subprocess.run(
            [*EXCHANGE, "--identity", str(admin_path), "init"], env=env, check=True, capture_output=True
        )
        admin = Identity.load(admin_path)
        check_fast_signer(admin)
        bench.start_server(env)
        url = bench.url
        fx = await setup(url, admin, work)
        seconds, conc = args.duration, args.concurrency
        presign = args.presign
        load = os.getloadavg()
        print(
            f"{conc} connections, {seconds:.0f} s per scenario,"
            f" {'PostgreSQL' if bench.postgres else 'SQLite (synchronous=FULL)'},"
            f" {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        session_file = RequestSpec("GET", f"{url}/l/{fx.session_token}/files/0?session={fx.session}")
        counted_file = RequestSpec(
            "GET", f"{url}/l/{fx.counted_token}/files/0", prover=(fx.proof_key, fx.counted_link)
        )
        challenge = RequestSpec("GET", f"{url}/l/{fx.counted_token}/challenge")
        issue = signed(
            fx.developer,
            "POST",
            url + "/v1/links",
            {"artifact": fx.artifact, "recipient": "tess", "expires_in_s": 3600},
        )
        query = signed(admin, "GET", url + "/v1/audit/events?actor=dev&action=link.create&limit=20")

        print("\nat the default redemption limits (EXCHANGE_REDEEM_*: 120/min and burst 60 per address):")
        print(HEADER)
        events0 = bench.audit.size()
        limited = await scenario(
            bench,
            "GET /l/T/files/0?session= (default)",
            session_file,
            seconds=min(seconds, 5),
            concurrency=conc,
            writes=True,
        )
        bench.stop_server()
        refused = limited.answered - limited.count(200, 400)
        print(f"{'':<40} after stopping: {accounted(bench, events0, refused)}")
        bench.start_server(env | RAISED_LIMITS, profile=args.profile)
        print(f"\nredemption limits raised for one loopback client ({', '.join(RAISED_LIMITS)}=10^8):")

        if args.soak:
            await soak(bench, args.soak, conc, [issue, session_file, query], presign)
            return

        ceiling_port = free_port()
        code = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import _bench_api; _bench_api.ceiling_app({ceiling_port})"
        )
        ceiling_proc = subprocess.Popen([sys.executable, "-c", code])
        wait_http(f"http://127.0.0.1:{ceiling_port}/", ceiling_proc)
        print(HEADER)
        (ceiling,) = await bench.run(
            [Stream("bare aiohttp (ceiling)", RequestSpec("GET", f"http://127.0.0.1:{ceiling_port}/"), conc)],
            seconds,
            port=ceiling_port,
        )
        print(report(ceiling, cpu=None, stats=None), flush=True)
        chosen = set(args.only.split(",")) if args.only else None
        # A counted redemption opens a session (link.session) and redirects (link.file): two events.
        plan: list[tuple[str, str, RequestSpec, bool]] = [
            ("healthz", "GET /healthz (unsigned)", RequestSpec("GET", url + "/healthz"), False),
            ("whoami", "GET /v1/whoami (signed)", signed(fx.developer, "GET", url + "/v1/whoami"), False),
            (
                "invite",
                "POST /v1/invites (signed, +event)",
                signed(admin, "POST", url + "/v1/invites", {"role": "tester", "org": "test"}),
                True,
            ),
            ("issue", "POST /v1/links (signed, +event)", issue, True),
            ("redeem", "GET /l/T/files/0?session= (+event)", session_file, True),
            ("counted", "GET /l/T/files/0?proof= counted (+session)", counted_file, True),
            ("challenge", "GET /l/T/challenge (age-encrypted, +event)", challenge, True),
            ("query", "GET /v1/audit/events (signed, +event)", query, True),
        ]
        closed: list[tuple[str, str, RequestSpec, bool, float | None]] = [
            (key, name, spec, writes, None) for key, name, spec, writes in plan
        ]
        paced: list[tuple[str, str, RequestSpec, bool, float | None]] = [
            (key, f"{name.split(' (')[0]} at {args.rates[key]:.0f}/s", spec, writes, args.rates[key])
            for key, name, spec, writes in plan
            if key in args.rates
        ]
        open_loop_shown = False
        for key, name, spec, writes, rate in closed + paced:
            if (chosen is not None and key not in chosen) or key == "flood":
                continue
            if rate is not None and not open_loop_shown:
                open_loop_shown = True
                print(
                    f"\nopen loop: sent at a fixed rate over {conc} connections, latency from each send time"
                )
                print(HEADER)
            await scenario(
                bench,
                name,
                spec,
                seconds=seconds,
                concurrency=conc,
                writes=writes,
                presign=presign,
                events_per_success=2 if key == "counted" else 1,
                rate=rate,
            )
        if chosen is None or "flood" in chosen:
            await flood(bench, fx, seconds=seconds, concurrency=conc, presign=presign, rate=args.flood_rate)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        bench.pool.shutdown(cancel_futures=True)
        bench.stop_server()
        if ceiling_proc is not None:
            ceiling_proc.send_signal(signal.SIGTERM)
            try:
                ceiling_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                ceiling_proc.kill()
        store.stop()
        if bench.postgres is not None:
            bench.postgres.drop()


async def flood(
    bench: Bench, fx: Fixture, *, seconds: float, concurrency: int, presign: int, rate: float | None
) -> None:
    """Signed requests from 127.0.0.2 alone, then beside an unsigned flood from 127.0.0.1; what the
    flood added to the log once the server has stopped (and written its last summaries)."""
    assert bench.server is not None
    url, pid = bench.url, bench.server.pid
    signed_spec = signed(fx.developer, "GET", url + "/v1/whoami")
    unsigned = RequestSpec("GET", url + "/v1/whoami")
    signed_name = "signed GET /v1/whoami from 127.0.0.2"
    print(f"\nflood: /proc/loadavg before: {loadavg()}")
    print(HEADER)
    (baseline,) = await bench.run(
        [
            Stream(
                f"{signed_name} (alone)",
                signed_spec,
                FLOOD_SIGNED_CONNECTIONS,
                presign,
                local_addr="127.0.0.2",
            )
        ],
        seconds,
    )
    print(report(baseline, None, None), flush=True)
    events0, bytes0, cpu0 = bench.audit.size(), bench.audit.bytes(), cpu_seconds(pid)
    how = f"at {rate:.0f}/s" if rate else "closed loop"
    signed_result, flooded = await bench.run(
        [
            Stream(
                f"{signed_name} (flood)",
                signed_spec,
                FLOOD_SIGNED_CONNECTIONS,
                presign,
                local_addr="127.0.0.2",
            ),
            Stream(
                f"unsigned flood from 127.0.0.1, {how}",
                unsigned,
                concurrency,
                rate=rate,
                local_addr="127.0.0.1",
            ),
        ],
        seconds,
    )
    cpu = cpu_seconds(pid) - cpu0
    print(report(signed_result, None, None))
    print(report(flooded, None, None), flush=True)
    during = bench.audit.growth(events0)
    bench.stop_server()  # its last summaries are written on the way out
    grown = bench.audit.growth(events0)
    ratio = signed_result.rps() / baseline.rps() if baseline.rps() else 0.0
    refused = flooded.answered - flooded.count(200, 400)
    total = signed_result.answered + flooded.answered
    print(
        f"signed throughput beside the flood: {signed_result.rps():.0f}/s,"
        f" {ratio:.0%} of {baseline.rps():.0f}/s alone; server CPU {cpu:.1f} s for {total} requests"
    )
    grew = bench.audit.bytes() - bytes0
    print(
        f"audit events added by {flooded.answered} flood answers in {seconds:.0f} s:"
        f" +{during.events} while it ran, +{grown.events} once the server stopped"
        f" ({grown.summaries} summaries); leaf bytes +{grown.leaf_bytes:,}; audit pages +{grew:,} bytes"
    )
    print(f"every refusal accounted for: {accounted(bench, events0, refused)}")
    print(f"flood: /proc/loadavg after: {loadavg()}")


#: Connections of the signed client beside the flood (and of its baseline).
FLOOD_SIGNED_CONNECTIONS = 8


async def soak(bench: Bench, seconds: float, conc: int, specs: list[RequestSpec], presign: int) -> None:
    """Issuance, redemption and audit queries at once for `seconds`; RSS and descriptors sampled."""
    assert bench.server is not None
    pid = bench.server.pid
    names = ["POST /v1/links (soak)", "GET /l/T/files/0?session= (soak)", "GET /v1/audit/events (soak)"]
    share = [max(1, conc // 4), max(1, conc // 2), max(1, conc // 4)]
    streams = [Stream(n, s, c, presign) for n, s, c in zip(names, specs, share, strict=True)]
    events0, cpu0 = bench.audit.size(), cpu_seconds(pid)
    samples = [(0.0, *process_stats(pid))]
    started = time.monotonic()
    task = asyncio.ensure_future(bench.run(streams, seconds))
    while not task.done():
        await asyncio.wait([task], timeout=min(30.0, max(1.0, seconds / 20)))
        samples.append((time.monotonic() - started, *process_stats(pid)))
    results = task.result()
    cpu = cpu_seconds(pid) - cpu0
    print(
        f"soak of {seconds:.0f} s, {conc} connections;"
        f" load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(HEADER)
    total = sum(r.answered for r in results)
    for r in results:
        print(report(r, None, None))  # the server's CPU is one figure for the mix, below
    grown = bench.audit.size() - events0
    print(f"audit events +{grown} for {total} answers: {'equal' if grown == total else 'MISMATCH'}")
    print(f"server CPU {cpu:.1f} s for {total} requests: {cpu / max(total, 1) * 1000:.2f} ms/request")
    print(
        "server RSS MiB / fds over time: " + ", ".join(f"{t:.0f}s {rss:.0f}/{fds}" for t, rss, fds in samples)
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench-api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", default="10s", help="time per scenario: 10s, 1m (default 10s)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument(
        "--soak", default=None, help="instead: issuance, redemption and queries at once, e.g. 10m"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"scenarios, comma-separated: {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--presign", type=int, default=20000, help="signed requests prepared per scenario (default 20000)"
    )
    parser.add_argument(
        "--rates",
        default="issue=300,redeem=1000",
        help="open-loop runs at these request rates, e.g. issue=300,redeem=1000 (the issue's targets;"
        " empty for none)",
    )
    parser.add_argument(
        "--profile", default=None, help="write a cProfile of the server (limits raised) to this file"
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the service's database (default sqlite; postgresql: a throwaway database on"
        " --postgres-dsn's server, dropped afterwards, and its CPU per request reported)",
    )
    parser.add_argument(
        "--postgres-dsn",
        default=os.environ.get("EXCHANGE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL server to create the throwaway database on (default: the tests' DSN)",
    )
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=None,
        help="send the flood scenario's unsigned requests at this rate (default: closed loop)",
    )
    args = parser.parse_args()
    args.duration = float(parse_duration(args.duration))
    args.soak = float(parse_duration(args.soak)) if args.soak else None
    try:
        args.rates = {
            key.strip(): float(value)
            for key, _, value in (p.partition("=") for p in args.rates.split(",") if p)
        }
    except ValueError:
        parser.error("--rates takes scenario=requests-per-second pairs, e.g. issue=300,redeem=1000")
    if any(rate <= 0 for rate in args.rates.values()):
        parser.error("--rates must be positive")
    named = set(args.rates) | (set(args.only.split(",")) if args.only else set())
    if unknown := named - set(SCENARIOS):
        parser.error(f"no such scenario: {', '.join(sorted(unknown))} (there are {','.join(SCENARIOS)})")
    with tempfile.TemporaryDirectory(prefix="exchange-bench-api-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()

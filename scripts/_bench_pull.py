"""scripts/bench-pull: what N testers pulling one big artifact through links cost the service,
against what they cost the storage, measured on a real stack and extrapolated.

The parent starts a throwaway SeaweedFS (the service on its least-privilege keys), `exchange init`
and `exchange serve` (SQLite, or `--database postgresql`: a throwaway database on the tests'
server, dropped afterwards) with its metrics listener on, in a temporary directory. Through the
SDK it enrols a developer and `--testers` testers (another organisation) through invites, uploads
one artifact of `--files` random files adding up to `--size`, grants it to every tester and makes
one link for each. Then every tester downloads through its link by the real client path
(`exchange.client.links.download_link`, what `exchange download URL` calls): challenge, proof,
counted session, ranged GETs decrypted and verified against the signed manifest, URLs renewed
within the session as they age, receipt; `--parallel` testers at a time, each with a client (and
connections) of its own, each GET stream paced to `--rate-limit` so that a download of a few
hundred MiB lasts long enough for its URLs to be renewed (`--presign-ttl` sets
EXCHANGE_LINK_PRESIGN_TTL_S for the run; the client renews 30 s before a URL expires).

Measured over the downloads, in all and per download: the service's requests by route and status
(deltas of `exchange_http_requests_total` on /metrics), audit events by action and rows added per
table (read from the database), the database's bytes (the pages of every table and index) and
the events' leaf bytes, presigned URLs (counted in the session answers the testers got, checked
against files x (sessions + renewals) from the log), the HTTP bytes between testers and service
(headers and bodies, client side), the service's CPU seconds (/proc/PID/stat; PostgreSQL's too),
storage GETs and bytes (counted where the download engine sends its ranged GETs, and SeaweedFS's
CPU), wall time and the load average. Renewals are measured as the log has them: the time from
each session's opening to its first renewal and between renewals, and their number per
download-second.

Then one session is renewed `--renewal-probe` times alone, which measures what one renewal costs
(requests, events, rows, bytes, CPU, URLs); the fixed cost of a download is the run's total less
its renewals at that price, divided by the testers. The extrapolation prints, for T testers
pulling S bytes at R bytes/s each (D = S/R seconds of download), every figure as
T x (fixed + n x per renewal), n = D / I renewals per download, I the measured interval moved to
the extrapolated presign TTL (I + TTL_x - TTL_run), beside the storage's T x parts GETs and
T x S bytes, with each formula next to its number.

To count storage traffic, the bench swaps the download engine's HTTP client for a subclass that
counts (and paces) what passes through, and wraps `links.open_session` to count the URLs each
answer holds; both call the real code. Redemption rate limits are raised for the run: every
tester here shares one loopback address, where real testers each have their own.

What this bench does not do: assert anything about speed; measure the storage's own request
accounting (the GETs are counted at the client, which sends every one of them); count the
checkpoints published meanwhile into the per-download figures (at most one per
EXCHANGE_AUDIT_CHECKPOINT_INTERVAL_S however many testers: shown apart); or model many service
replicas or the uploads (one upload, outside the measured window).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _bench_api import (
    EXCHANGE,
    RAISED_LIMITS,
    Postgres,
    cpu_delta,
    cpu_seconds,
    free_port,
    loadavg,
    postgres_cpu,
    wait_http,
)
from prometheus_client.parser import text_string_to_metric_families

from exchange.client import Client, _download
from exchange.client import artifacts as artifacts_api
from exchange.client import links as links_api
from exchange.client._storage_http import StorageHTTP
from exchange.client.transfer import upload
from exchange.dev.seaweed import S3Credentials, SeaweedFS
from exchange.durations import parse_duration
from exchange.format import age
from exchange.format.manifest import choose_part_size, part_count
from exchange.identity import Identity
from exchange.settings import Settings
from exchange.sizes import format_size, parse_size

#: The client renews a session's URLs this long before they expire.
MARGIN_S = _download._URLRefresher._MARGIN_S
#: Tables whose growth follows time, not downloads: one checkpoint per interval while the log grows.
TIME_DRIVEN_TABLES = frozenset({"audit_checkpoints"})


# -- counting what the testers send -----------------------------------------------------------------


class StorageMeter:
    """Storage GETs and the bytes read from their answers, over every tester's download engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gets = 0
        self.bytes = 0
        #: Answers of 300 or more (an expired URL, a refusal): counted, and retried by the engine.
        self.failed = 0
        #: Per-download pace in bytes/s (None: as fast as it goes).
        self.rate: float | None = None

    def count_get(self, status: int) -> None:
        with self._lock:
            self.gets += 1
            self.failed += status >= 300

    def count_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def snapshot(self) -> tuple[int, int, int]:
        with self._lock:
            return self.gets, self.bytes, self.failed


METER = StorageMeter()


class _Pace:
    """Read times for one download: n bytes may be read n / rate seconds after the last ones."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def wait(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self._rate
            delay = self._next - now
        if delay > 0:
            time.sleep(delay)


class _MeteredAnswer:
    """A storage answer whose body reads are counted, and paced when the run asks for it."""

    def __init__(self, resp: Any, pace: _Pace | None) -> None:
        self._resp = resp
        self._pace = pace

    def _took(self, n: int) -> None:
        METER.count_bytes(n)
        if self._pace is not None and n:
            self._pace.wait(n)

    def readinto(self, buffer: Any) -> int:
        n = int(self._resp.readinto(buffer) or 0)
        self._took(n)
        return n

    def read(self, amt: int | None = None) -> bytes:
        data: bytes = self._resp.read(amt)
        self._took(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resp, name)


class MeteredStorageHTTP(StorageHTTP):
    """The download engine's storage client (one per download), counting every GET it sends."""

    def __init__(self, *, timeout_s: float = 120.0) -> None:
        super().__init__(timeout_s=timeout_s)
        self._pace = _Pace(METER.rate) if METER.rate else None

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        resp = super().request(method, url, **kwargs)
        if method != "GET":
            return resp
        METER.count_get(resp.status)
        return _MeteredAnswer(resp, self._pace)


@dataclass
class SessionAnswers:
    """What the session answers held: URLs handed out, and the sessions opened."""

    urls: int = 0
    answers: int = 0
    sessions: list[tuple[str, str]] = field(default_factory=list)  # (token, session)


ANSWERS = SessionAnswers()
_real_open_session = links_api.open_session


async def _counted_open_session(
    client: Client, token: str, *, proof: str | None = None, session: str | None = None
) -> dict[str, Any]:
    info = await _real_open_session(client, token, proof=proof, session=session)
    ANSWERS.answers += 1
    ANSWERS.urls += sum(1 for f in info["files"] if f.get("url"))
    if session is None:
        ANSWERS.sessions.append((token, str(info["session"])))
    return info


def install_meters() -> None:
    """Count through the real code: the engine builds its storage client from
    `_download.StorageHTTP`, and both the first session and every renewal go through
    `links.open_session`, looked up in the module at each call."""
    setattr(_download, "StorageHTTP", MeteredStorageHTTP)  # noqa: B010 - a module attribute, on purpose
    setattr(links_api, "open_session", _counted_open_session)  # noqa: B010


@dataclass
class WireBytes:
    """HTTP bytes between testers and the service, seen by the testers' clients: request lines,
    headers and bodies both ways (the status line and headers of each answer as received)."""

    sent: int = 0
    received: int = 0

    def trace(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def chunk_sent(_s: Any, _c: Any, params: aiohttp.TraceRequestChunkSentParams) -> None:
            self.sent += len(params.chunk)

        async def chunk_received(_s: Any, _c: Any, params: aiohttp.TraceResponseChunkReceivedParams) -> None:
            self.received += len(params.chunk)

        async def request_end(_s: Any, _c: Any, params: aiohttp.TraceRequestEndParams) -> None:
            line = f"{params.method} {params.url.raw_path_qs} HTTP/1.1\r\n"
            self.sent += len(line) + sum(len(k) + len(v) + 4 for k, v in params.headers.items()) + 2
            resp = params.response
            self.received += 17 + sum(len(k) + len(v) + 4 for k, v in resp.raw_headers) + 2

        config.on_request_chunk_sent.append(chunk_sent)
        config.on_response_chunk_received.append(chunk_received)
        config.on_request_end.append(request_end)
        return config


# -- reading the service's side ---------------------------------------------------------------------


def scrape(port: int) -> Counter[str]:
    """`exchange_http_requests_total` by "METHOD route status"."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "exchange_http_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                out[f"{labels['method']} {labels['route']} {labels['status']}"] += int(sample.value)
    return out


class Tables:
    """The bench's read-only look at the service's database: SQLite's file, or psql."""

    def __init__(self, sqlite_file: Path, postgres: Postgres | None) -> None:
        self.file = sqlite_file
        self.postgres = postgres

    def _sqlite(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.file}?mode=ro", uri=True) as conn:
            return [tuple(r) for r in conn.execute(sql, args).fetchall()]

    def _names(self) -> list[str]:
        if self.postgres is None:
            rows = self._sqlite(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
            return sorted(str(r[0]) for r in rows)
        found = self.postgres.query(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        return sorted(r[0] for r in found)

    def rows(self) -> dict[str, int]:
        """Rows of every table. The names come from the catalogue, quoted as identifiers."""
        names = self._names()
        sql = " UNION ALL ".join(
            f"SELECT '{n}', COUNT(*) FROM \"{n}\""  # noqa: S608 - catalogue names, no input
            for n in names
            if n.replace("_", "").isalnum()
        )
        found = self._sqlite(sql) if self.postgres is None else self.postgres.query(sql)
        return {str(name): int(count) for name, count in found}

    def bytes(self) -> int:
        """The bytes of the pages of every table and index (SQLite's dbstat, the write-ahead log
        read through; PostgreSQL's relation sizes, their indexes and TOAST included)."""
        if self.postgres is None:
            return int(self._sqlite("SELECT COALESCE(SUM(pgsize), 0) FROM dbstat")[0][0])
        sql = (
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname = 'public'"
        )
        return int(self.postgres.query(sql)[0][0])

    def log_size(self) -> int:
        sql = "SELECT size FROM audit_head"
        found = self._sqlite(sql) if self.postgres is None else self.postgres.query(sql)
        return int(found[0][0])

    def events(self, since: int) -> list[tuple[int, str, dict[str, Any], int]]:
        """(time_ms, action, details, leaf bytes) of every event from index `since` on."""
        if self.postgres is None:
            rows = self._sqlite(
                "SELECT time_ms, action, leaf FROM audit_events WHERE idx >= ? ORDER BY idx", since
            )
            leaves = [(int(t), str(a), bytes(leaf)) for t, a, leaf in rows]
        else:
            # psql takes no bound parameters: `since` is the bench's own integer.
            where = f"WHERE idx >= {int(since)} ORDER BY idx"
            sql = f"SELECT time_ms, action, convert_from(leaf, 'UTF8') FROM audit_events {where}"  # noqa: S608
            found = self.postgres.query(sql)
            leaves = [(int(t), a, leaf.encode()) for t, a, leaf in found]
        return [(t, a, json.loads(leaf).get("details") or {}, len(leaf)) for t, a, leaf in leaves]


@dataclass
class Snapshot:
    """Everything the bench counts, at one moment."""

    at: float
    requests: Counter[str]
    rows: dict[str, int]
    db_bytes: int
    log_size: int
    service_cpu: float
    postgres_cpu: dict[int, float]
    storage_cpu: float
    storage: tuple[int, int, int]
    urls: int
    wire: tuple[int, int]


@dataclass
class Delta:
    """What grew between two snapshots."""

    seconds: float
    requests: Counter[str]
    rows: Counter[str]
    db_bytes: int
    events: Counter[str]
    leaf_bytes: int
    service_cpu: float
    postgres_cpu: float
    storage_cpu: float
    gets: int
    storage_bytes: int
    failed_gets: int
    urls: int
    wire_sent: int
    wire_received: int
    raw_events: list[tuple[int, str, dict[str, Any], int]]

    def counted_rows(self) -> int:
        return sum(n for t, n in self.rows.items() if t not in TIME_DRIVEN_TABLES)

    def requests_total(self) -> int:
        return sum(self.requests.values())

    def events_total(self) -> int:
        return sum(self.events.values())


class Stack:
    """SeaweedFS and `exchange serve`, and the bench's meters on them."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.work = work
        self.postgres = Postgres(args.postgres_dsn) if args.database == "postgresql" else None
        self.tables = Tables(work / "exchange.db", self.postgres)
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = SeaweedFS(
            work / "storage",
            credentials=S3Credentials.generate(),
            service_credentials=S3Credentials.generate(),  # the service's least-privilege keys
            bucket="exchange",
        )
        self.server: subprocess.Popen[bytes] | None = None
        self.wire = WireBytes()
        self.ttl_s = args.presign_ttl

    def start(self) -> Identity:
        self.store.start()
        self.store.ensure_bucket("exchange")
        env = (
            {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
            | {
                "EXCHANGE_HOME": str(self.work),
                "EXCHANGE_PORT": str(self.port),
                "EXCHANGE_METRICS_PORT": str(self.metrics_port),
                "EXCHANGE_LINK_PRESIGN_TTL_S": str(self.ttl_s),
                "EXCHANGE_S3_ENDPOINT": self.store.endpoint,
                "EXCHANGE_S3_ACCESS_KEY_ID": self.store.service_credentials.access_key_id,
                "EXCHANGE_S3_SECRET_ACCESS_KEY": self.store.service_credentials.secret_access_key,
            }
            | RAISED_LIMITS
            | ({"EXCHANGE_DATABASE_URL": self.postgres.url} if self.postgres else {})
        )
        admin_path = self.work / "admin.identity"
        subprocess.run(
            [*EXCHANGE, "--identity", str(admin_path), "init"], env=env, check=True, capture_output=True
        )
        log = (self.work / "serve.log").open("a")
        self.server = subprocess.Popen([*EXCHANGE, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/healthz", self.server)
        return Identity.load(admin_path)

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.server = None
        self.store.stop()
        if self.postgres is not None:
            self.postgres.drop()

    @asynccontextmanager
    async def client(self, identity: Identity | None) -> AsyncIterator[Client]:
        """A client with connections of its own, its HTTP bytes counted."""
        async with (
            aiohttp.ClientSession(trace_configs=[self.wire.trace()]) as session,
            Client(self.url, identity, session=session) as client,
        ):
            yield client

    def snapshot(self) -> Snapshot:
        assert self.server is not None
        weed = self.store.pid
        return Snapshot(
            at=time.perf_counter(),
            requests=scrape(self.metrics_port),
            rows=self.tables.rows(),
            db_bytes=self.tables.bytes(),
            log_size=self.tables.log_size(),
            service_cpu=cpu_seconds(self.server.pid),
            postgres_cpu=postgres_cpu(self.postgres.name) if self.postgres else {},
            storage_cpu=cpu_seconds(weed) if weed else 0.0,
            storage=METER.snapshot(),
            urls=ANSWERS.urls,
            wire=(self.wire.sent, self.wire.received),
        )

    def delta(self, a: Snapshot, b: Snapshot) -> Delta:
        raw = self.tables.events(a.log_size)
        raw = raw[: b.log_size - a.log_size]
        requests = b.requests.copy()
        requests.subtract(a.requests)
        rows = Counter({t: n - a.rows.get(t, 0) for t, n in b.rows.items()})
        return Delta(
            seconds=b.at - a.at,
            requests=+requests,
            rows=rows,
            db_bytes=b.db_bytes - a.db_bytes,
            events=Counter(action for _, action, _, _ in raw),
            leaf_bytes=sum(n for *_, n in raw),
            service_cpu=b.service_cpu - a.service_cpu,
            postgres_cpu=cpu_delta(a.postgres_cpu, b.postgres_cpu),
            storage_cpu=b.storage_cpu - a.storage_cpu,
            gets=b.storage[0] - a.storage[0],
            storage_bytes=b.storage[1] - a.storage[1],
            failed_gets=b.storage[2] - a.storage[2],
            urls=b.urls - a.urls,
            wire_sent=b.wire[0] - a.wire[0],
            wire_received=b.wire[1] - a.wire[1],
            raw_events=raw,
        )


# -- the run ----------------------------------------------------------------------------------------


def make_files(root: Path, size: int, files: int) -> list[int]:
    """`files` random files adding up to `size` bytes under `root`; their sizes."""
    root.mkdir()
    sizes = [size // files + (1 if i < size % files else 0) for i in range(files)]
    block = 16 * 1024 * 1024
    for i, n in enumerate(sizes):
        with (root / f"shard-{i:05d}.bin").open("wb") as fh:
            left = n
            while left:
                fh.write(os.urandom(min(block, left)))
                left -= min(block, left)
    return sizes


@dataclass
class Fixture:
    artifact: str
    testers: list[tuple[Identity, str]]  # (identity, link token)
    part_size: int
    parts_per_download: int


async def setup(stack: Stack, admin: Identity, args: argparse.Namespace) -> Fixture:
    """A developer and the testers (another organisation) enrolled through invites; the artifact
    uploaded, granted to every tester, one link each."""
    names = [f"tester{i:04d}" for i in range(args.testers)]
    async with stack.client(admin) as c:
        await c.create_org("dev")
        await c.create_org("test")
        dev_invite = await c.create_invite(role="developer", org="dev")
        invites = [await c.create_invite(role="tester", org="test") for _ in names]
    developer = Identity.generate()
    ids = {name: Identity.generate() for name in names}
    async with stack.client(None) as anon:
        await anon.enroll(dev_invite["code"], "dev", developer)
        for name, invite in zip(names, invites, strict=True):
            await anon.enroll(invite["code"], name, ids[name])
    sizes = make_files(stack.work / "model", args.size, args.files)
    tokens = []
    async with stack.client(developer) as dev:
        artifact = await upload(dev, stack.work / "model", kind="model-weights")
        for name in names:
            await links_api.grant(dev, artifact, name)
            link = await links_api.create_link(dev, artifact, name, expires_in_s=86400)
            tokens.append(links_api.split_link(link["url"])[1])
        info = await artifacts_api.get(dev, artifact)
    shutil.rmtree(stack.work / "model")
    part_size = int(info["part_size"])
    parts = sum(part_count(n, part_size) for n in sizes)
    return Fixture(artifact, [(ids[n], t) for n, t in zip(names, tokens, strict=True)], part_size, parts)


async def pull(stack: Stack, fx: Fixture, parallel: int) -> list[float]:
    """Every tester downloads through its link, `parallel` at a time; the seconds of each."""
    slots = asyncio.Semaphore(parallel)
    seconds: list[float] = []

    async def one(n: int, identity: Identity, token: str) -> None:
        async with slots:
            out = stack.work / f"out-{n}"
            async with stack.client(identity) as c:
                started = time.perf_counter()
                written, receipt = await links_api.download_link(c, token, out)
                seconds.append(time.perf_counter() - started)
            if receipt.get("artifact") != fx.artifact or not written:
                raise SystemExit(f"tester {n}: the download did not end with its receipt")
            shutil.rmtree(out)

    async with asyncio.TaskGroup() as group:
        for n, (identity, token) in enumerate(fx.testers):
            group.create_task(one(n, identity, token))
    return seconds


async def probe(stack: Stack, fx: Fixture, count: int) -> Delta:
    """Renew one finished session `count` times, alone: the price of one renewal."""
    token, session = ANSWERS.sessions[0]
    identity = next(i for i, t in fx.testers if t == token)
    await asyncio.sleep(1.5)  # let the run's last checkpoint be published first
    before = stack.snapshot()
    async with stack.client(identity) as c:
        for _ in range(count):
            await links_api.open_session(c, token, session=session)
    after = stack.snapshot()
    return stack.delta(before, after)


@dataclass(frozen=True)
class Renewals:
    count: int
    download_seconds: float
    #: Seconds from each session's opening to its first renewal, and between renewals.
    intervals: list[float]

    def mean_interval(self) -> float | None:
        return sum(self.intervals) / len(self.intervals) if self.intervals else None


def renewals_of(events: Iterable[tuple[int, str, dict[str, Any], int]], download_seconds: float) -> Renewals:
    times: dict[str, list[int]] = {}
    count = 0
    for t, action, details, _ in events:
        if action in ("link.session", "link.renew"):
            times.setdefault(str(details.get("session")), []).append(t)
            count += action == "link.renew"
    intervals = [
        (b - a) / 1000 for ts in times.values() for a, b in zip(sorted(ts), sorted(ts)[1:], strict=False)
    ]
    return Renewals(count, download_seconds, intervals)


# -- the report -------------------------------------------------------------------------------------


def _n(x: float) -> str:
    """A count or an amount, readable at any scale."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if x == int(x):
        return f"{int(x):,}"
    return f"{x:,.2f}" if abs(x) >= 10 else f"{x:.3g}"


def _decimal(x: float) -> str:
    """Bytes as they were most likely asked for: 400 GB, 200 MB (and what that is in binary)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:g} {unit} ({format_size(int(x))})"
    return f"{x:g} B"


def _bytes(x: float) -> str:
    return f"{format_size(int(x))} ({x:,.0f} B)" if x >= 1024 else f"{x:,.0f} B"


def table(
    title: str, counts: Mapping[str, float], testers: int, *, note: Mapping[str, str] | None = None
) -> None:
    print(f"\n{title:<56} {'total':>10} {'per download':>13}")
    for key in sorted(counts):
        if counts[key]:
            extra = f"  {note[key]}" if note and key in note else ""
            print(f"  {key:<54} {_n(counts[key]):>10} {_n(counts[key] / testers):>13}{extra}")


def report(
    args: argparse.Namespace, stack: Stack, fx: Fixture, run: Delta, per_renewal: Delta, seconds: list[float]
) -> None:
    t: int = args.testers
    ren = renewals_of(run.raw_events, sum(seconds))
    sessions = run.events["link.session"]
    print(
        f"\ndownloads: {len(seconds)} verified, each with its receipt, in {run.seconds:.1f} s wall;"
        f" {sum(seconds) / len(seconds):.1f} s per download (mean; {min(seconds):.1f} to {max(seconds):.1f}),"
        f" {ren.download_seconds:.0f} download-seconds in all"
    )
    interval = ren.mean_interval()
    per_second = ren.count / ren.download_seconds if ren.download_seconds else 0.0
    shown = f"one every {interval:.1f} s of download" if interval else "none"
    print(
        f"renewals: {ren.count} ({ren.count / t:.2f} per download, {per_second:.4f} per download-second);"
        f" {shown} (from the log: session opening to first renewal and between renewals;"
        f" the client's rule: TTL {stack.ttl_s} s - {MARGIN_S:.0f} s margin = {stack.ttl_s - MARGIN_S:.0f} s)"
    )
    table("service requests by route and status (from /metrics)", run.requests, t)
    table("audit events by action (from the database)", run.events, t)
    time_note = {
        name: "(time-driven: at most one per checkpoint interval, not per download)"
        for name in TIME_DRIVEN_TABLES
    }
    table("rows added per table", {k: float(v) for k, v in run.rows.items()}, t, note=time_note)
    print(
        f"database bytes: +{_bytes(run.db_bytes)} in pages of every table and index"
        f" ({_bytes(run.db_bytes / t)} per download); audit leaf bytes +{_bytes(run.leaf_bytes)}"
    )
    expected = args.files * (sessions + run.events["link.renew"])
    verdict = "equal" if expected == run.urls else "MISMATCH"
    print(
        f"presigned URLs: {run.urls} in the session answers ({run.urls / t:.2f} per download);"
        f" files {args.files} x (sessions {sessions} + renewals {run.events['link.renew']}) = {expected}:"
        f" {verdict}"
    )
    print(
        f"tester <-> service HTTP bytes (headers and bodies): sent {_bytes(run.wire_sent)},"
        f" received {_bytes(run.wire_received)}"
    )
    database = f"; PostgreSQL {run.postgres_cpu:.2f} s" if stack.postgres else ""
    print(
        f"service CPU: {run.service_cpu:.2f} s ({run.service_cpu / t * 1000:.1f} ms per download){database}"
    )
    print(
        f"storage: {run.gets} GETs ({run.gets / t:.2f} per download; the artifact has"
        f" {fx.parts_per_download} parts of {format_size(fx.part_size)};"
        f" {run.failed_gets} failed and retried),"
        f" {_bytes(run.storage_bytes)} read; SeaweedFS CPU {run.storage_cpu:.2f} s"
    )
    service_bytes = run.wire_sent + run.wire_received
    print(
        f"service bytes / storage bytes: HTTP {service_bytes / max(run.storage_bytes, 1):.2e},"
        f" database {run.db_bytes / max(run.storage_bytes, 1):.2e}"
    )

    k = args.renewal_probe
    renewal_rows = ", ".join(
        f"{name} {v / k:.2f}"
        for name, v in sorted(per_renewal.rows.items())
        if v and name not in TIME_DRIVEN_TABLES
    )
    print(
        f"\none renewal, measured alone ({k} renewals of one session, {per_renewal.seconds:.2f} s):"
        f" requests {per_renewal.requests_total() / k:.2f}, events {per_renewal.events_total() / k:.2f}"
        f" ({', '.join(sorted(per_renewal.events))}), rows {per_renewal.counted_rows() / k:.2f}"
        f" ({renewal_rows}),"
        f" database bytes {per_renewal.db_bytes / k:,.0f}, HTTP bytes"
        f" {(per_renewal.wire_sent + per_renewal.wire_received) / k:,.0f},"
        f" URLs {per_renewal.urls / k:.2f}, service CPU {per_renewal.service_cpu / k * 1000:.2f} ms"
        + (f", PostgreSQL CPU {per_renewal.postgres_cpu / k * 1000:.2f} ms" if stack.postgres else "")
    )
    r = ren.count

    def fixed(total: float, unit: float) -> float:
        return float(total - r * unit) / t

    figures = {
        "service requests": (run.requests_total(), per_renewal.requests_total() / k),
        "audit events": (run.events_total(), per_renewal.events_total() / k),
        "database rows": (run.counted_rows(), per_renewal.counted_rows() / k),
        "database bytes": (run.db_bytes, per_renewal.db_bytes / k),
        "presigned URLs": (run.urls, per_renewal.urls / k),
        "HTTP bytes": (service_bytes, (per_renewal.wire_sent + per_renewal.wire_received) / k),
        "service CPU s": (run.service_cpu, per_renewal.service_cpu / k),
    }
    if stack.postgres:
        figures["PostgreSQL CPU s"] = (run.postgres_cpu, per_renewal.postgres_cpu / k)
    print(f"fixed per download = (run total - {r} renewals x one renewal) / {t} testers:")
    print("  " + ", ".join(f"{name} {_n(fixed(total, unit))}" for name, (total, unit) in figures.items()))

    # -- extrapolation --
    tx, sx, rx, ttl_x = (
        args.extrapolate_testers,
        args.extrapolate_size,
        args.extrapolate_rate,
        args.extrapolate_ttl,
    )
    d = sx / rx
    if interval is not None:
        ix = interval + (ttl_x - stack.ttl_s)
        how = f"I = {interval:.1f} s measured + (TTL {ttl_x} - {stack.ttl_s}) s = {ix:.1f} s"
        lag = interval - (stack.ttl_s - MARGIN_S)
    else:
        ix = ttl_x - MARGIN_S
        how = (
            f"no renewal in this run: I = TTL {ttl_x} - {MARGIN_S:.0f} s margin = {ix:.1f} s (client's rule)"
        )
    n = d / ix if ix > 0 else 0.0
    file_size = sx // args.files
    px = choose_part_size(file_size, min_part_bytes=Settings().upload_min_part_bytes)
    parts_x = sum(part_count(file_size + (1 if i < sx % args.files else 0), px) for i in range(args.files))
    cipher_x = sum(
        age.ciphertext_size(file_size + (1 if i < sx % args.files else 0)) for i in range(args.files)
    )
    print(
        f"\nextrapolation: T = {tx:,} testers x S = {_decimal(sx)} in {args.files} files at"
        f" R = {_decimal(rx)}/s each, link presign TTL {ttl_x} s"
    )
    print(
        f"  D = S / R = {d:,.0f} s per download; {how};"
        f" n = D / I = D x {1 / ix:.4f}/s = {n:.1f} renewals per download"
    )
    if interval is not None:
        print(
            f"  (a renewal comes with the first part started after TTL - {MARGIN_S:.0f} s: here {lag:+.1f} s"
            " later on average; faster downloads start parts more often, so I is an upper bound)"
        )
    rows_out: list[tuple[str, str, float]] = []
    for name, (total, unit) in figures.items():
        f = fixed(total, unit)
        value = tx * (f + n * unit)
        formula = f"T x ({_n(f)} + n x {_n(unit)})"
        rows_out.append((name, formula, value))
    rows_out.append(
        ("storage GETs", f"T x {parts_x:,} parts of {format_size(px)} (~ T x S / part size)", tx * parts_x)
    )
    rows_out.append(("storage bytes", "T x ciphertext of S (S + 16 B per 64 KiB chunk)", tx * cipher_x))
    for name, formula, value in rows_out:
        shown_value = _bytes(value) if "bytes" in name else _n(value)
        print(f"  {name:<18} = {formula:<54} = {shown_value}")
    storage_bytes_x = tx * cipher_x
    http_x = next(v for name, _, v in rows_out if name == "HTTP bytes")
    db_x = next(v for name, _, v in rows_out if name == "database bytes")
    print(
        f"  service bytes / storage bytes: HTTP {http_x / storage_bytes_x:.2e},"
        f" database {db_x / storage_bytes_x:.2e}"
    )
    cpu_x = next(v for name, _, v in rows_out if name == "service CPU s")
    print(
        f"  all T pulling at once for D: {tx / ix:,.1f} renewals/s, the service's CPU"
        f" {cpu_x / d:.3f} of a core on average (the fixed requests come in a burst at the start)"
    )
    checkpoint_s = Settings().audit_checkpoint_interval_s
    print(
        f"  plus checkpoints: at most one per {checkpoint_s:g} s while events arrive, whatever T"
        f" ({run.rows.get('audit_checkpoints', 0)} in this run's {run.seconds:.0f} s)"
    )


async def run(args: argparse.Namespace, work: Path) -> None:
    stack = Stack(args, work)
    try:
        admin = stack.start()
        METER.rate = args.rate_limit
        install_meters()
        began = time.perf_counter()
        fx = await setup(stack, admin, args)
        what = "PostgreSQL" if stack.postgres else "SQLite"
        pace = f"{format_size(int(args.rate_limit))}/s per tester" if args.rate_limit else "unpaced"
        print(
            f"{args.testers} testers x {format_size(args.size)} ({args.files} files, parts of"
            f" {format_size(fx.part_size)}), {what}, {args.parallel} at a time, {pace},"
            f" link presign TTL {args.presign_ttl} s; {os.cpu_count()} CPUs"
        )
        print(
            f"setup: {time.perf_counter() - began:.1f} s"
            " (enrolment, upload, grants and links: outside the figures)"
        )
        print(f"/proc/loadavg before: {loadavg()}")
        await asyncio.sleep(1.5)  # the setup's last checkpoint, published before the window
        before = stack.snapshot()
        seconds = await pull(stack, fx, args.parallel)
        after = stack.snapshot()
        print(f"/proc/loadavg after:  {loadavg()}")
        measured = stack.delta(before, after)
        per_renewal = await probe(stack, fx, args.renewal_probe)
        report(args, stack, fx, measured, per_renewal, seconds)
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench-pull", description=__doc__.split("\n\n")[0])
    size = parse_size
    parser.add_argument("--testers", type=int, default=20, help="testers, each with its link (default 20)")
    parser.add_argument("--size", type=size, default=size("256MiB"), help="artifact size (default 256MiB)")
    parser.add_argument("--files", type=int, default=4, help="files in the artifact (default 4)")
    parser.add_argument("--parallel", type=int, default=10, help="testers downloading at once (default 10)")
    parser.add_argument(
        "--rate-limit",
        default="8MiB",
        help="bytes/s each download reads from storage, e.g. 8MiB (default; 0: unpaced)",
    )
    parser.add_argument(
        "--presign-ttl", default="40s", help="EXCHANGE_LINK_PRESIGN_TTL_S for the run (default 40s)"
    )
    parser.add_argument(
        "--renewal-probe", type=int, default=50, help="renewals of one session, alone (default 50)"
    )
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--postgres-dsn",
        default=os.environ.get("EXCHANGE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
        help="the PostgreSQL server to make the throwaway database on (default: the tests' DSN)",
    )
    parser.add_argument("--extrapolate-testers", type=int, default=1000)
    parser.add_argument("--extrapolate-size", type=size, default=size("400GB"))
    parser.add_argument("--extrapolate-rate", default="200MB", help="bytes/s per tester (default 200MB)")
    parser.add_argument(
        "--extrapolate-ttl",
        default=f"{Settings().link_presign_ttl_s}s",
        help="link presign TTL to extrapolate to (default: the service's default)",
    )
    args = parser.parse_args()
    try:
        args.rate_limit = float(parse_size(args.rate_limit.removesuffix("/s"))) or None
        args.extrapolate_rate = float(parse_size(args.extrapolate_rate.removesuffix("/s")))
        args.presign_ttl = parse_duration(args.presign_ttl)
        args.extrapolate_ttl = parse_duration(args.extrapolate_ttl)
    except ValueError as exc:
        parser.error(str(exc))
    if min(args.testers, args.files, args.parallel, args.renewal_probe, args.size, args.presign_ttl) < 1:
        parser.error(
            "--testers, --files, --parallel, --renewal-probe, --size and --presign-ttl must be positive"
        )
    if args.extrapolate_rate <= 0:
        parser.error("--extrapolate-rate must be positive")
    with tempfile.TemporaryDirectory(prefix="exchange-bench-pull-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()

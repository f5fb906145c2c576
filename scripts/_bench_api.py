"""scripts/bench-api: the running service under concurrent signed clients, against a bare aiohttp
handler on the same machine as the ceiling.

The parent starts a throwaway SeaweedFS, `exchange init` and `exchange serve` (SQLite, durable
commits) in a temporary directory, and a bare aiohttp app in a process of its own. Then, for each
scenario, it drives a bounded number of concurrent clients on loopback for a bounded time and
prints requests/s, p50 and p99 latency, the statuses seen, and the server's RSS and descriptors
before and after. For the scenarios that change state it also checks that the audit log grew by
exactly the number of 2xx answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from exchange.client.signing import sign_headers
from exchange.durations import parse_duration
from exchange.identity import Identity
from exchange.seaweed import S3Credentials, SeaweedFS

EXCHANGE = [sys.executable, "-m", "exchange.cli"]


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


def audit_size(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT size FROM audit_head").fetchone()[0])


@dataclass
class Result:
    name: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    def row(self, ceiling: float | None) -> str:
        lat = sorted(self.latencies) or [0.0]
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        rps = len(self.latencies) / self.seconds
        ratio = f"{rps / ceiling:6.2f}x" if ceiling else "     -"
        statuses = ",".join(f"{s}:{n}" for s, n in sorted(self.statuses.items()))
        return f"{self.name:<28} {rps:9.0f} {ratio} {p50:8.1f} {p99:8.1f}   {statuses} errors:{self.errors}"


Request = Callable[[aiohttp.ClientSession], Awaitable[int]]


async def drive(name: str, make: Request, *, concurrency: int, seconds: float) -> Result:
    result = Result(name=name, seconds=seconds)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    status = await make(session)
                except (aiohttp.ClientError, TimeoutError):
                    result.errors += 1
                    continue
                result.latencies.append(time.perf_counter() - started)
                result.statuses[status] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


def signed_request(
    identity: Identity, method: str, url: str, body: dict[str, object] | None = None
) -> Request:
    async def call(session: aiohttp.ClientSession) -> int:
        data = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        headers = sign_headers(identity, method=method, url=url, body=data, headers=headers)
        async with session.request(method, url, data=data, headers=headers) as resp:
            await resp.read()
            return resp.status

    return call


def plain_get(url: str) -> Request:
    async def call(session: aiohttp.ClientSession) -> int:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status

    return call


def ceiling_app(port: int) -> None:
    """The bare handler: what aiohttp itself does on this machine, for comparison."""
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/", ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def run(args: argparse.Namespace, work: Path) -> None:
    store = SeaweedFS(work / "storage", credentials=S3Credentials.generate())
    store.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        store.ensure_bucket("exchange")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")} | {
            "EXCHANGE_HOME": str(work),
            "EXCHANGE_PORT": str(port),
            "EXCHANGE_S3_ENDPOINT": store.endpoint,
            "EXCHANGE_S3_ACCESS_KEY_ID": store.credentials.access_key_id,
            "EXCHANGE_S3_SECRET_ACCESS_KEY": store.credentials.secret_access_key,
        }
        admin_path = work / "admin.identity"
        subprocess.run(
            [*EXCHANGE, "--identity", str(admin_path), "init"], env=env, check=True, capture_output=True
        )
        log = (work / "serve.log").open("w")
        server = subprocess.Popen([*EXCHANGE, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(server)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", server)
        ceiling_port = free_port()
        code = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import _bench_api; _bench_api.ceiling_app({ceiling_port})"
        )
        ceiling_proc = subprocess.Popen([sys.executable, "-c", code])
        procs.append(ceiling_proc)
        wait_http(f"http://127.0.0.1:{ceiling_port}/", ceiling_proc)

        admin = Identity.load(admin_path)
        async with aiohttp.ClientSession() as s:
            await signed_request(admin, "POST", url + "/v1/orgs", {"name": "bench"})(s)

        db = work / "exchange.db"
        print(f"{args.concurrency} clients, {args.duration:.0f} s per scenario, SQLite (synchronous=FULL)")
        print(f"{'scenario':<28} {'req/s':>9} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8}   statuses")
        scenarios: list[tuple[str, Request, bool]] = [
            ("bare aiohttp (ceiling)", plain_get(f"http://127.0.0.1:{ceiling_port}/"), False),
            ("GET /healthz (unsigned)", plain_get(url + "/healthz"), False),
            ("GET /v1/whoami (signed)", signed_request(admin, "GET", url + "/v1/whoami"), False),
            (
                "POST /v1/invites (+event)",
                signed_request(admin, "POST", url + "/v1/invites", {"role": "tester", "org": "bench"}),
                True,
            ),
        ]
        ceiling = None
        for name, make, writes in scenarios:
            before_events = audit_size(db)
            rss0, fds0 = process_stats(server.pid)
            result = await drive(name, make, concurrency=args.concurrency, seconds=args.duration)
            rss1, fds1 = process_stats(server.pid)
            if ceiling is None:
                ceiling = len(result.latencies) / result.seconds
                print(result.row(None))
                continue
            print(result.row(ceiling) + f"   server RSS {rss0:.0f}->{rss1:.0f} MiB, fds {fds0}->{fds1}")
            if writes:
                grown = audit_size(db) - before_events
                verdict = "equal" if grown == result.ok else "MISMATCH"
                print(f"{'':<28} audit events +{grown} for {result.ok} 2xx answers: {verdict}")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        store.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench-api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", default="10s", help="time per scenario: 10s, 1m, 10m (default 10s)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    args = parser.parse_args()
    args.duration = float(parse_duration(args.duration))
    with tempfile.TemporaryDirectory(prefix="exchange-bench-api-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()

"""scripts/bench-transfer: encrypted upload/download through exchange vs plain boto3, same storage.

The parent process runs SeaweedFS and the API; each measured transfer runs in a child process
(`--child ...`) that prints one JSON line with its seconds and its peak RSS (getrusage), so the
client's memory is measured apart from the server's and from boto3's. The CPU the service spends
meanwhile (SeaweedFS, and the API thread of this process) is measured too: on a small machine the
client and storage share the cores, so a transfer's total CPU is what bounds its speed.

`--pin` gives storage CPU sets of its own (`os.sched_setaffinity` on every thread of SeaweedFS)
and the client and API the others, for every transfer of the run alike, as a deployment does
with storage on machines of its own. Each row then says which side bound it: the side whose
CPU set was busy for most of the transfer's time, or "waiting" when none was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def parse_size(text: str) -> int:
    from exchange.sizes import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- children ---------------------------------------------------------------------------------------


def child(args: list[str]) -> None:
    config = json.loads(args[1])
    mode = args[0]
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if mode in ("exchange-upload", "exchange-download"):
        from exchange.client import Client
        from exchange.client.transfer import DEFAULT_CONCURRENCY, download, upload
        from exchange.identity import Identity

        async def run() -> None:
            identity = Identity.load(Path(config["identity"]))
            async with Client(config["server"], identity) as client:
                concurrency = int(config.get("concurrency") or DEFAULT_CONCURRENCY)
                if mode == "exchange-upload":
                    result["id"] = await upload(
                        client, Path(config["file"]), kind="model-weights", concurrency=concurrency
                    )
                else:
                    await download(client, config["id"], Path(config["out"]), concurrency=concurrency)

        asyncio.run(run())
    else:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=config["endpoint"],
            region_name="us-east-1",
            aws_access_key_id=config["key"],
            aws_secret_access_key=config["secret"],
        )
        if mode == "boto3-upload":
            s3.upload_file(config["file"], config["bucket"], "bench/plain")
        elif mode == "boto3-upload-sha256":
            # The integrity binding exchange's part URLs carry: storage checks each part's SHA-256.
            extra = {"ChecksumAlgorithm": "SHA256"}
            s3.upload_file(config["file"], config["bucket"], "bench/plain-sha256", ExtraArgs=extra)
        else:
            s3.download_file(config["bucket"], "bench/plain", str(Path(config["out"]) / "plain"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result |= {
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": peak_rss_mib(),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "sys_seconds": usage.ru_stime,
    }
    print(json.dumps(result), flush=True)


def _cpu_seconds(pid: int) -> float:
    import psutil  # type: ignore[import-untyped]

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` (and so the threads it starts later) onto `cpus`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


def cpu_sets(pin_storage: bool) -> tuple[set[int], set[int]]:
    """(storage's CPUs, the client's and API's): the first third of the cores (at least one) for
    storage when pinning; otherwise every core for both."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin_storage:
        return set(cpus), set(cpus)
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two cores")
    cut = max(1, len(cpus) // 3)
    return set(cpus[:cut]), set(cpus[cut:])


def bound_by(r: dict[str, Any], storage: set[int], client: set[int]) -> str:
    """Which side's CPU set was busy for most (>= 85%) of the transfer, else "waiting"."""
    seconds = r["seconds"]
    if storage == client:  # shared cores: the sum is what competes
        total = (r["cpu_seconds"] + r["storage_cpu_seconds"] + r["api_cpu_seconds"]) / (seconds * len(client))
        return "CPU (shared)" if total >= 0.85 else "waiting"
    busy = {
        "storage": r["storage_cpu_seconds"] / (seconds * len(storage)),
        "client+API": (r["cpu_seconds"] + r["api_cpu_seconds"]) / (seconds * len(client)),
    }
    side, share = max(busy.items(), key=lambda kv: kv[1])
    return f"{side} {share:.0%}" if share >= 0.85 else f"waiting ({side} {share:.0%})"


def run_child(mode: str, config: dict[str, Any], storage_pid: int | None = None) -> dict[str, Any]:
    """Run one transfer in a child process; add the CPU SeaweedFS and the API spent meanwhile."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    weed = _cpu_seconds(storage_pid) if storage_pid else 0.0
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["storage_cpu_seconds"] = (_cpu_seconds(storage_pid) - weed) if storage_pid else 0.0
    # This process runs the API (boto3 transfers do not use it) and otherwise only waits.
    result["api_cpu_seconds"] = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime
    return result


# -- the stack ----------------------------------------------------------------------------------------


class Service:
    """SeaweedFS and the API in this process (the API on a thread with its own event loop)."""

    def __init__(self, home: Path) -> None:
        from exchange.dev.seaweed import S3Credentials, SeaweedFS

        self.home = home
        self.credentials = S3Credentials.generate()
        self.store = SeaweedFS(home / "seaweed", credentials=self.credentials)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop_event: asyncio.Event | None = None

    def start(self) -> None:
        from exchange.settings import Settings

        self.store.start()
        self.store.ensure_bucket("exchange")
        self.settings = Settings(
            home=self.home,
            port=_free_port(),
            s3_endpoint=self.store.endpoint,
            s3_bucket="exchange",
            s3_access_key_id=self.credentials.access_key_id,
            s3_secret_access_key=self.credentials.secret_access_key,
        )
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        if not self.ready.wait(60):
            raise RuntimeError("the API did not start")

    def _serve(self) -> None:
        from aiohttp import web

        from exchange.api.app import create_app
        from exchange.server import bootstrap_with_settings

        async def main() -> None:
            await bootstrap_with_settings(
                self.settings, identity_path=self.home / "admin.identity", name="admin", org_name="operators"
            )
            runner = web.AppRunner(create_app(self.settings), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.settings.port).start()
            self.stop_event = asyncio.Event()
            self.ready.set()
            await self.stop_event.wait()
            await runner.cleanup()

        self.loop.run_until_complete(main())

    def stop(self) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(30)
        self.store.stop()

    async def developer(self) -> Path:
        from exchange.client import Client
        from exchange.identity import Identity

        admin = Identity.load(self.home / "admin.identity")
        async with Client(self.settings.effective_public_url, admin) as c:
            await c.create_org("bench")
            invite = await c.create_invite(role="developer", org="bench")
        dev = Identity.generate()
        async with Client(self.settings.effective_public_url) as c:
            await c.enroll(invite["code"], "bench-dev", dev)
        path = self.home / "dev.identity"
        dev.save(path)
        return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_file(path: Path, size: int) -> None:
    block = 16 * 1024 * 1024
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(block, left)
            fh.write(os.urandom(n))
            left -= n


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="scripts/bench-transfer", description=__doc__)
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1GiB"), help="file size (default 1GiB)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every transfer this many times, interleaved (default 1)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="exchange's parallel transfers (default: the client's own)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="storage on CPUs of its own (the first third of the cores), client and API on the rest",
    )
    args = parser.parse_args()
    storage_cpus, client_cpus = cpu_sets(args.pin)
    os.sched_setaffinity(0, client_cpus)  # this process (the API) and every child inherit it
    # SIGTERM ends the run like Ctrl-C does: through the finally below, which stops SeaweedFS.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="exchange-bench-", dir=args.dir))
    service = Service(work / "service")
    try:
        service.start()
        identity = asyncio.run(service.developer())
        source = work / "model.bin"
        make_file(source, args.size)
        common = {
            "endpoint": service.store.endpoint,
            "key": service.credentials.access_key_id,
            "secret": service.credentials.secret_access_key,
            "bucket": "exchange",
        }
        ours = {
            "server": service.settings.effective_public_url,
            "identity": str(identity),
            "concurrency": args.concurrency,
        }
        weed = service.store.pid
        assert weed is not None
        if args.pin:
            pin(weed, storage_cpus)
        ratios: dict[str, list[float]] = {"upload": [], "upload vs SHA-256": [], "download": []}
        print(f"file: {args.size} bytes ({args.size / 1024**3:.2f} GiB), cores: {os.cpu_count()}")
        print(
            f"CPUs: storage {sorted(storage_cpus)}, client and API {sorted(client_cpus)}"
            + (" (pinned)" if args.pin else " (shared)")
        )
        for n in range(args.rounds):
            results: dict[str, dict[str, Any]] = {}
            results["boto3 upload"] = run_child("boto3-upload", common | {"file": str(source)}, weed)
            results["boto3 upload SHA-256"] = run_child(
                "boto3-upload-sha256", common | {"file": str(source)}, weed
            )
            up = run_child("exchange-upload", ours | {"file": str(source)}, weed)
            results["exchange upload"] = up
            out_plain, out_ours = work / f"out-plain-{n}", work / f"out-ours-{n}"
            out_plain.mkdir()
            out_ours.mkdir()
            results["boto3 download"] = run_child("boto3-download", common | {"out": str(out_plain)}, weed)
            results["exchange download"] = run_child(
                "exchange-download", ours | {"id": up["id"], "out": str(out_ours)}, weed
            )
            assert (out_ours / "model.bin").stat().st_size == args.size
            shutil.rmtree(out_plain)
            shutil.rmtree(out_ours)
            mb = args.size / 1e6
            load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
            print(f"round {n + 1} of {args.rounds}, load average {load}")
            gib = args.size / 1024**3
            print(
                f"{'transfer':<22}{'seconds':>8}{'MB/s':>8}{'client CPU s/GiB':>18}{'storage CPU s/GiB':>19}"
                f"{'API CPU s/GiB':>15}{'peak RSS MiB':>14}  bound by"
            )
            for name, r in results.items():
                print(
                    f"{name:<22}{r['seconds']:>8.2f}{mb / r['seconds']:>8.1f}"
                    f"{r['cpu_seconds'] / gib:>18.2f}{r['storage_cpu_seconds'] / gib:>19.2f}"
                    f"{r['api_cpu_seconds'] / gib:>15.2f}{r['peak_rss_mib']:>14.1f}"
                    f"  {bound_by(r, storage_cpus, client_cpus)}"
                )
            for what in ("upload", "download"):
                ratio = results[f"boto3 {what}"]["seconds"] / results[f"exchange {what}"]["seconds"]
                ratios[what].append(ratio)
                print(f"{what}: exchange (encrypted, verified) / plain boto3 = {ratio:.2f}x")
            ratio = results["boto3 upload SHA-256"]["seconds"] / results["exchange upload"]["seconds"]
            ratios["upload vs SHA-256"].append(ratio)
            print(f"upload: exchange / boto3 with SHA-256 part checksums = {ratio:.2f}x")
        if args.rounds > 1:
            for what, values in ratios.items():
                shown = ", ".join(f"{v:.2f}" for v in values)
                print(f"{what} ratios: {shown}; median {statistics.median(values):.2f}x")
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

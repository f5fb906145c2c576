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

`--workers 1,2` runs exchange's upload and download once per number of crypto threads.
`--settle SECONDS` sleeps before every transfer, the last one's output already deleted: where the
kernel reports freed pages to the hypervisor (page_reporting), a transfer that reuses just-freed
pages costs far less system time than one that does not, so each starts from the same state.
`--resume-at F` stops an upload and a download abruptly (os._exit from the progress callback)
once F of the bytes are moved and measures the run that resumes each. `--files N` measures a
directory of N small files against boto3 sending each as an object with the same concurrency.
`--no-baseline`, `--only-resume` and `--drop-source` fit a 32 GiB run on ~64 GiB of disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: A child stopped on purpose (`--resume-at`) exits with this, from its progress callback.
STOPPED = 75
#: Where boto3 puts the small files of `--files`, one object each.
FILES_PREFIX = "bench/files/"
#: Freed pages are reported to the hypervisor when this exists (see `--settle`).
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def parse_size(text: str) -> int:
    from exchange.sizes import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def peak_rss_mib() -> float:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so
    a child started by a process of 110 MiB reads at least 110 MiB whatever it used itself."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- children ---------------------------------------------------------------------------------------


def child(args: list[str]) -> None:
    config = json.loads(args[1])
    os.environ.update(config.get("env") or {})  # before the SDK reads it
    mode = args[0]
    started = time.perf_counter()
    result: dict[str, Any] = {}

    def report() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result.update(
            seconds=time.perf_counter() - started,
            peak_rss_mib=peak_rss_mib(),
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            sys_seconds=usage.ru_stime,
        )
        print(json.dumps(result), flush=True)

    if mode in ("exchange-upload", "exchange-download"):
        from exchange.client import Client
        from exchange.client.transfer import DEFAULT_CONCURRENCY, download, upload
        from exchange.identity import Identity

        stop_at: float | None = config.get("stop_at")
        total = int(config.get("total") or 0)
        result["moved"] = 0

        def progress(nbytes: int) -> None:
            result["moved"] += nbytes
            if stop_at is not None and result["moved"] >= stop_at * total:
                # An abrupt stop, like a crash: the measurement line, then no cleanup at all.
                result["stopped"] = True
                report()
                os._exit(STOPPED)

        def upload_started(artifact_id: str, total_bytes: int, resumed: bool) -> None:
            result["id"] = artifact_id
            result["resumed"] = resumed

        def download_started(info: dict[str, Any], already: int) -> None:
            result["already"] = already

        async def run() -> None:
            identity = Identity.load(Path(config["identity"]))
            async with Client(config["server"], identity) as client:
                concurrency = int(config.get("concurrency") or DEFAULT_CONCURRENCY)
                extra: dict[str, Any] = {}
                if config.get("workers") is not None:
                    extra["workers"] = int(config["workers"])
                if mode == "exchange-upload":
                    if config.get("name"):
                        extra["name"] = config["name"]
                    result["id"] = await upload(
                        client,
                        Path(config["file"]),
                        kind="model-weights",
                        concurrency=concurrency,
                        progress=progress,
                        on_start=upload_started,
                        **extra,
                    )
                else:
                    await download(
                        client,
                        config["id"],
                        Path(config["out"]),
                        concurrency=concurrency,
                        progress=progress,
                        on_start=download_started,
                        **extra,
                    )

        asyncio.run(run())
    else:
        import boto3
        from botocore.config import Config

        concurrency = int(config.get("concurrency") or 6)
        s3 = boto3.client(
            "s3",
            endpoint_url=config["endpoint"],
            region_name="us-east-1",
            aws_access_key_id=config["key"],
            aws_secret_access_key=config["secret"],
            config=Config(max_pool_connections=max(10, concurrency)),
        )
        bucket = config["bucket"]
        if mode == "boto3-upload":
            s3.upload_file(config["file"], bucket, "bench/plain")
        elif mode == "boto3-upload-sha256":
            # The integrity binding exchange's part URLs carry: storage checks each part's SHA-256.
            extra_args = {"ChecksumAlgorithm": "SHA256"}
            s3.upload_file(config["file"], bucket, "bench/plain-sha256", ExtraArgs=extra_args)
        elif mode == "boto3-upload-files":
            # Every file its own object, `concurrency` at a time, one client shared by the threads.
            root = Path(config["file"])
            files = sorted(p for p in root.rglob("*") if p.is_file())

            def put(p: Path) -> None:
                s3.upload_file(str(p), bucket, f"{FILES_PREFIX}{p.relative_to(root.parent)}")

            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(put, files))
        elif mode == "boto3-download-files":
            out = Path(config["out"])
            keys = [
                obj["Key"]
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=FILES_PREFIX)
                for obj in page.get("Contents", [])
            ]

            def get(key: str) -> None:
                target = out / key[len(FILES_PREFIX) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(target))

            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(get, keys))
        else:
            key = config.get("object") or "bench/plain"
            s3.download_file(bucket, key, str(Path(config["out"]) / "plain"))
    report()


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


def run_child(
    mode: str, config: dict[str, Any], storage_pid: int | None = None, *, stops: bool = False
) -> dict[str, Any]:
    """Run one transfer in a child process; add the CPU SeaweedFS and the API spent meanwhile.
    With `stops`, the child may end on purpose (exit STOPPED) once it has moved its share."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    weed = _cpu_seconds(storage_pid) if storage_pid else 0.0
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, json.dumps(config)],
        check=False,
        capture_output=True,
        text=True,
    )
    if out.returncode not in ((0, STOPPED) if stops else (0,)) or not out.stdout.strip():
        raise RuntimeError(f"{mode} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
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


def stored_object(service: Service, artifact: str) -> tuple[str, int]:
    """The storage key and size of the artifact's (only) file, from the service's own database."""
    import sqlite3

    url = service.settings.effective_database_url
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
        row = db.execute(
            "SELECT object_key, ciphertext_size FROM artifact_files WHERE artifact_id = ?", (artifact,)
        ).fetchone()
    return str(row[0]), int(row[1])


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


#: The small files of `--files`: (kind, share of the files, smallest, largest bytes).
SMALL_FILES = (
    ("config", 0.5, 200, 2 * 1024),  # json/txt configs, ~1 KiB
    ("tokenizer", 0.2, 256 * 1024, 768 * 1024),  # vocabularies, merges, tokenizer.json: ~500 KiB
    ("shard", 0.3, 1024 * 1024, 2 * 1024 * 1024),  # weight shards of 1-2 MiB
)
SMALL_FILE_NAMES = {
    "config": "config-{:04d}.json",
    "tokenizer": "tokenizer-{:04d}.txt",
    "shard": "model-{:05d}.safetensors",
}


def make_files(root: Path, count: int, seed: int = 16) -> dict[str, list[int]]:
    """`count` files under `root`, shaped like a model repository's small files: a mix of kinds
    and sizes drawn from a seeded generator (the same for every run). Returns sizes by kind."""
    import random

    rng = random.Random(seed)  # noqa: S311 - sizes, not secrets
    root.mkdir()
    sizes: dict[str, list[int]] = {kind: [] for kind, *_ in SMALL_FILES}
    kinds = [kind for kind, *_ in SMALL_FILES]
    weights = [share for _, share, *_ in SMALL_FILES]
    bounds = {kind: (low, high) for kind, _, low, high in SMALL_FILES}
    for i in range(count):
        kind = rng.choices(kinds, weights)[0]
        size = rng.randint(*bounds[kind])
        (root / SMALL_FILE_NAMES[kind].format(i)).write_bytes(os.urandom(size))
        sizes[kind].append(size)
    return sizes


def tree(root: Path) -> tuple[int, int]:
    """(files, bytes) under `root`."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def crypto_seconds_per_gib(sample: int = 256 * 1024 * 1024) -> tuple[float, float]:
    """(SHA-256, age's ChaCha20-Poly1305) CPU seconds per GiB on one core of this machine, the
    latter through the client's own `encrypt_chunks_into` in ~1 MiB steps: the work an encrypted
    transfer must add to a plain one, measured on this thread's clock (whatever else runs)."""
    from exchange.format import age

    step = 16 * age.CHUNK_SIZE
    plain = memoryview(bytearray(os.urandom(step)))
    sealed = memoryview(bytearray(16 * age.ENCRYPTED_CHUNK_SIZE))
    key, rounds = os.urandom(32), sample // step
    started = time.thread_time()
    for _ in range(rounds):
        hashlib.sha256(plain).digest()
    sha = time.thread_time() - started
    started = time.thread_time()
    for n in range(rounds):
        age.encrypt_chunks_into(key, n * 16, plain, sealed, last=False)
    seal = time.thread_time() - started
    per_gib = 1024**3 / (rounds * step)
    return sha * per_gib, seal * per_gib


def crypto_line(sha: float, seal: float, *, baseline: bool) -> str:
    line = f"crypto on one core here: SHA-256 {sha:.2f} s/GiB, ChaCha20-Poly1305 {seal:.2f} s/GiB"
    if not baseline:
        return line
    return (
        f"{line}; an exchange upload does both on top of boto3's with SHA-256 part checksums"
        f" ({sha + seal:.2f} client CPU s/GiB more), a download both on top of plain boto3's"
    )


def worker_label(workers: int | None) -> str:
    if workers is None:
        return ""
    return f" ({workers} worker{'' if workers == 1 else 's'})"


def parse_workers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"workers must be numbers >= 1, e.g. 1,2: {text!r}")
    return values


def parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a fraction between 0 and 1 (exclusive), e.g. 0.5: {text!r}")
    return value


def stored_fraction(server: str, identity: Path, artifact_id: str, sizes: list[int]) -> float:
    """The share of an unfinished upload's ciphertext that storage already holds."""
    from exchange.client import Client
    from exchange.client import artifacts as api
    from exchange.format.age import ciphertext_size
    from exchange.identity import Identity

    async def status() -> dict[str, Any]:
        async with Client(server, Identity.load(identity)) as client:
            return await api.upload_status(client, artifact_id)

    stored: int = sum(p["size"] for f in asyncio.run(status())["files"] for p in f["stored"])
    return stored / sum(ciphertext_size(size) for size in sizes)


def resume_line(what: str, stopped: dict[str, Any], resumed: dict[str, Any], total: int) -> str:
    stop_share, resume_share = stopped["bytes"] / total, resumed["bytes"] / total
    if resume_share > 0:
        cost = (resumed["seconds"] / resume_share) / (stopped["seconds"] / stop_share)
        verdict = f"resume cost {cost:.2f}x the remainder's share"
    else:
        verdict = "nothing was left to move"
    return (
        f"{what} resume: moved {resume_share:.1%} of the bytes in {resumed['seconds']:.1f} s;"
        f" the stopped run moved {stop_share:.1%} in {stopped['seconds']:.1f} s ({verdict})"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="scripts/bench-transfer", description=__doc__)
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1GiB"), help="file size (default 1GiB)"
    )
    parser.add_argument(
        "--files",
        type=int,
        default=None,
        metavar="N",
        help="instead of one big file, a directory of N small files (configs, tokenizer files,"
        " 1-2 MiB shards): files per second against boto3 sending each file as an object",
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
        help="exchange's parallel transfers, and boto3's threads with --files (default: the client's own)",
    )
    parser.add_argument(
        "--workers",
        type=parse_workers,
        default=None,
        metavar="LIST",
        help="run exchange's upload and download once per value, e.g. 1,2: threads doing crypto at"
        " once (default: the SDK's own, every CPU the client may use)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="storage on CPUs of its own (the first third of the cores), client and API on the rest",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="sleep this long before every transfer, the last one's output already deleted"
        f" (default: 10 when {PAGE_REPORTING} exists, else 0)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the boto3 transfers (no second stored copy)"
    )
    parser.add_argument(
        "--read-ciphertext",
        action="store_true",
        help="also boto3 downloading the stored object of exchange's artifact (its ciphertext):"
        " the same bytes from the same storage, with no second stored copy (for big sizes)",
    )
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="empty the kernel's page cache before every transfer (needs root), so storage reads"
        " from disk at every size, as it must once the data outgrows memory",
    )
    parser.add_argument(
        "--page-cache",
        action="store_true",
        help="also an exchange download through the page cache (EXCHANGE_DIRECT_IO=0), to compare",
    )
    parser.add_argument(
        "--resume-at",
        type=parse_fraction,
        default=None,
        metavar="FRACTION",
        help="also stop an upload and a download abruptly at this share of the bytes, then resume"
        " each and measure the resumed run",
    )
    parser.add_argument(
        "--only-resume",
        action="store_true",
        help="with --no-baseline --resume-at: no uninterrupted exchange upload (the resumed one is"
        " the stored copy the downloads read)",
    )
    parser.add_argument(
        "--drop-source",
        action="store_true",
        help="delete the source once a round's uploads are done (one round only)",
    )
    args = parser.parse_args()
    if args.only_resume and not (args.no_baseline and args.resume_at is not None):
        parser.error("--only-resume goes with --no-baseline --resume-at FRACTION")
    if args.drop_source and args.rounds != 1:
        parser.error("--drop-source deletes the source after the first round's uploads: one round only")
    if args.files is not None and args.files < 1:
        parser.error("--files needs at least one file")
    if args.files is not None and args.resume_at is not None:
        parser.error("--resume-at measures one big file (--size), not --files")
    if args.settle is not None and args.settle < 0:
        parser.error("--settle cannot be negative")
    reporting = PAGE_REPORTING.exists()
    settle: float = args.settle if args.settle is not None else (10.0 if reporting else 0.0)
    storage_cpus, client_cpus = cpu_sets(args.pin)
    os.sched_setaffinity(0, client_cpus)  # this process (the API) and every child inherit it
    # SIGTERM ends the run like Ctrl-C does: through the finally below, which stops SeaweedFS.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="exchange-bench-", dir=args.dir))
    service = Service(work / "service")
    try:
        service.start()
        identity = asyncio.run(service.developer())
        from exchange.client.transfer import DEFAULT_CONCURRENCY

        concurrency = args.concurrency or DEFAULT_CONCURRENCY
        common = {
            "endpoint": service.store.endpoint,
            "key": service.credentials.access_key_id,
            "secret": service.credentials.secret_access_key,
            "bucket": "exchange",
            "concurrency": concurrency,
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
        if args.files is not None:
            source = work / "model"
            by_kind = make_files(source, args.files)
            count, size = tree(source)
            kinds = ", ".join(
                f"{len(sizes)} {kind}{'' if len(sizes) == 1 else 's'}"
                f" {min(sizes) / 1024:.0f}-{max(sizes) / 1024:.0f} KiB"
                for kind, sizes in by_kind.items()
                if sizes
            )
            print(
                f"files: {count} in model/ ({kinds}), {size} bytes in all ({size / 1024**2:.1f} MiB);"
                f" boto3 sends each as an object, {concurrency} at a time; exchange sends model/ as"
                f" one artifact, {concurrency} parts at a time; cores: {os.cpu_count()}"
            )
        else:
            source = work / "model.bin"
            make_file(source, args.size)
            count, size = 1, args.size
            print(f"file: {size} bytes ({size / 1024**3:.2f} GiB), cores: {os.cpu_count()}")
        print(
            f"CPUs: storage {sorted(storage_cpus)}, client and API {sorted(client_cpus)}"
            + (" (pinned)" if args.pin else " (shared)")
        )
        if reporting and args.settle is None:
            print(
                "memory: the kernel reports freed pages to the hypervisor (page_reporting); each"
                f" transfer starts {settle:g} s after the last so every one finds memory in the same state"
            )
        elif reporting:
            print(
                "memory: the kernel reports freed pages to the hypervisor (page_reporting); each"
                f" transfer starts {settle:g} s after the last (--settle)"
                + (
                    ""
                    if settle
                    else ": one that reuses just-freed pages may look up to 2x cheaper in client CPU"
                )
            )
        else:
            print(
                f"memory: freed pages are not reported to a hypervisor; each transfer starts {settle:g} s"
                " after the last"
            )
        print(crypto_line(*crypto_seconds_per_gib(), baseline=not args.no_baseline))
        workers: list[int | None] = list(args.workers) if args.workers else [None]
        resume_workers = workers[-1]
        if args.resume_at is not None and len(workers) > 1:
            print(f"resume runs: {resume_workers} workers")
        at = f"{args.resume_at:.0%}" if args.resume_at is not None else ""

        def measure(mode: str, config: dict[str, Any], nbytes: int, *, stops: bool = False) -> dict[str, Any]:
            """One transfer, `settle` seconds after the last (whose output is already gone)."""
            if args.drop_caches:
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("1\n")
            if settle:
                time.sleep(settle)
            r = run_child(mode, config, weed, stops=stops)
            r.setdefault("bytes", nbytes)
            return r

        def check(out: Path) -> None:
            """The download under `out` is whole (then it is deleted, before the next transfer)."""
            got = tree(out)
            if got != (count, size):
                raise RuntimeError(f"{out}: {got[0]} files of {got[1]} bytes, not {count} of {size}")
            shutil.rmtree(out)

        ratios: dict[str, list[float]] = {}
        for n in range(args.rounds):
            results: dict[str, dict[str, Any]] = {}
            resumes: list[str] = []
            plain = {"file": str(source)}
            if not args.no_baseline:
                if args.files is not None:
                    results["boto3 upload"] = measure("boto3-upload-files", common | plain, size)
                else:
                    results["boto3 upload"] = measure("boto3-upload", common | plain, size)
                    results["boto3 upload SHA-256"] = measure("boto3-upload-sha256", common | plain, size)
            artifact: str | None = None
            if not args.only_resume:
                for w in workers:
                    up = measure("exchange-upload", ours | plain | {"workers": w}, size)
                    results[f"exchange upload{worker_label(w)}"] = up
                    artifact = up["id"]
            if args.resume_at is not None:
                config = ours | plain | {"workers": resume_workers, "name": "model-resume"}
                stopped = measure(
                    "exchange-upload", config | {"stop_at": args.resume_at, "total": size}, size, stops=True
                )
                stopped["bytes"] = stopped["moved"]
                left = 1 - stored_fraction(ours["server"], identity, stopped["id"], [size])
                resumed = measure("exchange-upload", config, round(size * left))
                results[f"exchange upload, stopped at {at}"] = stopped
                results["exchange upload, resumed"] = resumed
                resumes.append(resume_line("upload", stopped, resumed, size))
                artifact = artifact or resumed["id"]
            assert artifact is not None
            if args.drop_source:
                if source.is_dir():
                    shutil.rmtree(source)
                else:
                    source.unlink()
                print(
                    f"source: {source.name} deleted once the uploads were done (the downloads do not"
                    " need it); the disk now holds the stored copies and one download at a time"
                )
            if not args.no_baseline:
                out = work / f"out-plain-{n}"
                out.mkdir()
                if args.files is not None:
                    results["boto3 download"] = measure(
                        "boto3-download-files", common | {"out": str(out)}, size
                    )
                else:
                    results["boto3 download"] = measure("boto3-download", common | {"out": str(out)}, size)
                check(out)
            for w in workers:
                out = work / f"out-ours-{n}"
                out.mkdir()
                results[f"exchange download{worker_label(w)}"] = measure(
                    "exchange-download", ours | {"id": artifact, "out": str(out), "workers": w}, size
                )
                check(out)
            if args.read_ciphertext and args.files is None:
                out = work / f"out-ciphertext-{n}"
                out.mkdir()
                key, stored = stored_object(service, artifact)
                r = measure("boto3-download", common | {"out": str(out), "object": key}, stored)
                if (out / "plain").stat().st_size != stored:
                    raise RuntimeError(f"boto3 read {(out / 'plain').stat().st_size} bytes, not {stored}")
                shutil.rmtree(out)
                results["boto3 download (stored ciphertext)"] = r
            if args.page_cache:
                out = work / f"out-cache-{n}"
                out.mkdir()
                config = ours | {"id": artifact, "out": str(out), "env": {"EXCHANGE_DIRECT_IO": "0"}}
                results["exchange download (page cache)"] = measure("exchange-download", config, size)
                check(out)
            if args.resume_at is not None:
                out = work / f"out-resume-{n}"
                out.mkdir()
                config = ours | {"id": artifact, "out": str(out), "workers": resume_workers}
                stopped = measure(
                    "exchange-download", config | {"stop_at": args.resume_at, "total": size}, size, stops=True
                )
                stopped["bytes"] = stopped["moved"]
                resumed = measure("exchange-download", config, size)
                resumed["bytes"] = size - resumed["already"]
                check(out)
                results[f"exchange download, stopped at {at}"] = stopped
                results["exchange download, resumed"] = resumed
                resumes.append(resume_line("download", stopped, resumed, size))
            load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
            print(f"round {n + 1} of {args.rounds}, load average {load}")
            per_file = args.files is not None
            print(
                f"{'transfer':<34}{'seconds':>8}"
                + (f"{'files/s':>9}" if per_file else "")
                + f"{'MB/s':>8}{'client CPU s/GiB':>18}{'of which sys':>14}{'storage CPU s/GiB':>19}"
                f"{'API CPU s/GiB':>15}{'peak RSS MiB':>14}  bound by"
            )
            for name, r in results.items():
                gib = r["bytes"] / 1024**3 or float("nan")
                mb = r["bytes"] / 1e6
                print(
                    f"{name:<34}{r['seconds']:>8.2f}"
                    + (f"{count / r['seconds']:>9.1f}" if per_file else "")
                    + f"{mb / r['seconds']:>8.1f}{r['cpu_seconds'] / gib:>18.2f}"
                    f"{r['sys_seconds'] / gib:>14.2f}"
                    f"{r['storage_cpu_seconds'] / gib:>19.2f}{r['api_cpu_seconds'] / gib:>15.2f}"
                    f"{r['peak_rss_mib']:>14.1f}  {bound_by(r, storage_cpus, client_cpus)}"
                )
            if not args.no_baseline:
                for w in workers:
                    label = worker_label(w)
                    for what in ("upload", "download"):
                        ratio = (
                            results[f"boto3 {what}"]["seconds"]
                            / results[f"exchange {what}{label}"]["seconds"]
                        )
                        ratios.setdefault(f"{what}{label}", []).append(ratio)
                        if per_file:
                            print(
                                f"{what}{label}: exchange (one artifact) / boto3 ({count} objects,"
                                f" {concurrency} at a time) = {ratio:.2f}x in files per second"
                            )
                        else:
                            print(
                                f"{what}{label}: exchange (encrypted, verified) / plain boto3 = {ratio:.2f}x"
                            )
                    if not per_file:
                        ratio = (
                            results["boto3 upload SHA-256"]["seconds"]
                            / results[f"exchange upload{label}"]["seconds"]
                        )
                        ratios.setdefault(f"upload{label} vs SHA-256", []).append(ratio)
                        print(f"upload{label}: exchange / boto3 with SHA-256 part checksums = {ratio:.2f}x")
                if args.page_cache:
                    ratio = (
                        results["boto3 download"]["seconds"]
                        / results["exchange download (page cache)"]["seconds"]
                    )
                    ratios.setdefault("download (page cache)", []).append(ratio)
                    print(f"download (page cache): exchange / plain boto3 = {ratio:.2f}x")
            for line in resumes:
                print(line)
        if args.rounds > 1:
            for what, values in ratios.items():
                shown = ", ".join(f"{v:.2f}" for v in values)
                print(f"{what} ratios: {shown}; median {statistics.median(values):.2f}x")
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

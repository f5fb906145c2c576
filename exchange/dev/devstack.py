"""`scripts/run`: the whole service on one machine with its embedded defaults.

Starts a local SeaweedFS (loopback only, S3 credentials generated on first run and kept in the
data directory), creates the bucket, migrates the SQLite database, creates the first admin
identity on first run, and serves the API until Ctrl-C or SIGTERM, when it stops everything it
started. A second run on the same `EXCHANGE_HOME` reuses all of it.

Not for production: there, run `exchange serve` against MinIO or AWS S3 and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
from collections.abc import Mapping

from ..errors import ExchangeError
from ..server import bootstrap_with_settings, run_until_stopped
from ..services.auditlog import load_or_create_signer
from ..settings import Settings
from .seaweed import S3Credentials, SeaweedFS

__all__ = ["main"]

log = logging.getLogger("exchange.dev.devstack")


def dev_settings(env: Mapping[str, str]) -> Settings:
    return Settings.from_mapping({"EXCHANGE_HOME": ".exchange", **env})


async def _run(settings: Settings) -> None:
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    credentials = S3Credentials.load_or_create(home / "s3-credentials.json")
    store = SeaweedFS(home / "storage", credentials=credentials, s3_port=settings.s3_port or None)
    await asyncio.to_thread(store.start)
    try:
        await asyncio.to_thread(store.ensure_bucket, settings.s3_bucket)
        settings = settings.replace(
            home=home,
            s3_endpoint=store.endpoint,
            s3_access_key_id=credentials.access_key_id,
            s3_secret_access_key=credentials.secret_access_key,
        )
        admin_path = home / "admin.identity"
        if not admin_path.exists():
            await bootstrap_with_settings(
                settings, identity_path=admin_path, name="admin", org_name="operators"
            )
            print(f"created the first admin: {admin_path}", flush=True)
        # Auditors pin the log's key out of band: this output is one such band.
        signer = load_or_create_signer(settings.effective_log_signing_key_file, settings.log_origin)
        print(
            "\nexchange is running. In another shell:\n\n"
            f"  export EXCHANGE_SERVER={shlex.quote(settings.effective_public_url)}"
            f" EXCHANGE_IDENTITY={shlex.quote(str(admin_path))}\n"
            "  .venv/bin/exchange whoami\n\n"
            "audit log verifier key (auditors pin it: exchange audit verify --vkey KEY):\n"
            f"  {signer.verifier_key()}\n\n"
            f"storage: SeaweedFS S3 at {store.endpoint} (data in {home / 'storage'})\n"
            "Ctrl-C stops the service and the storage.\n",
            flush=True,
        )
        await run_until_stopped(settings)
    finally:
        await asyncio.to_thread(store.stop)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = dev_settings(os.environ)
        asyncio.run(_run(settings))
    except ExchangeError as exc:  # SeaweedStartError included
        print(f"exchange: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""The audit log served as C2SP tlog-tiles under `/v1/audit/log/`: checkpoint, tiles, entry bundles.

    GET /v1/audit/log/checkpoint               the latest signed checkpoint (text/plain)
    GET /v1/audit/log/tile/<L>/<N>[.p/<W>]     Merkle tile (application/octet-stream)
    GET /v1/audit/log/tile/entries/<N>[.p/<W>] entry bundle (application/octet-stream)

Paths are exactly the spec's (`exchange.format.tiles.parse_path` refuses any other spelling,
with a 400); what exists is decided by `services.audittiles` (only what the latest checkpoint
covers: 404 beyond).

Access: signed requests from auditors and admins, like every other read of the log but its key.
The tiles could be public (they are static, and a tiled log is meant to be mirrored), but the log
holds who did what to which artifact: today it is for auditors only, and serving it as tiles
must not widen that. A log that decides to go public would serve hash tiles and checkpoints
without auth (they reveal nothing about events) and keep entry bundles signed.

Caching: a full tile never changes, so it is `private, max-age=31536000, immutable` (private:
it was served to an authenticated auditor, no shared cache keeps it). A partial tile is a prefix
of a tile still growing and the checkpoint changes with every publication: `private, max-age=60`
and `no-store`. Reads are recorded as `services.audittiles` says (bundles only, one event per
auditor and checkpoint size).

What this module does not do: publish tiles to the storage bucket, compress bundles (aiohttp
does not gzip unasked; clients get identity), or answer HEAD requests beyond what aiohttp does.
"""

from __future__ import annotations

import weakref

from aiohttp import web

from ..errors import ValidationError
from ..format import tiles as fmt
from ..services import audittiles as svc
from ..settings import Settings
from .audit import fail_closed_on_damage
from .keys import AUDIT, DB
from .routing import CTX, PRINCIPAL, Route, path_param
from .schemas import Schema

__all__ = ["ROUTES", "schemas"]

_FULL = "private, max-age=31536000, immutable"
_PARTIAL = "private, max-age=60"
_MUTABLE = "no-store"
# Per app, not per process: tests run several apps in one process, each its own replica.
_BUNDLE_READS: weakref.WeakKeyDictionary[web.Application, svc.BundleReads] = weakref.WeakKeyDictionary()


def _parse(path: str) -> tuple[int | None, int, int]:
    try:
        return fmt.parse_path(path)
    except ValueError as exc:
        raise ValidationError(f"not a tlog-tiles path: {exc}", field="path") from None


def _octets(data: bytes, width: int) -> web.Response:
    cache = _FULL if width == fmt.TILE_WIDTH else _PARTIAL
    return web.Response(body=data, content_type="application/octet-stream", headers={"Cache-Control": cache})


async def checkpoint(request: web.Request) -> web.Response:
    _, note = await svc.checkpoint(request.app[DB], request[PRINCIPAL])
    return web.Response(
        body=note, headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": _MUTABLE}
    )


async def tile(request: web.Request) -> web.Response:
    level, index, width = _parse(f"{request.match_info['level']}/{request.match_info['index']}")
    assert level is not None  # the route's pattern: digits
    with fail_closed_on_damage(request.app):
        data = await svc.tile(request.app[DB], request[PRINCIPAL], level=level, index=index, width=width)
    return _octets(data, width)


async def entry_bundle(request: web.Request) -> web.Response:
    app = request.app
    _, index, width = _parse(f"entries/{request.match_info['index']}")
    reads = _BUNDLE_READS.setdefault(app, svc.BundleReads())
    with fail_closed_on_damage(app):
        data = await svc.entry_bundle(
            app[DB], app[AUDIT], reads, request[CTX], request[PRINCIPAL], index=index, width=width
        )
    return _octets(data, width)


ROUTES = [
    Route(
        "GET",
        "/v1/audit/log/checkpoint",
        checkpoint,
        "audit.log.checkpoint",
        "tlog-tiles: the latest checkpoint as a signed note, text/plain (auditor, admin)",
        "audit",
        errors=(403, 404),
    ),
    Route(
        "GET",
        "/v1/audit/log/tile/entries/{index:.+}",
        entry_bundle,
        "audit.log.entries",
        "tlog-tiles: entry bundle N[.p/W], uint16-length-prefixed leaves (auditor, admin; logged)",
        "audit",
        parameters=(path_param("index", "N in x-prefixed groups of three digits, then .p/W if partial"),),
        errors=(400, 403, 404),
        action="audit.export",
    ),
    Route(
        "GET",
        "/v1/audit/log/tile/{level:[0-9]+}/{index:.+}",
        tile,
        "audit.log.tile",
        "tlog-tiles: Merkle tile L/N[.p/W], concatenated SHA-256 hashes (auditor, admin)",
        "audit",
        parameters=(
            path_param("level", "tile level, 0 to 63"),
            path_param("index", "N in x-prefixed groups of three digits, then .p/W if partial"),
        ),
        errors=(400, 403, 404),
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    return {}

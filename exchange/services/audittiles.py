"""The audit log as C2SP tlog-tiles: the latest checkpoint, Merkle tiles and entry bundles.

Tiles are cut out of what the log already stores: a level-L tile's hashes are the stored nodes
at tree level 8L (`audit_tree_nodes`, level 0 the leaf hashes) and an entry bundle is the leaves
of `audit_events`, each length-prefixed (`exchange.format.tiles`). Nothing new is written to
serve them.

Which tiles exist. Only what the latest published checkpoint covers: a full tile whose every
hash lies within that tree, or a partial tile of width W (1..255) whose W hashes do. The spec
asks a log to serve the partial tiles of its checkpoints' sizes; the partial tile of an older
checkpoint is a prefix of a tile that has since grown, and is served too, so that a client that
read one checkpoint while the next was being published still finds the tiles it asked for.
Anything beyond the latest checkpoint is NotFound, even if its nodes are stored: a tile says
nothing the log has not signed.

Who may read and what is recorded. Only auditors and admins (as every read of the log but its
key). Hash tiles and the checkpoint are not recorded, like proofs and checkpoints today: hashes
reveal nothing about events. Entry bundles are the events themselves, so they are recorded as
`audit.export` events, as range exports are, but bounded: one event per principal per published
checkpoint size and replica (`BundleReads`), naming the first bundle read. A monitor fetching
40,000 bundles against one checkpoint adds one event, not 40,000; the log still says who read
its events via tiles and up to which signed size. What it does not say is which bundles beyond
the first: the range export (`GET /v1/audit/entries`) is the way to leave an exact record.

What this module does not do: publish tiles to a bucket, verify anything for the auditor
(`exchange.auditverify` does, trusting none of this), or set HTTP headers (the API does).
"""

from __future__ import annotations

from ..db import Database
from ..errors import AuditLogDamaged, NotFound
from ..format import tiles
from . import auditlog
from .audit import AuditLog, Context
from .auditreads import AUDITOR_ROLES
from .principals import Principal, require_role

__all__ = ["BundleReads", "checkpoint", "entry_bundle", "tile"]


class BundleReads:
    """Which principals' entry-bundle reads this process recorded against the latest size."""

    def __init__(self) -> None:
        self._size = -1
        self._recorded: set[str] = set()

    def recorded(self, principal_id: str, size: int) -> bool:
        """Whether a read by `principal_id` against `size` was recorded already."""
        return size == self._size and principal_id in self._recorded

    def remember(self, principal_id: str, size: int) -> None:
        """Note a recorded read (only once its event is appended: a failed append records nothing)."""
        if size != self._size:
            # Sizes only grow; forgetting the older ones keeps this to one set of principals.
            self._size, self._recorded = size, set()
        self._recorded.add(principal_id)


async def checkpoint(db: Database, principal: Principal) -> tuple[int, bytes]:
    """The latest checkpoint's size and signed note."""
    require_role(principal, *AUDITOR_ROLES)
    latest = await auditlog.latest_checkpoint(db)
    if latest is None:
        raise NotFound("no checkpoint has been published yet")
    return latest


async def _published(db: Database, level: int, index: int, width: int) -> int:
    latest = await auditlog.latest_checkpoint(db)
    size = latest[0] if latest else 0
    hashes_at_level = size >> (tiles.TILE_HEIGHT * max(level, 0))
    if index * tiles.TILE_WIDTH + width > hashes_at_level:
        kind = "entry bundle" if level < 0 else f"level-{level} tile"
        raise NotFound(f"the {kind} {index} of width {width} is beyond the latest checkpoint (size {size})")
    return size


async def tile(db: Database, principal: Principal, *, level: int, index: int, width: int) -> bytes:
    """The hashes of tile (level, index) of `width`, concatenated; NotFound past the latest checkpoint."""
    require_role(principal, *AUDITOR_ROLES)
    await _published(db, level, index, width)
    first = index * tiles.TILE_WIDTH
    rows = await db.fetchall(
        "SELECT idx, hash FROM audit_tree_nodes WHERE level = $1 AND idx >= $2 AND idx < $3 ORDER BY idx",
        level * tiles.TILE_HEIGHT,
        first,
        first + width,
    )
    if [int(r["idx"]) for r in rows] != list(range(first, first + width)):
        raise AuditLogDamaged(
            f"the stored tree lacks nodes of tile {level}/{index}: level {level * tiles.TILE_HEIGHT}, "
            f"{len(rows)} of {width} from index {first}"
        )
    return b"".join(bytes(r["hash"]) for r in rows)


async def entry_bundle(
    db: Database,
    audit: AuditLog,
    reads: BundleReads,
    ctx: Context,
    principal: Principal,
    *,
    index: int,
    width: int,
) -> bytes:
    """The leaves of bundle `index` of `width`, each uint16-length-prefixed; the read is recorded
    once per principal and checkpoint size (see the module docstring)."""
    require_role(principal, *AUDITOR_ROLES)
    size = await _published(db, -1, index, width)
    start = index * tiles.TILE_WIDTH
    if not reads.recorded(principal.id, size):
        async with db.transaction() as conn:
            await audit.append(
                conn,
                ctx,
                action="audit.export",
                details={"via": "tiles", "size": size, "start": start, "end": start + width},
            )
        reads.remember(principal.id, size)
    leaves = [leaf async for leaf in auditlog.read_entries(db, start, start + width, audit=audit)]
    if len(leaves) != width:
        raise AuditLogDamaged(f"entry bundle {index} has {len(leaves)} of its {width} events")
    return tiles.join_bundle(leaves)

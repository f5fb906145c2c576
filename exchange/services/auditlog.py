"""The audit log as a transparency log: its key, checkpoints, proofs, entries and queries.

`services.audit` appends events and the Merkle nodes they complete; this module reads them back
for auditors and publishes signed checkpoints:

- the log signing key: an Ed25519 note key named after the log origin, kept as a signer key
  string in a file of mode 0600 (created on first start; every replica must share it);
- `Publisher`: on the one replica holding the signer lease (`services.leases`), when the tree
  grew, sign a C2SP tlog-checkpoint for its size, collect witness cosignatures
  (c2sp.org/tlog-witness) and store the note only if the quorum signed; while no event arrives
  for `audit_heartbeat_s`, append an `audit.heartbeat` event, so that a quiet stretch is
  provably quiet (consecutive events are never further apart than the interval plus one
  publisher tick, plus the takeover, at most 4/3 of the lease's TTL, when the signer dies).
  Every store and heartbeat re-checks the lease's holder and fence in its own transaction, so
  one term at a time writes, and a replica that lost the lease writes nothing and, once it
  knows, asks no witness;
- proofs and roots, each folded from O(log n) stored nodes fetched in one query;
- entries by range (the exact leaf bytes) and filtered queries pinned to a checkpoint size,
  each page written for one index whose rows come in idx order (migration 0011), so a page
  reads about what it returns however rare the match; a time window is first bounded by the
  indices it holds.

The publisher signs only what its `TreeCheck` (`services.auditcheck`) folded from re-hashed
leaves: at start it checks the whole log, before each checkpoint the events since (a replica
that takes the lease over checks every event since its own last check), and a stored checkpoint
it did not store itself (another term's) must be consistent with the root it folded, by a proof
from the stored nodes; on any mismatch the log fails closed (no checkpoint, no append). Every
row a query serves is checked against its leaf first; an export serves the exact leaves even
from a damaged log (they are the evidence, and `auditverify` their judge) but records the
damage all the same.

What it does not do: decide who may read (the API checks roles) or verify anything for the
auditor (that is `exchange.auditverify`, which trusts none of this). Replicas that do not sign
do not re-check new events: the signer does before each checkpoint, every append checks the
tail, and every replica checks the whole log when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ..db import Connection, Database
from ..errors import AuditLogDamaged, DependencyError, NoteError, ProofError, ValidationError
from ..files import write_atomic
from ..format import merkle
from ..format.checkpoint import Checkpoint
from ..format.note import Signature, Signer, open_note, sign_note
from ..settings import Settings
from ..witness import request_cosignature, witness_session
from . import logrotation
from .audit import SYSTEM, AuditLog, Context, read_nodes
from .auditcheck import ROW_COLUMNS, TreeCheck, check_row
from .leases import SIGNER_LEASE, Lease

__all__ = [
    "LOG_KEY_FILE",
    "Filter",
    "Publisher",
    "actor_id",
    "checkpoint_at",
    "consistency_proof",
    "inclusion_proofs",
    "latest_checkpoint",
    "load_or_create_signer",
    "query",
    "read_entries",
    "tree_size",
]

log = logging.getLogger("exchange.audit")

LOG_KEY_FILE = "log-signing.key"


# -- the signing key ---------------------------------------------------------------------------------


def load_or_create_signer(path: Path, origin: str) -> Signer:
    """The log's note signer from `path`, creating the key (mode 0600) if there is none.

    Creation is atomic (a hard link to a finished temporary file), so replicas starting at once
    agree on one key. A key made for another origin is refused: a new origin is a new log.
    """
    if not path.exists():  # only saves making a key; the create below settles any race
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Signer(origin, os.urandom(32)).signer_key() + "\n"
        with contextlib.suppress(FileExistsError):  # another replica was first: use its key
            write_atomic(path, key.encode("ascii"), overwrite=False)
    signer = Signer.from_skey(path.read_text(encoding="ascii").strip())
    if signer.name != origin:
        raise ValidationError(
            f"the log signing key in {path} is for the log {signer.name!r}, not {origin!r}: "
            "a new origin needs a new key file"
        )
    return signer


# -- tree reads --------------------------------------------------------------------------------------


async def tree_size(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT size FROM audit_head WHERE id = 1"))


async def _nodes_of(
    conn: Connection, nodes: Sequence[merkle.NodeId], size: int
) -> dict[merkle.NodeId, bytes]:
    """The nodes a proof in the tree of `size` needs; a size the log has not reached is the caller's error.

    Nodes commit with the head in one transaction, so they are missing exactly when the log is
    smaller than `size` (or the tree is damaged); the size is looked up only then, which keeps
    a proof to one query.
    """
    if nodes:
        try:
            return await read_nodes(conn, nodes)
        except AuditLogDamaged:
            if size <= await tree_size(conn):
                raise  # the log is that large: the stored tree is damaged
    elif size <= await tree_size(conn):
        return {}
    raise ValidationError(f"the log has fewer than {size} events", field="size")


async def root_at(conn: Connection, size: int) -> bytes:
    nodes = await read_nodes(conn, merkle.nodes_needed_for_root(size))
    return merkle.root_at(size, lambda level, i: nodes[level, i])


async def inclusion_proofs(conn: Connection, indices: Sequence[int], size: int) -> dict[int, list[bytes]]:
    """Inclusion proofs of several leaves in the tree of `size`; their nodes are read together."""
    if not indices:
        return {}
    for index in indices:
        if not 0 <= index < size:
            raise ValidationError(f"leaf index {index} is not in a tree of {size} events", field="index")
    needed = [node for index in indices for node in merkle.nodes_needed_for_inclusion(index, size)]
    nodes = await _nodes_of(conn, needed, size)
    return {index: merkle.inclusion_proof(index, size, lambda level, i: nodes[level, i]) for index in indices}


async def consistency_proof(conn: Connection, old_size: int, new_size: int) -> list[bytes]:
    if not 0 <= old_size <= new_size:
        raise ValidationError("the old size must be between 0 and the new size", field="old")
    nodes = await _nodes_of(conn, merkle.nodes_needed_for_consistency(old_size, new_size), new_size)
    return merkle.consistency_proof(old_size, new_size, lambda level, i: nodes[level, i])


# -- checkpoints -------------------------------------------------------------------------------------


async def latest_checkpoint(db: Database) -> tuple[int, bytes] | None:
    row = await db.fetchone("SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1")
    return None if row is None else (int(row["size"]), bytes(row["note"]))


async def checkpoint_at(db: Database, size: int) -> bytes | None:
    row = await db.fetchone("SELECT note FROM audit_checkpoints WHERE size = $1", size)
    return None if row is None else bytes(row["note"])


@dataclass(frozen=True)
class WitnessConfig:
    urls: tuple[str, ...]
    vkeys: tuple[str, ...]
    quorum: int

    @classmethod
    def from_settings(cls, settings: Settings) -> WitnessConfig:
        urls, vkeys = settings.witness_urls, settings.witness_vkeys
        if settings.witness_quorum > len(vkeys) or settings.witness_quorum > len(urls):
            raise ValidationError(
                f"witness_quorum is {settings.witness_quorum} but only {len(urls)} witness URLs and "
                f"{len(vkeys)} witness keys are configured"
            )
        return cls(urls, vkeys, settings.witness_quorum)


class _Fenced(Exception):
    """A write under the signer lease found it in another term: rolled back, step down."""


class Publisher:
    """Signs and publishes checkpoints and appends heartbeats, while this replica holds the
    signer lease (`services.leases`, `SIGNER_LEASE`); one per service process.

    Every replica runs one, and one at a time signs: the others only follow the latest
    checkpoint (for the metrics) and the log's size (for heartbeats, should they take over).
    A checkpoint is stored, and a heartbeat appended, in a transaction that first checks the
    lease's holder and fence (`Lease.check`), so a replica that lost the lease while it signed
    (paused, cut off) stores nothing; it also asks no witness once it knows it lost it.
    """

    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        signer: Signer,
        settings: Settings,
        clock: Callable[[], int],
        *,
        lease: Lease | None = None,
    ) -> None:
        self.db = db
        self.audit = audit
        self.signer = signer
        self.settings = settings
        self.clock = clock
        self.witnesses = WitnessConfig.from_settings(settings)
        #: The signer lease; by default this process's, judged by the database's clock.
        self.lease = (
            lease if lease is not None else Lease(db, SIGNER_LEASE, ttl_s=settings.audit_signer_lease_s)
        )
        self._lock = asyncio.Lock()
        # The size each witness last cosigned, as far as we know; a 409 corrects it.
        self._witness_size: dict[str, int] = {}
        self._seen_size = -1
        self._seen_at = time.monotonic()
        self.check = TreeCheck(audit)
        # The latest stored checkpoint this process checked against its own leaves (or stored).
        self._verified: tuple[int, bytes] | None = None
        self._rotated_away = False
        #: Told each witness call's URL (a configured one) and duration in seconds: metrics.
        self.on_witness_call: Callable[[str, float], None] | None = None
        #: Told when the latest checkpoint stored (by any replica) was stored, in ms: metrics.
        self.on_checkpoint: Callable[[int], None] | None = None

    async def note_latest(self) -> None:
        """Tell `on_checkpoint` when the latest stored checkpoint (any replica's) was stored."""
        if self.on_checkpoint is None:
            return
        at_ms = await self.db.fetchval(
            "SELECT created_at_ms FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
        )
        if at_ms is not None:
            self.on_checkpoint(int(at_ms))

    async def check_at_start(self) -> None:
        """Check the whole stored log before anything is served; AuditLogDamaged (and the log
        failed closed) if it does not hold together."""
        async with self._lock:
            latest = await latest_checkpoint(self.db)
            verifier = self.signer.verifier()
            if latest is not None:  # after a key rotation, the latest may be the old key's last word
                async with self.db.read() as conn:
                    verifier = await logrotation.verifier_at(conn, latest[0], verifier)
            await self.check.start(self.db, latest, verifier)
            self._verified = latest

    async def _hold(self) -> int | None:
        """The fence of this process's signer term, taking the lease if it is free; None while
        another replica holds it."""
        if not self.lease.held:
            await self.lease.acquire()
        return self.lease.fence

    async def publish(self) -> bytes | None:
        """Sign a checkpoint of the current tree if it grew and this replica holds the signer
        lease; return the stored note, if any.

        Nothing is signed once the log was found damaged, nor when the events since the last
        check do not hold together, nor when the latest stored checkpoint (another term's, after
        a takeover) is not consistent with the leaves this process checked (each marks it
        damaged). The lease is checked again just before the note goes to the witnesses, and by
        the transaction that stores it, which stores it only above the latest stored size.
        """
        async with self._lock:
            if self.audit.damage is not None:
                return None
            fence = await self._hold()
            if fence is None:
                await self.note_latest()
                return None
            latest = await latest_checkpoint(self.db)
            try:
                # Even with nothing new to sign: re-reading the last event checked is one row.
                size = await self.check.head(self.db)
                if not await self._origin_is_ours():
                    return None  # the log rotated away from this key (read after the size: see there)
                root = await self.check.advance(self.db, size)
                if latest is not None and latest != self._verified:
                    await self._check_latest(latest, size, root)
            except AuditLogDamaged:
                return None  # failed closed and said so
            if latest is not None and size <= latest[0]:
                await self.note_latest()
                return None
            text = Checkpoint(self.signer.name, size, root).to_text()
            note = sign_note(text, [self.signer])
            # The note leaves this process only in the term it was checked and signed in.
            renewed = await self.lease.acquire()
            if renewed is None or renewed.fence != fence:
                log.warning("checkpoint %d not published: the signer lease passed to another term", size)
                return None
            cosignatures = await self._cosign(note, size, latest[0] if latest else 0)
            if len(cosignatures) < self.witnesses.quorum:
                log.warning(
                    "checkpoint %d not published: %d of %d witness cosignatures",
                    size,
                    len(cosignatures),
                    self.witnesses.quorum,
                )
                return None
            note += "".join(cosignatures).encode("utf-8")
            try:
                stored = await self._store(size, note, fence)
            except _Fenced:
                log.warning("checkpoint %d not stored: the signer lease passed to another term", size)
                self.lease.step_down()
                return None
            if stored:
                self._verified = (size, note)
            await self.note_latest()
            return note if stored else None

    async def _origin_is_ours(self) -> bool:
        """Whether the log's head still names this key's origin; if not, step down for good.

        Read after the size to be signed: if the origin is still ours now, every leaf below
        that size was appended under it, since a rotation moves the origin in the transaction
        that appends its event. After a rotation this key signs nothing more (its last word was
        the rotation command's), so this replica gives the lease up to one with the new key.
        """
        origin = await self.db.fetchval("SELECT origin FROM audit_head WHERE id = 1")
        if origin is None or origin == self.signer.name:
            return True
        if not self._rotated_away:
            self._rotated_away = True
            log.warning(
                "the audit log was rotated to %r: this replica's key signs nothing more; restart it "
                "with EXCHANGE_LOG_ORIGIN and the new key file",
                origin,
            )
            await self.lease.release()
        return False

    async def sign_last_word(self, size: int) -> bytes:
        """Sign the checkpoint of `size`, whose last leaf is the rotation away from this key.

        For `exchange admin log-key rotate` (services.logrotation): the leaves up to `size` are
        checked from the first, the note is cosigned by the witnesses like any checkpoint (a
        DependencyError if fewer than the quorum sign: run the command again) and stored unless
        a checkpoint of that size is stored already, which is returned instead. It needs no
        lease: no replica signs this size (the old key's publishers stop at the rotation, the
        new key's sign only sizes after it).
        """
        existing = await checkpoint_at(self.db, size)
        if existing is not None:
            return existing
        async with self._lock:
            root = await self.check.advance(self.db, size)
            note = sign_note(Checkpoint(self.signer.name, size, root).to_text(), [self.signer])
            latest = await latest_checkpoint(self.db)
            published = latest[0] if latest is not None and latest[0] < size else 0
            cosignatures = await self._cosign(note, size, published)
            if len(cosignatures) < self.witnesses.quorum:
                raise DependencyError(
                    f"the rotation's checkpoint got {len(cosignatures)} of {self.witnesses.quorum} witness "
                    "cosignatures; nothing was stored: run the command again when the witnesses answer",
                    code="witness-quorum",
                )
            note += "".join(cosignatures).encode("utf-8")
            async with self.db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO audit_checkpoints (size, note, created_at_ms) VALUES ($1, $2, $3)"
                    " ON CONFLICT (size) DO NOTHING",
                    size,
                    note,
                    self.clock(),
                )
        stored = await checkpoint_at(self.db, size)
        assert stored is not None
        return stored

    async def _check_latest(self, latest: tuple[int, bytes], size: int, root: bytes) -> None:
        """Check a checkpoint this process did not store (another term's) against the tree it
        folded itself: signed with the log's key, and its root consistent with `root` at `size`,
        by a proof from the stored nodes checked against both roots. So a new signer's first
        checkpoint extends the last one stored, whoever signed it."""
        old_size, note = latest
        try:
            async with self.db.read() as conn:  # the old key's, if it is the rotation's last word
                verifier = await logrotation.verifier_at(conn, old_size, self.signer.verifier())
            old = Checkpoint.parse(open_note(note, [verifier]).text)
            if old.origin != verifier.name or old.size != old_size or old_size > size:
                raise ProofError(f"it is for another log or size, or past the head {size}")
            async with self.db.read() as conn:
                proof = await consistency_proof(conn, old_size, size)
            merkle.verify_consistency(old_size, size, old.root_hash, root, proof)
        except (NoteError, ProofError, AuditLogDamaged, ValidationError) as exc:
            damage = AuditLogDamaged(
                f"the latest checkpoint (size {old_size}) does not extend to the leaves checked: {exc}"
            )
            self.audit.fail_closed(damage)
            raise damage from exc
        self._verified = latest

    async def _store(self, size: int, note: bytes, fence: int) -> bool:
        """Store the note if this process still holds the lease in the term `fence` (else
        _Fenced, and the transaction rolls back) and `size` is above every stored checkpoint."""
        async with self.db.transaction() as conn:
            if not await self.lease.check(conn, fence):
                raise _Fenced
            # The lease row is locked now: every store runs after the one before it committed.
            top = await conn.fetchval("SELECT MAX(size) FROM audit_checkpoints")
            if top is not None and size <= int(top):
                return False
            await conn.execute(
                "INSERT INTO audit_checkpoints (size, note, created_at_ms, fence) VALUES ($1, $2, $3, $4)",
                size,
                note,
                self.clock(),
                fence,
            )
        return True

    async def _cosign(self, note: bytes, size: int, published: int) -> list[str]:
        """Ask every configured witness at once; return the cosignature lines that arrived (one
        per witness key) within `witness_timeout_s`, for the caller to hold against the quorum.

        The deadline covers all of a witness's calls together (a 409 costs a second one), so a
        witness that never answers, or answers slowly, costs at most the timeout and does not
        hold up the others: its request is cancelled and the checkpoint goes out with the
        cosignatures that came in, if they make the quorum (tlog-witness allows a subset).
        """
        if not self.witnesses.urls:
            return []
        timeout_s = self.settings.witness_timeout_s
        async with witness_session(
            timeout_s=timeout_s, allow_private=self.settings.witness_allow_private
        ) as session:
            tasks = {
                asyncio.ensure_future(self._cosign_one(session, url, note, size, published)): url
                for url in self.witnesses.urls
            }
            try:
                done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        for task in pending:
            log.warning("witness %s did not answer checkpoint %d within %s s", tasks[task], size, timeout_s)
        lines: list[str] = []
        seen: set[tuple[str, bytes]] = set()
        for task in tasks:  # in the configured order
            if task not in done:
                continue
            sig = task.result()  # a failing database is the publisher's error, not a witness's
            if sig is not None and (sig.name, sig.key_id) not in seen:
                seen.add((sig.name, sig.key_id))
                lines.append(sig.to_line())
        return lines

    async def _cosign_one(
        self, session: aiohttp.ClientSession, url: str, note: bytes, size: int, published: int
    ) -> Signature | None:
        old = self._witness_size.get(url, published)
        for _ in range(2):  # once with our guess, once more with the size a 409 told us
            if old > size:
                return None  # the witness has seen a larger tree (another replica published it)
            async with self.db.read() as conn:
                proof = [] if old == 0 else await consistency_proof(conn, old, size)
            if not self.lease.held:
                return None  # the term ran out meanwhile (by this process's clock): ask no more
            started = time.perf_counter()
            try:
                result = await request_cosignature(session, url, note, old, proof, self.witnesses.vkeys)
            finally:
                if self.on_witness_call is not None:
                    self.on_witness_call(url, time.perf_counter() - started)
            if result.signature is not None:
                self._witness_size[url] = size
                return result.signature
            if result.known_size is None or result.known_size == old:
                log.warning("witness %s refused checkpoint %d: %s", url, size, result.problem)
                return None
            old = self._witness_size[url] = result.known_size
        return None

    async def _observe_size(self) -> int | None:
        """The log's size; remembers when it last changed. None if it just did."""
        async with self.db.read() as conn:
            size = await tree_size(conn)
        if size != self._seen_size:
            self._seen_size, self._seen_at = size, time.monotonic()
            return None
        return size

    async def heartbeat_if_idle(self) -> int | None:
        """Append an `audit.heartbeat` event if no event arrived for `audit_heartbeat_s` and this
        replica holds the signer lease (checked again in the append's transaction).

        Idleness is measured on this process's monotonic clock from the last time it saw the
        log grow (any replica's events count, and every replica watches, so a replica taking
        over knows how long the log was quiet), so wall-clock jumps cannot fake or skip one.
        """
        if self.audit.damage is not None:
            return None
        if await self._observe_size() is None:
            return None
        now = time.monotonic()
        if now - self._seen_at < self.settings.audit_heartbeat_s:
            return None
        fence = await self._hold()
        if fence is None:
            return None
        try:
            async with self.db.transaction() as conn:
                if not await self.lease.check(conn, fence):
                    raise _Fenced
                idx = await self.audit.append(
                    conn,
                    Context(actor=SYSTEM),
                    action="audit.heartbeat",
                    details={"interval_s": int(self.settings.audit_heartbeat_s)},
                )
        except _Fenced:
            log.warning("heartbeat not appended: the signer lease passed to another term")
            self.lease.step_down()
            return None
        self._seen_size, self._seen_at = idx + 1, now
        return idx

    async def release(self) -> None:
        """Give the signer lease up (a graceful stop): another replica takes over at once."""
        async with self._lock:  # not while a checkpoint is on its way to the store
            await self.lease.release()

    async def run_forever(self) -> None:
        """Keep (or wait for) the signer lease, and each tick: as the signer, a heartbeat if the
        log is idle and a checkpoint if it grew; otherwise follow the latest checkpoint."""
        async with asyncio.TaskGroup() as tasks:
            # Not under the publisher's lock: a slow witness must not let the lease lapse.
            tasks.create_task(self.lease.keep_forever())
            while True:
                await asyncio.sleep(self.settings.audit_checkpoint_interval_s)
                if self.audit.damage is not None:
                    continue  # failed closed: said once, nothing more to do until a restart
                try:
                    await self._tick()
                except AuditLogDamaged:
                    pass  # the log failed closed and said so
                except DependencyError:
                    log.warning("checkpoint publication skipped: database unavailable")
                except NoteError:
                    log.exception("checkpoint publication failed")

    async def _tick(self) -> None:
        if await self._hold() is None:
            await self._observe_size()
            await self.note_latest()
            return
        if self.settings.audit_heartbeat_s:
            await self.heartbeat_if_idle()
        await self.publish()


# -- entries and queries -----------------------------------------------------------------------------


async def read_entries(
    db: Database, start: int, end: int, *, batch: int = 1000, audit: AuditLog | None = None
) -> AsyncIterator[bytes]:
    """The exact leaf bytes of events [start, end), in index order, read in batches.

    With `audit`, each row is checked (its columns against its leaf, no gap) and a mismatch
    fails the log closed; the stored leaves are yielded all the same, since an export is how an
    auditor sees what the damage is.
    """
    pos = start
    while pos < end:
        async with db.read() as conn:
            rows = await conn.fetchall(
                f"SELECT {ROW_COLUMNS} FROM audit_events WHERE idx >= $1 AND idx < $2 ORDER BY idx LIMIT $3",  # noqa: S608 - fixed names
                pos,
                end,
                batch,
            )
        for row in rows:
            if audit is not None:
                try:
                    if int(row["idx"]) != pos:
                        raise AuditLogDamaged(
                            f"event {pos} is missing (the next stored event is {row['idx']})"
                        )
                    check_row(row)
                except AuditLogDamaged as exc:
                    audit.fail_closed(exc)
            yield bytes(row["leaf"])
            pos = int(row["idx"]) + 1
        if not rows:
            if audit is not None:
                audit.fail_closed(AuditLogDamaged(f"event {pos} is missing (the export asked up to {end})"))
            return


@dataclass(frozen=True)
class Filter:
    """A filtered query; every field narrows it (AND). Times are milliseconds, `until` exclusive."""

    actor_id: str | None = None
    org: str | None = None
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    outcome: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


#: Equality filters, by field: the column, and an equivalent term no index can serve (NULL
#: stays NULL, so `col || '' = $n` matches exactly the rows `col = $n` does).
_EQUALITY_COLUMNS = {
    "actor_id": "actor_id",
    "org": "actor_org",
    "action": "action",
    "resource_type": "resource_type",
    "resource_id": "resource_id",
    "outcome": "outcome",
}
#: The index a page walks, by which equality filters are present: the first entry whose fields
#: are all given wins. Each index ends with idx (migrations 0001, 0003, 0011), so the rows come
#: out in page order and a page reads about as many index entries as it returns (plus the
#: matches of the walked columns that the other filters reject). An actor's or a resource's
#: events are few next to the log's, so those come first; then the conjunctions auditors use.
_WALK_ORDER: tuple[tuple[str, ...], ...] = (
    ("actor_id",),
    ("resource_type", "resource_id"),
    ("org", "action", "outcome"),
    ("org", "action"),
    ("org", "outcome"),
    ("action", "outcome"),
    ("org",),
    ("action",),
    ("resource_type",),
    ("outcome",),
)
#: A time filter first reads up to this many (time_ms, idx) index entries: if that is all the
#: window holds, the page reads just those events (by time, then sorted: a short window,
#: however far back). Otherwise up to _TIME_SCAN_ROWS entries are scanned for the window's
#: lowest and highest index, which bound the page's walk in (idx, time_ms) (time is nearly in
#: idx order, so the walk is dense there); past that, the walk starts at the cursor.
_TIME_PROBE_ROWS = 1000
_TIME_SCAN_ROWS = 100_000


def _time_clauses(where: Filter, args: list[Any]) -> list[str]:
    clauses = []
    if where.since_ms is not None:
        args.append(where.since_ms)
        clauses.append(f"time_ms >= ${len(args)}")
    if where.until_ms is not None:
        args.append(where.until_ms)
        clauses.append(f"time_ms < ${len(args)}")
    return clauses


async def _time_bounds(
    conn: Connection, where: Filter, after: int, size: int, *, scan: bool
) -> tuple[tuple[int, int] | None, bool]:
    """((after, before) such that every event of the time window below `size` is within, or None
    if the window holds more than _TIME_PROBE_ROWS events (with `scan`: _TIME_SCAN_ROWS);
    whether it holds at most _TIME_PROBE_ROWS, so that reading it by time is the cheaper way).

    The cursor is not a term here: (time_ms, idx) is read in time order, and the events a
    cursor skips come first in it, so every page but the first would read them all.
    """
    args: list[Any] = [size]
    window = " AND ".join(["idx + 0 < $1", *_time_clauses(where, args)])  # idx checked, never walked
    args.append(_TIME_PROBE_ROWS + 1)
    rows = await conn.fetchall(
        f"SELECT idx FROM audit_events WHERE {window} ORDER BY time_ms LIMIT ${len(args)}",  # noqa: S608 - fixed fragments, placeholders only
        *args,
    )
    if len(rows) <= _TIME_PROBE_ROWS:
        found = [int(r["idx"]) for r in rows if int(r["idx"]) > after]
        return ((max(after, min(found) - 1), max(found) + 1) if found else (after, after + 1)), True
    if not scan:
        return None, False
    args[-1] = _TIME_SCAN_ROWS + 1
    span = await conn.fetchone(
        f"SELECT COUNT(*) AS n, MIN(idx) AS lo, MAX(idx) AS hi FROM (SELECT idx FROM audit_events"  # noqa: S608 - fixed fragments, placeholders only
        f" WHERE {window} LIMIT ${len(args)}) AS w",
        *args,
    )
    if span is None or int(span["n"]) > _TIME_SCAN_ROWS:
        return None, False
    lo, hi = max(after, int(span["lo"]) - 1), int(span["hi"]) + 1
    return ((lo, hi) if lo < hi else (after, after + 1)), False


async def query(
    conn: Connection, where: Filter, *, size: int, after: int, limit: int
) -> list[tuple[int, bytes]]:
    """(idx, leaf) of matching events with after < idx < size, in index order, at most `limit`.

    The statement is written so that both engines read it one way, whatever their statistics
    (SQLite keeps none here): the equality filters of the first index of `_WALK_ORDER` that fits
    are walked in idx order and the others are written so that no index serves them; a time
    window is first narrowed to the indices it holds, when it holds few (`_time_bounds`, then
    read by time and sorted), else walked in (idx, time_ms) when nothing else narrows it. Each
    row is checked against its leaf before it is returned (AuditLogDamaged if a column
    differs): the columns chose it, so the leaf must say what they say.

    PostgreSQL plans each statement for its values, but after five runs a prepared statement
    may switch to a generic plan, which for a single filter walks the primary key and reads
    the whole log for a rare value: the pool keeps custom plans (`plan_cache_mode`, set in
    `db._postgres`).
    """
    given = where.to_json()
    walked = next((fields for fields in _WALK_ORDER if all(f in given for f in fields)), ())
    timed = where.since_ms is not None or where.until_ms is not None
    # An index of _WALK_ORDER narrows the walk already: then only a short window is worth bounds.
    bounds, few = await _time_bounds(conn, where, after, size, scan=not walked) if timed else (None, False)
    lo, hi = bounds if bounds is not None else (after, size)
    # Which index reads the page, by the terms left indexable: `idx + 0` and `time_ms + 0` are
    # the same values, but no index serves them.
    by_time = few and not walked  # the window's few events, by time, then sorted
    by_idx_time = timed and not few and not walked  # a long window, walked in idx order
    idx = "idx + 0" if by_time else "idx"
    time_ms = "time_ms" if by_time or by_idx_time else "time_ms + 0"
    clauses = [f"{idx} > $1", f"{idx} < $2"]
    args: list[Any] = [lo, hi]
    for name, value in given.items():
        args.append(value)
        if name == "since_ms":
            clauses.append(f"{time_ms} >= ${len(args)}")
        elif name == "until_ms":
            clauses.append(f"{time_ms} < ${len(args)}")
        else:
            column = _EQUALITY_COLUMNS[name]
            clauses.append(f"{column} = ${len(args)}" if name in walked else f"{column} || '' = ${len(args)}")
    args.append(limit)
    where_sql = " AND ".join(clauses)
    if by_idx_time:
        # Only time filters: find the page's indices in the covering (idx, time_ms), so the
        # events skipped are never read, then read the page's rows by key.
        sql = (
            f"SELECT {ROW_COLUMNS} FROM audit_events WHERE idx IN (SELECT idx FROM audit_events"  # noqa: S608 - fixed fragments, placeholders only
            f" WHERE {where_sql} ORDER BY idx LIMIT ${len(args)}) ORDER BY idx"
        )
    else:
        sql = f"SELECT {ROW_COLUMNS} FROM audit_events WHERE {where_sql} ORDER BY {idx} LIMIT ${len(args)}"  # noqa: S608 - fixed fragments, placeholders only
    rows = await conn.fetchall(sql, *args)
    return [(int(r["idx"]), check_row(r)) for r in rows]


async def actor_id(db: Database, actor: str) -> str:
    """A principal's id from its name or its id (a name is looked up first)."""
    found = await db.fetchval("SELECT id FROM principals WHERE name = $1", actor)
    return str(found) if found is not None else actor

"""The audit log as a transparency log: its key, checkpoints, proofs, entries and queries.

`services.audit` appends events and the Merkle nodes they complete; this module reads them back
for auditors and publishes signed checkpoints:

- the log signing key: an Ed25519 note key named after the log origin, kept as a signer key
  string in a file of mode 0600 (created on first start; every replica must share it);
- `Publisher`: when the tree grew, sign a C2SP tlog-checkpoint for its size, collect witness
  cosignatures (c2sp.org/tlog-witness) and store the note only if the quorum signed; while no
  event arrives for `audit_heartbeat_s`, append an `audit.heartbeat` event, so that a quiet
  stretch is provably quiet (consecutive events are never further apart than the interval plus
  one publisher tick);
- proofs and roots, each folded from O(log n) stored nodes fetched in one query;
- entries by range (the exact leaf bytes) and filtered queries pinned to a checkpoint size.

The publisher signs only what its `TreeCheck` (`services.auditcheck`) folded from re-hashed
leaves: at start it checks the whole log, before each checkpoint the events since, and on any
mismatch the log fails closed (no checkpoint, no append). Every row a query serves is checked
against its leaf first; an export serves the exact leaves even from a damaged log (they are
the evidence, and `auditverify` their judge) but records the damage all the same.

What it does not do: decide who may read (the API checks roles) or verify anything for the
auditor (that is `exchange.auditverify`, which trusts none of this).
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
from ..errors import AuditLogDamaged, DependencyError, NoteError, ValidationError
from ..files import write_atomic
from ..format import merkle
from ..format.checkpoint import Checkpoint
from ..format.note import Signature, Signer, sign_note
from ..settings import Settings
from ..witness import request_cosignature, witness_session
from .audit import SYSTEM, AuditLog, Context, read_nodes
from .auditcheck import ROW_COLUMNS, TreeCheck, check_row

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


class Publisher:
    """Signs and publishes checkpoints and appends heartbeats; one per service process.

    Replicas may publish the same size at once: the note is deterministic for a size (Ed25519)
    up to the witnesses' timestamps, and the first stored note wins.
    """

    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        signer: Signer,
        settings: Settings,
        clock: Callable[[], int],
    ) -> None:
        self.db = db
        self.audit = audit
        self.signer = signer
        self.settings = settings
        self.clock = clock
        self.witnesses = WitnessConfig.from_settings(settings)
        self._lock = asyncio.Lock()
        # The size each witness last cosigned, as far as we know; a 409 corrects it.
        self._witness_size: dict[str, int] = {}
        self._seen_size = -1
        self._seen_at = time.monotonic()
        self.check = TreeCheck(audit)
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
            await self.check.start(self.db, await latest_checkpoint(self.db), self.signer.verifier())

    async def publish(self) -> bytes | None:
        """Sign a checkpoint of the current tree if it grew; return the stored note, if any.

        Nothing is signed once the log was found damaged, nor when the events since the last
        check do not hold together (which marks it damaged).
        """
        async with self._lock:
            if self.audit.damage is not None:
                return None
            latest = await latest_checkpoint(self.db)
            try:
                # Even with nothing new to sign: re-reading the last event checked is one row.
                size = await self.check.head(self.db)
                root = await self.check.advance(self.db, size)
            except AuditLogDamaged:
                return None  # failed closed and said so
            if latest is not None and size <= latest[0]:
                await self.note_latest()
                return None
            text = Checkpoint(self.audit.origin, size, root).to_text()
            note = sign_note(text, [self.signer])
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
            async with self.db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO audit_checkpoints (size, note, created_at_ms) VALUES ($1, $2, $3)"
                    " ON CONFLICT (size) DO NOTHING",
                    size,
                    note,
                    self.clock(),
                )
            await self.note_latest()
            return note

    async def _cosign(self, note: bytes, size: int, published: int) -> list[str]:
        if not self.witnesses.urls:
            return []
        async with witness_session(
            timeout_s=self.settings.witness_timeout_s, allow_private=self.settings.witness_allow_private
        ) as session:
            results = await asyncio.gather(
                *(self._cosign_one(session, url, note, size, published) for url in self.witnesses.urls)
            )
        lines: list[str] = []
        seen: set[tuple[str, bytes]] = set()
        for sig in results:
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

    async def heartbeat_if_idle(self) -> int | None:
        """Append an `audit.heartbeat` event if no event arrived for `audit_heartbeat_s`.

        Idleness is measured on this process's monotonic clock from the last time it saw the
        log grow (any replica's events count), so wall-clock jumps cannot fake or skip one.
        """
        if self.audit.damage is not None:
            return None
        async with self.db.read() as conn:
            size = await tree_size(conn)
        now = time.monotonic()
        if size != self._seen_size:
            self._seen_size, self._seen_at = size, now
            return None
        if now - self._seen_at < self.settings.audit_heartbeat_s:
            return None
        async with self.db.transaction() as conn:
            idx = await self.audit.append(
                conn,
                Context(actor=SYSTEM),
                action="audit.heartbeat",
                details={"interval_s": int(self.settings.audit_heartbeat_s)},
            )
        self._seen_size, self._seen_at = idx + 1, now
        return idx

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.audit_checkpoint_interval_s)
            if self.audit.damage is not None:
                continue  # failed closed: said once, nothing more to do until a restart
            try:
                if self.settings.audit_heartbeat_s:
                    await self.heartbeat_if_idle()
                await self.publish()
            except AuditLogDamaged:
                pass  # the log failed closed and said so
            except DependencyError:
                log.warning("checkpoint publication skipped: database unavailable")
            except NoteError:
                log.exception("checkpoint publication failed")


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


_FILTER_SQL = {
    "actor_id": "actor_id = ${}",
    "org": "actor_org = ${}",
    "action": "action = ${}",
    "resource_type": "resource_type = ${}",
    "resource_id": "resource_id = ${}",
    "outcome": "outcome = ${}",
    "since_ms": "time_ms >= ${}",
    "until_ms": "time_ms < ${}",
}


async def query(
    conn: Connection, where: Filter, *, size: int, after: int, limit: int
) -> list[tuple[int, bytes]]:
    """(idx, leaf) of matching events with after < idx < size, in index order, at most `limit`.

    Each row is checked against its leaf before it is returned (AuditLogDamaged if a column
    differs): the columns chose it, so the leaf must say what they say.
    """
    clauses = ["idx > $1", "idx < $2"]
    args: list[Any] = [after, size]
    for name, value in where.to_json().items():
        args.append(value)
        clauses.append(_FILTER_SQL[name].format(len(args)))
    args.append(limit)
    rows = await conn.fetchall(
        f"SELECT {ROW_COLUMNS} FROM audit_events WHERE "  # noqa: S608 - fixed fragments, placeholders only
        + " AND ".join(clauses)
        + f" ORDER BY idx LIMIT ${len(args)}",
        *args,
    )
    return [(int(r["idx"]), check_row(r)) for r in rows]


async def actor_id(db: Database, actor: str) -> str:
    """A principal's id from its name or its id (a name is looked up first)."""
    found = await db.fetchval("SELECT id FROM principals WHERE name = $1", actor)
    return str(found) if found is not None else actor

"""SDK calls for auditors: the log key, checkpoints, proofs, entries, queries and export bundles.

`AuditClient(client)` wraps a signed `Client`. It fetches; it does not decide whether what it
fetched is true; that is `exchange.auditverify`, which trusts none of it (an export bundle is
checked offline, against the key the auditor pinned, never the copy the service sent along).
`verified_query` fetches a query's pages with their proofs and has `auditverify` judge every
row before handing it out; what fails is `AuditEventUnverified`, never a row (`verified_page`
does the same for one page, for readers that page on their own). `follow` fetches
the log's tlog-tiles (`/v1/audit/log/...`) that `auditverify.tiles_needed` names, one request
each, for `auditverify.verify_tiles` to judge.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import auditverify
from ..auditverify import BUNDLE_FILES, MANIFEST
from ..errors import AuditEventUnverified, NotFound, ValidationError
from ..format import tiles
from ..format.checkpoint import Checkpoint
from . import Client
from ._csv import safe_cell
from .auditproof import build_proof

__all__ = ["AuditClient", "events_csv"]

#: Entries per request when exporting; the service caps it with audit_export_max_entries.
EXPORT_PAGE = 50_000


def _hashes(items: list[str]) -> list[bytes]:
    return [base64.b64decode(h, validate=True) for h in items]


def _unverified(exc: auditverify.VerifyFailure, idx: int | None = None) -> Exception:
    if exc.kind == "usage":
        return ValidationError(exc.message)
    if idx is None:
        return AuditEventUnverified(exc.message, check=exc.kind)
    return AuditEventUnverified(exc.message, check=exc.kind, idx=idx)


#: The service's cursor, "<checkpoint size>.<idx of the last row returned>".
_CURSOR = re.compile(r"([0-9]{1,19})\.([0-9]{1,19})")


def _requested_size(filters: Mapping[str, str | int | None]) -> int | None:
    size = filters.get("size")
    return None if size is None else int(size)


class _PageCheck:
    """What `verified_query` and `verified_page` check of a query's pages, page by page.

    `pin` takes the first page's checkpoint (signed by the pinned key and quorum, of the size it
    claims or was asked for, consistent with the saved one: a consistency proof is fetched) and
    holds every later page to the very same note; `rows` checks each row against it (in idx
    order after `after`, a canonical event of the log matching the filters, its inclusion proof
    leading to the root). Failures raise AuditEventUnverified (ValidationError for an unusable
    pinned key). The state is only read.
    """

    def __init__(
        self,
        audit: AuditClient,
        filters: Mapping[str, str | int | None],
        state: auditverify.State,
        *,
        size: int | None,
        after: int = -1,
    ) -> None:
        self.audit, self.filters, self.state, self.size = audit, filters, state, size
        self.note: str | None = None
        self.checkpoint: Checkpoint | None = None
        self.last = after

    async def pin(self, page: Mapping[str, Any]) -> None:
        try:
            if self.note is None:
                note = page["checkpoint"]["note"]
                checkpoint = auditverify.open_checkpoint(note.encode("utf-8"), self.state)
                if page["checkpoint"]["size"] != checkpoint.size or (
                    self.size is not None and self.size != checkpoint.size
                ):
                    raise auditverify.VerifyFailure(
                        "signature", "the page's checkpoint is not of the size it claims or was asked for"
                    )
                sizes = auditverify.consistency_sizes(self.state, checkpoint)
                proof = await self.audit.consistency_proof(*sizes) if sizes else []
                auditverify.check_consistent(self.state, checkpoint, proof)
                self.note, self.checkpoint = note, checkpoint
            elif page["checkpoint"]["note"] != self.note:
                raise auditverify.VerifyFailure(
                    "signature", "the query's pages are pinned to different checkpoints"
                )
        except auditverify.VerifyFailure as exc:
            raise _unverified(exc) from exc

    def rows(self, page: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        checkpoint = self.checkpoint
        assert checkpoint is not None, "pin the page first"
        earlier = [auditverify.vkey_name(v) for v in self.state.rotated_from]
        for item in page["items"]:
            idx = item.get("idx")
            if not isinstance(idx, int) or isinstance(idx, bool) or idx <= self.last:
                raise AuditEventUnverified(
                    f"the service listed idx {idx!r} after idx {self.last}: rows out of order or repeated",
                    check="entries",
                )
            try:
                proof = _hashes(item.get("proof") or [])
            except (ValueError, TypeError) as exc:  # not a list of base64 strings
                raise AuditEventUnverified(
                    f"event {idx}: its inclusion proof is malformed", check="proof", idx=idx
                ) from exc
            try:
                event = auditverify.check_query_row(
                    str(item.get("leaf")).encode("utf-8"), idx, proof, checkpoint, self.filters, earlier
                )
            except auditverify.VerifyFailure as exc:
                raise _unverified(exc, idx) from exc
            self.last = idx
            yield item | {"event": event, "checkpoint": page["checkpoint"], "proof": item.get("proof")}


class AuditClient:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def vkey(self) -> dict[str, Any]:
        return await self.client.request("GET", "/v1/audit/vkey", signed=False)  # type: ignore[no-any-return]

    async def checkpoint(self, size: int | None = None) -> dict[str, Any]:
        """{"size", "note"}: the latest checkpoint, or the one published at `size`."""
        path = "/v1/audit/checkpoint" if size is None else f"/v1/audit/checkpoints/{size}"
        return await self.client.request("GET", path)  # type: ignore[no-any-return]

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        data = await self.client.request(
            "GET", "/v1/audit/proof/inclusion", params={"index": str(index), "size": str(size)}
        )
        return _hashes(data["proof"])

    async def consistency_proof(self, old: int, new: int) -> list[bytes]:
        data = await self.client.request(
            "GET", "/v1/audit/proof/consistency", params={"old": str(old), "new": str(new)}
        )
        return _hashes(data["proof"])

    async def entries(self, start: int, end: int) -> AsyncIterator[bytes]:
        """The exact leaves of events [start, end), page by page (each page is logged as an export)."""
        pos = start
        while pos < end:
            stop = min(end, pos + EXPORT_PAGE)
            raw: bytes = await self.client.request(
                "GET", "/v1/audit/entries", params={"start": str(pos), "end": str(stop)}, raw=True
            )
            lines = raw.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            for line in lines:
                yield line
            if len(lines) != stop - pos:
                return  # the service has fewer rows than it claims: the verifier will say so
            pos = stop

    async def query(
        self, filters: Mapping[str, str | int | None], *, limit: int | None = None, proofs: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Every matching event as {"idx", "leaf", "event", "proof"?, "checkpoint"}, following cursors.

        All pages are pinned to the checkpoint of the first one. A filtered query shows what
        matched; it cannot prove that nothing else did.
        """
        async for page in self._pages(filters, limit=limit, proofs=proofs):
            for item in page["items"]:
                item["event"] = json.loads(item["leaf"])
                item["checkpoint"] = page["checkpoint"]
                yield item

    async def _pages(
        self,
        filters: Mapping[str, str | int | None],
        *,
        limit: int | None,
        proofs: bool,
        cursor: str | None = None,
        one: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        """The query's pages from `cursor` on (the first page without one); only that page if `one`."""
        params = {k: str(v) for k, v in filters.items() if v is not None}
        if limit is not None:
            params["limit"] = str(limit)
        if proofs:
            params["proofs"] = "1"
        while True:
            page = await self.client.request(
                "GET", "/v1/audit/events", params=params | ({"cursor": cursor} if cursor else {})
            )
            yield page
            cursor = page["next_cursor"]
            if not cursor or one:
                return

    async def verified_query(
        self,
        filters: Mapping[str, str | int | None],
        state: auditverify.State,
        *,
        limit: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """`query` with proofs, each item handed out only once `auditverify` has checked it.

        The first page's checkpoint must be signed by the key (and quorum) pinned in `state` and
        consistent with the checkpoint saved there (a consistency proof is fetched); every page
        must be pinned to that same checkpoint; every row must be a canonical event of the log,
        match `filters`, and have an inclusion proof that leads to the checkpoint's root. The
        first failure raises AuditEventUnverified (naming the idx), ValidationError if the
        pinned key itself is unusable. `state` is not changed.
        """
        check = _PageCheck(self, filters, state, size=_requested_size(filters))
        async for page in self._pages(filters, limit=limit, proofs=True):
            await check.pin(page)
            for item in check.rows(page):
                yield item

    async def verified_page(
        self,
        filters: Mapping[str, str | int | None],
        state: auditverify.State,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of `verified_query`: {"checkpoint", "items", "next_cursor"}, for a reader
        that pages on its own (the auditors' console). Every row of the page is checked as
        `verified_query` checks it, before any is returned. A `cursor` (the `next_cursor` of the
        previous page, "SIZE.IDX") pins the page to that checkpoint size and to rows after that
        idx; one that is not of that form is a ValidationError, sent nowhere."""
        size, after = _requested_size(filters), -1
        if cursor is not None:
            match = _CURSOR.fullmatch(cursor)
            if match is None:
                raise ValidationError("the cursor is not one this service issued", field="cursor")
            size, after = int(match.group(1)), int(match.group(2))
        check = _PageCheck(self, filters, state, size=size, after=after)
        async for page in self._pages(filters, limit=limit, proofs=True, cursor=cursor, one=True):
            await check.pin(page)
            items = list(check.rows(page))
            next_cursor = page.get("next_cursor")
            return {
                "checkpoint": page["checkpoint"],
                "items": items,
                "next_cursor": next_cursor if isinstance(next_cursor, str) and next_cursor else None,
            }
        raise AssertionError("_pages yields at least one page")  # pragma: no cover

    async def export(self, out: Path, *, since_size: int = 0) -> dict[str, Any]:
        """Write an export bundle to `out`: every leaf of the latest checkpoint, with what checks it.

        Files: `entries.jsonl` (the exact leaves, idx 0 to size - 1), `events.csv` (for reading),
        `checkpoint` (the signed note with cosignatures), `consistency.json` (proof from
        `since_size`, the auditor's last verified size), `log.vkey` (the service's own claim of
        its key, for reference only), and `manifest.json` (SHA-256 of each file). If the log
        rotated its key, `rotations.json` too: for each `audit.log.rotated` event at index r, the
        checkpoint of size r + 1 that the old key signed (its last word).
        """
        cp = await self.checkpoint()
        size = int(cp["size"])
        if since_size > size:
            since_size = size  # the verifier compares sizes itself and reports the rollback
        proof = await self.consistency_proof(since_size, size) if since_size else []
        out.mkdir(parents=True, exist_ok=True)
        leaves = out / "entries.jsonl"
        rotated_at: list[int] = []
        with leaves.open("wb") as fh:
            async for leaf in self.entries(0, size):
                fh.write(leaf + b"\n")
                if auditverify.ROTATION_ACTION.encode() in leaf:  # cheap test first
                    event = _readable(leaf)
                    if event.get("action") == auditverify.ROTATION_ACTION and type(event.get("idx")) is int:
                        rotated_at.append(event["idx"] + 1)
        files = list(BUNDLE_FILES)
        if rotated_at:
            notes = [await self.checkpoint(at) for at in rotated_at]
            text = json.dumps([{"size": n["size"], "note": n["note"]} for n in notes], indent=1)
            (out / auditverify.ROTATIONS_FILE).write_text(text + "\n", encoding="utf-8")
            files.append(auditverify.ROTATIONS_FILE)
        with (out / "events.csv").open("w", encoding="utf-8", newline="") as fh:
            events_csv(fh, (_readable(line) for line in leaves.read_bytes().splitlines()))
        (out / "checkpoint").write_bytes(cp["note"].encode("utf-8"))
        consistency = {"old": since_size, "new": size, "proof": [base64.b64encode(h).decode() for h in proof]}
        (out / "consistency.json").write_text(json.dumps(consistency, indent=1) + "\n", encoding="utf-8")
        (out / "log.vkey").write_text((await self.vkey())["vkey"] + "\n", encoding="utf-8")
        manifest = {
            "size": size,
            "files": {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in files},
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return {"out": str(out), "size": size, "since_size": since_size}

    async def prove(self, event: str | int) -> bytes:
        """A c2sp.org/tlog-proof file of one event (its id or idx), in the latest signed checkpoint.

        Its `extra` line is the event's exact leaf (`exchange.client.auditproof`); the parts must
        hold together (AuditEventUnverified otherwise), but the checkpoint's signature is the
        reader's to check (`check_proof`, offline). Auditors and admins may prove any event;
        others, events they are the actor or subject of (PermissionDenied otherwise).
        """
        ref = str(event).lower()
        if not ref or len(ref) > 36 or not set(ref) <= set("0123456789abcdef-"):
            raise ValidationError(f"{event!r} is not an event id (a UUID) or idx (a decimal)")
        answer = await self.client.request("GET", f"/v1/audit/proofs/{ref}")
        return build_proof(answer)

    # -- the log as tlog-tiles -------------------------------------------------------------------

    async def log_checkpoint(self) -> bytes:
        """The latest checkpoint note as the tiles API serves it (`/v1/audit/log/checkpoint`)."""
        note: bytes = await self.client.request("GET", "/v1/audit/log/checkpoint", raw=True)
        return note

    async def tile(self, level: int, index: int, width: int = tiles.TILE_WIDTH) -> bytes:
        """Merkle tile (level, index) of `width` hashes, or, for level -1, that entry bundle."""
        path = tiles.entries_path(index, width) if level < 0 else tiles.tile_path(level, index, width)
        data: bytes = await self.client.request("GET", "/v1/audit/log/" + path, raw=True)
        return data

    async def follow(
        self, saved_size: int | None
    ) -> tuple[bytes, dict[auditverify.TileKey, bytes], dict[int, bytes]]:
        """What `auditverify.verify_tiles` needs to move a state of `saved_size` to the latest
        checkpoint: the note, only the tiles and bundles that move needs (`tiles_needed`), and the
        old key's checkpoints at key rotations among the new leaves. A tile the service does not
        have (404) is left out: the verifier calls it a gap."""
        note = await self.log_checkpoint()
        size = auditverify.claimed_size(note)
        fetched: dict[auditverify.TileKey, bytes] = {}
        for key in auditverify.tiles_needed(saved_size, size):
            try:
                fetched[key] = await self.tile(*key)
            except NotFound:
                continue
        rotations: dict[int, bytes] = {}
        for at in auditverify.rotation_sizes(fetched, saved_size, size):
            with contextlib.suppress(NotFound):
                rotations[at] = str((await self.checkpoint(at))["note"]).encode("utf-8")
        return note, fetched, rotations


def _readable(leaf: bytes) -> dict[str, Any]:
    # The CSV is for reading; a leaf that is not even JSON still gets a row (the verifier judges it).
    try:
        event = json.loads(leaf)
    except ValueError:
        return {"action": "(not a JSON event)"}
    return event if isinstance(event, dict) else {"action": "(not a JSON object)"}


CSV_COLUMNS = (
    "idx",
    "time_ms",
    "action",
    "outcome",
    "reason",
    "actor_type",
    "actor_id",
    "actor_name",
    "actor_org",
    "actor_key_id",
    "ip",
    "resource_type",
    "resource_id",
    "request_id",
    "id",
)


def events_csv(fh: Any, events: Any) -> None:
    """Write events as CSV with one flat row each (the leaves stay the evidence; this is for reading)."""
    writer = csv.writer(fh)
    writer.writerow(CSV_COLUMNS)
    for e in events:
        actor, outcome, resource = e.get("actor", {}), e.get("outcome", {}), e.get("resource", {})
        writer.writerow(
            safe_cell(value)  # attacker-chosen text (user agents, names) stays text
            for value in [
                e.get("idx"),
                e.get("time_ms"),
                e.get("action"),
                outcome.get("result"),
                outcome.get("reason", ""),
                actor.get("type"),
                actor.get("id", ""),
                actor.get("name", ""),
                actor.get("org", ""),
                actor.get("key_id", ""),
                e.get("source", {}).get("ip", ""),
                resource.get("type", ""),
                resource.get("id", ""),
                e.get("request_id", ""),
                e.get("id"),
            ]
        )

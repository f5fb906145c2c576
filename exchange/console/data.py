"""What the auditors' console shows, each piece verified here before the page may see it.

`Console` holds the auditor's signed SDK client and verify state. Every answer is built from
rows that `exchange.auditverify` has judged: `state` follows the log through its tiles as
`exchange audit verify --tiles` does (and saves the new checkpoint, as that command does);
`events` is one page of `AuditClient.verified_page`; `timeline`, `charts` and `export` read
every matching row through `AuditClient.verified_query`; `proof` checks the tlog-proof it hands
out against the pinned keys, as `exchange audit check-proof` would.

A failure is evidence, not a glitch: the first one (a row whose proof fails, a checkpoint that
forks from the saved one) is remembered as `failure` and the state stays red until the console
is restarted. Nothing else is cached: each call asks the service again.

What this module does not do: HTTP (`console.server`), or decide anything the verifier decides.
A filtered view, the timeline included, shows what matched, each row proven to be in the signed
log; it cannot prove that nothing else matched (only a verified export can).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import auditverify
from ..client import Client
from ..client.audit import AuditClient, events_csv
from ..client.auditproof import check_proof
from ..errors import AuditEventUnverified, NotFound, ValidationError
from ..format.checkpoint import Checkpoint
from ..format.note import parse_note

__all__ = ["FILTERS", "Console", "Failure", "parse_filters", "parse_span"]

#: Filters /api/events and /api/export accept (and pass on to the service's query).
FILTERS = ("actor", "org", "action", "resource", "outcome", "since", "until")
OUTCOMES = ("allowed", "denied", "error")
#: Page size for the console's own pages, and what it asks per request when reading everything.
PAGE_DEFAULT, PAGE_MAX = 50, 500
#: Longest name, action or id a filter may hold (the service's are far shorter).
_MAX_TEXT = 256
_RESOURCE = re.compile(r"([a-z][a-z_]{0,31})(?::(.{1,200}))?", re.DOTALL)
_MS = re.compile(r"[0-9]{1,16}")
_CURSOR = re.compile(r"[0-9]{1,19}\.[0-9]{1,19}")
_DECIMAL = re.compile(r"[0-9]{1,4}")
#: Chart buckets: the smallest of these that splits the span into at most _MAX_BUCKETS.
_BUCKETS_MS = (60_000, 300_000, 3_600_000, 6 * 3_600_000, 86_400_000, 7 * 86_400_000, 30 * 86_400_000)
_MAX_BUCKETS = 200


@dataclass(frozen=True)
class Failure:
    """The first verification failure the console saw: its class (a verdict of auditverify), a
    sentence, the event's idx if one was named, and when."""

    kind: str
    detail: str
    idx: int | None
    at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"class": self.kind, "detail": self.detail, "idx": self.idx, "at_ms": self.at_ms}


def _text(name: str, value: str) -> str:
    if not value or len(value) > _MAX_TEXT or not value.isprintable():
        raise ValidationError(
            f"query parameter {name!r} must be 1 to {_MAX_TEXT} printable characters", field=name
        )
    return value


def _ms(name: str, value: str) -> int:
    if not _MS.fullmatch(value):
        raise ValidationError(f"query parameter {name!r} must be a time in ms since the epoch", field=name)
    return int(value)


def _single(query: Mapping[str, str], allowed: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters, each given once and each one `allowed`; ValidationError otherwise."""
    keys = [key for key, _ in query.items()]  # a multidict's keys() would hide repeats
    for key in keys:
        if key not in allowed:
            raise ValidationError(f"unknown query parameter {key[:40]!r}", field=key[:40])
        if keys.count(key) > 1:
            raise ValidationError(f"query parameter {key!r} is given more than once", field=key)
    return {key: query[key] for key in keys}


def parse_span(query: Mapping[str, str], allowed: tuple[str, ...] = ("since", "until")) -> dict[str, int]:
    """`since` and `until` (ms, until exclusive) from a query that has nothing else."""
    given = _single(query, allowed)
    span: dict[str, int] = {name: _ms(name, given[name]) for name in ("since", "until") if name in given}
    if "since" in span and "until" in span and span["since"] >= span["until"]:
        raise ValidationError("'since' must be before 'until'", field="since")
    return span


def parse_filters(
    query: Mapping[str, str], *, extra: tuple[str, ...] = ()
) -> tuple[dict[str, str | int | None], int, str | None]:
    """(filters, limit, cursor) from the page's query; ValidationError for anything unknown,
    repeated, empty or malformed (nothing is sent to the service then)."""
    given = _single(query, (*FILTERS, "limit", "cursor", *extra))
    filters: dict[str, str | int | None] = dict(
        parse_span({k: v for k, v in given.items() if k in ("since", "until")})
    )
    for name in ("actor", "org", "action"):
        if name in given:
            filters[name] = _text(name, given[name])
    if "resource" in given:
        if not _RESOURCE.fullmatch(given["resource"]) or not given["resource"].isprintable():
            raise ValidationError("query parameter 'resource' must be TYPE or TYPE:ID", field="resource")
        filters["resource"] = given["resource"]
    if "outcome" in given:
        if given["outcome"] not in OUTCOMES:
            raise ValidationError(
                f"query parameter 'outcome' must be one of: {', '.join(OUTCOMES)}", field="outcome"
            )
        filters["outcome"] = given["outcome"]
    limit = PAGE_DEFAULT
    if "limit" in given:
        if not _DECIMAL.fullmatch(given["limit"]) or not 1 <= int(given["limit"]) <= PAGE_MAX:
            raise ValidationError(f"query parameter 'limit' must be between 1 and {PAGE_MAX}", field="limit")
        limit = int(given["limit"])
    cursor = given.get("cursor")
    if cursor is not None and not _CURSOR.fullmatch(cursor):
        raise ValidationError("the cursor is not one this console issued", field="cursor")
    return filters, limit, cursor


def _root_b64(note: str) -> str:
    checkpoint = Checkpoint.parse(parse_note(note.encode("utf-8")).text)
    return base64.b64encode(checkpoint.root_hash).decode("ascii")


class Console:
    """The console's view of the log: the signed client, the verify state, the sticky failure."""

    def __init__(
        self,
        client: Client,
        state_dir: Path,
        state: auditverify.State,
        *,
        auditor: Mapping[str, Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.audit = AuditClient(client)
        self.server = client.server
        self.state_dir = state_dir
        self.trusted = state
        self.auditor = {"name": str(auditor.get("name", "")), "org": str(auditor.get("org", ""))}
        self.failure: Failure | None = None
        self.last: dict[str, Any] | None = None
        self._clock = clock
        self._follow_lock = asyncio.Lock()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _fail(self, kind: str, detail: str, idx: int | None) -> None:
        if self.failure is None:  # the first failure is the evidence; later ones follow from it
            self.failure = Failure(kind, detail, idx, self._now_ms())

    @contextlib.contextmanager
    def _verifying(self) -> Iterator[None]:
        """Remember any verification failure inside (sticky), and let it go on as AuditEventUnverified."""
        try:
            yield
        except AuditEventUnverified as exc:
            idx = exc.extra.get("idx")
            self._fail(
                str(exc.extra.get("check", "entries")), exc.message, idx if isinstance(idx, int) else None
            )
            raise
        except auditverify.VerifyFailure as exc:
            if exc.kind == "usage":
                raise ValidationError(exc.message) from exc
            self._fail(exc.kind, exc.message, None)
            raise AuditEventUnverified(exc.message, check=exc.kind) from exc

    def _snapshot(self) -> auditverify.State:
        # Queries read the trusted state while `state` may be moving it forward: each gets a copy.
        return copy.copy(self.trusted)

    # -- /api/state ------------------------------------------------------------------------------

    async def state(self) -> dict[str, Any]:
        """Follow the log from the saved checkpoint to the latest (as `audit verify --tiles`),
        save it, and say so; once anything failed, only say that (the evidence stays red)."""
        async with self._follow_lock:
            if self.failure is None:
                note, fetched, rotations = await self.audit.follow(self.trusted.size)
                state = copy.copy(self.trusted)
                try:
                    with self._verifying():
                        report = auditverify.run_tiles(self.state_dir, state, note, fetched, rotations)
                except AuditEventUnverified:
                    pass
                else:
                    self.trusted = state
                    self.last = {
                        "checkpoint": {
                            "origin": report.origin,
                            "size": report.size,
                            "root": report.root,
                            "witnesses": report.witnesses,
                            "note": note.decode("utf-8"),
                        },
                        "verified_size": report.size,
                        "previous_size": report.previous_size,
                        "verified_at_ms": self._now_ms(),
                    }
        last = self.last or {
            "checkpoint": None,
            "verified_size": None,
            "previous_size": None,
            "verified_at_ms": None,
        }
        return {
            "ok": self.failure is None,
            "server": self.server,
            "auditor": self.auditor,
            **last,
            "failure": None if self.failure is None else self.failure.to_json(),
        }

    # -- /api/events -----------------------------------------------------------------------------

    async def events(
        self, filters: Mapping[str, str | int | None], *, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        with self._verifying():
            page = await self.audit.verified_page(filters, self._snapshot(), limit=limit, cursor=cursor)
        checkpoint = page["checkpoint"]
        return {
            "checkpoint": {"size": checkpoint["size"], "root": _root_b64(checkpoint["note"])},
            "items": [_row(item) for item in page["items"]],
            "next_cursor": page["next_cursor"],
        }

    async def _rows(self, filters: Mapping[str, str | int | None]) -> AsyncIterator[dict[str, Any]]:
        """Every matching row, verified (the failure remembered as for a page)."""
        with self._verifying():
            async for item in self.audit.verified_query(filters, self._snapshot(), limit=PAGE_MAX):
                yield item

    async def _all(self, **filters: str | int | None) -> list[dict[str, Any]]:
        return [item async for item in self._rows(filters)]

    # -- /api/export -----------------------------------------------------------------------------

    async def export(self, filters: Mapping[str, str | int | None], fmt: str) -> str:
        """Every matching row, all verified before the first is written: JSONL as `exchange audit
        query --format jsonl --proofs`, or CSV as `--format csv`."""
        items = [item async for item in self._rows(filters)]
        if fmt == "csv":
            out = io.StringIO()
            events_csv(out, (item["event"] for item in items))
            return out.getvalue()
        return "".join(
            json.dumps(
                {
                    "idx": item["idx"],
                    "event": item["event"],
                    "proof": item["proof"],
                    "checkpoint_size": item["checkpoint"]["size"],
                },
                sort_keys=True,
            )
            + "\n"
            for item in items
        )

    # -- /api/proof/{idx} ------------------------------------------------------------------------

    async def proof(self, idx: int) -> bytes:
        """The event's tlog-proof, checked against the pinned keys (and quorum) before it is handed out."""
        data = await self.audit.prove(idx)
        trusted = self._snapshot()
        with self._verifying():
            checked = check_proof(
                data,
                log_vkeys=[trusted.log_vkey, *trusted.rotated_from],
                witness_vkeys=trusted.witness_vkeys,
                quorum=trusted.witness_quorum,
            )
            if checked.index != idx:
                raise AuditEventUnverified(
                    f"asked for the proof of event {idx}, the service proved event {checked.index}",
                    check="proof",
                    idx=idx,
                )
        return data

    # -- /api/artifacts/{id}/timeline ------------------------------------------------------------

    async def timeline(self, artifact_id: str) -> dict[str, Any]:
        """Custody of one artifact, oldest first, from four kinds of verified query: the events
        naming it (upload, grants, redemptions, receipts), the links made for it (`link.create`
        names the artifact in its details) with every event naming each link (its revocation,
        refused redemptions), and the findings about it with their moves."""
        rows: dict[int, dict[str, Any]] = {}
        for item in await self._all(resource=f"artifact:{artifact_id}"):
            rows[item["idx"]] = item["event"]
        for kind, action in (("link", "link.create"), ("finding", "finding.submit")):
            for item in await self._all(action=action):
                details = item["event"].get("details") or {}
                resource = item["event"].get("resource") or {}
                if details.get("artifact") != artifact_id or not resource.get("id"):
                    continue
                for named in await self._all(resource=f"{kind}:{resource['id']}"):
                    rows[named["idx"]] = named["event"]
        if not rows:
            raise NotFound(f"no event names the artifact {artifact_id!r}", code="no-such-artifact")
        events = [rows[idx] for idx in sorted(rows)]
        created = next((e for e in events if e.get("action") == "artifact.create"), None)
        return {
            "artifact": {
                "id": artifact_id,
                "name": (created.get("details") or {}).get("name") if created else None,
                "org": (created.get("actor") or {}).get("org") if created else None,
            },
            "events": [_custody(e) for e in events],
            "complete": False,
            "caveat": "A filtered view shows what matched, each row verified in the signed log; "
            "it cannot prove that nothing else matched. A verified export can.",
        }

    # -- /api/charts -----------------------------------------------------------------------------

    async def charts(self, span: Mapping[str, int]) -> dict[str, Any]:
        """Downloads and bytes per tester over time, refusals by reason, findings by severity and
        status: counted from verified rows only.

        No event carries the bytes a download moved, so a download counts the artifact's size as
        its upload recorded it (`artifact.create` details.bytes): a whole-artifact download
        (`artifact.download`, or a link's `link.session`, which counts one download).
        """
        since, until = span.get("since"), span.get("until")
        sizes = {
            str((e["event"].get("resource") or {}).get("id")): e["event"].get("details", {}).get("bytes")
            for e in await self._all(action="artifact.create")
        }
        downloads: list[tuple[int, str, int]] = []
        for action in ("artifact.download", "link.session"):
            for item in await self._all(action=action, outcome="allowed", since=since, until=until):
                event = item["event"]
                details = event.get("details") or {}
                who = details.get("recipient") or (event.get("actor") or {}).get("name") or "?"
                size = sizes.get(str((event.get("resource") or {}).get("id")))
                downloads.append((int(event["time_ms"]), str(who), size if type(size) is int else 0))
        refusals: Counter[str] = Counter()
        for outcome in ("denied", "error"):
            for item in await self._all(outcome=outcome, since=since, until=until):
                event = item["event"]
                reason = str((event.get("outcome") or {}).get("reason") or "other")
                if event.get("action") == "http.refusals":  # a flood's summary: what was only counted
                    suppressed = (event.get("details") or {}).get("suppressed")
                    refusals[reason] += suppressed if type(suppressed) is int else 0
                else:
                    refusals[reason] += 1
        severity: Counter[str] = Counter()
        status: dict[str, str] = {}
        for item in await self._all(action="finding.submit", since=since, until=until):
            event = item["event"]
            severity[str((event.get("details") or {}).get("severity"))] += 1
            status[str((event.get("resource") or {}).get("id"))] = "submitted"
        for item in await self._all(action="finding.move", until=until):
            fid = str((item["event"].get("resource") or {}).get("id"))
            if fid in status:
                status[fid] = str((item["event"].get("details") or {}).get("to"))
        return {
            **_downloads(downloads, since, until),
            "refusals": [
                {"reason": r, "count": n} for r, n in sorted(refusals.items(), key=lambda x: (-x[1], x[0]))
            ],
            "findings": {
                "by_severity": dict(sorted(severity.items())),
                "by_status": dict(Counter(status.values())),
            },
        }


def _downloads(rows: list[tuple[int, str, int]], since: int | None, until: int | None) -> dict[str, Any]:
    times = [t for t, _, _ in rows]
    start = since if since is not None else min(times, default=0)
    end = until if until is not None else max(times, default=start) + 1
    bucket = next((b for b in _BUCKETS_MS if (end - start) / b <= _MAX_BUCKETS), _BUCKETS_MS[-1])
    first = start - start % bucket
    count = max(1, -(-(end - first) // bucket))
    per: dict[str, dict[str, list[int]]] = defaultdict(
        lambda: {"downloads": [0] * count, "bytes": [0] * count}
    )
    for t, who, size in rows:
        i = min(count - 1, max(0, (t - first) // bucket))
        per[who]["downloads"][i] += 1
        per[who]["bytes"][i] += size
    return {
        "bucket_ms": bucket,
        "downloads": {
            "buckets": [first + i * bucket for i in range(count)],
            "testers": [{"name": name} | per[name] for name in sorted(per)],
        },
    }


def _row(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "idx": item["idx"],
        "leaf": item["leaf"],
        "event": item["event"],
        "proof": item["proof"],
        "verified": True,
    }


_KINDS = {
    "artifact.create": "upload",
    "artifact.parts": "upload",
    "artifact.complete": "upload",
    "artifact.grant": "grant",
    "artifact.revoke": "revocation",
    "link.create": "link",
    "link.revoke": "revocation",
    "link.view": "redemption",
    "link.challenge": "redemption",
    "link.session": "redemption",
    "link.renew": "redemption",
    "link.header": "redemption",
    "link.file": "redemption",
    "artifact.download": "redemption",
    "artifact.renew": "redemption",
    "artifact.header": "redemption",
    "artifact.receipt": "receipt",
    "finding.submit": "finding",
    "finding.move": "finding",
    "finding.share": "finding",
}


def _custody(event: Mapping[str, Any]) -> dict[str, Any]:
    actor = event.get("actor") or {}
    action = str(event.get("action"))
    return {
        "idx": event.get("idx"),
        "time_ms": event.get("time_ms"),
        "action": action,
        "actor": {"name": actor.get("name") or actor.get("type"), "org": actor.get("org")},
        "outcome": event.get("outcome"),
        "summary": summary(event),
        "kind": _KINDS.get(action, "other"),
        "event": event,
    }


def summary(event: Mapping[str, Any]) -> str:
    """A plain-text line about one event, for reading (the page inserts it as text). Names come
    from the log as they are: the page, not this, keeps them inert."""
    actor = event.get("actor") or {}
    who = str(actor.get("name") or actor.get("type") or "someone")
    d = event.get("details") or {}
    action = str(event.get("action"))
    outcome = event.get("outcome") or {}
    lines: dict[str, Callable[[], str]] = {
        "artifact.create": lambda: (
            f"{who} uploaded {d.get('name')!s} ({d.get('files')} files, {d.get('bytes')} bytes)"
        ),
        "artifact.complete": lambda: (
            f"{who} completed the upload ({d.get('files')} files, {d.get('bytes')} bytes)"
        ),
        "artifact.grant": lambda: f"{who} granted {d.get('principal')} ({d.get('org')}) access",
        "artifact.revoke": lambda: f"{who} revoked {d.get('principal')}'s access",
        "artifact.download": lambda: f"{who} downloaded the artifact ({d.get('files')} files)",
        "artifact.header": lambda: f"{who} fetched their header",
        "artifact.receipt": lambda: f"{d.get('recipient')} signed a receipt for a download",
        "link.create": lambda: f"{who} made a link for {d.get('recipient')}",
        "link.revoke": lambda: f"{who} revoked the link for {d.get('recipient')}",
        "link.view": lambda: "the link was opened",
        "link.challenge": lambda: f"a key proof was asked of {d.get('recipient')}",
        "link.session": lambda: f"{d.get('recipient')} started a download through a link",
        "link.header": lambda: f"{d.get('recipient')} fetched their header through a link",
        "link.file": lambda: f"file {d.get('file')} was fetched through a link",
        "finding.submit": lambda: f"{who} reported a {d.get('severity')} finding: {d.get('title')}",
        "finding.move": lambda: f"{who} moved the finding from {d.get('from')} to {d.get('to')}",
        "finding.share": lambda: f"{who} shared the finding with {d.get('principal')}",
    }
    line = lines[action]() if action in lines else f"{who}: {action}"
    if outcome.get("result") not in (None, "allowed"):
        line += f" ({outcome.get('result')}: {outcome.get('reason')})"
    return line

"""Findings from the client's side: encrypt on this machine, send, follow, decrypt.

Submitting uploads the body (`body.md`) and the attachments as two encrypted artifacts through
the ordinary upload machinery (parallel, resumable, manifest signed by the reporter), addressed
with `finding: {on, part}` so that they belong to the reported artifact's organisation and are
encrypted to exactly the recipients the server's policy names: that organisation's active
developers, the clearinghouse principals, and the reporter. Before anything is sent, the client
checks the recipients it is about to encrypt to against that policy, and refuses a body that
would be readable by anyone else, or not by someone entitled (`check_recipients`).

Notes on lifecycle moves are age payloads (nonce, then STREAM chunks) under the body's file key,
so everyone who can read the body can read the notes, and the service none of them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import (
    AgeError,
    LocalFileError,
    NotFound,
    PermissionDenied,
    ValidationError,
)
from ..format import age
from ..format.finding import BODY_NAME
from . import Client, segment
from . import artifacts as artifacts_api
from ._csv import safe_cell
from ._upload import Destination
from .transfer import download, upload

__all__ = [
    "BODY_NAME",
    "check_recipients",
    "decrypt_note",
    "encrypt_note",
    "export",
    "fetch",
    "get",
    "list_findings",
    "move",
    "policy_recipients",
    "read",
    "share",
    "submit",
]


async def policy_recipients(client: Client, artifact_id: str) -> dict[str, str]:
    """Whom a finding on `artifact_id` must be encrypted to besides oneself: name -> age recipient."""
    answer = await client.request("GET", f"/v1/artifacts/{segment(artifact_id)}/finding-recipients")
    return {r["name"]: r["age_recipient"] for r in answer["recipients"]}


def check_recipients(policy: dict[str, str], chosen: dict[str, str]) -> None:
    """Refuse to encrypt a finding to any other set than `policy` (name -> age recipient)."""
    missing = sorted(set(policy) - set(chosen))
    extra = sorted(set(chosen) - set(policy))
    changed = sorted(n for n in set(policy) & set(chosen) if policy[n] != chosen[n])
    problems = []
    if missing:
        problems.append(f"not readable by {', '.join(missing)}, who must be able to read it")
    if extra:
        problems.append(f"readable by {', '.join(extra)}, who is not entitled to")
    if changed:
        problems.append(f"encrypted to keys that are not the registered ones of {', '.join(changed)}")
    if problems:
        raise ValidationError(
            "refusing to send this finding: it would be " + "; ".join(problems), code="wrong-recipients"
        )


async def submit(
    client: Client,
    artifact_id: str,
    *,
    title: str,
    severity: str,
    category: str = "other",
    body: bytes,
    attachments: Sequence[Path] = (),
    recipients: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Encrypt and send a finding on `artifact_id`; return it as the service recorded it.

    `recipients` (name -> age recipient, oneself excluded) is whom the caller means to encrypt
    to, e.g. a list it keeps pinned; it must be exactly the policy's, or nothing is sent."""
    me = await client.whoami()
    policy = await policy_recipients(client, artifact_id)
    chosen = policy if recipients is None else dict(recipients)
    check_recipients(policy | {me["name"]: me["age_recipient"]}, chosen | {me["name"]: me["age_recipient"]})
    names = [Path(p).name for p in attachments]
    if BODY_NAME in names:
        raise LocalFileError(f"an attachment may not be named {BODY_NAME}: rename it", code="unsafe-path")

    def destination(part: str) -> Destination:
        async def fixed() -> dict[str, str]:
            return await policy_recipients(client, artifact_id)

        return Destination({"finding": {"on": artifact_id, "part": part}}, fixed)

    with tempfile.TemporaryDirectory(prefix="exchange-finding-") as tmp:
        body_path = Path(tmp) / BODY_NAME
        body_path.write_bytes(body)
        body_id = await upload(
            client,
            body_path,
            name=f"finding-body-{artifact_id}",
            kind="finding-attachment",
            destination=destination("body"),
        )
    attachments_id = None
    if attachments:
        attachments_id = await upload(
            client,
            [Path(p) for p in attachments],
            name=f"finding-attachments-{artifact_id}",
            kind="finding-attachment",
            destination=destination("attachments"),
        )
    request: dict[str, Any] = {
        "artifact": artifact_id,
        "body": body_id,
        "title": title,
        "severity": severity,
        "category": category,
    }
    if attachments_id is not None:
        request["attachments"] = attachments_id
    return await client.request("POST", "/v1/findings", json_body=request)  # type: ignore[no-any-return]


async def list_findings(
    client: Client,
    *,
    artifact_id: str | None = None,
    status: str | None = None,
    severity: str | None = None,
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {
            k: v
            for k, v in {
                "artifact": artifact_id,
                "status": status,
                "severity": severity,
                "cursor": cursor,
            }.items()
            if v is not None
        }
        page = await client.request("GET", "/v1/findings", params=params)
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return items


async def get(client: Client, finding_id: str) -> dict[str, Any]:
    return await client.request("GET", f"/v1/findings/{segment(finding_id)}")  # type: ignore[no-any-return]


async def _file_key(client: Client, content_id: str) -> bytes | None:
    """The file key of a finding's body or attachments, if the caller holds a header for it."""
    identity = client.identity
    if identity is None:
        return None
    try:
        header = await artifacts_api.header(client, content_id)
    except (NotFound, PermissionDenied):
        return None
    return age.unwrap_file_key(header, [identity.age_identity])


def encrypt_note(file_key: bytes, text: str) -> bytes:
    return b"".join(age.encrypt_stream(file_key, [text.encode("utf-8")]))


def decrypt_note(file_key: bytes, note: bytes) -> str:
    return b"".join(age.decrypt_stream(file_key, [note])).decode("utf-8", errors="replace")


async def read(client: Client, finding: dict[str, Any]) -> tuple[str | None, list[str | None]]:
    """The decrypted body and notes (one per move; None where there is none), or (None, …) when
    the caller holds no key to this finding."""
    file_key = await _file_key(client, finding["body"])
    if file_key is None:
        return None, [None for _ in finding["moves"]]
    with tempfile.TemporaryDirectory(prefix="exchange-finding-") as tmp:
        await download(client, finding["body"], Path(tmp))
        body = (Path(tmp) / BODY_NAME).read_bytes().decode("utf-8", errors="replace")
    notes = [
        None if m["note"] is None else decrypt_note(file_key, base64.b64decode(m["note"]))
        for m in finding["moves"]
    ]
    return body, notes


async def move(client: Client, finding_id: str, to: str, *, note: str | None = None) -> dict[str, Any]:
    """Move a finding to `to`, with an optional note encrypted here for the finding's readers."""
    request: dict[str, Any] = {"to": to}
    if note is not None:
        finding = await get(client, finding_id)
        file_key = await _file_key(client, finding["body"])
        if file_key is None:
            raise PermissionDenied(
                "you hold no key to this finding, so a note cannot be encrypted for its readers;"
                " move it without --note, or ask a developer who can read it to share it with you",
                code="not-a-recipient",
            )
        request["note"] = base64.b64encode(encrypt_note(file_key, note)).decode("ascii")
    return await client.request(  # type: ignore[no-any-return]
        "POST", f"/v1/findings/{segment(finding_id)}/moves", json_body=request
    )


async def fetch(client: Client, finding_id: str, out_dir: Path) -> list[Path]:
    """Download, decrypt and verify the finding's body and attachments into OUT_DIR/FINDING_ID/."""
    finding = await get(client, finding_id)
    target = Path(os.path.abspath(out_dir)) / finding["id"]
    if target.exists():
        raise LocalFileError(f"{target} exists already: move it away or choose another -o", code="exists")
    staging = Path(tempfile.mkdtemp(prefix=f".{finding['id']}.", dir=out_dir))
    try:
        for content_id in filter(None, (finding["body"], finding["attachments"])):
            await download(client, content_id, staging)
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return sorted(target.iterdir())


async def share(client: Client, finding_id: str, principal: str) -> dict[str, Any]:
    """Wrap the finding's keys for `principal` (a developer of the owning organisation) here."""
    identity = client.identity
    if identity is None:
        raise ValidationError("sharing needs an identity (--identity)")
    finding = await get(client, finding_id)
    grantee = await client.get_principal(principal)
    headers = {}
    for part in ("body", "attachments"):
        if finding[part] is None:
            continue
        key = await _file_key(client, finding[part])
        if key is None:
            raise PermissionDenied(
                f"you hold no key to this finding's {part}, so you cannot pass one on", code="not-a-recipient"
            )
        header = age.wrap_file_key(key, [grantee["age_recipient"]]).to_bytes()
        headers[part] = base64.b64encode(header).decode("ascii")
    return await client.request(  # type: ignore[no-any-return]
        "POST",
        f"/v1/findings/{segment(finding_id)}/share",
        json_body={"principal": principal, "headers": headers},
    )


EXPORT_FIELDS = (
    "id",
    "artifact",
    "artifact_name",
    "org",
    "reporter",
    "reporter_org",
    "title",
    "severity",
    "category",
    "status",
    "created_at_ms",
    "updated_at_ms",
    "body",
)


async def export(client: Client, *, artifact_id: str | None = None, fmt: str = "json") -> str:
    """Every finding the caller may see, with its body decrypted where the caller can (else
    null/empty): JSON (a list, moves included) or CSV (one row per finding)."""
    rows = []
    for item in await list_findings(client, artifact_id=artifact_id):
        finding = await get(client, item["id"])
        try:
            body, notes = await read(client, finding)
        except AgeError:
            body, notes = None, [None for _ in finding["moves"]]
        moves = [m | {"note": n} for m, n in zip(finding["moves"], notes, strict=True)]
        rows.append(finding | {"body_artifact": finding["body"], "body": body, "moves": moves})
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    if fmt != "csv":
        raise ValidationError("the export format is json or csv", field="format")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: safe_cell(row[k]) for k in EXPORT_FIELDS})  # a title may be =HYPERLINK(…)
    return out.getvalue()

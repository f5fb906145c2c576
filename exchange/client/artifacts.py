"""The artifact endpoints of the API, one call each: values in, parsed JSON out, errors raised.

The transfers themselves (encryption, parts, storage) are in `exchange.client.transfer`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from . import Client, segment

__all__ = [
    "abort",
    "complete",
    "create",
    "download_info",
    "get",
    "header",
    "list_artifacts",
    "part_urls",
    "upload_status",
]


async def create(
    client: Client,
    *,
    name: str,
    kind: str,
    files: Sequence[tuple[str, int, bytes]],
    headers: dict[str, bytes],
    extra: dict[str, Any] | None = None,
    upload_link: str | None = None,
) -> dict[str, Any]:
    """Start an upload of `files` (path, size, payload nonce) with one age header per principal.

    `extra` members say where else the upload goes (`upload_link`, `finding`); `upload_link` is
    short for `extra={"upload_link": TOKEN}`."""
    body: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "files": [
            {"path": path, "size": size, "nonce": base64.b64encode(nonce).decode()}
            for path, size, nonce in files
        ],
        "headers": [
            {"principal": who, "header": base64.b64encode(raw).decode()}
            for who, raw in sorted(headers.items())
        ],
    }
    body |= extra or {}
    if upload_link is not None:
        body["upload_link"] = upload_link
    return await client.request("POST", "/v1/artifacts", json_body=body)  # type: ignore[no-any-return]


async def list_artifacts(client: Client, *, status: str | None = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {k: v for k, v in {"status": status, "cursor": cursor}.items() if v is not None}
        page = await client.request("GET", "/v1/artifacts", params=params)
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return items


async def get(client: Client, artifact_id: str) -> dict[str, Any]:
    return await client.request("GET", f"/v1/artifacts/{segment(artifact_id)}")  # type: ignore[no-any-return]


async def abort(client: Client, artifact_id: str) -> dict[str, Any]:
    return await client.request("DELETE", f"/v1/artifacts/{segment(artifact_id)}")  # type: ignore[no-any-return]


async def delete(client: Client, artifact_id: str, *, reason: str | None = None) -> dict[str, Any]:
    """Delete a complete artifact (its objects removed; its records, events and a tombstone kept).
    The answer's `deleted.storage_purged` is false if the store failed: delete again to finish."""
    body = {"reason": reason} if reason else {}
    return await client.request("POST", f"/v1/artifacts/{segment(artifact_id)}/delete", json_body=body)  # type: ignore[no-any-return]


async def part_urls(
    client: Client, artifact_id: str, parts: Sequence[tuple[int, int, bytes]]
) -> dict[str, Any]:
    """URLs for (file index, part number, raw SHA-256) triples."""
    body = {
        "parts": [
            {"file": f, "number": n, "sha256": base64.b64encode(digest).decode()} for f, n, digest in parts
        ]
    }
    return await client.request(  # type: ignore[no-any-return]
        "POST", f"/v1/artifacts/{segment(artifact_id)}/parts", json_body=body
    )


async def upload_status(client: Client, artifact_id: str) -> dict[str, Any]:
    return await client.request("GET", f"/v1/artifacts/{segment(artifact_id)}/parts")  # type: ignore[no-any-return]


async def complete(
    client: Client, artifact_id: str, manifest: dict[str, Any], signature: bytes
) -> dict[str, Any]:
    body = {"manifest": manifest, "signature": base64.b64encode(signature).decode()}
    return await client.request(  # type: ignore[no-any-return]
        "POST", f"/v1/artifacts/{segment(artifact_id)}/complete", json_body=body
    )


async def header(client: Client, artifact_id: str) -> bytes:
    """The caller's own age header for the artifact."""
    answer = await client.request("GET", f"/v1/artifacts/{segment(artifact_id)}/header")
    return base64.b64decode(answer["header"])


async def download_info(client: Client, artifact_id: str, *, session: str | None = None) -> dict[str, Any]:
    """Presigned GETs in a download session: a new one (counted against a grant that bounds its
    downloads) or, with `session`, the same one renewed (not counted)."""
    params = {"session": session} if session else None
    return await client.request("GET", f"/v1/artifacts/{segment(artifact_id)}/download", params=params)  # type: ignore[no-any-return]


async def send_receipt(client: Client, artifact_id: str, session: str, signature: bytes) -> dict[str, Any]:
    """The downloader's signed receipt of a download session by id (`format.receipt`, via grant)."""
    body = {"session": session, "signature": base64.b64encode(signature).decode()}
    return await client.request("POST", f"/v1/artifacts/{segment(artifact_id)}/receipt", json_body=body)  # type: ignore[no-any-return]

"""Upload links, one call per endpoint: made by a receiving organisation's developer, used by
one named uploader (`transfer.upload(..., upload_link=TOKEN)`, `exchange upload PATH --link URL`).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from ..errors import ValidationError
from . import Client, segment

__all__ = ["create", "list_upload_links", "revoke", "split_upload_link", "view"]

_UPLOAD_LINK_PATH = re.compile(r"(.*)/u/(exu1_[A-Za-z0-9_-]{43})/?")


def split_upload_link(url: str) -> tuple[str, str]:
    """(service URL, token) of an upload link URL `…/u/TOKEN`; ValidationError if it is not one."""
    parts = urlsplit(url)
    match = _UPLOAD_LINK_PATH.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or match is None or parts.query:
        raise ValidationError(
            "not an upload link URL: expected https://SERVICE/u/exu1_…", code="bad-link-url"
        )
    return f"{parts.scheme}://{parts.netloc}{match.group(1)}", match.group(2)


async def create(
    client: Client,
    uploader: str,
    *,
    kind: str,
    max_bytes: int,
    note: str = "",
    expires_in_s: int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"uploader": uploader, "kind": kind, "max_bytes": max_bytes}
    if note:
        body["note"] = note
    if expires_in_s is not None:
        body["expires_in_s"] = expires_in_s
    return await client.request("POST", "/v1/upload-links", json_body=body)  # type: ignore[no-any-return]


async def list_upload_links(client: Client) -> list[dict[str, Any]]:
    return (await client.request("GET", "/v1/upload-links"))["items"]  # type: ignore[no-any-return]


async def revoke(client: Client, link_id: str) -> dict[str, Any]:
    return await client.request("DELETE", f"/v1/upload-links/{segment(link_id)}")  # type: ignore[no-any-return]


async def view(client: Client, token: str) -> dict[str, Any]:
    """What an upload through the link must be: kind, maximum size, recipients (signed)."""
    return await client.request("GET", f"/u/{token}")  # type: ignore[no-any-return]

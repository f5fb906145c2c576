"""Grants and links, one call per endpoint, and downloads through a link.

Granting happens on the developer's machine: `grant` fetches the caller's own header, unwraps the
artifact's file key with the caller's age identity, wraps it for the grantee's registered
recipient and posts only that header. The file key never leaves the client.

A link is redeemed without a request signature, but not by its URL alone: `download_link`
decrypts the link's challenge with the recipient's age identity (a link for someone else fails
here, with `age-no-match`, before anything is counted), opens a counted download session with the
proof it holds, verifies the uploader's signed manifest, unwraps the file key, downloads like
`transfer.download` (parallel, resumable, verified), and ends by posting a receipt: the
recipient's Ed25519 signature over the artifact, link, session and manifest digest
(`format.receipt`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ManifestError, ValidationError
from ..files import write_atomic
from ..format import age
from ..format.receipt import receipt_message
from . import Client, segment
from . import artifacts as artifacts_api
from ._download import SESSION_SUFFIX, _DownloadFile, _URLRefresher, _verified_manifest
from .transfer import DEFAULT_CONCURRENCY, Progress, download_verified

__all__ = [
    "SESSION_SUFFIX",
    "challenge",
    "create_link",
    "download_link",
    "grant",
    "link_header",
    "list_grants",
    "list_links",
    "open_session",
    "prove",
    "revoke",
    "revoke_link",
    "send_receipt",
    "split_link",
    "view_link",
]

_LINK_PATH = re.compile(r"(.*)/l/(exl1_[A-Za-z0-9_-]{43})/?")


# -- grants (signed) ------------------------------------------------------------------------------


async def grant(
    client: Client,
    artifact_id: str,
    principal: str,
    *,
    expires_in_s: int | None = None,
    max_downloads: int | None = None,
) -> dict[str, Any]:
    """Wrap the artifact's file key for `principal` here, and post the header: a grant (of at
    most `max_downloads` downloads by id, if given)."""
    identity = client.identity
    if identity is None:
        raise ValidationError("granting needs an identity (--identity)")
    own = await artifacts_api.header(client, artifact_id)
    file_key = age.unwrap_file_key(own, [identity.age_identity])
    grantee = await client.get_principal(principal)
    header = age.wrap_file_key(file_key, [grantee["age_recipient"]]).to_bytes()
    body: dict[str, Any] = {"principal": principal, "header": base64.b64encode(header).decode()}
    if expires_in_s is not None:
        body["expires_in_s"] = expires_in_s
    if max_downloads is not None:
        body["max_downloads"] = max_downloads
    return await client.request(  # type: ignore[no-any-return]
        "POST", f"/v1/artifacts/{segment(artifact_id)}/grants", json_body=body
    )


async def revoke(client: Client, artifact_id: str, principal: str) -> dict[str, Any]:
    return await client.request(  # type: ignore[no-any-return]
        "DELETE", f"/v1/artifacts/{segment(artifact_id)}/grants/{segment(principal)}"
    )


async def list_grants(client: Client, artifact_id: str) -> list[dict[str, Any]]:
    return (await client.request("GET", f"/v1/artifacts/{segment(artifact_id)}/grants"))["items"]  # type: ignore[no-any-return]


# -- links (signed) -------------------------------------------------------------------------------


async def create_link(
    client: Client,
    artifact_id: str,
    recipient: str,
    *,
    expires_in_s: int | None = None,
    max_downloads: int | None = None,
    allowed_networks: Sequence[str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"artifact": artifact_id, "recipient": recipient}
    if allowed_networks:
        body["allowed_networks"] = list(allowed_networks)
    if expires_in_s is not None:
        body["expires_in_s"] = expires_in_s
    if max_downloads is not None:
        body["max_downloads"] = max_downloads
    return await client.request("POST", "/v1/links", json_body=body)  # type: ignore[no-any-return]


async def list_links(client: Client, artifact_id: str | None = None) -> list[dict[str, Any]]:
    params = {"artifact": artifact_id} if artifact_id else None
    return (await client.request("GET", "/v1/links", params=params))["items"]  # type: ignore[no-any-return]


async def revoke_link(client: Client, link_id: str) -> dict[str, Any]:
    return await client.request("DELETE", f"/v1/links/{segment(link_id)}")  # type: ignore[no-any-return]


# -- redemption (unsigned: the token is the capability) -------------------------------------------


def split_link(url: str) -> tuple[str, str]:
    """(service URL, token) of a link URL `…/l/TOKEN`; ValidationError if it is not one."""
    parts = urlsplit(url)
    match = _LINK_PATH.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or match is None or parts.query:
        raise ValidationError("not a link URL: expected https://SERVICE/l/exl1_…", code="bad-link-url")
    return f"{parts.scheme}://{parts.netloc}{match.group(1)}", match.group(2)


async def view_link(client: Client, token: str) -> dict[str, Any]:
    return await client.request("GET", f"/l/{token}", signed=False)  # type: ignore[no-any-return]


async def challenge(client: Client, token: str) -> bytes:
    """The link's challenge: an age file holding a fresh proof, for the link's recipient alone."""
    return await client.request("GET", f"/l/{token}/challenge", signed=False, raw=True)  # type: ignore[no-any-return]


async def prove(client: Client, token: str) -> str:
    """Decrypt the link's challenge with our age identity: the proof that opens a download.

    A link for someone else fails here (`age-no-match`), before anything is counted."""
    identity = client.identity
    if identity is None:
        raise ValidationError("redeeming a link needs the recipient's identity (--identity)")
    proof = age.decrypt(await challenge(client, token), [identity.age_identity])
    try:
        return proof.decode("ascii")
    except UnicodeDecodeError:
        raise ValidationError("the link's challenge does not hold a proof", code="bad-challenge") from None


async def open_session(
    client: Client, token: str, *, proof: str | None = None, session: str | None = None
) -> dict[str, Any]:
    """Open a counted download session with `proof`, or renew the URLs of `session` without
    counting."""
    body = {"session": session} if session else {"proof": proof} if proof else {}
    return await client.request("POST", f"/l/{token}/session", json_body=body, signed=False)  # type: ignore[no-any-return]


async def link_header(
    client: Client, token: str, *, proof: str | None = None, session: str | None = None
) -> bytes:
    params = {"session": session} if session else {"proof": proof} if proof else None
    return await client.request("GET", f"/l/{token}/header", signed=False, raw=True, params=params)  # type: ignore[no-any-return]


async def send_receipt(client: Client, token: str, session: str, signature: bytes) -> dict[str, Any]:
    body = {"session": session, "signature": base64.b64encode(signature).decode()}
    return await client.request("POST", f"/l/{token}/receipt", json_body=body, signed=False)  # type: ignore[no-any-return]


class _LinkURLs(_URLRefresher):
    """Fresh presigned GETs for a long download come from the same session: not counted again."""

    def __init__(
        self, client: Client, token: str, info: dict[str, Any], files: Sequence[_DownloadFile]
    ) -> None:
        super().__init__(client, info, files)
        self._token = token
        self._session = str(info["session"])

    async def _fetch_info(self) -> dict[str, Any]:
        return await open_session(self._client, self._token, session=self._session)


async def download_link(
    client: Client,
    token: str,
    out_dir: Path,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    workers: int | None = None,
    progress: Progress | None = None,
    on_start: Callable[[dict[str, Any], int], None] | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """Download, decrypt and verify what the link holds into `out_dir`, then post the receipt.

    Returns the top-level paths written and the receipt the service recorded."""
    identity = client.identity
    if identity is None:
        raise ValidationError("downloading needs the recipient's identity (--identity)")
    # A download resumed after an interruption continues its session: it is not counted again.
    # The marker is named after the link (not the artifact, whose name we learn only from the
    # session), so a used-up link's own download still resumes.
    out_dir = Path(os.path.abspath(out_dir))
    marker = out_dir / (".exchange-link-" + hashlib.sha256(token.encode()).hexdigest()[:24] + SESSION_SUFFIX)
    saved = marker.read_text().strip() if marker.is_file() else None
    if saved is not None:
        info = await open_session(client, token, session=saved)
    else:
        info = await open_session(client, token, proof=await prove(client, token))
    name = str(info["name"])
    if "/" in name or name in ("", ".", "..") or name.startswith("."):
        raise ManifestError(f"the artifact name {name!r} is not a safe file name")
    manifest = _verified_manifest(info, info["uploader"])
    file_key = age.unwrap_file_key(base64.b64decode(info["header"]), [identity.age_identity])
    if saved is None:  # only once the link has proved to be ours to download
        out_dir.mkdir(parents=True, exist_ok=True)
        # Whole or absent, even after a kill mid-write; a symbolic link there is replaced, not followed.
        write_atomic(marker, (str(info["session"]) + "\n").encode("utf-8"), overwrite=True)
    written = await download_verified(
        info,
        manifest,
        file_key,
        out_dir,
        lambda files: _LinkURLs(client, token, info, files),
        concurrency=concurrency,
        workers=workers,
        progress=progress,
        on_start=on_start,
    )
    message = receipt_message(
        artifact=str(info["id"]),
        link=str(info["link"]),
        session=str(info["session"]),
        manifest_sha256=manifest.digest(),
    )
    signature = identity.signing_key.sign(message).signature
    receipt = await send_receipt(client, token, str(info["session"]), signature)
    marker.unlink(missing_ok=True)
    return written, receipt

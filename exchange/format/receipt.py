"""The message a recipient signs to say it received an artifact: a receipt.

A receipt is an Ed25519 signature, by the recipient's registered signing key, over this text:

    exchange receipt v1
    artifact art_…
    link lnk_…
    session ses_…
    manifest-sha256 <64 lower-case hex digits>

(each line ending in a newline) for a download through a link, and with `via grant` in place of
the `link` line for a download by the artifact's id. The first line separates receipts from
anything else the same key signs (request signatures, manifests); the session line ties one
signature to one download session, and the third line to the kind of session, so a receipt
cannot be replayed onto another. Every value is in the `artifact.receipt` audit event, so an
auditor can rebuild the message and check the signature against the recipient's key without
trusting the service.
"""

from __future__ import annotations

import re

__all__ = ["receipt_message"]

_ID = re.compile(r"[A-Za-z0-9_]{1,64}")


def receipt_message(*, artifact: str, link: str | None, session: str, manifest_sha256: bytes) -> bytes:
    """The exact bytes a receipt signs; `link` None for a download by id (`via grant`).
    ValueError for values that could blur the lines."""
    for name, value in (("artifact", artifact), ("link", link), ("session", session)):
        if value is not None and not _ID.fullmatch(value):
            raise ValueError(f"{name} {value!r} is not an identifier")
    if len(manifest_sha256) != 32:
        raise ValueError("the manifest digest must be 32 bytes")
    via = "via grant" if link is None else f"link {link}"
    return (
        f"exchange receipt v1\nartifact {artifact}\n{via}\nsession {session}\n"
        f"manifest-sha256 {manifest_sha256.hex()}\n"
    ).encode("ascii")

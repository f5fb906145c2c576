"""C2SP tlog-proof (c2sp.org/tlog-proof@v1): a proof a person can carry that an entry is in a log.

A proof is text, one item per line (U+000A):

    c2sp.org/tlog-proof@v1
    extra <base64 opaque extra data>          (optional)
    index <decimal index of the entry>
    <base64 SHA-256 hash>                     (zero or more: the RFC 6962 inclusion proof,
    ...                                        from the leaf's sibling up to the root's child)
    <empty line>
    <the checkpoint, a signed note with its cosignatures, verbatim>

The spec carries the proof, not the entry: the extra data is where "additional data necessary to
reconstruct the record hash" goes. Exchange's proofs put the entry itself there: `extra` is the
base64 of the event's exact leaf bytes (its RFC 8785 canonical JSON), so one standard
`.tlog-proof` file holds everything a verifier needs. The extra data is not authenticated by
the format; it is trusted only because its leaf hash, at `index`, leads through the inclusion
proof to the root of a checkpoint signed by a pinned key (`exchange.client.auditproof`).

Rules this module enforces, beyond the spec's text: the header is exactly the v1 line; the
index is a decimal without leading zeroes below 2^63 - 1; every hash and the extra data are
canonical, padded base64 (one spelling for the same bytes); a present `extra` is not empty;
no line other than the one before the checkpoint is empty; at most `MAX_PROOF_HASHES` hashes
(a tree of at most 2^63 - 1 entries needs no more); the extra data and the checkpoint have
upper bounds; the checkpoint ends with a newline.

What it deliberately does not do: open or verify the checkpoint (it is kept as the bytes it
came in, and parsed by `exchange.format.note` and `exchange.format.checkpoint` when a verifier
trusts it), check the inclusion proof, or interpret the extra data. Errors are `FormatError`
with the code `bad-tlog-proof` and a sentence that names the problem.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from exchange.errors import FormatError, NoteError

from .note import b64decode_canonical

__all__ = [
    "HEADER",
    "MAX_CHECKPOINT_BYTES",
    "MAX_EXTRA_BYTES",
    "MAX_PROOF_HASHES",
    "TlogProof",
]

HEADER = "c2sp.org/tlog-proof@v1"
#: An inclusion proof in a tree of at most 2^63 - 1 entries has at most 63 hashes.
MAX_PROOF_HASHES = 63
#: The largest extra data accepted (exchange's leaves are at most 64 KiB).
MAX_EXTRA_BYTES = 256 * 1024
#: The largest checkpoint note accepted (a checkpoint with 100 signature lines is under 20 KiB).
MAX_CHECKPOINT_BYTES = 64 * 1024
#: Indices are below the largest tree size a checkpoint may state (2^63 - 1).
_MAX_INDEX = 2**63 - 2
_HASH_SIZE = 32
_CODE = "bad-tlog-proof"


def _fail(message: str) -> FormatError:
    return FormatError(message, code=_CODE)


def _b64(text: str, what: str) -> bytes:
    try:
        return b64decode_canonical(text, what=what)
    except NoteError as exc:
        raise _fail(f"The proof's {what} is not canonical base64.") from exc


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _index(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 19:
        raise _fail("The proof's index is not a decimal number without leading zeroes.")
    value = int(text)
    if value > _MAX_INDEX:
        raise _fail("The proof's index is beyond the largest tree a checkpoint can state.")
    return value


@dataclass(frozen=True)
class TlogProof:
    """One tlog-proof: the entry's index, its inclusion proof, the checkpoint note, extra data."""

    index: int
    proof: tuple[bytes, ...]
    #: The signed checkpoint note, cosignatures included, exactly as the log (and witnesses) wrote it.
    checkpoint: bytes
    #: Opaque, unauthenticated; exchange puts the entry's exact leaf bytes here.
    extra: bytes | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.index <= _MAX_INDEX:
            raise _fail("The proof's index is outside 0 to 2^63 - 2.")
        if len(self.proof) > MAX_PROOF_HASHES:
            raise _fail(f"The proof has {len(self.proof)} hashes; at most {MAX_PROOF_HASHES} are possible.")
        if any(len(h) != _HASH_SIZE for h in self.proof):
            raise _fail("Every inclusion proof hash is 32 bytes (SHA-256).")
        if self.extra is not None and not 0 < len(self.extra) <= MAX_EXTRA_BYTES:
            raise _fail(f"The proof's extra data must be 1 to {MAX_EXTRA_BYTES} bytes when present.")
        if not self.checkpoint.endswith(b"\n") or len(self.checkpoint) > MAX_CHECKPOINT_BYTES:
            raise _fail(
                f"The proof's checkpoint must end with a newline and be at most {MAX_CHECKPOINT_BYTES} bytes."
            )
        if self.checkpoint.startswith(b"\n"):
            raise _fail("The proof's checkpoint must not start with an empty line.")

    def to_bytes(self) -> bytes:
        """The proof file's bytes, in the spec's order."""
        lines = [HEADER]
        if self.extra is not None:
            lines.append("extra " + _b64encode(self.extra))
        lines.append(f"index {self.index}")
        lines.extend(_b64encode(h) for h in self.proof)
        return ("\n".join(lines) + "\n\n").encode("ascii") + self.checkpoint

    @classmethod
    def parse(cls, data: bytes) -> TlogProof:
        """Parse a proof file strictly; FormatError (`bad-tlog-proof`) on any deviation."""
        if len(data) > MAX_CHECKPOINT_BYTES + 2 * MAX_EXTRA_BYTES:
            raise _fail("The proof is larger than any proof this format makes.")
        # Proof lines are never empty, so the first empty line is the one before the checkpoint
        # (whose own empty line, between its text and its signatures, comes later).
        head, blank, checkpoint = data.partition(b"\n\n")
        if not blank:
            raise _fail("The proof has no empty line before its checkpoint.")
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            raise _fail("The proof's lines before the checkpoint are not ASCII.") from None
        lines = text.split("\n")
        if lines[0] != HEADER:
            raise _fail(f"The proof does not start with the line {HEADER!r}.")
        pos = 1
        extra = None
        if pos < len(lines) and lines[pos].startswith("extra "):
            extra = _b64(lines[pos][len("extra ") :], "extra data")
            pos += 1
        if pos >= len(lines) or not lines[pos].startswith("index "):
            raise _fail("The proof has no 'index' line after its header (and extra data).")
        index = _index(lines[pos][len("index ") :])
        hashes = lines[pos + 1 :]
        if len(hashes) > MAX_PROOF_HASHES:
            raise _fail(f"The proof has {len(hashes)} hashes; at most {MAX_PROOF_HASHES} are possible.")
        proof = tuple(_b64(h, f"inclusion proof hash {n}") for n, h in enumerate(hashes))
        return cls(index=index, proof=proof, checkpoint=checkpoint, extra=extra)

"""A C2SP tlog-witness: cosigns the audit log's checkpoints, refusing rollbacks and forks.

`exchange witness serve` runs this as an aiohttp app of its own, typically at an auditor
organisation, so that the log operator alone cannot show two histories: a checkpoint is
published only with a quorum of witness cosignatures, and a witness cosigns a checkpoint only
if it extends the one it cosigned last (c2sp.org/tlog-witness, `add-checkpoint`):

    POST /add-checkpoint
    old <size the witness last cosigned>\\n
    <consistency proof hash, base64>\\n ...   (at most 63)
    \\n
    <signed checkpoint note>

Answers, in the order the spec checks them: 400 for a malformed request (or old size above the
checkpoint's size); 404 for an unknown origin; 403 when no trusted log signature is present or one
from a trusted key (name and key ID) does not verify (signatures from other keys are ignored);
409 (`text/x.tlog.size`, body: the size it last cosigned and a newline) when the old size is not
that size; 422 when the consistency proof does not verify, including a non-empty proof from size
0, an empty tree whose root is not the empty-tree hash, and the same size with another root (a
fork, also logged); 413 for a body above `MAX_BODY_BYTES`; 405 for another method. On success,
200 with one cosignature/v1 line (c2sp.org/tlog-cosignature, timestamped with the witness's
clock) over the checkpoint text exactly as submitted.

Monitors: `GET /<SHA-256 of the origin, lowercase hex>/checkpoint` serves the latest checkpoint
cosigned for that log, with the log signatures the witness verified and its cosignature (404 if
it never cosigned one for that log).

State: one JSON file per log origin in the state directory, `{origin, size, root, checkpoint}`
(`checkpoint`: the note served to monitors; a file from before it was kept serves 404 until the
next cosignature), replaced atomically (write, fsync, rename, fsync the directory) before the
cosignature is returned. The check against it and the update run under an exclusive `flock` on
`<state>/.lock` (and an asyncio lock), so neither a crash nor a concurrent request, nor a second
witness process on the same directory, can roll it back.

What the witness does not do: fetch anything from logs (it trusts only the log keys it was
given, and knows a log by its key name, which is the log's origin), serve the optional
`sign-subtree` API, or make ML-DSA-44 cosignatures (cosignature/v1 Ed25519 only, which is what
the log's verifiers accept).

This module also holds the client side (`request_cosignature`), used by the service to collect
cosignatures.
A witness URL is configuration that points the service's own HTTP client somewhere, so the client
cannot be turned against internal addresses: the URL's form and literal addresses are checked in
`Settings`, every name is checked again each time it is resolved (`PublicResolver`: an internal
answer refuses the connection, so DNS rebinding gains nothing), and redirects are never followed
(a 3xx is a failed call), unless `witness_allow_private` says the witnesses are local.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from .errors import DependencyError, InputError, NoteError, ProofError
from .files import write_atomic
from .format import merkle
from .format.checkpoint import COSIGNATURE_V1, Checkpoint, cosign, cosigner_vkey, verify_cosignature
from .format.note import (
    Note,
    Signature,
    Verifier,
    b64decode_canonical,
    check_key_name,
    open_note,
    parse_note,
)
from .settings import is_internal_address

__all__ = [
    "MAX_PROOF_LINES",
    "AddCheckpointError",
    "CheckpointConflict",
    "CheckpointInconsistent",
    "CheckpointUntrusted",
    "InternalAddressRefused",
    "PublicResolver",
    "UnknownLogOrigin",
    "WitnessKey",
    "WitnessState",
    "create_witness_app",
    "format_add_checkpoint",
    "parse_add_checkpoint",
    "request_cosignature",
    "witness_session",
]

log = logging.getLogger("exchange.witness")

#: tlog-witness: "The client MUST NOT send more than 63 consistency proof lines."
MAX_PROOF_LINES = 63
#: Largest add-checkpoint body accepted: 63 proof lines and a note with 100 signatures fit easily.
MAX_BODY_BYTES = 64 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"
_SKEY_PREFIX = "PRIVATE+KEY+"


class AddCheckpointError(InputError):
    """A refused add-checkpoint request, the submitting log's fault: a malformed request (400) or
    one of the subclasses. The witness answers the class's status and `message` as plain text."""

    code = "checkpoint-refused"
    title = "Checkpoint refused"

    def __init__(self, message: str, *, known_size: int | None = None) -> None:
        super().__init__(message)
        #: The size the witness last cosigned, sent back with a 409 (`text/x.tlog.size`).
        self.known_size = known_size


class CheckpointUntrusted(AddCheckpointError):
    status = 403
    code = "checkpoint-untrusted"
    title = "No trusted log signature"


class UnknownLogOrigin(AddCheckpointError):
    status = 404
    code = "unknown-log-origin"
    title = "Unknown log origin"


class CheckpointConflict(AddCheckpointError):
    status = 409
    code = "checkpoint-conflict"
    title = "Not the size last cosigned"


class CheckpointInconsistent(AddCheckpointError):
    status = 422
    code = "checkpoint-inconsistent"
    title = "Consistency proof does not verify"


# -- keys ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WitnessKey:
    """A witness's cosigning key (type 0x04): its name and Ed25519 seed. Keep it secret."""

    name: str
    seed: bytes

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if len(self.seed) != 32:
            raise NoteError("An Ed25519 seed is 32 bytes.")

    @classmethod
    def generate(cls, name: str) -> WitnessKey:
        return cls(name, os.urandom(32))

    @property
    def vkey(self) -> str:
        """The public cosigner vkey `<name>+<key ID>+base64(0x04 || public key)` to give to logs."""
        return cosigner_vkey(self.name, self.seed)

    def to_skey(self) -> str:
        key_id = self.vkey.split("+", 2)[1]
        material = base64.b64encode(bytes([COSIGNATURE_V1]) + self.seed).decode("ascii")
        return f"{_SKEY_PREFIX}{self.name}+{key_id}+{material}"

    @classmethod
    def from_skey(cls, skey: str) -> WitnessKey:
        if not skey.startswith(_SKEY_PREFIX):
            raise NoteError("A witness key file holds PRIVATE+KEY+<name>+<key ID>+<key>.")
        parts = skey[len(_SKEY_PREFIX) :].split("+", 2)
        if len(parts) != 3:
            raise NoteError("A witness key file holds PRIVATE+KEY+<name>+<key ID>+<key>.")
        name, key_id, material = parts
        raw = b64decode_canonical(material, what="witness key material")
        if len(raw) != 33 or raw[0] != COSIGNATURE_V1:
            raise NoteError("The witness key is not a cosignature/v1 (type 0x04) Ed25519 seed.")
        key = cls(name, raw[1:])
        if key.vkey.split("+")[1] != key_id:
            raise NoteError("The witness key states a key ID that does not match its key.")
        return key

    def save(self, path: Path) -> None:
        """Write the key file with mode 0600; refuse to overwrite one (`FileExistsError`)."""
        write_atomic(path, (self.to_skey() + "\n").encode("ascii"), overwrite=False)

    @classmethod
    def load(cls, path: Path) -> WitnessKey:
        return cls.from_skey(path.read_text(encoding="ascii").strip())


# -- the request body --------------------------------------------------------------------------------


def format_add_checkpoint(old_size: int, proof: Sequence[bytes], note: bytes) -> bytes:
    lines = [f"old {old_size}\n", *(base64.b64encode(h).decode("ascii") + "\n" for h in proof), "\n"]
    return "".join(lines).encode("ascii") + note


_OLD_SIZE = re.compile(rb"old (0|[1-9][0-9]{0,18})")


def parse_add_checkpoint(body: bytes) -> tuple[int, list[bytes], bytes]:
    """(old size, consistency proof, signed checkpoint note) from a request body, strictly."""
    # Proof lines are never empty, so the first blank line ends the header.
    header, blank, note = body.partition(b"\n\n")
    if not blank:
        raise AddCheckpointError("no blank line between the old size and proof lines and the checkpoint")
    old_line, *proof_lines = header.split(b"\n")
    match = _OLD_SIZE.fullmatch(old_line)
    if match is None:
        raise AddCheckpointError("the first line must be 'old <size>' in decimal without leading zeros")
    if len(proof_lines) > MAX_PROOF_LINES:
        raise AddCheckpointError(f"more than {MAX_PROOF_LINES} consistency proof lines")
    proof: list[bytes] = []
    for line in proof_lines:
        try:
            digest = b64decode_canonical(line.decode("ascii"), what="consistency proof hash")
        except (NoteError, UnicodeDecodeError) as exc:
            raise AddCheckpointError("a consistency proof line is not canonical base64") from exc
        if len(digest) != merkle.HASH_SIZE:
            raise AddCheckpointError("a consistency proof line is not a 32-byte hash")
        proof.append(digest)
    return int(match.group(1)), proof, note


# -- state -----------------------------------------------------------------------------------------------


class WitnessState:
    """The latest cosigned (size, root) per origin, and the checkpoint note as cosigned (the log's
    verified signatures and the witness's cosignature), one JSON file each, replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, origin: str) -> Path:
        return self.directory / (hashlib.sha256(origin.encode("utf-8")).hexdigest()[:32] + ".json")

    def _read(self, origin: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._path(origin).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        if data.get("origin") != origin:
            raise RuntimeError(f"witness state file {self._path(origin)} belongs to another origin")
        return data

    def load(self, origin: str) -> tuple[int, bytes] | None:
        data = self._read(origin)
        return None if data is None else (int(data["size"]), base64.b64decode(data["root"]))

    def store(self, origin: str, size: int, root: bytes, note: bytes | None = None) -> None:
        data = {"origin": origin, "size": size, "root": base64.b64encode(root).decode("ascii")}
        if note is not None:
            data["checkpoint"] = note.decode("utf-8")
        write_atomic(self._path(origin), json.dumps(data).encode("utf-8"), overwrite=True)

    def cosigned(self, origin: str) -> bytes | None:
        """The latest checkpoint note cosigned for `origin`, if any (and stored with its state)."""
        data = self._read(origin)
        note = None if data is None else data.get("checkpoint")
        return note.encode("utf-8") if isinstance(note, str) else None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the state directory (blocking): load, check and store under
        it, so that two processes serving one directory cannot interleave a check and an update."""
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


# -- the witness -------------------------------------------------------------------------------------


class Witness:
    """The add-checkpoint decision and state update; the aiohttp handler is a thin shell around it."""

    def __init__(
        self,
        key: WitnessKey,
        state: WitnessState,
        log_vkeys: Sequence[str],
        *,
        clock_s: Callable[[], int] = lambda: int(time.time()),
    ) -> None:
        if not log_vkeys:
            raise ValueError("a witness needs at least one log verifier key (--log-vkey)")
        self.key = key
        self.state = state
        self.clock_s = clock_s
        self.logs: dict[str, list[Verifier]] = {}
        for vkey in log_vkeys:
            verifier = Verifier.from_vkey(vkey)
            self.logs.setdefault(verifier.name, []).append(verifier)
        self._lock = asyncio.Lock()

    async def add_checkpoint(self, body: bytes) -> bytes:
        """Check an add-checkpoint request body and, if it passes, record and cosign it: the
        response body (one cosignature line). Raises an AddCheckpointError subclass otherwise."""
        old_size, proof, note_bytes = parse_add_checkpoint(body)
        try:
            checkpoint = Checkpoint.parse(parse_note(note_bytes).text)
        except NoteError as exc:
            raise AddCheckpointError(f"the checkpoint does not parse: {exc}") from exc
        verifiers = self.logs.get(checkpoint.origin)
        if verifiers is None:
            raise UnknownLogOrigin(f"unknown log origin {checkpoint.origin!r}")
        try:
            opened = open_note(note_bytes, verifiers)
        except NoteError as exc:
            raise CheckpointUntrusted(f"no trusted log signature verifies: {exc}") from exc
        if old_size > checkpoint.size:
            raise AddCheckpointError("the old size is larger than the checkpoint size")
        # One request at a time in this process (the flock inside serialises processes).
        async with self._lock:
            line = await asyncio.to_thread(self._check_and_store, old_size, proof, checkpoint, opened)
        return line.encode("utf-8")

    def _check_and_store(
        self, old_size: int, proof: Sequence[bytes], checkpoint: Checkpoint, opened: Note
    ) -> str:
        """Check the request against the state, then cosign and store; the cosignature line."""
        with self.state.locked():
            known = self.state.load(checkpoint.origin)
            known_size, known_root = known if known else (0, merkle.EMPTY_ROOT)
            if old_size != known_size:
                raise CheckpointConflict(
                    f"the witness last cosigned size {known_size}", known_size=known_size
                )
            if old_size == checkpoint.size and known_root != checkpoint.root_hash:
                log.warning("fork: %s size %d with two roots", checkpoint.origin, checkpoint.size)
            try:
                merkle.verify_consistency(old_size, checkpoint.size, known_root, checkpoint.root_hash, proof)
            except ProofError as exc:
                log.warning("inconsistent checkpoint from %s: %s", checkpoint.origin, exc)
                raise CheckpointInconsistent(f"the consistency proof does not verify: {exc}") from exc
            # The spec: the timestamp MUST NOT be zero; the cosigned message is the submitted text.
            timestamp = max(1, self.clock_s())
            line = cosign(opened.text, self.key.name, self.key.seed, timestamp).to_line()
            # Kept for monitors: the text, the log signatures checked, and this cosignature.
            cosigned = opened.text + "\n" + "".join(sig.to_line() for sig in opened.signatures) + line
            self.state.store(
                checkpoint.origin, checkpoint.size, checkpoint.root_hash, cosigned.encode("utf-8")
            )
            return line

    def latest(self, origin_hash: str) -> bytes | None:
        """The latest cosigned checkpoint of the log whose origin hashes (SHA-256, lowercase hex)
        to `origin_hash`, with its log signatures and this witness's cosignature; None if none."""
        for origin in self.logs:
            if hashlib.sha256(origin.encode("utf-8")).hexdigest() == origin_hash:
                return self.state.cosigned(origin)
        return None


_WITNESS = web.AppKey("witness", Witness)


async def _handle_add_checkpoint(request: web.Request) -> web.Response:
    witness = request.app[_WITNESS]
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return web.Response(status=413, text="request body too large\n")
    body = await request.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        return web.Response(status=413, text="request body too large\n")
    try:
        lines = await witness.add_checkpoint(body)
    except AddCheckpointError as exc:
        if exc.status == 409 and exc.known_size is not None:
            return web.Response(
                status=409, body=f"{exc.known_size}\n".encode(), content_type=SIZE_CONTENT_TYPE
            )
        return web.Response(status=exc.status, text=exc.message + "\n")
    return web.Response(status=200, body=lines, content_type="text/plain", charset="utf-8")


async def _handle_checkpoint(request: web.Request) -> web.Response:
    note = await asyncio.to_thread(request.app[_WITNESS].latest, request.match_info["origin_hash"])
    if note is None:
        return web.Response(status=404, text="no checkpoint cosigned for that log\n")
    return web.Response(status=200, body=note, content_type="text/plain", charset="utf-8")


def create_witness_app(witness: Witness) -> web.Application:
    """The witness's routes: `POST /add-checkpoint` (submission) and `GET /<origin hash>/checkpoint`
    (monitoring; the submission and monitoring prefixes are both the root)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_WITNESS] = witness
    app.router.add_post("/add-checkpoint", _handle_add_checkpoint)
    app.router.add_get("/{origin_hash:[0-9a-f]{64}}/checkpoint", _handle_checkpoint)
    return app


# -- the client: collecting cosignatures ---------------------------------------------------------------


class InternalAddressRefused(DependencyError, OSError):
    """A witness name resolved to a loopback, private, link-local or metadata address. Also an
    OSError: aiohttp turns only an OSError from a resolver into a failed connection."""

    code = "witness-address-refused"
    title = "Witness address refused"


class PublicResolver(AbstractResolver):
    """Resolves as usual, then refuses the whole answer if any address in it is internal.

    Checked at every connection, not once at start: a name that answers with a public address
    today and 169.254.169.254 tomorrow (DNS rebinding) is refused tomorrow. aiohttp does not
    resolve address literals; `Settings` refuses internal ones when it is built.
    """

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            address = ipaddress.ip_address(answer["host"].split("%", 1)[0])
            if is_internal_address(address):
                raise InternalAddressRefused(
                    f"{host} resolves to {address}, an internal address; witnesses must be public"
                    " (witness_allow_private is off)"
                )
        return answers

    async def close(self) -> None:
        await self._inner.close()


def witness_session(*, timeout_s: float, allow_private: bool) -> aiohttp.ClientSession:
    """The HTTP client the service asks witnesses with: no proxies from the environment, and
    (unless `allow_private`) no connection to an internal address. Redirects are refused per
    request in `request_cosignature`."""
    connector = aiohttp.TCPConnector(resolver=None if allow_private else PublicResolver())
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s), connector=connector, trust_env=False
    )


@dataclass
class CosignResult:
    signature: Signature | None
    #: The size the witness says it last cosigned, when it told us (409), for the next request.
    known_size: int | None
    problem: str | None = None


async def request_cosignature(
    session: aiohttp.ClientSession,
    url: str,
    note: bytes,
    old_size: int,
    proof: Sequence[bytes],
    witness_vkeys: Sequence[str],
) -> CosignResult:
    """One add-checkpoint call; returns the first cosignature that verifies against a known key.

    On 409 with a size the caller retries with a proof from that size. Cosignatures from keys
    not in `witness_vkeys` are ignored, as the spec asks. A redirect is not followed: it is a
    failed call (a witness that moved is reconfigured by the operator, not by its answers).
    """
    body = format_add_checkpoint(old_size, proof, note)
    endpoint = url.rstrip("/") + "/add-checkpoint"
    try:
        async with session.post(endpoint, data=body, allow_redirects=False) as resp:
            raw = await resp.content.read(MAX_BODY_BYTES)
            status, content_type = resp.status, resp.content_type
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        refused = exc if isinstance(exc, InternalAddressRefused) else exc.__cause__
        if isinstance(refused, InternalAddressRefused):
            return CosignResult(None, None, f"refused: {refused}")
        return CosignResult(None, None, f"unreachable: {exc.__class__.__name__}")
    if 300 <= status < 400:
        return CosignResult(None, None, f"HTTP {status}: a redirect, not followed")
    if status == 409 and content_type == SIZE_CONTENT_TYPE:
        text = raw.decode("ascii", "replace").strip()
        return CosignResult(None, int(text) if text.isdigit() else None, "conflict: " + text)
    if status != 200:
        return CosignResult(None, None, f"HTTP {status}: {raw[:200].decode('utf-8', 'replace').strip()}")
    text = parse_note(note).text
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return CosignResult(None, None, "answer is not UTF-8")
    for line in lines:
        try:
            sig = parse_note(b"x\n\n" + (line + "\n").encode("utf-8")).signatures[0]
        except NoteError:
            continue
        for vkey in witness_vkeys:
            try:
                verify_cosignature(text, sig, vkey)
            except NoteError:
                continue
            return CosignResult(sig, None)
    return CosignResult(None, None, "no cosignature from a configured witness key")

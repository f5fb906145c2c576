"""Offline verification of an audit log export: trusts the pinned keys and nothing it was sent.

`exchange audit verify` runs `verify_bundle` over a directory written by `exchange audit
export` and a state directory of its own. It uses only the standard library, PyNaCl and the
pure format code (`exchange.format`, `exchange.errors`): no network, no database, no aiohttp,
so an auditor can run it on an air-gapped machine and read every line it depends on.

Checks, in order; the first failure decides the verdict and its exit code:

    10 bundle     a file is missing or does not match manifest.json
    11 signature  the checkpoint is not signed by the pinned log key (unknown key, bad signature,
                  another origin)
    12 quorum     fewer valid witness cosignatures (from the pinned witness keys) than the quorum
    13 entries    the leaves are not the log's events: a gap or a wrong idx, a leaf that is not
                  canonical RFC 8785 JSON, over 64 KiB, of another origin, or fewer / more leaves
                  than the checkpoint's size
    14 root       the leaves do not hash to the checkpoint's root
    15 fork       the checkpoint contradicts the last one this state saved: a smaller size
                  (rollback), or a tree that does not extend the saved one. Both signed
                  checkpoints are kept in STATE/evidence/ as proof of the log's misbehaviour.
    16 proof      the bundle's consistency proof is malformed or does not verify, although the
                  leaves themselves extend the saved checkpoint
    17 rollback   (following tiles) the log's signed checkpoint is smaller than the saved one
    18 gap        (following tiles) a tile or entry bundle the checkpoint needs is missing or
                  short, or an entry's idx is not its position

On success the checkpoint, its root and the pinned keys are saved in the state directory
atomically (write, fsync, rename). The log key is pinned on first use from what the auditor
gives (`--vkey`), never from the bundle's `log.vkey`, which is there for reference only.

Key rotation. The log may hand over to a new key and origin once (or more): its last event under
the old origin is `audit.log.rotated`, naming `next_origin` and `next_vkey`, and every later
leaf carries the new origin. The verifier follows a rotation only when the old key signed it: the
bundle's `rotations.json` must hold, for each rotation event at index r, the checkpoint of size
r + 1 signed by the key being rotated away from (with the pinned quorum), whose root the first
r + 1 leaves hash to. A checkpoint is opened with the key of the origin its last leaf carries, so
the latest one may still be the old key's (nothing was signed with the new key yet). On success
the state pins the new key and remembers the old ones (`rotated_from`), so `--vkey OLD` still
names this state. A rotation event that is not the old key's last word, names an invalid key,
or lacks its signed checkpoint fails with `signature` (11) or `entries` (13).

Following the log through its tiles (c2sp.org/tlog-tiles; `exchange audit verify --tiles`,
`exchange audit monitor`). `tiles_needed` names exactly the Merkle tiles and entry bundles that
move a saved state of size n to a checkpoint of size N: the tiles holding the old root's
subtrees and the consistency proof, and the bundles of leaves n..N-1 (nothing already verified
is fetched again). `verify_tiles` then opens the checkpoint with the key the new leaves end
under (following `audit.log.rotated` events as bundles do, with the old key's checkpoint at the
rotation's size), checks the consistency proof it computes from the tiles against the saved
root, each new leaf (canonical, of this log, at its idx), and that the old tree's subtrees and
the new leaves hash to the new root. Beyond the bundle verdicts it has two of its own: a signed
checkpoint smaller than the saved one is a `rollback` (17), and a missing or short tile or
bundle, or an entry not at its idx, is a `gap` (18); a fork or rollback keeps both signed
checkpoints as evidence, like a bundle's fork. Old leaves are not fetched again, so a change to
them shows only as a fork once the log signs the changed tree (a full bundle export re-reads
them all).

The same checks, one row at a time, back `exchange audit query`, which prints nothing it has not
verified: the page's checkpoint is signed by the pinned key with the pinned quorum
(`open_checkpoint`) and consistent with the saved one (`consistency_sizes`, `check_consistent`),
and each row is a canonical event of this log, matches the filters asked for, and has an
inclusion proof that leads to the checkpoint's root (`check_query_row`). Those functions raise
VerifyFailure too; they never write the state: only a verified export moves it forward.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IntegrityFailure, NoteError, ProofError
from .files import write_atomic
from .format import merkle, tiles
from .format.checkpoint import COSIGNATURE_V1, Checkpoint, cosigner_key_id, verify_cosignature
from .format.note import Verifier, decode_vkey, open_note, parse_note

__all__ = [
    "BUNDLE_FILES",
    "EXIT_CODES",
    "MANIFEST",
    "ROTATIONS_FILE",
    "ROTATION_ACTION",
    "State",
    "TileKey",
    "VerifyFailure",
    "canonical_json",
    "check_consistent",
    "check_query_row",
    "claimed_size",
    "consistency_sizes",
    "filter_mismatch",
    "load_pinned",
    "open_checkpoint",
    "rotation_sizes",
    "run_tiles",
    "tiles_needed",
    "verify_bundle",
    "verify_tiles",
    "vkey_name",
]

MANIFEST = "manifest.json"
BUNDLE_FILES = ("entries.jsonl", "events.csv", "checkpoint", "consistency.json", "log.vkey")
#: In the manifest when the log rotated its key: [{"size", "note"}], the old key's last checkpoints.
ROTATIONS_FILE = "rotations.json"
EVENT_TYPE = "exchange.audit.event/v1"
#: The last event under an origin: its details name the next origin and its key.
ROTATION_ACTION = "audit.log.rotated"
MAX_LEAF_BYTES = 64 * 1024
_MAX_SAFE_INT = 2**53 - 1

EXIT_CODES = {
    "ok": 0,
    "usage": 2,
    "bundle": 10,
    "signature": 11,
    "quorum": 12,
    "entries": 13,
    "root": 14,
    "fork": 15,
    "proof": 16,
    "rollback": 17,
    "gap": 18,
}


class VerifyFailure(IntegrityFailure):
    """A verdict other than ok: its class (a key of EXIT_CODES) and a sentence for the auditor.
    `exchange audit verify` exits with the verdict's own code, not the tree's (8)."""

    code = "audit-verify-failed"
    title = "Audit log does not verify"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


# -- canonical JSON (RFC 8785) for the subset events use --------------------------------------------


def _escape(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20:
            short = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}.get(ch)
            out.append(short or f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError("a lone surrogate has no canonical form")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _canonical(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        # JCS writes numbers as ECMAScript doubles; integers within 2^53 print as themselves.
        if abs(value) > _MAX_SAFE_INT:
            raise ValueError("an integer beyond 2^53 has no exact canonical form")
        return str(value)
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, list):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        # RFC 8785 3.2.3: members sorted by their names' UTF-16 code units.
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(_escape(k) + ":" + _canonical(v) for k, v in items) + "}"
    raise ValueError(f"{type(value).__name__} values are not allowed in events")


def canonical_json(value: Any) -> bytes:
    """RFC 8785 bytes of a JSON value without floats (what audit events are made of).

    Pure-ASCII output takes the C encoder, whose compact key-sorted output is RFC 8785 for
    ASCII text without floats; anything else goes through the encoder above, character by
    character. Tests hold both paths to the bytes of the rfc8785 package the service uses.
    """
    _canonical_check(value)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    if text.isascii():
        return text.encode("ascii")
    return _canonical(value).encode("utf-8")


def _canonical_check(value: Any) -> None:
    # What json.dumps would print without complaint but RFC 8785 cannot: floats, huge integers.
    if isinstance(value, dict):
        for v in value.values():
            _canonical_check(v)
    elif isinstance(value, list):
        for v in value:
            _canonical_check(v)
    elif isinstance(value, float) or (
        isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_SAFE_INT
    ):
        raise ValueError("a float or an integer beyond 2^53 has no exact canonical form here")


def _no_floats(text: str) -> Any:
    raise ValueError("floats are not allowed in events")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a member name appears twice")
    return result


def parse_leaf(leaf: bytes) -> dict[str, Any]:
    """The event in a leaf, if the leaf is exactly its canonical form; ValueError otherwise."""
    if len(leaf) > MAX_LEAF_BYTES:
        raise ValueError(f"the leaf is over {MAX_LEAF_BYTES} bytes")
    event = json.loads(
        leaf.decode("utf-8"),
        parse_float=_no_floats,
        parse_constant=_no_floats,
        object_pairs_hook=_no_duplicates,
    )
    if not isinstance(event, dict):
        raise ValueError("the leaf is not a JSON object")
    if not hmac.compare_digest(canonical_json(event), leaf):
        raise ValueError("the leaf is not in canonical RFC 8785 form")
    return event


# -- the tree, leaf by leaf ---------------------------------------------------------------------------


class _CompactRange:
    """The perfect subtrees of the leaves seen so far (at most log2(n) + 1 hashes): their root."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (level, hash), largest first
        self.size = 0

    def append(self, leaf_hash: bytes) -> None:
        level, node = 0, leaf_hash
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            node = merkle.node_hash(left, node)
            level += 1
        self._stack.append((level, node))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return merkle.EMPTY_ROOT
        acc = self._stack[-1][1]
        for _, node in reversed(self._stack[:-1]):
            acc = merkle.node_hash(node, acc)
        return acc


# -- state ------------------------------------------------------------------------------------------------


@dataclass
class State:
    """What the auditor trusts: pinned keys and the last checkpoint verified (if any)."""

    log_vkey: str
    witness_vkeys: list[str] = field(default_factory=list)
    witness_quorum: int = 0
    size: int | None = None
    root: bytes | None = None
    checkpoint: bytes | None = None
    #: Log keys this state pinned before, oldest first: each rotated to the next by a signed event.
    rotated_from: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> State | None:
        path = directory / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        checkpoint = directory / "checkpoint"
        return cls(
            log_vkey=data["log_vkey"],
            witness_vkeys=list(data.get("witness_vkeys", [])),
            witness_quorum=int(data.get("witness_quorum", 0)),
            size=data.get("size"),
            root=base64.b64decode(data["root"]) if data.get("root") else None,
            checkpoint=checkpoint.read_bytes() if checkpoint.exists() else None,
            rotated_from=list(data.get("rotated_from", [])),
        )

    def save(self, directory: Path) -> None:
        """Write the checkpoint, then state.json, each by atomic rename; state.json is the commit."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.checkpoint is not None:
            write_atomic(directory / "checkpoint", self.checkpoint, overwrite=True)
        data = {
            "log_vkey": self.log_vkey,
            "witness_vkeys": self.witness_vkeys,
            "witness_quorum": self.witness_quorum,
            "size": self.size,
            "root": base64.b64encode(self.root).decode("ascii") if self.root is not None else None,
        } | ({"rotated_from": self.rotated_from} if self.rotated_from else {})
        state = (json.dumps(data, indent=1) + "\n").encode("utf-8")
        write_atomic(directory / "state.json", state, overwrite=True)


def save_evidence(directory: Path, previous: bytes, new: bytes) -> Path:
    """Keep both signed checkpoints of a fork; they prove the log signed two histories."""
    where = directory / "evidence" / f"fork-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    where.mkdir(parents=True, exist_ok=True)
    (where / "saved.checkpoint").write_bytes(previous)
    (where / "new.checkpoint").write_bytes(new)
    return where


# -- verification --------------------------------------------------------------------------------------


@dataclass
class Report:
    origin: str
    size: int
    root: str
    witnesses: list[str]
    previous_size: int | None
    entries: int
    #: Each key rotation the leaves went through: {"size", "from_origin", "to_origin", "from_vkey",
    #: "to_vkey"}.
    rotations: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read_bundle(bundle: Path) -> dict[str, bytes]:
    try:
        manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
        expected = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VerifyFailure("bundle", f"the bundle has no readable {MANIFEST}: {exc}") from exc
    files: dict[str, bytes] = {}
    for name in BUNDLE_FILES:
        try:
            data = (bundle / name).read_bytes()
        except OSError as exc:
            raise VerifyFailure("bundle", f"the bundle's {name} cannot be read: {exc.strerror}") from exc
        if not isinstance(expected.get(name), str) or not hmac.compare_digest(
            hashlib.sha256(data).hexdigest(), expected[name]
        ):
            raise VerifyFailure("bundle", f"the bundle's {name} does not match its SHA-256 in {MANIFEST}")
        files[name] = data
    if ROTATIONS_FILE in expected:  # only bundles of a log that rotated its key carry it
        try:
            data = (bundle / ROTATIONS_FILE).read_bytes()
        except OSError as exc:
            raise VerifyFailure(
                "bundle", f"the bundle's {ROTATIONS_FILE} cannot be read: {exc.strerror}"
            ) from exc
        if not isinstance(expected[ROTATIONS_FILE], str) or not hmac.compare_digest(
            hashlib.sha256(data).hexdigest(), expected[ROTATIONS_FILE]
        ):
            raise VerifyFailure(
                "bundle", f"the bundle's {ROTATIONS_FILE} does not match its SHA-256 in {MANIFEST}"
            )
        files[ROTATIONS_FILE] = data
    return files


def _open_checkpoint(note: bytes, log_vkey: str) -> Checkpoint:
    try:
        verifier = Verifier.from_vkey(log_vkey)
    except NoteError as exc:
        raise VerifyFailure("usage", f"the pinned log key is not a valid vkey: {exc}") from exc
    try:
        opened = open_note(note, [verifier])
        checkpoint = Checkpoint.parse(opened.text)
    except NoteError as exc:
        raise VerifyFailure(
            "signature",
            f"the checkpoint is not signed by the pinned log key: {exc} (if the log rotated its key, "
            "`exchange audit verify` follows the rotation and pins the new key)",
        ) from exc
    if checkpoint.origin != verifier.name:
        raise VerifyFailure(
            "signature", f"the checkpoint is for the log {checkpoint.origin!r}, not {verifier.name!r}"
        )
    return checkpoint


def _count_cosignatures(note: bytes, text: str, witness_vkeys: Sequence[str]) -> list[str]:
    """Names of the pinned witnesses whose cosignature verifies; a bad one from a pinned key fails."""
    keys: dict[tuple[str, bytes], str] = {}
    for vkey in witness_vkeys:
        name, key_type, public_key = decode_vkey(vkey)
        if key_type != COSIGNATURE_V1:
            raise VerifyFailure("usage", f"the witness key {name} is not a cosignature/v1 (0x04) key")
        keys[name, cosigner_key_id(name, public_key)] = vkey
    valid: list[str] = []
    for sig in parse_note(note).signatures:
        pinned = keys.get((sig.name, sig.key_id))
        if pinned is None:
            continue  # an unknown key's line is ignored, as signed-note requires
        try:
            verify_cosignature(text, sig, pinned)
        except NoteError as exc:
            raise VerifyFailure(
                "quorum", f"a cosignature from a pinned witness does not verify: {exc}"
            ) from exc
        if sig.name not in valid:
            valid.append(sig.name)
    return valid


def _leaves(data: bytes) -> Iterator[bytes]:
    if not data:
        return
    if not data.endswith(b"\n"):
        raise VerifyFailure("entries", "entries.jsonl does not end with a newline")
    yield from data[:-1].split(b"\n")


def _open_with_quorum(note: bytes, state: State, log_vkey: str | None = None) -> tuple[Checkpoint, list[str]]:
    checkpoint = _open_checkpoint(note, log_vkey or state.log_vkey)
    witnesses = _count_cosignatures(note, checkpoint.to_text(), state.witness_vkeys)
    if len(witnesses) < state.witness_quorum:
        raise VerifyFailure(
            "quorum",
            f"the checkpoint has {len(witnesses)} valid cosignatures from pinned witnesses; "
            f"{state.witness_quorum} are required",
        )
    return checkpoint, witnesses


def open_checkpoint(note: bytes, state: State) -> Checkpoint:
    """The checkpoint in `note` once it is signed by the pinned log key, with the pinned quorum."""
    return _open_with_quorum(note, state)[0]


@dataclass
class _Rotation:
    size: int  # the tree size whose last leaf is the rotation event
    old_vkey: str
    new_vkey: str
    root: bytes = b""

    def to_json(self) -> dict[str, Any]:
        """What a report says of it (`Report.rotations`)."""
        return {
            "size": self.size,
            "from_origin": vkey_name(self.old_vkey),
            "to_origin": vkey_name(self.new_vkey),
            "from_vkey": self.old_vkey,
            "to_vkey": self.new_vkey,
        }


def vkey_name(vkey: str) -> str:
    """The origin a log key signs for; VerifyFailure("usage") if it is not a valid vkey."""
    try:
        return Verifier.from_vkey(vkey).name
    except NoteError as exc:
        raise VerifyFailure("usage", f"the pinned log key is not a valid vkey: {exc}") from exc


def _rotation_of(event: dict[str, Any], position: int, origin: str, vkey: str) -> _Rotation:
    """The rotation an `audit.log.rotated` event announces, once its details hold together."""
    details = _member(event, "details")
    next_origin, next_vkey = details.get("next_origin"), details.get("next_vkey")
    if not isinstance(next_origin, str) or not isinstance(next_vkey, str):
        raise VerifyFailure("entries", f"the rotation event at {position} names no next origin and key")
    try:
        named = Verifier.from_vkey(next_vkey).name
    except NoteError as exc:
        raise VerifyFailure(
            "entries", f"the rotation event at {position} names an invalid key: {exc}"
        ) from exc
    if named != next_origin or next_origin == origin:
        raise VerifyFailure(
            "entries", f"the rotation event at {position} names a key for {named!r}, not a new origin"
        )
    return _Rotation(position + 1, vkey, next_vkey)


def _check_last_words(
    rotations: Sequence[_Rotation],
    notes: Mapping[int, bytes],
    state: State,
    root_of: Callable[[_Rotation], bytes],
) -> None:
    """Each rotation is followed only if the key it rotates from signed (with the pinned quorum)
    the checkpoint ending with it, whose root `root_of` the leaves make."""
    for rotation in rotations:
        signed = notes.get(rotation.size)
        if signed is None:
            raise VerifyFailure(
                "signature",
                f"the rotation at size {rotation.size} has no checkpoint signed by the key it rotates from",
            )
        last_word, _ = _open_with_quorum(signed, state, rotation.old_vkey)
        if last_word.size != rotation.size or not hmac.compare_digest(last_word.root_hash, root_of(rotation)):
            raise VerifyFailure(
                "root", f"the old key's checkpoint of size {rotation.size} does not match the leaves"
            )


def _rotation_notes(data: bytes | None) -> dict[int, bytes]:
    if data is None:
        return {}
    try:
        items = json.loads(data)
        return {int(item["size"]): str(item["note"]).encode("utf-8") for item in items}
    except (ValueError, KeyError, TypeError) as exc:
        raise VerifyFailure("bundle", f"{ROTATIONS_FILE} is malformed: {exc}") from exc


def verify_bundle(bundle: Path, state: State) -> tuple[Report, Checkpoint, bytes]:
    """Check a bundle against the trusted state; return the report, checkpoint and its note.

    Raises VerifyFailure with the verdict. Does not write anything: the caller saves the new
    state (or the fork evidence). The key that signed the returned checkpoint is the report's
    last rotation's new key, if the leaves rotated, else the pinned one.
    """
    files = _read_bundle(bundle)
    note = files["checkpoint"]
    # The leaves are read from the first, so the first key this state pinned reads them.
    vkey = state.rotated_from[0] if state.rotated_from else state.log_vkey
    origin = vkey_name(vkey)
    rotations: list[_Rotation] = []

    tree = _CompactRange()
    previous_root_from_leaves: bytes | None = merkle.EMPTY_ROOT if state.size == 0 else None
    for position, leaf in enumerate(_leaves(files["entries.jsonl"])):
        try:
            event = parse_leaf(leaf)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
            raise VerifyFailure(
                "entries", f"the leaf at position {position} is not a valid event: {exc}"
            ) from exc
        if event.get("idx") != position:
            raise VerifyFailure(
                "entries",
                f"the leaf at position {position} says idx {event.get('idx')!r}: a gap or reordering",
            )
        if event.get("type") != EVENT_TYPE or event.get("origin") != origin:
            raise VerifyFailure("entries", f"the leaf at position {position} is not an event of this log")
        tree.append(merkle.leaf_hash(leaf))
        if tree.size == state.size:
            previous_root_from_leaves = tree.root()
        if event.get("action") == ROTATION_ACTION:
            rotation = _rotation_of(event, position, origin, vkey)
            rotation.root = tree.root()
            rotations.append(rotation)
            vkey, origin = rotation.new_vkey, vkey_name(rotation.new_vkey)
    # The checkpoint is signed by the key of the origin its last leaf carries: the old key's
    # when the last leaf is a rotation event (the new key has signed nothing yet).
    signer_vkey = rotations[-1].old_vkey if rotations and rotations[-1].size == tree.size else vkey
    checkpoint, witnesses = _open_with_quorum(note, state, signer_vkey)
    if tree.size != checkpoint.size:
        raise VerifyFailure(
            "entries", f"the bundle has {tree.size} leaves; the checkpoint covers {checkpoint.size}"
        )
    root = tree.root()
    if not hmac.compare_digest(root, checkpoint.root_hash):
        raise VerifyFailure("root", "the leaves do not hash to the checkpoint's root: an entry was changed")

    followed = [*state.rotated_from, state.log_vkey]
    chain = [rotations[0].old_vkey, *(r.new_vkey for r in rotations)] if rotations else [vkey]
    if chain[: len(followed)] != followed:
        raise VerifyFailure("fork", "the log's key history differs from the one this state followed before")
    _check_last_words(rotations, _rotation_notes(files.get(ROTATIONS_FILE)), state, lambda r: r.root)

    if state.size is not None and state.root is not None:
        _check_against_saved(state, checkpoint, previous_root_from_leaves, files["consistency.json"])

    report = Report(
        origin=checkpoint.origin,
        size=checkpoint.size,
        root=base64.b64encode(root).decode("ascii"),
        witnesses=witnesses,
        previous_size=state.size,
        entries=tree.size,
        rotations=[r.to_json() for r in rotations],
    )
    return report, checkpoint, note


def _check_against_saved(
    state: State, checkpoint: Checkpoint, previous_root_from_leaves: bytes | None, consistency: bytes
) -> None:
    assert state.size is not None and state.root is not None
    if checkpoint.size < state.size:
        raise VerifyFailure(
            "fork", f"the log shrank: size {checkpoint.size} after the saved size {state.size} (rollback)"
        )
    if previous_root_from_leaves is None or not hmac.compare_digest(previous_root_from_leaves, state.root):
        raise VerifyFailure(
            "fork",
            f"the first {state.size} leaves do not hash to the saved checkpoint's root: "
            "the log rewrote history it had signed",
        )
    try:
        data = json.loads(consistency)
        old, new = int(data["old"]), int(data["new"])
        proof = [merkle_b64(h) for h in data["proof"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise VerifyFailure("proof", f"consistency.json is malformed: {exc}") from exc
    if old == 0 or old != state.size:
        return  # a proof from another size proves nothing here; the leaves already did
    if new != checkpoint.size:
        raise VerifyFailure("proof", "consistency.json is for another checkpoint size")
    try:
        merkle.verify_consistency(old, new, state.root, checkpoint.root_hash, proof)
    except ProofError as exc:
        raise VerifyFailure("proof", f"the consistency proof does not verify: {exc}") from exc


def merkle_b64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("a proof hash is a base64 string")
    raw = base64.b64decode(text, validate=True)
    if len(raw) != merkle.HASH_SIZE:
        raise ValueError("a proof hash is 32 bytes")
    return raw


# -- filtered queries, row by row ------------------------------------------------------------------


def consistency_sizes(state: State, checkpoint: Checkpoint) -> tuple[int, int] | None:
    """(old, new): the consistency proof that relates `checkpoint` to the saved one, if one is needed.

    The checkpoint may be older than the saved one (a query pinned to an earlier size): then the
    proof runs from it to the saved one.
    """
    if state.size is None or state.root is None or checkpoint.size == state.size:
        return None
    old, new = sorted((state.size, checkpoint.size))
    return None if old == 0 else (old, new)


def check_consistent(state: State, checkpoint: Checkpoint, proof: Sequence[bytes]) -> None:
    """Raise VerifyFailure("fork") unless `checkpoint` and the saved checkpoint are one history."""
    if state.size is None or state.root is None:
        return
    if checkpoint.size == state.size:
        if not hmac.compare_digest(checkpoint.root_hash, state.root):
            raise VerifyFailure(
                "fork", f"the checkpoint of size {checkpoint.size} has another root than the saved one"
            )
        return
    sizes = consistency_sizes(state, checkpoint)
    if sizes is None:
        return  # one of them is the empty tree, which every tree extends
    roots = {state.size: state.root, checkpoint.size: checkpoint.root_hash}
    old, new = sizes
    try:
        merkle.verify_consistency(old, new, roots[old], roots[new], proof)
    except ProofError as exc:
        raise VerifyFailure(
            "fork",
            f"the checkpoint of size {checkpoint.size} is not consistent with the saved one of size "
            f"{state.size}: {exc}",
        ) from exc


def _member(event: dict[str, Any], name: str) -> dict[str, Any]:
    value = event.get(name)
    return value if isinstance(value, dict) else {}


def filter_mismatch(event: dict[str, Any], filters: Mapping[str, str | int | None]) -> str | None:
    """The first filter of `exchange audit query` the event does not match, or None.

    The same meaning as the service's query: `actor` is a principal's id or name, `resource` is
    TYPE or TYPE:ID, `since` and `until` are ms (until exclusive); `size` is the checkpoint's.
    """
    actor, outcome, resource = _member(event, "actor"), _member(event, "outcome"), _member(event, "resource")
    time_ms = event.get("time_ms")
    for name, value in filters.items():
        if value is None or value == "" or name == "size":
            continue
        if name == "actor":
            ok = value in (actor.get("id"), actor.get("name"))
        elif name == "org":
            ok = actor.get("org") == value
        elif name == "action":
            ok = event.get("action") == value
        elif name == "outcome":
            ok = outcome.get("result") == value
        elif name == "resource":
            rtype, _, rid = str(value).partition(":")
            ok = (not rtype or resource.get("type") == rtype) and (not rid or resource.get("id") == rid)
        elif name in ("since", "until"):
            ok = type(time_ms) is int and (time_ms >= int(value) if name == "since" else time_ms < int(value))
        else:
            raise ValueError(f"unknown query filter {name!r}")
        if not ok:
            return name
    return None


def check_query_row(
    leaf: bytes,
    idx: int,
    proof: Sequence[bytes],
    checkpoint: Checkpoint,
    filters: Mapping[str, str | int | None],
    earlier_origins: Sequence[str] = (),
) -> dict[str, Any]:
    """The event of one row of a filtered query, once the row is shown to be what it claims.

    The leaf must be a canonical event of this log at `idx` (of the checkpoint's origin, or of
    one the log rotated from: `earlier_origins`), match every filter, and be leaf `idx` of the
    checkpoint's tree by its inclusion proof. Raises VerifyFailure naming the idx.
    """
    try:
        event = parse_leaf(leaf)
    except ValueError as exc:
        raise VerifyFailure("entries", f"event {idx} is not a valid event: {exc}") from exc
    if event.get("idx") != idx:
        raise VerifyFailure("entries", f"the row at idx {idx} holds the event of idx {event.get('idx')!r}")
    if event.get("type") != EVENT_TYPE or (
        event.get("origin") != checkpoint.origin and event.get("origin") not in earlier_origins
    ):
        raise VerifyFailure("entries", f"event {idx} is not an event of this log")
    mismatch = filter_mismatch(event, filters)
    if mismatch is not None:
        raise VerifyFailure("entries", f"event {idx} does not match the filter --{mismatch}")
    try:
        merkle.verify_inclusion(merkle.leaf_hash(leaf), idx, checkpoint.size, proof, checkpoint.root_hash)
    except ProofError as exc:
        raise VerifyFailure(
            "proof", f"event {idx} is not in the checkpoint of size {checkpoint.size}: {exc}"
        ) from exc
    return event


# -- running it -----------------------------------------------------------------------------------


def load_pinned(state_dir: Path, vkey: str | None) -> State:
    """The trusted state in `state_dir`, or a new one pinning `vkey` (not saved here).

    VerifyFailure("usage") when nothing is pinned and no key is given, or the key contradicts
    the pinned one. The state's own files are read as they are (OSError, ValueError).
    """
    state = State.load(state_dir)
    if state is None:
        if not vkey:
            raise VerifyFailure(
                "usage", "no log key is pinned in this state directory: give the log's key with --vkey"
            )
        return State(log_vkey=vkey)
    if vkey and vkey != state.log_vkey and vkey not in state.rotated_from:
        raise VerifyFailure("usage", "--vkey differs from the log key pinned in this state directory")
    return state


def run(
    bundle: Path, state_dir: Path, *, vkey: str | None, witness_vkeys: Sequence[str], quorum: int | None
) -> Report:
    """Verify `bundle` against the state in `state_dir` and save the new state on success.

    The log key, witness keys and quorum come from the state (pinned on first use from these
    arguments); an argument that contradicts the pinned value is a usage error.
    """
    state = load_pinned(state_dir, vkey)
    if witness_vkeys:
        state.witness_vkeys = list(witness_vkeys)
    if quorum is not None:
        state.witness_quorum = quorum
    if state.witness_quorum > len(state.witness_vkeys):
        raise VerifyFailure("usage", "the witness quorum is larger than the number of witness keys")
    try:
        report, checkpoint, note = verify_bundle(bundle, state)
    except VerifyFailure as exc:
        if exc.kind == "fork" and state.checkpoint is not None:
            new = (bundle / "checkpoint").read_bytes()
            where = save_evidence(state_dir, state.checkpoint, new)
            exc.message += f"; both signed checkpoints are kept in {where}"
        raise
    state.size, state.root, state.checkpoint = checkpoint.size, checkpoint.root_hash, note
    if report.rotations:  # each verified: its old key signed its last checkpoint
        state.rotated_from = [r["from_vkey"] for r in report.rotations]
        state.log_vkey = report.rotations[-1]["to_vkey"]
    state.save(state_dir)
    return report


# -- following the log through its tiles (c2sp.org/tlog-tiles) -------------------------------------

TileKey = tuple[int, int, int]
"""(level, index, width) of a tile; level -1 is the entry bundle of that index."""


def claimed_size(note: bytes) -> int:
    """The size a note claims, before anyone checked who signed it (the key depends on the leaves)."""
    try:
        return Checkpoint.parse(parse_note(note).text).size
    except NoteError as exc:
        raise VerifyFailure("signature", f"the checkpoint is not a signed checkpoint note: {exc}") from exc


def _bundle_keys(start: int, size: int) -> list[TileKey]:
    if start >= size:
        return []
    first, end = start // tiles.TILE_WIDTH, -(-size // tiles.TILE_WIDTH)
    return [(-1, b, tiles.tile_width(-1, b, size)) for b in range(first, end)]


def tiles_needed(saved_size: int | None, size: int) -> list[TileKey]:
    """Exactly the tiles `verify_tiles` reads to move a state of `saved_size` to a checkpoint of
    `size`: the Merkle tiles of the old root and the consistency proof, then the entry bundles of
    the new leaves. Nothing when the size did not change or shrank (the saved root decides)."""
    old = saved_size or 0
    if size <= old and saved_size is not None:
        return []
    dry = tiles.TileTree(size, lambda level, index, width: bytes(merkle.HASH_SIZE * width))
    if 0 < old < size:
        merkle.root_at(old, dry.get_node)
        merkle.consistency_proof(old, size, dry.get_node)
    return [*dry.fetched, *_bundle_keys(old, size)]


def _new_leaves(fetched: Mapping[TileKey, bytes], start: int, size: int) -> list[bytes]:
    leaves: list[bytes] = []
    for key in _bundle_keys(start, size):
        data = fetched.get(key)
        if data is None:
            raise VerifyFailure("gap", f"the entry bundle {tiles.entries_path(key[1], key[2])} is missing")
        try:
            entries = tiles.split_bundle(data)
        except ValueError as exc:
            raise VerifyFailure("gap", f"the entry bundle {key[1]} is truncated: {exc}") from exc
        if len(entries) != key[2]:
            raise VerifyFailure("gap", f"the entry bundle {key[1]} has {len(entries)} entries, not {key[2]}")
        first = key[1] * tiles.TILE_WIDTH
        leaves.extend(entries[max(0, start - first) :])
    return leaves


def rotation_sizes(fetched: Mapping[TileKey, bytes], saved_size: int | None, size: int) -> list[int]:
    """The tree sizes whose last leaf, among the new ones, is a key rotation event: the caller
    fetches the old key's checkpoint at each (`verify_tiles` checks them). A leaf that does not
    parse is skipped here and refused there."""
    start = saved_size or 0
    try:
        new = _new_leaves(fetched, start, size)
    except VerifyFailure:
        return []  # a gap, which verify_tiles reports
    found = []
    for position, leaf in enumerate(new, start=start):
        try:
            if parse_leaf(leaf).get("action") == ROTATION_ACTION:
                found.append(position + 1)
        except ValueError:
            continue
    return found


def verify_tiles(
    state: State,
    note: bytes,
    fetched: Mapping[TileKey, bytes],
    rotation_notes: Mapping[int, bytes] | None = None,
) -> tuple[Report, Checkpoint]:
    """Move the trusted state to the checkpoint in `note` using only the tiles in `fetched`
    (`tiles_needed`), and the old key's checkpoints at the sizes `rotation_sizes` names.

    Checks, the first failure deciding: the note is signed by the key of the origin the new
    leaves end under, with the quorum (`signature`, `quorum`); it is not smaller than the saved
    checkpoint (`rollback`) and, at the same size, has the same root (`fork`); the consistency
    proof computed from the tiles leads from the saved root to the new one (`fork`); every new
    leaf is present and at its position (`gap`), a canonical event of this log (`entries`); the
    old tree's nodes and the new leaves hash to the new root (`root`). Writes nothing.
    """
    saved = state.size or 0
    size = claimed_size(note)
    vkey, origin = state.log_vkey, vkey_name(state.log_vkey)
    if state.size is not None and size <= state.size:
        checkpoint, witnesses = _open_with_quorum(note, state)
        if size < state.size:
            raise VerifyFailure(
                "rollback",
                f"the log's signed checkpoint has size {size}, smaller than the saved {state.size}",
            )
        if state.root is None or not hmac.compare_digest(checkpoint.root_hash, state.root):
            raise VerifyFailure("fork", f"the checkpoint of size {size} has another root than the saved one")
        return _tiles_report(checkpoint, witnesses, state, 0, []), checkpoint

    tree = tiles.TileTree(size, lambda level, index, width: _tile(fetched, level, index, width))
    leaves = _new_leaves(fetched, saved, size)
    hashes: list[bytes] = []
    rotations: list[_Rotation] = []
    for position, leaf in enumerate(leaves, start=saved):
        try:
            event = parse_leaf(leaf)
        except ValueError as exc:
            raise VerifyFailure(
                "entries", f"the leaf at position {position} is not a valid event: {exc}"
            ) from exc
        if event.get("idx") != position:
            raise VerifyFailure(
                "gap", f"the entry at position {position} says idx {event.get('idx')!r}: a gap or reordering"
            )
        if event.get("type") != EVENT_TYPE or event.get("origin") != origin:
            raise VerifyFailure("entries", f"the leaf at position {position} is not an event of this log")
        hashes.append(merkle.leaf_hash(leaf))
        if event.get("action") == ROTATION_ACTION:
            rotations.append(_rotation_of(event, position, origin, vkey))
            vkey, origin = rotations[-1].new_vkey, vkey_name(rotations[-1].new_vkey)

    def node(level: int, index: int) -> bytes:
        # Old nodes from the tiles, new ones from the leaves, and the ones across both folded.
        lo, hi = index << level, (index + 1) << level
        if hi <= saved:
            return tree.get_node(level, index)
        if lo >= saved and level == 0:
            return hashes[lo - saved]
        return merkle.node_hash(node(level - 1, 2 * index), node(level - 1, 2 * index + 1))

    signer_vkey = rotations[-1].old_vkey if rotations and rotations[-1].size == size else vkey
    checkpoint, witnesses = _open_with_quorum(note, state, signer_vkey)
    if state.size is not None and state.root is not None and saved > 0:
        try:
            proof = merkle.consistency_proof(saved, size, tree.get_node)
            merkle.verify_consistency(saved, size, state.root, checkpoint.root_hash, proof)
        except ProofError as exc:
            raise VerifyFailure(
                "fork", f"the checkpoint of size {size} does not extend the saved one of size {saved}: {exc}"
            ) from exc
        if not hmac.compare_digest(merkle.root_at(saved, tree.get_node), state.root):
            raise VerifyFailure(
                "fork", f"the tiles' tree of size {saved} has another root than the saved one"
            )
    if not hmac.compare_digest(merkle.root_at(size, node), checkpoint.root_hash):
        raise VerifyFailure(
            "root", "the new leaves do not hash to the checkpoint's root: an entry was changed"
        )
    _check_last_words(rotations, rotation_notes or {}, state, lambda r: merkle.root_at(r.size, node))
    return _tiles_report(checkpoint, witnesses, state, len(leaves), rotations), checkpoint


def _tile(fetched: Mapping[TileKey, bytes], level: int, index: int, width: int) -> bytes:
    data = fetched.get((level, index, width))
    if data is None:
        raise VerifyFailure("gap", f"the tile {tiles.tile_path(level, index, width)} is missing")
    if len(data) != merkle.HASH_SIZE * width:
        raise VerifyFailure("gap", f"the tile {tiles.tile_path(level, index, width)} is {len(data)} bytes")
    return data


def _tiles_report(
    checkpoint: Checkpoint, witnesses: list[str], state: State, entries: int, rotations: list[_Rotation]
) -> Report:
    return Report(
        origin=checkpoint.origin,
        size=checkpoint.size,
        root=base64.b64encode(checkpoint.root_hash).decode("ascii"),
        witnesses=witnesses,
        previous_size=state.size,
        entries=entries,
        rotations=[r.to_json() for r in rotations],
    )


def run_tiles(
    state_dir: Path,
    state: State,
    note: bytes,
    fetched: Mapping[TileKey, bytes],
    rotation_notes: Mapping[int, bytes] | None = None,
) -> Report:
    """`verify_tiles`, then save the new state; on a fork or rollback keep both signed
    checkpoints in STATE/evidence/ first (the saved state is left as it was)."""
    try:
        report, checkpoint = verify_tiles(state, note, fetched, rotation_notes)
    except VerifyFailure as exc:
        if exc.kind in ("fork", "rollback") and state.checkpoint is not None:
            where = save_evidence(state_dir, state.checkpoint, note)
            exc.message += f"; both signed checkpoints are kept in {where}"
        raise
    state.size, state.root, state.checkpoint = checkpoint.size, checkpoint.root_hash, note
    if report.rotations:
        state.rotated_from = [*state.rotated_from, *(r["from_vkey"] for r in report.rotations)]
        state.log_vkey = report.rotations[-1]["to_vkey"]
    state.save(state_dir)
    return report

"""`exchange witness serve` against the text of c2sp.org/tlog-witness and c2sp.org/tlog-cosignature.

Nothing here uses exchange's own note, checkpoint, Merkle or request-formatting code to build a
request or to judge an answer: log signatures, checkpoint texts, RFC 6962 consistency proofs and
request bodies are written out in this file from the specs' prose (and, where the spec has one,
from its example bytes), and the witness's cosignatures are checked with PyNaCl directly. Only
the witness itself is exchange's: an aiohttp app on a loopback port, answering real HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nacl.signing
import pytest
from aiohttp.test_utils import TestServer

from exchange.witness import Witness, WitnessKey, WitnessState, create_witness_app

ORIGIN = "example.com/behind-the-sofa"  # the specs' example log
WITNESS_NAME = "witness.example.com/w1"
NOW = 1679315147  # the tlog-cosignature example's timestamp

# tlog-witness, "add-checkpoint": the example request body, byte for byte (indentation removed).
SPEC_REQUEST = (
    "old 20852014\n"
    "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"
    "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=\n"
    "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=\n"
    "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=\n"
    "\n"
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGz"
    "Gku9nTo+zyWE+xeMcTOAYQ8=\n"
    "\u2014 example.com/behind-the-sofa opLqBQsREYCgu6xQkYQwJr9fo45a62DN9EdmHXnZdXNqlcVGlCum2Wks+49/V6267UE"
    "jw6QUXTS5Rovnzv++qbSzm9Q=\n"
).encode()
# tlog-cosignature, "Format": the example cosignature line (key ID, timestamp, Ed25519 signature).
SPEC_COSIGNATURE = (
    "jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA=="
)


# -- an independent implementation of what the specs say ---------------------------------------


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """signed-note / tlog-cosignature: SHA-256(name || "\\n" || type byte || public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()[:4]


def vkey(name: str, sig_type: int, public_key: bytes) -> str:
    return f"{name}+{key_id(name, sig_type, public_key).hex()}+{base64.b64encode(bytes([sig_type]) + public_key).decode()}"


@dataclass
class LogKey:
    name: str = ORIGIN
    sk: nacl.signing.SigningKey = field(default_factory=lambda: nacl.signing.SigningKey(os.urandom(32)))

    @property
    def vkey(self) -> str:
        return vkey(self.name, 0x01, bytes(self.sk.verify_key))

    def sign_line(self, text: bytes) -> bytes:
        """A signed-note Ed25519 (type 0x01) signature line over the note text."""
        kid = key_id(self.name, 0x01, bytes(self.sk.verify_key))
        sig = self.sk.sign(text).signature
        return f"\u2014 {self.name} {base64.b64encode(kid + sig).decode()}\n".encode()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def mth(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 2.1: the Merkle Tree Hash of a list of leaf inputs."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    """RFC 6962 2.1.2 SUBPROOF(m, D[n], b)."""
    n = len(leaves)
    if m == n:
        return [] if complete else [mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*subproof(m, leaves[:k], complete), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def consistency(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 6962 2.1.2 PROOF(m, D[n])."""
    return subproof(m, leaves, True)


LEAVES = [f"leaf {i}".encode() for i in range(40)]


def checkpoint_text(size: int, root: bytes | None = None, *extensions: str, origin: str = ORIGIN) -> bytes:
    """tlog-checkpoint: origin, decimal size, base64 root hash, extension lines; each ends in a newline."""
    root = mth(LEAVES[:size]) if root is None else root
    lines = [origin, str(size), base64.b64encode(root).decode(), *extensions]
    return "".join(line + "\n" for line in lines).encode()


def note(text: bytes, *signers: LogKey) -> bytes:
    return text + b"\n" + b"".join(s.sign_line(text) for s in signers)


def body(old: int, proof: Sequence[bytes], checkpoint_note: bytes) -> bytes:
    """tlog-witness: "old <size>", proof lines (base64), an empty line, then the checkpoint."""
    lines = [f"old {old}\n".encode(), *(base64.b64encode(h) + b"\n" for h in proof), b"\n"]
    return b"".join(lines) + checkpoint_note


# -- the witness under test ------------------------------------------------------------------------


@dataclass
class Served:
    key: WitnessKey
    log: LogKey
    state: Path
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("/add-checkpoint"))

    async def post(self, data: bytes, *, path: str = "/add-checkpoint") -> tuple[int, str, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.post(self.server.make_url(path), data=data) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), await resp.read()

    async def add(self, old: int, size: int, *, root: bytes | None = None) -> tuple[int, str, bytes]:
        proof = [] if old == 0 or old >= size else consistency(old, LEAVES[:size])
        return await self.post(body(old, proof, note(checkpoint_text(size, root), self.log)))


async def serve(tmp_path: Path, key: WitnessKey, log: LogKey, *vkeys: str) -> Served:
    state = tmp_path / "witness-state"
    witness = Witness(key, WitnessState(state), list(vkeys) or [log.vkey], clock_s=lambda: NOW)
    server = TestServer(create_witness_app(witness), host="127.0.0.1")
    await server.start_server()
    return Served(key, log, state, server)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    s = await serve(tmp_path, WitnessKey.generate(WITNESS_NAME), LogKey())
    yield s
    await s.server.close()


def check_cosignature(response: bytes, key: WitnessKey, text: bytes) -> int:
    """tlog-witness: one or more signature lines "— <name> <base64>\\n"; tlog-cosignature: the
    base64 is key ID (4) || timestamp (8, big-endian) || Ed25519 signature (64) over
    "cosignature/v1\\ntime <t>\\n" || the checkpoint text. Returns the timestamp."""
    assert response.endswith(b"\n")
    [line] = response.decode().split("\n")[:-1]
    dash, name, b64 = line.split(" ")
    assert (dash, name) == ("\u2014", key.name)
    raw = base64.b64decode(b64, validate=True)
    assert base64.b64encode(raw).decode() == b64 and len(raw) == 4 + 8 + 64
    public = nacl.signing.SigningKey(key.seed).verify_key
    assert raw[:4] == key_id(key.name, 0x04, bytes(public))
    assert key.vkey == vkey(key.name, 0x04, bytes(public))
    timestamp = int.from_bytes(raw[4:12], "big")
    assert 0 < timestamp <= 2**63 - 1
    public.verify(b"cosignature/v1\ntime " + str(timestamp).encode() + b"\n" + text, raw[12:])
    return timestamp


# -- tests -----------------------------------------------------------------------------------------------


def test_the_spec_cosignature_example_has_the_layout_we_produce() -> None:
    """The tlog-cosignature example line: 4-byte key ID, the example message's timestamp, 64 bytes."""
    raw = base64.b64decode(SPEC_COSIGNATURE, validate=True)
    assert len(raw) == 4 + 8 + 64
    assert int.from_bytes(raw[4:12], "big") == NOW


async def test_spec_example_request(tmp_path: Path) -> None:
    """The spec's own request body: parsed, and refused for the reason the spec gives."""
    # A witness that does not know the origin: 404.
    stranger = await serve(tmp_path / "a", WitnessKey.generate(WITNESS_NAME), LogKey("other.example/log"))
    try:
        assert (await stranger.post(SPEC_REQUEST))[0] == 404
    finally:
        await stranger.server.close()
    # One that knows the origin under a key that did not sign it: the example's signatures are
    # from unknown keys, ignored, so no trusted signature is present: 403.
    knows = await serve(tmp_path / "b", WitnessKey.generate(WITNESS_NAME), LogKey())
    try:
        assert (await knows.post(SPEC_REQUEST))[0] == 403
    finally:
        await knows.server.close()


async def test_cosigns_and_remembers(served: Served) -> None:
    status, ctype, answer = await served.add(0, 5)
    assert status == 200, answer
    assert check_cosignature(answer, served.key, checkpoint_text(5)) == NOW
    # 409: the body is the size it last cosigned and a newline, with the spec's content type.
    status, ctype, answer = await served.add(0, 7)
    assert (status, ctype, answer) == (409, "text/x.tlog.size", b"5\n")
    status, ctype, answer = await served.add(3, 7)
    assert (status, ctype, answer) == (409, "text/x.tlog.size", b"5\n")
    # From 5 to 8 with an RFC 6962 consistency proof.
    status, _, answer = await served.add(5, 8)
    assert status == 200
    check_cosignature(answer, served.key, checkpoint_text(8))
    # The same size and root again (old size = checkpoint size, identical roots): cosigned again.
    status, _, answer = await served.add(8, 8)
    assert status == 200
    check_cosignature(answer, served.key, checkpoint_text(8))


async def test_cosignature_covers_extension_lines_and_extra_log_signatures(served: Served) -> None:
    text = checkpoint_text(4, None, "extension one", "extension two")
    other = LogKey("someone.else/key")  # an unknown key's line is ignored
    status, _, answer = await served.post(body(0, [], note(text, other, served.log)))
    assert status == 200
    check_cosignature(answer, served.key, text)


async def test_consistency_failures_are_422(served: Served) -> None:
    # A checkpoint of size zero must have the empty-tree root.
    assert (await served.add(0, 0, root=b"\x07" * 32))[0] == 422
    assert (await served.add(0, 0))[0] == 200
    # From size zero the proof must be empty.
    proof = consistency(3, LEAVES[:9])
    assert (await served.post(body(0, proof, note(checkpoint_text(9), served.log))))[0] == 422
    assert (await served.add(0, 9))[0] == 200
    # A proof that does not verify: altered, cut short, one hash too many.
    good = consistency(9, LEAVES[:21])
    cp = note(checkpoint_text(21), served.log)
    altered = [good[0][:-1] + bytes([good[0][-1] ^ 1]), *good[1:]]
    assert (await served.post(body(9, altered, cp)))[0] == 422
    assert (await served.post(body(9, good[:-1], cp)))[0] == 422
    assert (await served.post(body(9, [*good, good[0]], cp)))[0] == 422
    # A tree of 21 leaves that is not the one the witness holds at 9 (another leaf 3).
    forked_leaves = [*LEAVES[:3], b"rewritten", *LEAVES[4:21]]
    forked = note(checkpoint_text(21, mth(forked_leaves)), served.log)
    assert (await served.post(body(9, consistency(9, forked_leaves), forked)))[0] == 422
    # The same size with another root: a fork, 422 (not 409: the old size matched).
    status, _, _ = await served.post(
        body(9, [], note(checkpoint_text(9, mth(forked_leaves[:9])), served.log))
    )
    assert status == 422
    # None of that moved the witness.
    assert await served.add(0, 1) == (409, "text/x.tlog.size", b"9\n")
    assert (await served.post(body(9, good, cp)))[0] == 200


@pytest.mark.parametrize(
    "prefix",
    [
        b"old 05\n\n",  # leading zero
        b"old 00\n\n",
        b"old -0\n\n",
        b"old +5\n\n",
        b"old  5\n\n",  # two spaces
        b"old 5 \n\n",
        b"Old 5\n\n",
        b"old\n\n",
        b"old 5\r\n\r\n",  # lines end in U+000A only
        b"old 99999999999999999999\n\n",
        b"\nold 5\n\n",
        b"old 5\n" + base64.b64encode(b"\x00" * 31) + b"\n\n",  # not a 32-byte hash
        b"old 5\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=\n\n",  # not canonical base64
        b"old 5\n" + (base64.b64encode(b"\x00" * 32) + b"\n") * 64 + b"\n",  # more than 63 lines
    ],
)
async def test_malformed_request_headers_are_400(served: Served, prefix: bytes) -> None:
    assert (await served.add(0, 5))[0] == 200
    cp = note(checkpoint_text(9), served.log)
    assert (await served.post(prefix + cp))[0] == 400
    assert (await served.add(0, 1))[2] == b"5\n"  # unchanged


async def test_malformed_checkpoints_are_400(served: Served) -> None:
    text = checkpoint_text(5)
    for cp in [
        b"",  # no checkpoint
        text,  # no signatures
        text + b"\n",  # an empty signature block
        note(text, served.log)[:-1],  # the signature line does not end in a newline
        note(b"example.com/behind-the-sofa\n05\n" + text.split(b"\n")[2] + b"\n", served.log),
        note(b"example.com/behind-the-sofa\n5\n", served.log),  # no root hash
        note(text, served.log).replace(ORIGIN.encode(), b"\xff\xfe", 1),  # not UTF-8
    ]:
        assert (await served.post(body(0, [], cp)))[0] == 400, cp
    # The old size larger than the checkpoint's size.
    assert (await served.post(body(6, [], note(text, served.log))))[0] == 400


async def test_untrusted_or_bad_log_signatures_are_403(served: Served) -> None:
    text = checkpoint_text(5)
    impostor = LogKey()  # same name, another key: another key ID, so an unknown key
    assert (await served.post(body(0, [], note(text, impostor))))[0] == 403
    # A line whose name and key ID match the trusted key but whose signature fails: 403, even
    # next to a valid line from the same key.
    good = served.log.sign_line(text)
    raw = bytearray(base64.b64decode(good.split(b" ")[2]))
    raw[10] ^= 1
    bad = b"\xe2\x80\x94 " + ORIGIN.encode() + b" " + base64.b64encode(bytes(raw)) + b"\n"
    assert (await served.post(body(0, [], text + b"\n" + bad)))[0] == 403
    assert (await served.post(body(0, [], text + b"\n" + good + bad)))[0] == 403
    # A signature over another checkpoint text.
    moved = text.replace(b"\n5\n", b"\n6\n")
    assert (await served.post(body(0, [], moved + b"\n" + good)))[0] == 403
    # Nothing was recorded.
    assert (await served.add(0, 5))[0] == 200


async def test_unknown_origin_is_404(served: Served) -> None:
    stranger = LogKey("other.example/log")
    cp = note(checkpoint_text(5, origin=stranger.name), stranger)
    assert (await served.post(body(0, [], cp)))[0] == 404


async def test_method_path_and_size_rules(served: Served) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(served.url) as resp:
            assert resp.status == 405
        async with session.put(served.url, data=b"old 0\n\n") as resp:
            assert resp.status == 405
    assert (await served.post(b"old 0\n\n", path="/add-checkpoint/"))[0] == 404
    assert (await served.post(b"old 0\n\n", path="/checkpoint"))[0] == 404
    huge = body(0, [], note(checkpoint_text(5), served.log)) + b"x" * (64 * 1024)
    assert (await served.post(huge))[0] == 413


async def test_concurrent_requests_cannot_both_pass(served: Served) -> None:
    """The spec's race: two requests from the same old size; exactly one is cosigned."""
    assert (await served.add(0, 5))[0] == 200
    results = await asyncio.gather(served.add(5, 9), served.add(5, 30), served.add(5, 12))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 409, 409]
    winner = next(size for (status, _, _), size in zip(results, (9, 30, 12), strict=True) if status == 200)
    assert {r[2] for r in results if r[0] == 409} == {f"{winner}\n".encode()}


async def test_state_survives_a_restart_and_refuses_rollback(tmp_path: Path) -> None:
    key, log = WitnessKey.generate(WITNESS_NAME), LogKey()
    first = await serve(tmp_path, key, log)
    try:
        assert (await first.add(0, 10))[0] == 200
    finally:
        await first.server.close()
    [state_file] = [p for p in first.state.iterdir() if p.suffix == ".json"]
    saved = json.loads(state_file.read_text())
    assert (saved["origin"], saved["size"]) == (ORIGIN, 10)
    assert base64.b64decode(saved["root"]) == mth(LEAVES[:10])
    assert not [p for p in first.state.iterdir() if p.name.endswith(".tmp")]  # replaced, not left over
    second = await serve(tmp_path, key, log)
    try:
        assert await second.add(0, 4) == (409, "text/x.tlog.size", b"10\n")
        assert (await second.add(10, 4))[0] == 400  # a rollback: old size above the new size
        assert (await second.add(4, 4))[0] == 409
        assert (await second.add(10, 15))[0] == 200
    finally:
        await second.server.close()


async def test_a_second_process_on_the_same_state_waits_for_the_lock(served: Served) -> None:
    """The check-and-store holds an exclusive flock on <state>/.lock: while another process
    (here: this test) holds it, a request is not answered; once released, it is."""
    assert (await served.add(0, 5))[0] == 200
    fd = os.open(served.state / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pending = asyncio.ensure_future(served.add(5, 8))
        done, _ = await asyncio.wait([pending], timeout=0.5)
        assert not done
    finally:
        os.close(fd)
    assert (await pending)[0] == 200


async def test_monitoring_checkpoint(served: Served) -> None:
    """tlog-witness, "Monitor Retrieval Mechanism": GET <prefix>/<hex SHA-256 of the origin>/checkpoint
    serves the latest cosigned checkpoint with the log's signature and the witness's cosignature;
    404 before the witness cosigned one for that log."""
    origin_hash = hashlib.sha256(ORIGIN.encode()).hexdigest()

    async def get(path: str) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.get(served.server.make_url(path)) as resp:
                return resp.status, await resp.read()

    assert (await get(f"/{origin_hash}/checkpoint"))[0] == 404
    unknown_key = LogKey("someone.else/key")
    text = checkpoint_text(7)
    status, _, cosignature = await served.post(body(0, [], note(text, unknown_key, served.log)))
    assert status == 200
    status, served_note = await get(f"/{origin_hash}/checkpoint")
    assert status == 200
    # The text, the log signature the witness verified (the unknown key's is not vouched for),
    # then the very cosignature line add-checkpoint returned.
    assert served_note == text + b"\n" + served.log.sign_line(text) + cosignature
    check_cosignature(cosignature, served.key, text)
    # A log the witness does not know, an upper-case hash, a method other than GET.
    assert (await get(f"/{hashlib.sha256(b'other.example/log').hexdigest()}/checkpoint"))[0] == 404
    assert (await get(f"/{origin_hash.upper()}/checkpoint"))[0] == 404
    assert (await served.post(b"", path=f"/{origin_hash}/checkpoint"))[0] == 405
    # It follows the latest cosigned checkpoint.
    assert (await served.add(7, 12))[0] == 200
    assert (await get(f"/{origin_hash}/checkpoint"))[1].startswith(checkpoint_text(12) + b"\n")

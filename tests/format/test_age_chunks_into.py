"""`encrypt_chunks_into` / `decrypt_chunks_into`: runs of payload chunks between caller buffers.

They are the bulk path of uploads and downloads, so they must give exactly the bytes of
`encrypt_chunk` and accept and refuse exactly what `decrypt_chunk` does — through OpenSSL where
`cryptography` can seal into a buffer, and through PyNaCl chunk by chunk where it cannot.
"""

from __future__ import annotations

import os

import pytest

from exchange.errors import AgePayloadError
from exchange.format import age

C = age.CHUNK_SIZE
E = age.ENCRYPTED_CHUNK_SIZE
KEY = bytes(range(32))


@pytest.fixture(params=["openssl", "pynacl"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pynacl":
        monkeypatch.setattr(age, "_INTO", False)
    elif not age._INTO:
        pytest.skip("this cryptography has no encrypt_into")
    return str(request.param)


def reference(plaintext: bytes, first: int, last: bool) -> bytes:
    count = max(1, -(-len(plaintext) // C))
    return b"".join(
        age.encrypt_chunk(KEY, first + n, plaintext[n * C : (n + 1) * C], last=last and n == count - 1)
        for n in range(count)
    )


@pytest.mark.parametrize(
    ("size", "first", "last"),
    [
        *[(0, 0, True), (1, 0, True), (C - 1, 0, True), (C, 0, True), (C + 1, 0, True)],
        *[(3 * C + 5, 7, True), (C, 0, False), (4 * C, 9, False)],
    ],
)
def test_same_bytes_as_one_chunk_at_a_time(backend: str, size: int, first: int, last: bool) -> None:
    plaintext = os.urandom(size)
    sealed = bytearray(size + 4 * age.TAG_SIZE + 100)
    written = age.encrypt_chunks_into(KEY, first, memoryview(plaintext), memoryview(sealed), last=last)
    assert bytes(sealed[:written]) == reference(plaintext, first, last)
    opened = bytearray(size + 7)
    n = age.decrypt_chunks_into(KEY, first, memoryview(sealed)[:written], memoryview(opened), last=last)
    assert bytes(opened[:n]) == plaintext


def test_refuses_what_decrypt_chunk_refuses(backend: str) -> None:
    plaintext = os.urandom(3 * C + 10)
    sealed = bytearray(reference(plaintext, 0, True))
    out = memoryview(bytearray(len(plaintext)))

    def opens(data: bytes | bytearray, first: int = 0, *, last: bool = True) -> None:
        age.decrypt_chunks_into(KEY, first, memoryview(bytes(data)), out, last=last)

    opens(sealed)
    tampered = bytearray(sealed)
    tampered[E + 5] ^= 1  # a byte of chunk 1
    with pytest.raises(AgePayloadError, match="chunk 1 does not authenticate"):
        opens(tampered)
    with pytest.raises(AgePayloadError, match="does not authenticate"):
        opens(sealed, first=1)  # the chunks under other indices
    whole = reference(plaintext[: 2 * C], 0, True)
    with pytest.raises(AgePayloadError, match="chunk 1 does not authenticate"):
        opens(whole, last=False)  # the final chunk is not sealed as an ordinary one
    with pytest.raises(AgePayloadError, match="does not authenticate"):
        opens(sealed[: 3 * E])  # cut after a whole chunk: that one was not sealed as the last
    with pytest.raises(AgePayloadError, match="impossible size"):
        opens(sealed[: 2 * E + 100], last=False)  # a run that is not the last holds whole chunks
    with pytest.raises(AgePayloadError, match="shorter than its tag"):
        opens(sealed[: 3 * E + 5])
    empty_final = reference(b"\0" * C, 0, False) + age.encrypt_chunk(KEY, 0, b"", last=True)
    with pytest.raises(AgePayloadError, match="empty final chunk"):
        opens(empty_final)


def test_misuse_is_a_value_error(backend: str) -> None:
    with pytest.raises(ValueError, match="whole chunks"):
        age.encrypt_chunks_into(KEY, 0, memoryview(bytes(C + 1)), memoryview(bytearray(2 * E)), last=False)
    with pytest.raises(ValueError, match="output buffer"):
        age.encrypt_chunks_into(KEY, 0, memoryview(bytes(C)), memoryview(bytearray(C)), last=True)
    with pytest.raises(ValueError, match="empty only"):
        age.encrypt_chunks_into(KEY, 3, memoryview(b""), memoryview(bytearray(E)), last=True)
    with pytest.raises(ValueError, match="payload key"):
        age.encrypt_chunks_into(KEY[:16], 0, memoryview(bytes(C)), memoryview(bytearray(E)), last=True)
    with pytest.raises(ValueError, match="output buffer"):
        age.decrypt_chunks_into(KEY, 0, memoryview(bytes(E)), memoryview(bytearray(C - 1)), last=True)

"""exchange.format.age: keys, header, key wrapping, STREAM payload and whole files."""

from __future__ import annotations

import array
import base64
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from exchange.errors import AgeHeaderError, AgeHeaderMacError, AgeNoIdentityMatch, AgePayloadError
from exchange.format import age, bech32

C = age.CHUNK_SIZE
E = age.ENCRYPTED_CHUNK_SIZE
SIZES = [0, 1, C - 1, C, C + 1, 2 * C, 3 * C + 5]

# The example key pair of the age spec (c2sp.org/age, "The X25519 recipient type").
SPEC_IDENTITY = "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"
SPEC_RECIPIENT = "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"


@pytest.fixture(scope="module")
def identity() -> str:
    return age.generate_identity()


@pytest.fixture(scope="module")
def recipient(identity: str) -> str:
    return age.identity_to_recipient(identity)


def plaintext_of(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def chunks_of(payload: bytes) -> list[bytes]:
    """Split a payload (nonce included) into its ciphertext chunks."""
    body = payload[age.NONCE_SIZE :]
    return [body[i : i + E] for i in range(0, len(body), E)]


# --- keys --------------------------------------------------------------------------------


def test_spec_example_key_pair() -> None:
    assert age.identity_to_recipient(SPEC_IDENTITY) == SPEC_RECIPIENT
    assert len(age.parse_identity(SPEC_IDENTITY)) == 32
    assert len(age.parse_recipient(SPEC_RECIPIENT)) == 32


def test_generated_identities_are_fresh_and_well_formed() -> None:
    a, b = age.generate_identity(), age.generate_identity()
    assert a != b
    assert a.startswith("AGE-SECRET-KEY-1") and a == a.upper() and len(a) == 74
    r = age.identity_to_recipient(a)
    assert r.startswith("age1") and r == r.lower() and len(r) == 62
    assert age.recipient_from_public_key(age.parse_recipient(r)) == r


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (SPEC_IDENTITY.lower(), "AGE-SECRET-KEY-1"),
        (SPEC_RECIPIENT, "AGE-SECRET-KEY-1"),
        (bech32.encode("AGE-SECRET-KEY-", bytes(31)), "31"),
        (bech32.encode("AGE-SECRET-KEY-", bytes(33)), "33"),
        (bech32.encode("AGE-SECRET-KEY-PQ-", bytes(32)), "post-quantum"),
        (SPEC_IDENTITY[:-1] + "Y", "checksum"),
        (" " + SPEC_IDENTITY, "valid"),
        (SPEC_IDENTITY + "\n", "valid"),
        ("", "valid"),
    ],
)
def test_parse_identity_is_strict(text: str, match: str) -> None:
    with pytest.raises(AgeHeaderError, match=match) as caught:
        age.parse_identity(text)
    # Messages never repeat the key: for an identity, that would leak a secret.
    assert SPEC_IDENTITY[16:40] not in caught.value.message


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (SPEC_RECIPIENT.upper(), "lowercase"),
        (SPEC_IDENTITY, "age1"),
        (bech32.encode("age", bytes(31)), "31"),
        (bech32.encode("age1pq", bytes(32)), "post-quantum"),
        (bech32.encode("age1tag", bytes(33)), "plugin"),
        (SPEC_RECIPIENT[:-1] + "q", "checksum"),
        (SPEC_RECIPIENT[:10] + "b" + SPEC_RECIPIENT[11:], "alphabet"),
    ],
)
def test_parse_recipient_is_strict(text: str, match: str) -> None:
    with pytest.raises(AgeHeaderError, match=match):
        age.parse_recipient(text)


# --- header ------------------------------------------------------------------------------


def test_header_layout(identity: str, recipient: str) -> None:
    header = age.wrap_file_key(age.generate_file_key(), [recipient, recipient])
    text = header.to_bytes()
    lines = text.split(b"\n")
    assert lines[0] == b"age-encryption.org/v1"
    assert lines[1].startswith(b"-> X25519 ") and len(lines[1]) == 3 + 6 + 1 + 43
    assert len(lines[2]) == 43  # 32-byte body: one short line
    assert lines[5].startswith(b"--- ") and len(lines[5]) == 4 + 43
    assert lines[6] == b"" and text.endswith(b"\n")
    assert age.Header.parse(text + b"payload") == (header, len(text))


@pytest.mark.parametrize(
    ("size", "lines"), [(0, [b""]), (1, [b"AA"]), (48, [b"A" * 64, b""]), (50, [b"A" * 64, b"AAA"])]
)
def test_stanza_body_wraps_at_64_columns_with_a_short_last_line(size: int, lines: list[bytes]) -> None:
    stanza = age.Stanza("grease", ("x",), bytes(size))
    assert stanza.to_bytes() == b"\n".join([b"-> grease x", *lines]) + b"\n"


@pytest.mark.parametrize("arg", ["", "a b", "caf\u00e9", "tab\t", "new\nline"])
def test_stanza_arguments_must_be_printable_ascii(arg: str) -> None:
    with pytest.raises(AgeHeaderError):
        age.Stanza("grease", (arg,), b"")
    with pytest.raises(AgeHeaderError):
        age.Stanza(arg, (), b"")


def test_header_needs_a_stanza_and_a_32_byte_mac() -> None:
    with pytest.raises(AgeHeaderError, match="at least one"):
        age.Header((), bytes(32))
    with pytest.raises(AgeHeaderError, match="MAC"):
        age.Header((age.Stanza("grease", (), b""),), bytes(31))


def test_header_objects_refuse_malformed_native_stanzas() -> None:
    low_order = base64.b64encode(bytes(32)).decode().rstrip("=")
    with pytest.raises(AgeHeaderError, match="low-order"):
        age.Header((age.Stanza("X25519", (low_order,), bytes(32)),), bytes(32))
    with pytest.raises(AgeHeaderError, match="only stanza"):
        scrypt = age.Stanza("scrypt", ("A" * 22, "10"), bytes(32))
        age.Header((scrypt, age.Stanza("grease", (), b"")), bytes(32))


def test_unknown_stanzas_are_carried_and_ignored(identity: str, recipient: str) -> None:
    file_key = age.generate_file_key()
    ours = age.wrap_file_key(file_key, [recipient]).stanzas[0]
    stanzas = (age.Stanza("example.com/enigma", ("a", "b"), os.urandom(100)), ours)
    header = age.Header(stanzas, age._header_mac(file_key, stanzas))
    parsed, _ = age.Header.parse(header.to_bytes())
    assert parsed == header
    assert age.unwrap_file_key(header.to_bytes(), [identity]) == file_key


# --- wrapping ----------------------------------------------------------------------------


def test_wrap_and_unwrap_for_several_recipients() -> None:
    identities = [age.generate_identity() for _ in range(3)]
    file_key = age.generate_file_key()
    header = age.wrap_file_key(file_key, [age.identity_to_recipient(i) for i in identities])
    for i in identities:
        assert age.unwrap_file_key(header, [i]) == file_key
        assert age.unwrap_file_key(header.to_bytes(), [age.generate_identity(), i]) == file_key


def test_wrapping_is_randomised(recipient: str) -> None:
    file_key = age.generate_file_key()
    assert age.wrap_file_key(file_key, [recipient]) != age.wrap_file_key(file_key, [recipient])
    assert len(file_key) == age.FILE_KEY_SIZE and file_key != age.generate_file_key()


def test_wrap_fails_closed(recipient: str) -> None:
    file_key = age.generate_file_key()
    with pytest.raises(AgeHeaderError, match="empty list of recipients"):
        age.wrap_file_key(file_key, [])
    with pytest.raises(TypeError):
        age.wrap_file_key(file_key, recipient)
    with pytest.raises(AgeHeaderError):
        age.wrap_file_key(file_key, [recipient, "age1notarecipient"])
    with pytest.raises(AgeHeaderError, match="low-order"):
        age.wrap_file_key(file_key, [bech32.encode("age", bytes(32))])
    with pytest.raises(ValueError, match="16 bytes"):
        age.wrap_file_key(bytes(15), [recipient])
    with pytest.raises(AgeHeaderError, match="empty list of recipients"):
        age.encrypt(b"secret", [])


def test_wrong_identity_is_no_match(recipient: str) -> None:
    data = age.encrypt(b"secret", [recipient])
    with pytest.raises(AgeNoIdentityMatch):
        age.decrypt(data, [age.generate_identity(), age.generate_identity()])
    with pytest.raises(AgeNoIdentityMatch, match="no identity"):
        age.decrypt(data, [])
    with pytest.raises(AgeHeaderError):
        age.decrypt(data, ["AGE-SECRET-KEY-1NOTANIDENTITY"])
    with pytest.raises(TypeError):
        age.decrypt(data, SPEC_IDENTITY)


def test_unwrap_from_bytes_wants_exactly_a_header(identity: str, recipient: str) -> None:
    header = age.wrap_file_key(age.generate_file_key(), [recipient]).to_bytes()
    with pytest.raises(AgeHeaderError, match="bytes follow"):
        age.unwrap_file_key(header + b"\x00", [identity])


# --- header tampering --------------------------------------------------------------------


def _file_with_two_recipients(identity: str, recipient: str) -> tuple[bytes, age.Header, int]:
    data = age.encrypt(b"secret", [age.identity_to_recipient(age.generate_identity()), recipient])
    header, offset = age.Header.parse(data)
    return data, header, offset


def test_header_tampering_breaks_the_mac(identity: str, recipient: str) -> None:
    data, header, offset = _file_with_two_recipients(identity, recipient)
    payload = data[offset:]
    other, ours = header.stanzas
    tampered = [
        age.Header(header.stanzas, bytes([header.mac[0] ^ 1]) + header.mac[1:]),  # MAC changed
        age.Header((ours, other), header.mac),  # stanzas reordered
        age.Header((ours,), header.mac),  # a recipient removed
        age.Header((*header.stanzas, age.Stanza("grease", (), b"")), header.mac),  # one added
        age.Header((age.Stanza(other.type, other.args, bytes(32)), ours), header.mac),  # other body
    ]
    for h in tampered:
        with pytest.raises(AgeHeaderMacError):
            age.decrypt(h.to_bytes() + payload, [identity])


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.replace(b"age-encryption.org/v1\n", b"age-encryption.org/v2\n"),
        lambda h: h.replace(b"\n", b"\r\n"),
        lambda h: h.replace(b"-> X25519 ", b"-> X25519  "),
        lambda h: h.replace(b"-> X25519 ", b"->X25519 "),
        lambda h: h.replace(b"--- ", b"---  "),
        lambda h: h[:-2] + b"=\n",
        lambda h: h[: h.rindex(b"---")],
        lambda h: h[: h.index(b"->")] + h[h.rindex(b"---") :],  # no stanza at all
        lambda h: h.replace(b"X25519", b"X25519 extra", 1),
    ],
)
def test_header_mangling_is_a_header_error(
    identity: str, recipient: str, edit: Callable[[bytes], bytes]
) -> None:
    data, _, offset = _file_with_two_recipients(identity, recipient)
    mangled = edit(data[:offset])
    with pytest.raises(AgeHeaderError):
        age.decrypt(mangled + data[offset:], [identity])


def test_changing_our_stanza_body_is_no_match(identity: str, recipient: str) -> None:
    data, header, offset = _file_with_two_recipients(identity, recipient)
    other, ours = header.stanzas
    body = bytes([ours.body[0] ^ 1]) + ours.body[1:]
    forged = age.Header((other, age.Stanza(ours.type, ours.args, body)), header.mac)
    with pytest.raises(AgeNoIdentityMatch):
        age.decrypt(forged.to_bytes() + data[offset:], [identity])


def test_missing_or_short_payload_nonce_is_a_header_error(identity: str, recipient: str) -> None:
    data = age.encrypt(b"", [recipient])
    _, offset = age.Header.parse(data)
    for cut in (offset, offset + 15):
        with pytest.raises(AgeHeaderError, match="nonce"):
            age.decrypt(data[:cut], [identity])
    with pytest.raises(AgePayloadError, match="no chunks"):
        age.decrypt(data[: offset + 16], [identity])


def test_not_an_age_file() -> None:
    for data in (b"", b"hello\n", b"-----BEGIN AGE ENCRYPTED FILE-----\n", b"age-encryption.org/v1"):
        with pytest.raises(AgeHeaderError):
            age.decrypt(data, [SPEC_IDENTITY])


# --- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plain", "cipher"),
    [(0, 32), (1, 33), (C - 1, 16 + E - 1), (C, 16 + E), (C + 1, 16 + E + 17), (2 * C, 16 + 2 * E)],
)
def test_sizes(plain: int, cipher: int) -> None:
    assert age.ciphertext_size(plain) == cipher
    assert age.plaintext_size(cipher) == plain


@pytest.mark.parametrize("cipher", [-1, 0, 16, 31, 16 + E + 1, 16 + E + 15, 16 + E + 16, 16 + 2 * E + 16])
def test_impossible_payload_sizes(cipher: int) -> None:
    with pytest.raises(AgePayloadError):
        age.plaintext_size(cipher)


def test_sizes_agree_everywhere_near_chunk_boundaries() -> None:
    for plain in [*range(0, 40), *range(C - 20, C + 40), *range(5 * C - 20, 5 * C + 20)]:
        cipher = age.ciphertext_size(plain)
        assert age.plaintext_size(cipher) == plain
        assert age.chunk_count(plain) == len(chunks_of(bytes(cipher)))
    with pytest.raises(ValueError):
        age.ciphertext_size(-1)


# --- payload round trips -----------------------------------------------------------------


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("size", SIZES)
def test_whole_file_round_trip(size: int, identity: str, recipient: str) -> None:
    plaintext = plaintext_of(size)
    data = age.encrypt(plaintext, [recipient])
    _, offset = age.Header.parse(data)
    assert len(data) - offset == age.ciphertext_size(size)
    assert age.decrypt(data, [identity]) == plaintext


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("piece", [1000, C, C + 1, 10**9])
def test_stream_round_trip_whatever_the_piece_sizes(size: int, piece: int) -> None:
    plaintext = plaintext_of(size)
    file_key, nonce = age.generate_file_key(), os.urandom(16)
    out = list(age.encrypt_stream(file_key, pieces(plaintext, piece), nonce=nonce))
    # The nonce, then one item per chunk: nothing is ever held back beyond a chunk.
    assert out[0] == nonce and all(len(c) <= E for c in out[1:])
    assert len(out) == 1 + age.chunk_count(size)
    payload = b"".join(out)
    assert payload == b"".join(age.encrypt_stream(file_key, [plaintext], nonce=nonce))
    for decrypt_piece in (7, E, E + 1, 10**9):
        if decrypt_piece == 7 and size > 2 * C:
            continue  # byte-by-byte-ish feeding is slow; small sizes cover the logic
        assert b"".join(age.decrypt_stream(file_key, pieces(payload, decrypt_piece))) == plaintext


def test_stream_accepts_buffers() -> None:
    file_key = age.generate_file_key()
    typed = memoryview(array.array("I", [1, 2, 3]))  # items of 4 bytes: slicing must count bytes
    payload = b"".join(age.encrypt_stream(file_key, [bytearray(b"ab"), memoryview(b"cd"), typed]))
    assert b"".join(age.decrypt_stream(file_key, [memoryview(payload)])) == b"abcd" + typed.tobytes()


def test_empty_plaintext_is_one_empty_final_chunk() -> None:
    file_key, nonce = age.generate_file_key(), os.urandom(16)
    payload = b"".join(age.encrypt_stream(file_key, [], nonce=nonce))
    assert len(payload) == 32
    key = age.payload_key(file_key, nonce)
    assert age.decrypt_chunk(key, 0, payload[16:], last=True) == b""
    assert payload == b"".join(age.encrypt_stream(file_key, [b"", b""], nonce=nonce))


def test_streams_are_lazy_and_bounded() -> None:
    """decrypt_stream yields chunk k having read at most chunk k+1, never the whole payload."""
    file_key = age.generate_file_key()
    payload = b"".join(age.encrypt_stream(file_key, [plaintext_of(20 * C)]))
    consumed = 0

    def source() -> Iterator[bytes]:
        nonlocal consumed
        for piece in pieces(payload, 4096):
            consumed += len(piece)
            yield piece

    for index, chunk in enumerate(age.decrypt_stream(file_key, source())):
        assert len(chunk) == C
        assert consumed <= 16 + (index + 2) * E


# --- chunks on their own: parallel, out of order, from the middle ------------------------


@pytest.mark.parametrize("size", [C, 2 * C, 3 * C + 5, 7 * C])
def test_chunks_decrypt_in_parallel_and_out_of_order(size: int) -> None:
    plaintext = plaintext_of(size)
    file_key, nonce = age.generate_file_key(), os.urandom(16)
    payload = b"".join(age.encrypt_stream(file_key, [plaintext], nonce=nonce))
    key = age.payload_key(file_key, nonce)
    chunks = chunks_of(payload)
    last = len(chunks) - 1
    order = list(range(len(chunks)))
    random.Random(size).shuffle(order)
    with ThreadPoolExecutor(max_workers=4) as pool:
        opened = pool.map(lambda i: (i, age.decrypt_chunk(key, i, chunks[i], last=i == last)), order)
        by_index = dict(opened)
        assert b"".join(by_index[i] for i in range(len(chunks))) == plaintext
        # Encryption parallelises the same way and gives the same bytes.
        parts = [plaintext[i * C : (i + 1) * C] for i in range(len(chunks))]
        sealed = pool.map(lambda i: age.encrypt_chunk(key, i, parts[i], last=i == last), range(len(chunks)))
        assert nonce + b"".join(sealed) == payload


@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_decrypt_from_a_middle_chunk(start: int) -> None:
    """A resumed download: from chunk `start` on, knowing only the payload's total size."""
    plaintext = plaintext_of(3 * C + 5)
    file_key = age.generate_file_key()
    payload = b"".join(age.encrypt_stream(file_key, [plaintext]))
    key = age.payload_key(file_key, payload[:16])
    count = age.chunk_count(age.plaintext_size(len(payload)))
    offset = age.NONCE_SIZE + start * E
    tail = payload[offset:]
    out = [
        age.decrypt_chunk(
            key, index, tail[(index - start) * E : (index - start + 1) * E], last=index == count - 1
        )
        for index in range(start, count)
    ]
    assert b"".join(out) == plaintext[start * C :]


def test_chunk_api_guards() -> None:
    key = age.payload_key(age.generate_file_key(), bytes(16))
    full = age.encrypt_chunk(key, 0, bytes(C), last=False)
    with pytest.raises(ValueError):
        age.encrypt_chunk(key, 0, bytes(C - 1), last=False)
    with pytest.raises(ValueError):
        age.encrypt_chunk(key, 0, bytes(C + 1), last=True)
    with pytest.raises(ValueError):
        age.encrypt_chunk(key, 1, b"", last=True)
    with pytest.raises(ValueError):
        age.encrypt_chunk(key, 1 << 88, b"x", last=True)
    with pytest.raises(ValueError):
        age.encrypt_chunk(bytes(16), 0, b"x", last=True)
    with pytest.raises(ValueError):
        age.payload_key(bytes(15), bytes(16))
    with pytest.raises(ValueError):
        age.payload_key(bytes(16), bytes(15))
    assert age.decrypt_chunk(key, 0, full, last=False) == bytes(C)
    with pytest.raises(AgePayloadError):
        age.decrypt_chunk(key, 0, full, last=True)  # wrong flag
    with pytest.raises(AgePayloadError):
        age.decrypt_chunk(key, 1, full, last=False)  # wrong position
    with pytest.raises(AgePayloadError):
        age.decrypt_chunk(key, 0, full[:-1], last=False)  # impossible size
    with pytest.raises(AgePayloadError):
        age.decrypt_chunk(key, 0, full[:15], last=True)  # shorter than a tag
    empty_last = age.encrypt_chunk(key, 0, b"", last=True)
    with pytest.raises(AgePayloadError, match="empty final chunk"):
        age.decrypt_chunk(key, 1, empty_last, last=True)


# --- payload tampering -------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, C, C + 1, 2 * C, 3 * C + 5])
def test_payload_tampering_is_detected(size: int, identity: str, recipient: str) -> None:
    plaintext = plaintext_of(size)
    data = age.encrypt(plaintext, [recipient])
    _, offset = age.Header.parse(data)
    header, payload = data[:offset], data[offset:]
    nonce, chunks = payload[:16], chunks_of(payload)

    def fails(candidate_payload: bytes) -> None:
        with pytest.raises(AgePayloadError):
            age.decrypt(header + candidate_payload, [identity])

    for i, chunk in enumerate(chunks):  # a flipped bit in each chunk, at its start and its tag
        for pos in (0, len(chunk) - 1):
            flipped = chunk[:pos] + bytes([chunk[pos] ^ 0x80]) + chunk[pos + 1 :]
            fails(nonce + b"".join([*chunks[:i], flipped, *chunks[i + 1 :]]))
    fails(bytes([nonce[0] ^ 1]) + nonce[1:] + b"".join(chunks))  # nonce changed
    fails(payload + b"\x00")  # a byte appended
    fails(payload + chunks[-1])  # the final chunk repeated
    fails(payload[:-1])  # a byte cut
    fails(nonce)  # every chunk dropped
    if len(chunks) > 1:
        fails(nonce + b"".join(chunks[:-1]))  # the final chunk dropped
        fails(nonce + b"".join([chunks[1], chunks[0], *chunks[2:]]))  # two chunks swapped
        fails(nonce + b"".join(chunks[1:]))  # the first chunk dropped
    other = age.encrypt(plaintext, [recipient])
    fails(other[age.Header.parse(other)[1] :])  # another file's payload under this header


def test_truncation_at_a_chunk_boundary_releases_then_fails() -> None:
    """Cut after a full middle chunk: that chunk is authentic and released, then the error."""
    file_key = age.generate_file_key()
    plaintext = plaintext_of(2 * C + 10)
    payload = b"".join(age.encrypt_stream(file_key, [plaintext]))
    released: list[bytes] = []
    with pytest.raises(AgePayloadError, match="truncated"):
        for chunk in age.decrypt_stream(file_key, [payload[: 16 + 2 * E]]):
            released.append(chunk)
    assert b"".join(released) == plaintext[: 2 * C]

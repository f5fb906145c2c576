"""Interoperability with the real `age` binary (Debian's package; CI installs it).

Files we write must open with `age -d`, files `age` writes must open with our decrypt,
and — exchange's storage layout — a header from the database followed by a payload
from storage must be a standard age file.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from exchange.errors import AgeNoIdentityMatch, AgePayloadError
from exchange.format import age
from tests.conftest import requires_age

AGE = shutil.which("age")
pytestmark = requires_age

SIZES = [0, 65536, 200000]


def run_age(*args: str | Path, stdin: bytes = b"") -> bytes:
    assert AGE is not None
    done = subprocess.run([AGE, *map(str, args)], input=stdin, capture_output=True, check=False, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"age {args} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


def key_file(tmp_path: Path, identity: str) -> Path:
    path = tmp_path / "key.txt"
    # age's own key files carry comments; it must read ours the same way.
    path.write_text(
        f"# created: by exchange tests\n# public key: {age.identity_to_recipient(identity)}\n{identity}\n"
    )
    return path


def plaintext_of(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize("size", SIZES)
def test_age_decrypts_what_we_encrypt(tmp_path: Path, size: int) -> None:
    identity = age.generate_identity()
    plaintext = plaintext_of(size)
    encrypted = tmp_path / "file.age"
    encrypted.write_bytes(age.encrypt(plaintext, [age.identity_to_recipient(identity)]))
    assert run_age("-d", "-i", key_file(tmp_path, identity), encrypted) == plaintext


@pytest.mark.parametrize("size", SIZES)
def test_we_decrypt_what_age_encrypts(tmp_path: Path, size: int) -> None:
    identity = age.generate_identity()
    plaintext = plaintext_of(size)
    data = run_age("-r", age.identity_to_recipient(identity), stdin=plaintext)
    assert age.decrypt(data, [identity]) == plaintext
    with pytest.raises(AgeNoIdentityMatch):
        age.decrypt(data, [age.generate_identity()])


def test_detached_header_and_stream_payload_make_a_standard_file(tmp_path: Path) -> None:
    """One header per recipient, one payload shared: each `header || payload` opens with age."""
    file_key = age.generate_file_key()
    plaintext = plaintext_of(3 * age.CHUNK_SIZE + 5)
    payload = b"".join(
        age.encrypt_stream(file_key, (plaintext[i : i + 10_000] for i in range(0, len(plaintext), 10_000)))
    )
    for n in range(2):
        identity = age.generate_identity()
        header = age.wrap_file_key(file_key, [age.identity_to_recipient(identity)])
        encrypted = tmp_path / f"file{n}.age"
        encrypted.write_bytes(header.to_bytes() + payload)
        (tmp_path / str(n)).mkdir()
        assert run_age("-d", "-i", key_file(tmp_path / str(n), identity), encrypted) == plaintext


def test_multi_recipient_header_opens_for_each(tmp_path: Path) -> None:
    identities = [age.generate_identity() for _ in range(3)]
    data = age.encrypt(b"findings", [age.identity_to_recipient(i) for i in identities])
    encrypted = tmp_path / "file.age"
    encrypted.write_bytes(data)
    for n, identity in enumerate(identities):
        (tmp_path / str(n)).mkdir()
        assert run_age("-d", "-i", key_file(tmp_path / str(n), identity), encrypted) == b"findings"


def test_keys_agree_with_age_keygen(tmp_path: Path) -> None:
    keygen = shutil.which("age-keygen")
    assert keygen is not None, "age-keygen ships in the same package as age"
    ours = age.generate_identity()
    done = subprocess.run(
        [keygen, "-y"], input=ours.encode() + b"\n", capture_output=True, check=True, timeout=60
    )
    assert done.stdout.decode().strip() == age.identity_to_recipient(ours)
    path = tmp_path / "theirs.txt"
    subprocess.run([keygen, "-o", str(path)], capture_output=True, check=True, timeout=60)
    theirs = next(line for line in path.read_text().splitlines() if line.startswith("AGE-SECRET-KEY-1"))
    recipient = age.identity_to_recipient(theirs)
    assert age.decrypt(run_age("-r", recipient, stdin=b"hello"), [theirs]) == b"hello"


def test_age_and_we_both_refuse_a_truncated_file(tmp_path: Path) -> None:
    identity = age.generate_identity()
    data = age.encrypt(plaintext_of(2 * age.CHUNK_SIZE), [age.identity_to_recipient(identity)])
    truncated = data[: -age.ENCRYPTED_CHUNK_SIZE]
    with pytest.raises(AgePayloadError):
        age.decrypt(truncated, [identity])
    encrypted = tmp_path / "file.age"
    encrypted.write_bytes(truncated)
    with pytest.raises(AssertionError, match="age"):
        run_age("-d", "-i", key_file(tmp_path, identity), encrypted)

"""Identity files: 0600, atomic, no secrets in repr; the age identity works with the real `age`."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from exchange.errors import ValidationError
from exchange.identity import Identity, key_id_for
from tests.conftest import requires_age


def test_save_load_round_trip(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "id.json"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.key_id == ident.key_id == key_id_for(bytes(ident.verify_key))
    assert loaded.public == ident.public
    assert loaded.public.age_recipient.startswith("age1")


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    Identity.generate().save(path)
    before = path.read_bytes()
    with pytest.raises(ValidationError, match="refusing to overwrite"):
        Identity.generate().save(path)
    assert path.read_bytes() == before


def test_repr_has_no_private_key(tmp_path: Path) -> None:
    ident = Identity.generate()
    assert ident.age_identity not in repr(ident)
    assert "AGE-SECRET-KEY" not in repr(ident)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "{}",
        json.dumps({"type": "exchange-identity", "version": 1, "signing_key": "AA==", "age_identity": "x"}),
    ],
)
def test_damaged_files_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "id.json"
    path.write_text(content)
    with pytest.raises(ValidationError):
        Identity.load(path)


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exchange keygen"):
        Identity.load(tmp_path / "nope.json")


@requires_age
def test_age_key_file_decrypts_with_the_real_age(tmp_path: Path) -> None:
    ident = Identity.generate()
    keyfile = tmp_path / "key.txt"
    keyfile.write_text(ident.age_key_file())
    plaintext = b"findings for the developer\n" * 100
    encrypted = subprocess.run(
        ["age", "-r", ident.public.age_recipient], input=plaintext, capture_output=True, check=True
    ).stdout
    decrypted = subprocess.run(
        ["age", "-d", "-i", str(keyfile)], input=encrypted, capture_output=True, check=True
    ).stdout
    assert decrypted == plaintext

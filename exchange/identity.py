"""A principal's local identity: an Ed25519 signing key and an X25519 age identity.

The identity file is JSON, mode 0600, written atomically; it holds the two private keys and,
after enrolment, the principal's name and server. Private keys never leave it: the service
learns the public halves only — the signing key (with its key id) and the age recipient.

The key id names a signing key in request signatures: the first 16 bytes of SHA-256 of the
raw public key, in hex. It identifies; it is not secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey, VerifyKey

from .errors import AgeError, ValidationError
from .files import write_atomic
from .format import age

__all__ = ["Identity", "PublicKeys", "key_id_for"]

_TYPE = "exchange-identity"


def key_id_for(signing_public_key: bytes) -> str:
    return hashlib.sha256(signing_public_key).hexdigest()[:32]


@dataclass(frozen=True)
class PublicKeys:
    """What the service may know of an identity."""

    signing_public_key: bytes
    age_recipient: str

    @property
    def key_id(self) -> str:
        return key_id_for(self.signing_public_key)

    def to_json(self) -> dict[str, str]:
        return {
            "key_id": self.key_id,
            "signing_public_key": base64.b64encode(self.signing_public_key).decode(),
            "age_recipient": self.age_recipient,
        }


@dataclass(frozen=True, repr=False)
class Identity:
    signing_seed: bytes
    age_identity: str
    name: str | None = None
    server: str | None = None

    def __repr__(self) -> str:  # never print private keys
        return f"Identity(key_id={self.key_id!r}, name={self.name!r})"

    @classmethod
    def generate(cls) -> Identity:
        return cls(signing_seed=bytes(SigningKey.generate()), age_identity=age.generate_identity())

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.signing_seed)

    @property
    def verify_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @property
    def key_id(self) -> str:
        return key_id_for(bytes(self.verify_key))

    @property
    def public(self) -> PublicKeys:
        return PublicKeys(
            signing_public_key=bytes(self.verify_key),
            age_recipient=age.identity_to_recipient(self.age_identity),
        )

    def with_enrolment(self, *, name: str, server: str) -> Identity:
        return replace(self, name=name, server=server)

    # -- files ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "type": _TYPE,
            "version": 1,
            "signing_key": base64.b64encode(self.signing_seed).decode(),
            "age_identity": self.age_identity,
        }
        if self.name:
            data["name"] = self.name
        if self.server:
            data["server"] = self.server
        return data

    @classmethod
    def from_json(cls, data: Any) -> Identity:
        if not isinstance(data, dict) or data.get("type") != _TYPE or data.get("version") != 1:
            raise ValidationError("not an exchange identity file (version 1)")
        try:
            seed = base64.b64decode(data["signing_key"], validate=True)
            age_identity = str(data["age_identity"])
            age.parse_identity(age_identity)
        except (KeyError, binascii.Error, ValueError, AgeError) as exc:
            raise ValidationError(f"identity file is damaged: {exc}") from exc
        if len(seed) != 32:
            raise ValidationError("identity file is damaged: signing key is not 32 bytes")
        name, server = data.get("name"), data.get("server")
        return cls(
            signing_seed=seed,
            age_identity=age_identity,
            name=name if isinstance(name, str) else None,
            server=server if isinstance(server, str) else None,
        )

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValidationError(
                f"no identity file at {path} (create one with `exchange keygen` or `exchange enroll`)"
            ) from None
        except OSError as exc:
            raise ValidationError(f"cannot read identity file {path}: {exc.strerror}") from exc
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValidationError(f"identity file {path} is not valid JSON") from exc

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write atomically with mode 0600; refuse to replace an existing file unless told to.

        The refusal is the create itself (a hard link), not a check before it: of two saves
        racing to the same path, one wins and the other is refused."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8")
        try:
            write_atomic(path, data, overwrite=overwrite)
        except FileExistsError:
            raise ValidationError(f"{path} exists; refusing to overwrite an identity") from None

    def age_key_file(self) -> str:
        """The age identity as an age key file, usable as `age -d -i FILE`."""
        return f"# public key: {self.public.age_recipient}\n{self.age_identity}\n"

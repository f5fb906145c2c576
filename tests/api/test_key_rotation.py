"""Key rotation through the API, on both databases: the new keys proven and authorised by the
old, the old refused afterwards, the history kept; a principal's own headers listed and
re-wrapped; and every bad input a clear problem with its audit event, nothing changed."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exchange.client import links as grants_api
from exchange.client import transfer
from exchange.client.signing import sign_headers
from exchange.errors import AuthError, Conflict, NotFound, PermissionDenied, ValidationError
from exchange.format import age
from exchange.format.keyrotation import sign_rotation
from exchange.identity import Identity
from tests.conftest import Stack


async def _state(stack: Stack) -> list[tuple[Any, ...]]:
    """Everything a rotation may change: every principal's current keys and the key history."""
    principals = await stack.db.fetchall(
        "SELECT id, key_id, signing_public_key, age_recipient, status FROM principals ORDER BY id"
    )
    keys = await stack.db.fetchall(
        "SELECT key_id, principal_id, valid_from_ms, valid_until_ms FROM principal_keys ORDER BY key_id"
    )
    return [tuple(r.values()) for r in principals] + [tuple(r.values()) for r in keys]


def _body(
    me: dict[str, Any], old: Identity, new: Identity, *, signer: Identity | None = None
) -> dict[str, Any]:
    """A rotation body for `new`, its proof made by `signer` (the new key unless told)."""
    public = new.public
    proof = sign_rotation(
        (signer or new).signing_key,
        principal_id=me["id"],
        old_key_id=old.key_id,
        new_key_id=public.key_id,
        age_recipient=public.age_recipient,
    )
    return {
        "signing_public_key": public.to_json()["signing_public_key"],
        "age_recipient": public.age_recipient,
        "proof": base64.b64encode(proof).decode(),
    }


async def _last_event(stack: Stack) -> dict[str, Any]:
    return (await stack.events())[-1]


async def test_rotate_replaces_the_keys_and_keeps_the_history(stack: Stack) -> None:
    old = await stack.principal("tess", "tester", org="aisi")
    new = Identity.generate()
    async with stack.client(old) as c:
        me = await c.whoami()
        changed = await c.rotate_keys(new)
    assert (changed["key_id"], changed["age_recipient"]) == (new.key_id, new.public.age_recipient)

    event = await _last_event(stack)
    assert event["action"] == "principal.rotate" and event["outcome"] == {"result": "allowed"}
    assert event["actor"]["key_id"] == old.key_id and event["resource"] == {
        "type": "principal",
        "id": me["id"],
    }
    assert event["details"] == {
        "name": "tess",
        "old_key_id": old.key_id,
        "new_key_id": new.key_id,
        "age_recipient": new.public.age_recipient,
    }

    # Only the new key authenticates; the old one is unknown, and refused as such.
    async with stack.client(old) as c:
        with pytest.raises(AuthError) as err:
            await c.whoami()
    assert err.value.code == "unknown-key"
    async with stack.client(new) as c:
        assert (await c.whoami())["key_id"] == new.key_id
        shown = await c.get_principal("tess")
    (previous,) = shown["previous_keys"]
    assert previous["key_id"] == old.key_id
    assert previous["signing_public_key"] == old.public.to_json()["signing_public_key"]
    assert previous["age_recipient"] == old.public.age_recipient
    assert previous["valid_until_ms"] is not None and previous["valid_from_ms"] <= previous["valid_until_ms"]
    rows = await stack.db.fetchall(
        "SELECT key_id, valid_until_ms FROM principal_keys WHERE principal_id = $1 ORDER BY valid_from_ms, key_id",
        me["id"],
    )
    assert {r["key_id"]: r["valid_until_ms"] is None for r in rows} == {old.key_id: False, new.key_id: True}


async def test_bad_rotations_change_nothing(stack: Stack) -> None:
    old = await stack.principal("tess", "tester", org="aisi")
    other = await stack.principal("olga", "tester", org="aisi")
    async with stack.client(old) as c:
        me = await c.whoami()
    new = Identity.generate()
    before = await _state(stack)
    refusals: list[str] = []

    async def refused(body: dict[str, Any], cls: type[Exception], code: str, signer: Identity = old) -> None:
        async with stack.client(signer) as c:
            with pytest.raises(cls) as err:
                await c.request("POST", "/v1/principals/me/keys", json_body=body)
        assert getattr(err.value, "code", None) == code, (code, err.value)
        assert await _state(stack) == before, code
        event = await _last_event(stack)
        assert event["action"] == "principal.rotate", event
        assert event["outcome"] == {"result": "denied", "reason": code}
        refusals.append(code)

    # A proof by another key than the one registered.
    await refused(_body(me, old, new, signer=Identity.generate()), ValidationError, "rotation-proof-invalid")
    # A proof made for another principal, or another old key.
    other_id = "prn_" + ("0" * 20 if me["id"] != "prn_" + "0" * 20 else "1" * 20)
    await refused(_body({"id": other_id}, old, new), ValidationError, "rotation-proof-invalid")
    await refused(_body(me, other, new), ValidationError, "rotation-proof-invalid")
    # The new key is the old one; the new age key is the old one.
    await refused(_body(me, old, old), ValidationError, "key-unchanged")
    same_age = Identity(signing_seed=Identity.generate().signing_seed, age_identity=old.age_identity)
    await refused(_body(me, old, same_age), ValidationError, "age-key-unchanged")
    # A key another principal holds.
    await refused(_body(me, old, other), Conflict, "key-enrolled")
    # Malformed: a key that is not 32 bytes, a recipient that is not one, a proof of the wrong size.
    good = _body(me, old, new)
    await refused(
        good | {"signing_public_key": base64.b64encode(b"k" * 31).decode()}, ValidationError, "invalid-input"
    )
    await refused(good | {"age_recipient": "age1" + "q" * 58}, ValidationError, "invalid-input")
    await refused(good | {"proof": base64.b64encode(b"p" * 63).decode()}, ValidationError, "invalid-input")
    assert len(refusals) == 9

    # A proof cannot be replayed by someone else: olga signing tess's rotation body changes olga
    # nothing, since the proof names tess's id and old key.
    await refused(_body(me, old, new), ValidationError, "rotation-proof-invalid", signer=other)


async def test_a_retired_key_is_never_enrolled_again(stack: Stack) -> None:
    first = await stack.principal("tess", "tester", org="aisi")
    second = Identity.generate()
    async with stack.client(first) as c:
        me = await c.whoami()
        await c.rotate_keys(second)
    before = await _state(stack)
    # Back to the first key: refused, it is in the history.
    async with stack.client(second) as c:
        with pytest.raises(Conflict) as err:
            await c.request("POST", "/v1/principals/me/keys", json_body=_body(me, second, first))
    assert err.value.code == "key-enrolled"
    # Enrolling it as a new principal with a fresh invite: refused too.
    async with stack.client(stack.admin) as admin:
        invite = await admin.create_invite(role="tester", org="aisi")
    async with stack.client() as anon:
        with pytest.raises(Conflict) as err:
            await anon.enroll(invite["code"], "tess-again", first)
    assert err.value.code == "key-enrolled"
    # A fresh age key with the retired signing key: still refused (the key id is the signing key's).
    reuse = Identity(signing_seed=first.signing_seed, age_identity=age.generate_identity())
    async with stack.client(second) as c:
        with pytest.raises(Conflict) as err:
            await c.request("POST", "/v1/principals/me/keys", json_body=_body(me, second, reuse))
    assert err.value.code == "key-enrolled"
    # A fresh signing key with a retired age key of one's own: refused.
    old_age = Identity(signing_seed=Identity.generate().signing_seed, age_identity=first.age_identity)
    async with stack.client(second) as c:
        with pytest.raises(Conflict) as err:
            await c.request("POST", "/v1/principals/me/keys", json_body=_body(me, second, old_age))
    assert err.value.code == "age-key-reused"
    assert await _state(stack) == before


async def test_a_disabled_principal_cannot_rotate(stack: Stack) -> None:
    old = await stack.principal("tess", "tester", org="aisi")
    async with stack.client(old) as c:
        me = await c.whoami()
    async with stack.client(stack.admin) as admin:
        await admin.disable_principal("tess")
    before = await _state(stack)
    async with stack.client(old) as c:
        with pytest.raises(PermissionDenied) as err:
            await c.request("POST", "/v1/principals/me/keys", json_body=_body(me, old, Identity.generate()))
    assert err.value.code == "principal-disabled"
    assert await _state(stack) == before
    event = await _last_event(stack)
    assert (event["action"], event["outcome"]) == (
        "principal.rotate",
        {"result": "denied", "reason": "principal-disabled"},
    )
    assert event["actor"]["name"] == "tess"


async def test_an_unsigned_or_self_signed_rotation_is_refused(stack: Stack) -> None:
    old = await stack.principal("tess", "tester", org="aisi")
    async with stack.client(old) as c:
        me = await c.whoami()
    new = Identity.generate()
    before = await _state(stack)
    # Signed by the NEW key (not registered): the old key's authorisation is missing.
    async with stack.client(new) as c:
        with pytest.raises(AuthError) as err:
            await c.request("POST", "/v1/principals/me/keys", json_body=_body(me, old, new))
    assert err.value.code == "unknown-key"
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/principals/me/keys", json=_body(me, old, new)) as resp:
            assert resp.status == 401
            assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert await _state(stack) == before


async def test_own_headers_and_rewrap(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dev", "developer", org="lab")
    tess = await stack.principal("tess", "tester", org="aisi")
    src = tmp_path / "weights.bin"
    src.write_bytes(b"w" * 10_000)
    async with stack.client(dev) as c:
        artifact = await transfer.upload(c, src)
        await grants_api.grant(c, artifact, "tess")
    new = Identity.generate()
    async with stack.client(tess) as c:
        (listed,) = await c.own_headers()
        await c.rotate_keys(new)
    assert listed["artifact"] == artifact
    old_header = base64.b64decode(listed["header"])
    file_key = age.unwrap_file_key(old_header, [tess.age_identity])
    event = [e for e in await stack.events() if e["action"] == "principal.headers"][-1]
    assert event["details"] == {"count": 1}

    rewrapped = age.wrap_file_key(file_key, [new.public.age_recipient]).to_bytes()
    async with stack.client(new) as c:
        # Another principal's header, and an unknown artifact: answered alike, nothing written.
        async with stack.client(dev) as d:
            (dev_own,) = await d.own_headers()
        with pytest.raises(NotFound):
            await c.put_header("art_" + "0" * 20, rewrapped)
        # Not an age header; two stanzas (for more than the caller): refused.
        with pytest.raises(ValidationError):
            await c.put_header(artifact, b"not an age header")
        two = age.wrap_file_key(file_key, [new.public.age_recipient, tess.public.age_recipient]).to_bytes()
        with pytest.raises(ValidationError):
            await c.put_header(artifact, two)
        stored = await stack.db.fetchval(
            "SELECT header FROM artifact_headers WHERE artifact_id = $1 AND principal_id = $2",
            artifact,
            (await c.whoami())["id"],
        )
        assert bytes(stored) == old_header
        await c.put_header(artifact, rewrapped)
        (again,) = await c.own_headers()
    assert age.unwrap_file_key(base64.b64decode(again["header"]), [new.age_identity]) == file_key
    assert bytes(base64.b64decode(dev_own["header"])) != rewrapped  # the uploader's own row untouched
    event = [e for e in await stack.events() if e["action"] == "artifact.rewrap"][-1]
    assert event["outcome"] == {"result": "allowed"} and event["resource"] == {
        "type": "artifact",
        "id": artifact,
    }
    assert event["details"] == {"principal": "tess", "key_id": new.key_id}
    # The tester downloads with its new key.
    async with stack.client(new) as c:
        await transfer.download(c, artifact, tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == src.read_bytes()


async def test_rewrap_of_a_header_one_does_not_hold_is_refused(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dev", "developer", org="lab")
    outsider = await stack.principal("olga", "tester", org="aisi")
    src = tmp_path / "w.bin"
    src.write_bytes(b"x" * 1000)
    async with stack.client(dev) as c:
        artifact = await transfer.upload(c, src)
    header = age.wrap_file_key(b"k" * 16, [outsider.public.age_recipient]).to_bytes()
    rows = await stack.count("artifact_headers")
    async with stack.client(outsider) as c:
        with pytest.raises(NotFound):
            await c.put_header(artifact, header)
    assert await stack.count("artifact_headers") == rows
    event = await _last_event(stack)
    assert (event["action"], event["outcome"]["result"]) == ("artifact.rewrap", "denied")


async def test_signed_by_hand_the_old_key_is_refused_after_rotation(stack: Stack) -> None:
    """The refusal of a retired key is the same 401 problem whatever request it signs."""
    old = await stack.principal("tess", "tester", org="aisi")
    async with stack.client(old) as c:
        await c.rotate_keys(Identity.generate())
    url = stack.url + "/v1/whoami"
    headers = sign_headers(old, method="GET", url=url, body=b"", headers={})
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        problem = await resp.json(content_type=None)
    assert resp.status == 401 and problem["code"] == "unknown-key"
    assert old.key_id not in problem["detail"]


# -- lost keys: the admin's re-enrol invite -------------------------------------------------------


async def test_reenroll_replaces_lost_keys_and_drops_their_headers(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dev", "developer", org="lab")
    lost = await stack.principal("tess", "tester", org="aisi")
    src = tmp_path / "weights.bin"
    src.write_bytes(b"r" * 5000)
    async with stack.client(dev) as c:
        artifact = await transfer.upload(c, src)
        await grants_api.grant(c, artifact, "tess")
        (before,) = await grants_api.list_grants(c, artifact)
    assert before["needs_regrant"] is False
    async with stack.client(lost) as c:
        me = await c.whoami()

    async with stack.client(stack.admin) as admin:
        invite = await admin.create_reenroll_invite("tess")
    assert (invite["role"], invite["org"], invite["reenroll"]) == ("tester", "aisi", "tess")
    event = await _last_event(stack)
    assert event["action"] == "invite.reenroll" and event["details"]["name"] == "tess"
    assert invite["code"] not in repr(await stack.events())

    fresh = Identity.generate()
    async with stack.client() as anon:
        enrolled = await anon.enroll(invite["code"], "tess", fresh)
    assert (enrolled["id"], enrolled["key_id"], enrolled["role"]) == (me["id"], fresh.key_id, "tester")
    event = await _last_event(stack)
    assert event["action"] == "principal.reenroll" and event["actor"]["key_id"] == fresh.key_id
    assert event["details"] | {"invite": None} == {
        "invite": None,
        "name": "tess",
        "old_key_id": lost.key_id,
        "new_key_id": fresh.key_id,
        "age_recipient": fresh.public.age_recipient,
        "headers_dropped": 1,
    }
    async with stack.client(lost) as c:
        with pytest.raises(AuthError):
            await c.whoami()
    async with stack.client(fresh) as c:
        assert await c.own_headers() == []
        shown = await c.get_principal("tess")
    assert [k["key_id"] for k in shown["previous_keys"]] == [lost.key_id]

    # The grant stays, marked as needing a re-grant; granting again makes it downloadable.
    async with stack.client(dev) as c:
        (after,) = await grants_api.list_grants(c, artifact)
        assert after["needs_regrant"] is True and after["revoked_at_ms"] is None
        await grants_api.grant(c, artifact, "tess")
        (regranted,) = await grants_api.list_grants(c, artifact)
    assert regranted["needs_regrant"] is False
    async with stack.client(fresh) as c:
        await transfer.download(c, artifact, tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == src.read_bytes()


async def test_bad_reenrolments_change_nothing(stack: Stack) -> None:
    await stack.principal("tess", "tester", org="aisi")
    dev = await stack.principal("dev", "developer", org="lab")
    before = await _state(stack)
    invites = await stack.count("invites")
    # An unknown name; a caller who is not an admin.
    async with stack.client(stack.admin) as admin:
        with pytest.raises(NotFound):
            await admin.create_reenroll_invite("nobody")
    event = await _last_event(stack)
    assert (event["action"], event["outcome"]) == (
        "invite.reenroll",
        {"result": "denied", "reason": "not-found"},
    )
    async with stack.client(dev) as c:
        with pytest.raises(PermissionDenied) as denied:
            await c.create_reenroll_invite("tess")
    assert denied.value.code == "role-required"
    assert await stack.count("invites") == invites

    # The invite spent under another name, or with a key already enrolled: refused, still usable.
    async with stack.client(stack.admin) as admin:
        invite = await admin.create_reenroll_invite("tess")
    before = await _state(stack)
    async with stack.client() as anon:
        with pytest.raises(PermissionDenied) as other:
            await anon.enroll(invite["code"], "mallory", Identity.generate())
        assert other.value.code == "invite-other-principal"
        with pytest.raises(Conflict) as taken:
            await anon.enroll(invite["code"], "tess", dev)
        assert taken.value.code == "key-enrolled"
        assert await _state(stack) == before
        assert await stack.count("principals") == 3
        await anon.enroll(invite["code"], "tess", Identity.generate())
        with pytest.raises(PermissionDenied) as used:
            await anon.enroll(invite["code"], "tess", Identity.generate())
    assert used.value.code == "invite-used"

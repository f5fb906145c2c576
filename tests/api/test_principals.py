"""Invites, enrolment, roles, and the bad-input rules: a clear 4xx, nothing written but the event."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import pytest

from exchange.client.signing import sign_headers
from exchange.errors import Conflict, NotFound, PermissionDenied
from exchange.identity import Identity
from tests.conftest import FakeClock, Stack

TABLES = ("orgs", "principals", "invites")


async def counts(stack: Stack) -> dict[str, int]:
    return {t: await stack.count(t) for t in TABLES}


async def test_invite_enrol_whoami(stack: Stack) -> None:
    tester = await stack.principal("alice", "tester", org="ukaisi")
    async with stack.client(tester) as c:
        me = await c.whoami()
    assert (me["name"], me["role"], me["org"]) == ("alice", "tester", "ukaisi")
    assert me["age_recipient"] == tester.public.age_recipient
    actions = [e["action"] for e in await stack.events()]
    assert actions == ["principal.bootstrap", "org.create", "invite.create", "principal.enroll"]
    enrol = (await stack.events())[-1]
    assert enrol["actor"]["name"] == "alice" and enrol["outcome"] == {"result": "allowed"}


async def test_invite_code_is_stored_hashed(stack: Stack) -> None:
    async with stack.client(stack.admin) as admin:
        await admin.create_org("lab")
        invite = await admin.create_invite(role="tester", org="lab")
    rows = await stack.db.fetchall("SELECT * FROM invites")
    dump = repr(rows) + repr(await stack.events())
    assert invite["code"] not in dump
    assert invite["code"].encode() not in b"".join(bytes(r["code_hash"]) for r in rows)


async def test_invite_cannot_be_used_twice(stack: Stack) -> None:
    async with stack.client(stack.admin) as admin:
        await admin.create_org("lab")
        invite = await admin.create_invite(role="tester", org="lab")
    async with stack.client() as anon:
        await anon.enroll(invite["code"], "first", Identity.generate())
        before = await counts(stack)
        with pytest.raises(PermissionDenied) as err:
            await anon.enroll(invite["code"], "second", Identity.generate())
    assert err.value.code == "invite-used"
    assert await counts(stack) == before
    assert (await stack.events())[-1]["outcome"] == {"result": "denied", "reason": "invite-used"}


async def test_expired_invite_is_refused(stack: Stack, clock: FakeClock) -> None:
    async with stack.client(stack.admin) as admin:
        await admin.create_org("lab")
        invite = await admin.create_invite(role="tester", org="lab", expires_in_s=60)
    clock.advance(61)
    before = await counts(stack)
    async with stack.client() as anon:
        with pytest.raises(PermissionDenied) as err:
            await anon.enroll(invite["code"], "late", Identity.generate())
    assert err.value.code == "invite-expired"
    assert await counts(stack) == before


async def test_unknown_invite_code_is_refused(stack: Stack) -> None:
    async with stack.client() as anon:
        with pytest.raises(PermissionDenied) as err:
            await anon.enroll("exinv1_" + "A" * 43, "nobody", Identity.generate())
    assert err.value.code == "invite-invalid"


async def test_taken_name_keeps_the_invite_usable(stack: Stack) -> None:
    await stack.principal("bob", "tester")
    async with stack.client(stack.admin) as admin:
        invite = await admin.create_invite(role="tester", org="lab")
    async with stack.client() as anon:
        with pytest.raises(Conflict) as err:
            await anon.enroll(invite["code"], "bob", Identity.generate())
        assert err.value.code == "name-taken"
        await anon.enroll(invite["code"], "bob2", Identity.generate())


async def test_enrolment_must_be_signed_by_the_registered_key(stack: Stack) -> None:
    async with stack.client(stack.admin) as admin:
        await admin.create_org("lab")
        invite = await admin.create_invite(role="tester", org="lab")
    claimed, signer = Identity.generate(), Identity.generate()
    public = claimed.public.to_json()
    body = {
        "code": invite["code"],
        "name": "mallory",
        "signing_public_key": public["signing_public_key"],
        "age_recipient": public["age_recipient"],
    }
    async with stack.client() as anon:
        with pytest.raises(Exception) as err:
            await anon.request("POST", "/v1/enroll", json_body=body, signer=signer)
    assert getattr(err.value, "code", None) == "bad-signature"
    assert await stack.count("principals") == 1


@pytest.mark.parametrize(
    ("role", "call"),
    [
        ("tester", lambda c: c.create_invite(role="admin", org="operators")),
        ("developer", lambda c: c.create_invite(role="tester", org="lab")),
        ("auditor", lambda c: c.create_org("x")),
        ("tester", lambda c: c.list_orgs()),
    ],
)
async def test_role_checks(stack: Stack, role: str, call: Any) -> None:
    who = await stack.principal(f"p-{role}", role)
    before = await counts(stack)
    async with stack.client(who) as c:
        with pytest.raises(PermissionDenied) as err:
            await call(c)
    assert err.value.code == "role-required"
    assert await counts(stack) == before
    last = (await stack.events())[-1]
    assert last["outcome"] == {"result": "denied", "reason": "role-required"}
    assert last["actor"]["name"] == f"p-{role}"


async def test_auditor_may_list_orgs(stack: Stack) -> None:
    auditor = await stack.principal("aud", "auditor", org="audit-org")
    async with stack.client(auditor) as c:
        names = {o["name"] for o in await c.list_orgs()}
    assert names == {"operators", "audit-org"}


async def test_invite_to_unknown_org_is_404(stack: Stack) -> None:
    async with stack.client(stack.admin) as admin:
        with pytest.raises(NotFound):
            await admin.create_invite(role="tester", org="nowhere")
    assert await stack.count("invites") == 0


async def test_duplicate_org_is_409(stack: Stack) -> None:
    async with stack.client(stack.admin) as admin:
        await admin.create_org("lab")
        with pytest.raises(Conflict) as err:
            await admin.create_org("lab")
    assert err.value.code == "org-exists"


async def test_principals_are_listed_and_paged(stack: Stack) -> None:
    for name in ("p1", "p2", "p3"):
        await stack.principal(name, "tester")
    async with stack.client(stack.admin) as c:
        page = await c.request("GET", "/v1/principals", params={"limit": "2", "role": "tester"})
        assert [p["name"] for p in page["items"]] == ["p1", "p2"]
        rest = await c.request(
            "GET", "/v1/principals", params={"limit": "2", "role": "tester", "cursor": "p2"}
        )
        assert [p["name"] for p in rest["items"]] == ["p3"] and rest["next_cursor"] is None
        assert [p["name"] for p in await c.list_principals(org="lab")] == ["p1", "p2", "p3"]
        assert (await c.get_principal("p2"))["role"] == "tester"
        with pytest.raises(NotFound):
            await c.get_principal("nobody")


# -- bad input: each a 4xx problem, nothing written but its denial event ----------------------------

LONG = "x" * 65
BAD_BODIES: list[tuple[str, bytes, str, int, str]] = [
    ("malformed JSON", b'{"name": ', "application/json", 400, "invalid-input"),
    ("not an object", b'["lab"]', "application/json", 400, "invalid-input"),
    ("unknown field", b'{"name": "lab", "admin": true}', "application/json", 400, "invalid-input"),
    ("wrong type", b'{"name": 42}', "application/json", 400, "invalid-input"),
    ("missing field", b"{}", "application/json", 400, "invalid-input"),
    ("duplicate key", b'{"name": "a", "name": "b"}', "application/json", 400, "invalid-input"),
    ("NaN", b'{"name": NaN}', "application/json", 400, "invalid-input"),
    ("over-long name", json.dumps({"name": LONG}).encode(), "application/json", 400, "invalid-input"),
    (
        "control character",
        json.dumps({"name": "lab\u0000x"}).encode(),
        "application/json",
        400,
        "invalid-input",
    ),
    (
        "newline",
        json.dumps({"name": "lab\r\nX-Injected: 1"}).encode(),
        "application/json",
        400,
        "invalid-input",
    ),
    ("RTL override", json.dumps({"name": "lab\u202egpj"}).encode(), "application/json", 400, "invalid-input"),
    ("empty name", json.dumps({"name": ""}).encode(), "application/json", 400, "invalid-input"),
    ("not UTF-8", b'{"name": "\xff"}', "application/json", 400, "invalid-input"),
    ("not JSON media type", b'{"name": "lab"}', "text/plain", 415, "unsupported-media-type"),
    (
        "oversize body",
        b'{"name": "' + b"a" * (1024 * 1024) + b'"}',
        "application/json",
        413,
        "payload-too-large",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "ctype", "status", "code"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
async def test_bad_input_is_refused_and_writes_nothing(
    stack: Stack, case: str, body: bytes, ctype: str, status: int, code: str
) -> None:
    before = await counts(stack)
    events_before = await stack.count("audit_events")
    headers = sign_headers(
        stack.admin, method="POST", url=stack.url + "/v1/orgs", body=body, headers={"Content-Type": ctype}
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/orgs", data=io.BytesIO(body), headers=headers) as resp:
            assert resp.status == status
            assert resp.content_type == "application/problem+json"
            problem = json.loads(await resp.read())
    assert problem["code"] == code and problem["status"] == status
    assert problem["detail"] and "Traceback" not in problem["detail"]
    assert "\x00" not in json.dumps(problem) and LONG not in problem["detail"]
    assert await counts(stack) == before
    assert await stack.count("audit_events") == events_before + 1
    last = (await stack.events())[-1]
    assert last["action"] == "org.create"
    assert last["outcome"] == {"result": "denied", "reason": code}


async def test_validation_messages_name_the_field_and_never_echo_the_value(stack: Stack) -> None:
    secret = "exinv1_" + "S" * 43
    public = Identity.generate().public.to_json()
    body = {"code": secret, "name": "n", "extra": 1, "signing_public_key": public["signing_public_key"]}
    async with stack.client(stack.admin) as c:
        with pytest.raises(Exception) as err:
            await c.request("POST", "/v1/enroll", json_body=body | {"age_recipient": public["age_recipient"]})
        assert "'extra'" in str(err.value)
        with pytest.raises(Exception) as err:
            await c.request(
                "POST",
                "/v1/enroll",
                json_body={k: v for k, v in body.items() if k != "extra"} | {"age_recipient": secret},
            )
    assert "S" * 43 not in str(err.value)
    assert "age_recipient" in str(err.value)


async def test_bad_query_parameters(stack: Stack) -> None:
    async with stack.client(stack.admin) as c:
        for params in ({"limit": "x"}, {"limit": "0"}, {"limit": "100000"}, {"role": "root"}):
            with pytest.raises(Exception) as err:
                await c.request("GET", "/v1/principals", params=params)
            assert getattr(err.value, "code", None) == "invalid-input", params


def _flip_last_bits(b64: str) -> str:
    """The same bytes in a second spelling: stray low bits in the last base64 character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = b64.rstrip("=")
    last = alphabet[alphabet.index(body[-1]) | 1]
    return body[:-1] + last + b64[len(body) :]


def _bad_checksum(recipient: str) -> str:
    return recipient[:-1] + ("q" if recipient[-1] != "q" else "p")


@pytest.mark.parametrize(
    ("field", "spoil", "hint"),
    [
        ("signing_public_key", _flip_last_bits, "canonical base64"),
        ("age_recipient", _bad_checksum, "Bech32 checksum"),
    ],
    ids=["non-canonical-base64-key", "bech32-checksum"],
)
async def test_enrolment_fields_the_schema_refuses(stack: Stack, field: str, spoil: Any, hint: str) -> None:
    """What the schema admits is what the handler accepts: a second spelling of a key, or an age
    recipient whose checksum fails, is refused by the body check itself (400, naming the field),
    so the published schema says what is refused (format `age-recipient`)."""
    async with stack.client(stack.admin) as admin:
        await admin.create_org("lab")
        invite = await admin.create_invite(role="tester", org="lab")
    identity = Identity.generate()
    body = {"code": invite["code"], "name": "tess"} | identity.public.to_json()
    body = {k: body[k] for k in ("code", "name", "signing_public_key", "age_recipient")}
    body[field] = spoil(body[field])
    before = await counts(stack)
    async with stack.client() as anon:
        with pytest.raises(Exception) as err:
            await anon.request("POST", "/v1/enroll", json_body=body, signer=identity)
    assert getattr(err.value, "code", None) == "invalid-input"
    assert field in str(err.value) and hint in str(err.value)
    assert await counts(stack) == before
    async with stack.client() as anon:
        doc = await anon.request("GET", "/openapi.json", signed=False)
    enroll = doc["components"]["schemas"]["Enroll"]["properties"]["age_recipient"]
    assert enroll["format"] == "age-recipient" and "checksum" in enroll["description"]


async def test_two_admins_disabling_each_other_at_once_leave_one(stack: Stack) -> None:
    """The last-admin rule under a race: both requests pass authentication while both are
    active; the active admins are locked in the change's transaction, so exactly one wins and
    the other is refused (`last-admin`), on SQLite and PostgreSQL alike."""
    import asyncio

    second = await stack.principal("second-admin", "admin", org="operators")
    for _ in range(3):  # a few rounds: the interleaving differs from run to run
        async with stack.client(stack.admin) as a, stack.client(second) as b:
            results = await asyncio.gather(
                a.disable_principal("second-admin"), b.disable_principal("admin"), return_exceptions=True
            )
        won = [r for r in results if isinstance(r, dict)]
        lost = [r for r in results if isinstance(r, Exception)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], (Conflict, PermissionDenied)), lost[0]
        active = await stack.db.fetchall(
            "SELECT name FROM principals WHERE role = 'admin' AND status = 'active'"
        )
        assert len(active) == 1
        # The winner re-enables the loser for the next round.
        winner = stack.admin if won[0]["name"] == "second-admin" else second
        async with stack.client(winner) as w:
            await w.enable_principal(won[0]["name"])
    allowed = [e for e in await stack.events() if e["action"] == "principal.disable"]
    assert sum(e["outcome"]["result"] == "allowed" for e in allowed) == 3


async def test_disable_bad_input_changes_nothing(stack: Stack) -> None:
    await stack.principal("bob", "tester")
    before = await stack.db.fetchall("SELECT name, status FROM principals ORDER BY name")
    async with stack.client(stack.admin) as admin:
        for body in ({"reason": ""}, {"reason": "x" * 501}, {"why": "extra"}, {"reason": 5}):
            with pytest.raises(Exception) as err:
                await admin.request("POST", "/v1/principals/bob/disable", json_body=body)
            assert getattr(err.value, "status", None) == 400 or "400" in str(err.value), err.value
    assert await stack.db.fetchall("SELECT name, status FROM principals ORDER BY name") == before
    refused = [e for e in await stack.events() if e["action"] == "principal.disable"]
    assert len(refused) == 4 and all(e["outcome"]["result"] == "denied" for e in refused)

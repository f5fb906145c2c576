"""The OpenAPI document is valid 3.1, lists exactly the app's routes, and describes real answers:
its success schemas match what the service sends, and every refusal the service really gives —
provoked here, not built by hand — is a documented status of its operation, is
`application/problem+json`, and validates against the document's own `Problem` schema."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from exchange.api.keys import OPENAPI
from exchange.client.signing import sign_headers
from exchange.dev.seaweed import SeaweedFS
from exchange.identity import Identity
from tests.conftest import FakeClock, Stack, start_stack

PROBLEM_JSON = "application/problem+json"
DOC_URI = "urn:exchange:openapi"


def _app_routes(stack: Stack) -> set[tuple[str, str]]:
    return {
        (route.method.lower(), route.resource.canonical)
        for route in stack.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


async def test_document_is_valid_openapi_31(stack: Stack) -> None:
    async with stack.client() as c:
        doc = await c.request("GET", "/openapi.json", signed=False)
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    assert doc == stack.app[OPENAPI]


async def test_document_and_router_agree(stack: Stack) -> None:
    doc = stack.app[OPENAPI]
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _app_routes(stack)


def _schema(doc: dict[str, Any], name: str) -> Draft202012Validator:
    return Draft202012Validator(doc["components"]["schemas"][name])


async def test_answers_match_their_documented_schemas(stack: Stack) -> None:
    doc = stack.app[OPENAPI]
    await stack.principal("t", "tester")  # makes the organisation "lab"
    async with stack.client(stack.admin) as admin:
        _schema(doc, "Principal").validate(await admin.whoami())
        _schema(doc, "OrgList").validate({"items": await admin.list_orgs()})
        _schema(doc, "PrincipalList").validate(await admin.request("GET", "/v1/principals"))
        _schema(doc, "Invite").validate(await admin.create_invite(role="tester", org="lab"))


# -- refusals, as the service really gives them ---------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class Refusal:
    """One request the service must refuse: what is sent, which operation of the document it is
    (`template`; None for a path the document does not have), and the status and code expected."""

    name: str
    method: str
    path: str
    template: str | None
    status: int
    code: str
    signer: str | None = None  # "admin", "tester" or "stranger" (a key never registered)
    body: bytes | None = None
    content_type: str | None = None


async def send(
    session: aiohttp.ClientSession,
    stack: Stack,
    method: str,
    path: str,
    *,
    signer: Identity | None = None,
    body: bytes | None = None,
    content_type: str | None = None,
) -> Answer:
    url = stack.url + path
    headers = {"Content-Type": content_type} if content_type else {}
    if signer is not None:
        headers = sign_headers(signer, method=method, url=url, body=body or b"", headers=headers)
    data = io.BytesIO(body) if body is not None else None  # aiohttp warns of a large bytes body
    async with session.request(method, url, data=data, headers=headers, allow_redirects=False) as resp:
        raw = await resp.read()
        return Answer(resp.status, resp.content_type, dict(resp.headers), json.loads(raw) if raw else None)


def problem_validator(doc: dict[str, Any], ref: str) -> Draft202012Validator:
    """A validator for the schema `ref` points to, resolving references inside the document."""
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": DOC_URI + ref}, registry=registry)


def disagreements(doc: dict[str, Any], case: Refusal, answer: Answer) -> list[str]:
    """How the document and this real answer disagree; empty if they do not."""
    found: list[str] = []
    if answer.status != case.status:
        return [f"answered {answer.status}, expected {case.status}: {answer.body}"]
    if answer.content_type != PROBLEM_JSON:
        found.append(f"Content-Type is {answer.content_type!r}, not {PROBLEM_JSON}")
    # The schema to check against is the one the document gives for this operation and status;
    # for a path or method the document does not have, the document's Problem schema.
    ref = "#/components/schemas/Problem"
    if case.template is None:
        if any(_matches(template, case.path) for template in doc["paths"]):
            found.append(f"{case.path} is a documented path, yet answered as an unknown one")
    elif case.method.lower() not in doc["paths"].get(case.template, {}):
        if case.template not in doc["paths"]:
            found.append(f"{case.template} is not a documented path")
    else:
        responses = doc["paths"][case.template][case.method.lower()]["responses"]
        documented = responses.get(str(answer.status))
        if documented is None:
            found.append(f"status {answer.status} is not documented (documented: {sorted(responses)})")
        else:
            content = documented.get("content", {})
            if list(content) != [PROBLEM_JSON]:
                found.append(f"status {answer.status} is documented as {list(content)}, not {PROBLEM_JSON}")
            else:
                ref = content[PROBLEM_JSON]["schema"]["$ref"]
    errors = sorted(problem_validator(doc, ref).iter_errors(answer.body), key=str)
    found += [f"body fails {ref}: {e.message} at {list(e.absolute_path)}" for e in errors]
    body = answer.body if isinstance(answer.body, dict) else {}
    if body.get("status") != answer.status:
        found.append(f"the body's status {body.get('status')!r} is not the answer's {answer.status}")
    if body.get("code") != case.code:
        found.append(f"code {body.get('code')!r}, expected {case.code!r}")
    if body.get("type") != "urn:exchange:problem:" + str(body.get("code")):
        found.append(f"type {body.get('type')!r} does not name the code")
    return found


def _matches(template: str, path: str) -> bool:
    a, b = template.strip("/").split("/"), path.split("?")[0].strip("/").split("/")
    return len(a) == len(b) and all(t == p or t.startswith("{") for t, p in zip(a, b, strict=True))


def _token(prefix: str = "exl1_") -> str:
    return prefix + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


ORG = json.dumps({"name": "another-org"}).encode()

REFUSALS = [
    Refusal("unsigned", "GET", "/v1/whoami", "/v1/whoami", 401, "missing-signature"),
    Refusal("unknown key", "GET", "/v1/whoami", "/v1/whoami", 401, "unknown-key", signer="stranger"),
    Refusal(
        "body fails its schema",
        "POST",
        "/v1/orgs",
        "/v1/orgs",
        400,
        "invalid-input",
        signer="admin",
        body=json.dumps({"name": "x", "colour": "red"}).encode(),
        content_type="application/json",
    ),
    Refusal(
        "body not JSON",
        "POST",
        "/v1/orgs",
        "/v1/orgs",
        400,
        "invalid-input",
        signer="admin",
        body=b"{not json",
        content_type="application/json",
    ),
    Refusal(
        "wrong media type",
        "POST",
        "/v1/orgs",
        "/v1/orgs",
        415,
        "unsupported-media-type",
        signer="admin",
        body=ORG,
        content_type="text/plain",
    ),
    Refusal(
        "body over the limit",
        "POST",
        "/v1/orgs",
        "/v1/orgs",
        413,
        "payload-too-large",
        signer="admin",
        body=b" " * (1024 * 1024 + 1),
        content_type="application/json",
    ),
    Refusal(
        "role refused",
        "POST",
        "/v1/orgs",
        "/v1/orgs",
        403,
        "role-required",
        signer="tester",
        body=ORG,
        content_type="application/json",
    ),
    Refusal(
        "org exists",
        "POST",
        "/v1/orgs",
        "/v1/orgs",
        409,
        "org-exists",
        signer="admin",
        body=json.dumps({"name": "lab"}).encode(),
        content_type="application/json",
    ),
    Refusal(
        "bad query parameter",
        "GET",
        "/v1/principals?limit=0",
        "/v1/principals",
        400,
        "invalid-input",
        signer="admin",
    ),
    Refusal(
        "unknown principal",
        "GET",
        "/v1/principals/nobody",
        "/v1/principals/{name}",
        404,
        "not-found",
        signer="admin",
    ),
    Refusal(
        "unknown artifact",
        "GET",
        "/v1/artifacts/art_00000000000000000000000000000000",
        "/v1/artifacts/{id}",
        404,
        "not-found",
        signer="admin",
    ),
    Refusal("unknown link token", "GET", "/l/" + _token(), "/l/{token}", 404, "link-unavailable"),
    Refusal("malformed link token", "GET", "/l/not-a-token", "/l/{token}", 404, "link-unavailable"),
    Refusal("unknown route", "GET", "/v1/nothing-here", None, 404, "not-found", signer="admin"),
    Refusal("method not allowed", "PUT", "/v1/orgs", "/v1/orgs", 405, "method-not-allowed", signer="admin"),
]


async def test_real_refusals_are_documented_problems(stack: Stack) -> None:
    identities = {
        "admin": stack.admin,
        "tester": await stack.principal("t", "tester"),
        "stranger": Identity.generate(),
    }
    async with aiohttp.ClientSession() as session:
        doc = (await send(session, stack, "GET", "/openapi.json")).body
        found = {}
        for case in REFUSALS:
            answer = await send(
                session,
                stack,
                case.method,
                case.path,
                signer=identities[case.signer] if case.signer else None,
                body=case.body,
                content_type=case.content_type,
            )
            if problems := disagreements(doc, case, answer):
                found[case.name] = problems
            if case.status == 405:
                # RFC 9110: a 405 names the allowed methods; they are the documented ones.
                allowed = set(answer.headers.get("Allow", "").split(",")) - {"HEAD"}
                assert {m.strip().lower() for m in allowed} == set(doc["paths"][case.path]), answer.headers
    assert found == {}


@pytest.fixture
async def limited_stack(
    tmp_path: Path, database_url: str, seaweed: SeaweedFS, clock: FakeClock
) -> AsyncIterator[Stack]:
    """A stack whose per-source budgets run out after two refusals."""
    s = await start_stack(
        tmp_path, database_url, seaweed, clock, redeem_ip_burst_requests=2, auth_failure_burst_requests=2
    )
    yield s
    await s.server.close()


@pytest.mark.parametrize(
    ("path", "template"),
    [
        pytest.param("/l/" + _token(), "/l/{token}", id="link redemptions"),
        pytest.param("/v1/whoami", "/v1/whoami", id="unsigned requests"),
    ],
)
async def test_rate_limited_refusals_are_documented_problems(
    limited_stack: Stack, path: str, template: str
) -> None:
    stack = limited_stack
    async with aiohttp.ClientSession() as session:
        doc = (await send(session, stack, "GET", "/openapi.json")).body
        statuses = [(await send(session, stack, "GET", path)).status for _ in range(2)]
        assert statuses[0] in (401, 404) and len(set(statuses)) == 1
        answer = await send(session, stack, "GET", path)
    assert int(answer.headers["Retry-After"]) >= 1
    assert (
        disagreements(doc, Refusal("rate limited", "GET", path, template, 429, "rate-limited"), answer) == []
    )

"""The OpenAPI document is valid 3.1, lists exactly the app's routes, and describes real answers."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from exchange.api.keys import OPENAPI
from tests.conftest import Stack


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
    tester = await stack.principal("t", "tester")
    async with stack.client(stack.admin) as admin:
        _schema(doc, "Principal").validate(await admin.whoami())
        _schema(doc, "OrgList").validate({"items": await admin.list_orgs()})
        _schema(doc, "PrincipalList").validate(await admin.request("GET", "/v1/principals"))
        _schema(doc, "Invite").validate(await admin.create_invite(role="tester", org="lab"))
    async with stack.client(tester) as c:
        try:
            await c.list_orgs()
        except Exception as exc:  # a problem detail: check its documented shape too
            _schema(doc, "Problem").validate(
                {
                    "type": "urn:exchange:problem:" + exc.code,
                    "title": "t",
                    "status": 403,
                    "detail": str(exc),
                    "code": exc.code,
                }
            )

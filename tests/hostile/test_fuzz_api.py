"""Schemathesis against /openapi.json on the real service (real SeaweedFS, real SQLite): every
phase, positive and negative data, requests signed as the admin. No answer is a 5xx, every answer
matches its documented schema and media type, and a negative case is refused and changes no row."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from exchange.client.signing import sign_headers
from exchange.dev.seaweed import SeaweedFS
from exchange.identity import Identity
from tests.conftest import Served, serve_process

#: Rows that a refused request must leave alone (the audit log grows by design).
TABLES = ("orgs", "principals", "invites")


class SignedAuth(requests.auth.AuthBase):
    """Sign each prepared request exactly as the SDK does."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if "Signature" in r.headers:
            return r  # the case itself is testing authentication: send what it made
        body = r.body if isinstance(r.body, bytes) else (r.body or "").encode()
        headers = dict(r.headers)
        signed = sign_headers(
            self.identity, method=r.method or "GET", url=r.url or "", body=body, headers=headers
        )
        r.headers.update(signed)
        return r


def row_counts(served: Served) -> dict[str, int]:
    with sqlite3.connect(f"file:{served.home / 'exchange.db'}?mode=ro", uri=True) as conn:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}  # noqa: S608


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    doc = requests.get(served.url + "/openapi.json", timeout=10).json()
    config = SchemathesisConfig.from_dict(
        {
            "generation": {"mode": "all", "max-examples": 25, "database": "none"},
            "checks": {
                "negative_data_rejection": {
                    "expected-statuses": [400, 401, 403, 404, 405, 409, 413, 415, 429]
                }
            },
            # The enrol schema says what it refuses (format `age-recipient`, checked by the body's
            # validator: the Bech32 checksum and the curve point), and Schemathesis's fuzzing
            # phase draws from the strategy registered below; its coverage phase, though, builds
            # strings from the pattern alone, which that format then rightly refuses (400).
            # tests/api/test_principals.py checks the refusal and the document's format.
            "operations": [
                {"include-path": "/v1/enroll", "checks": {"positive_data_acceptance": {"enabled": False}}}
            ],
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
            },
        }
    )
    return schemathesis.openapi.from_dict(doc, config=config)


@pytest.fixture(scope="module")
def served(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The service as people run it, with a failure budget the fuzzer cannot spend: it sends
    thousands of deliberately broken requests from one address, which the default budget would
    answer 429 (late) — fuzzing the gate instead of the handlers. The gate has tests of its own
    (tests/api/test_refusals.py)."""
    yield from serve_process(
        seaweed,
        tmp_path_factory,
        EXCHANGE_AUTH_FAILURE_REQUESTS_PER_MIN="100000000",
        EXCHANGE_AUTH_FAILURE_BURST_REQUESTS="100000000",
    )


@pytest.fixture(scope="module")
def session(served: Served) -> requests.Session:
    s = requests.Session()
    s.auth = SignedAuth(Identity.load(served.admin))
    return s


@pytest.fixture(scope="module")
def unsigned() -> requests.Session:
    return requests.Session()


# Values whose validity a JSON Schema cannot express (a Bech32 checksum) come from our own code.
schemathesis.openapi.format("age-recipient", st.builds(lambda: Identity.generate().public.age_recipient))
schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
def test_api_fuzz(
    case: Any, served: Served, session: requests.Session, unsigned: requests.Session, api_schema: Any
) -> None:
    before = row_counts(served)
    # A case that leaves out or breaks the signature on purpose is sent as it is.
    negated = api_schema.is_security_param_negated(case)
    response = case.call(base_url=served.url, session=unsigned if negated else session, timeout=30)
    assert response.status_code < 500, response.text
    # Every answer is documented and problem+json, the HTTP parser's own refusals included (a raw
    # byte in the request line is refused by aiohttp before any route: `connections._ProblemHandler`).
    case.validate_response(response)
    if case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE:
        if not 400 <= response.status_code < 500:
            # The one kind tolerated: a bodiless request to an operation that takes no body,
            # "negative" only in a Content-Type header. It carries no invalid data to refuse.
            assert not case.operation.body, f"negative case accepted: {case.as_curl_command()}"
            assert not response.request.body and set(case.headers or {}) <= {"Content-Type"}, (
                f"negative case accepted: {case.as_curl_command()}"
            )
        assert row_counts(served) == before

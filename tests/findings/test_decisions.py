"""The finding decisions over plain records, one scenario a row: who may move a finding where
(`check_move`) and who may see it (`may_see`). Rows with two faults pin the order of the checks:
an unknown status, then a move the lifecycle does not have, then who is asking."""

from __future__ import annotations

from dataclasses import replace

import pytest

from exchange.errors import Conflict, ExchangeError, ValidationError
from exchange.format.finding import MOVES
from exchange.services.findings import Finding, check_move, may_see
from exchange.services.principals import Principal


def principal(name: str, *, org: str, role: str) -> Principal:
    return Principal(
        id=f"prn_{name}",
        name=name,
        org_id=org,
        org_name=org.removeprefix("org_"),
        role=role,
        key_id=f"key_{name}",
        signing_public_key=bytes(32),
        age_recipient="age1" + "q" * 58,
        status="active",
        created_at_ms=0,
    )


DEVELOPER = principal("dev", org="org_dev", role="developer")  # of the owning organisation
REPORTER = principal("rep", org="org_lab", role="tester")
COLLEAGUE = principal("col", org="org_lab", role="tester")  # the reporter's organisation
OWN_TESTER = principal("own", org="org_dev", role="tester")
OTHER_DEVELOPER = principal("odev", org="org_lab", role="developer")
ADMIN = principal("root", org="org_ops", role="admin")
AUDITOR = principal("aud", org="org_ops", role="auditor")
STRANGER = principal("x", org="org_else", role="developer")

FINDING = Finding(
    id="fnd_1",
    artifact_id="art_1",
    artifact_name="model-v1",
    org_id="org_dev",
    org_name="dev",
    reporter_id=REPORTER.id,
    reporter_name=REPORTER.name,
    reporter_org_id="org_lab",
    reporter_org_name="lab",
    body_id="art_body",
    attachments_id=None,
    title="a jailbreak",
    severity="high",
    category="safeguard bypass",
    status="submitted",
    created_at_ms=0,
    updated_at_ms=0,
)

SKIPS = ("move-skips-lifecycle", Conflict)
NOT_PERMITTED = ("move-not-permitted", Conflict)
UNKNOWN = ("invalid-input", ValidationError)

# (status now, asked to become, who asks, (code, exception class))
REFUSED = [
    pytest.param("submitted", "done", DEVELOPER, UNKNOWN, id="an unknown status"),
    pytest.param("submitted", "Closed", REPORTER, UNKNOWN, id="a status spelt otherwise"),
    pytest.param(
        "closed", "done", STRANGER, UNKNOWN, id="an unknown status, by a stranger: the status first"
    ),
    pytest.param("submitted", "validated", DEVELOPER, SKIPS, id="submitted to validated skips acknowledging"),
    pytest.param("submitted", "submitted", DEVELOPER, SKIPS, id="to the status it has"),
    pytest.param("acknowledged", "submitted", DEVELOPER, SKIPS, id="backwards"),
    pytest.param("submitted", "closed", REPORTER, SKIPS, id="closed before it is remediated"),
    pytest.param("closed", "acknowledged", DEVELOPER, SKIPS, id="reopened past submitted"),
    pytest.param("remediated", "wont-fix", DEVELOPER, SKIPS, id="remediated, then won't fix"),
    pytest.param(
        "submitted", "validated", STRANGER, SKIPS, id="a skipping move by a stranger: the lifecycle first"
    ),
    pytest.param(
        "submitted", "acknowledged", OWN_TESTER, NOT_PERMITTED, id="acknowledged by an owning tester"
    ),
    pytest.param(
        "submitted",
        "acknowledged",
        OTHER_DEVELOPER,
        NOT_PERMITTED,
        id="acknowledged by another org's developer",
    ),
    pytest.param("submitted", "acknowledged", REPORTER, NOT_PERMITTED, id="acknowledged by its reporter"),
    pytest.param("acknowledged", "validated", ADMIN, NOT_PERMITTED, id="validated by an admin"),
    pytest.param("validated", "wont-fix", AUDITOR, NOT_PERMITTED, id="won't fix, by an auditor"),
    pytest.param("remediated", "closed", DEVELOPER, NOT_PERMITTED, id="closed by the owning developer"),
    pytest.param("wont-fix", "closed", COLLEAGUE, NOT_PERMITTED, id="closed by the reporter's colleague"),
    pytest.param("closed", "submitted", ADMIN, NOT_PERMITTED, id="reopened by an admin"),
    pytest.param(
        "remediated",
        "closed",
        replace(REPORTER, id="prn_other", name=REPORTER.name),
        NOT_PERMITTED,
        id="closed by another principal of the reporter's name: the id counts",
    ),
]


@pytest.mark.parametrize(("status", "to", "who", "expected"), REFUSED)
def test_moves_refused(
    status: str, to: str, who: Principal, expected: tuple[str, type[ExchangeError]]
) -> None:
    code, cls = expected
    with pytest.raises(ExchangeError) as refused:
        check_move(replace(FINDING, status=status), who, to)
    assert type(refused.value) is cls
    assert refused.value.code == code


ALLOWED = [
    pytest.param("submitted", "acknowledged", DEVELOPER, id="acknowledged by the owning developer"),
    pytest.param("acknowledged", "validated", DEVELOPER, id="validated by the owning developer"),
    pytest.param("validated", "remediated", DEVELOPER, id="remediated by the owning developer"),
    pytest.param("validated", "wont-fix", DEVELOPER, id="won't fix, by the owning developer"),
    pytest.param("remediated", "closed", REPORTER, id="closed by its reporter after remediation"),
    pytest.param("wont-fix", "closed", REPORTER, id="closed by its reporter after won't fix"),
    pytest.param("closed", "submitted", REPORTER, id="reopened by its reporter"),
]


@pytest.mark.parametrize(("status", "to", "who"), ALLOWED)
def test_moves_allowed(status: str, to: str, who: Principal) -> None:
    check_move(replace(FINDING, status=status), who, to)


def test_every_move_of_the_lifecycle_has_an_allowed_row() -> None:
    assert {(p.values[0], p.values[1]) for p in ALLOWED} == set(MOVES)


SEE = [
    pytest.param(DEVELOPER, True, id="the owning organisation's developer"),
    pytest.param(OWN_TESTER, True, id="the owning organisation's tester"),
    pytest.param(REPORTER, True, id="its reporter"),
    pytest.param(COLLEAGUE, True, id="the reporter's organisation"),
    pytest.param(ADMIN, True, id="an admin"),
    pytest.param(AUDITOR, True, id="an auditor"),
    pytest.param(STRANGER, False, id="a developer of a third organisation"),
    pytest.param(principal("t", org="org_else", role="tester"), False, id="a tester of a third organisation"),
]


@pytest.mark.parametrize(("who", "sees"), SEE)
def test_may_see(who: Principal, sees: bool) -> None:
    assert may_see(who, FINDING) is sees

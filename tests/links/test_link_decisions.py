"""Who may redeem a download link, or use an upload link, now: `check_link` and `check_usable`
over plain records, one scenario a row. Rows with two faults pin the order of the checks: the
reason logged is the first that applies."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from exchange.services.links import LinkRecord, check_link
from exchange.services.principals import Principal
from exchange.services.tokens import LinkRefused
from exchange.services.uploadlinks import UploadLink, check_usable

NOW = 1_700_000_000_000
LATER = NOW + 3_600_000
EARLIER = NOW - 3_600_000


def principal(name: str, *, org: str = "org_dev", role: str = "tester", status: str = "active") -> Principal:
    return Principal(
        id=f"prn_{name}",
        name=name,
        org_id=org,
        org_name=org.removeprefix("org_"),
        role=role,
        key_id=f"key_{name}",
        signing_public_key=bytes(32),
        age_recipient="age1" + "q" * 58,
        status=status,
        created_at_ms=EARLIER,
    )


#: The recipient of the same organisation as the artifact, and one of another (needs a grant).
INSIDER = principal("insider")
OUTSIDER = principal("outsider", org="org_lab")

LINK = LinkRecord(
    id="lnk_1",
    artifact_id="art_1",
    recipient=INSIDER,
    expires_at_ms=LATER,
    max_downloads=3,
    downloads=0,
    revoked_at_ms=None,
    artifact_status="complete",
    artifact_org_id="org_dev",
    grant_expires_at_ms=None,
    grant_revoked_at_ms=None,
    has_grant=False,
)
GRANTED = replace(LINK, recipient=OUTSIDER, has_grant=True)
NETWORKS = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8::/32"))
FENCED = replace(LINK, allowed_networks=NETWORKS)


def link(base: LinkRecord = LINK, **changes: Any) -> LinkRecord:
    return replace(base, **changes)


# (link, counting, ip, the reason it is refused)
REFUSED = [
    pytest.param(link(revoked_at_ms=EARLIER), False, None, "link-revoked", id="revoked"),
    pytest.param(
        link(revoked_at_ms=EARLIER, expires_at_ms=EARLIER, downloads=3),
        True,
        None,
        "link-revoked",
        id="revoked, expired and used up: revoked first",
    ),
    pytest.param(link(expires_at_ms=EARLIER), False, None, "link-expired", id="expired"),
    pytest.param(link(expires_at_ms=NOW), False, None, "link-expired", id="expiring this millisecond"),
    pytest.param(
        link(FENCED, expires_at_ms=EARLIER),
        False,
        "203.0.113.9",
        "link-expired",
        id="expired and from outside its networks: expired first",
    ),
    pytest.param(FENCED, False, "203.0.113.9", "ip-not-allowed", id="from outside its networks"),
    pytest.param(FENCED, False, None, "ip-not-allowed", id="from no IP address, with networks"),
    pytest.param(FENCED, False, "2001:db9::1", "ip-not-allowed", id="IPv6 outside its networks"),
    pytest.param(
        link(FENCED, recipient=replace(INSIDER, status="disabled")),
        False,
        "203.0.113.9",
        "ip-not-allowed",
        id="from outside its networks to a disabled recipient: the address first",
    ),
    pytest.param(
        link(recipient=replace(INSIDER, status="disabled")),
        False,
        None,
        "recipient-disabled",
        id="recipient disabled",
    ),
    pytest.param(
        link(recipient=replace(OUTSIDER, status="disabled"), artifact_status="uploading"),
        False,
        None,
        "recipient-disabled",
        id="recipient disabled, artifact uploading, no grant: recipient first",
    ),
    pytest.param(
        link(artifact_status="uploading"), False, None, "artifact-uploading", id="artifact uploading"
    ),
    pytest.param(link(artifact_status="aborted"), False, None, "artifact-aborted", id="artifact aborted"),
    pytest.param(
        link(recipient=OUTSIDER, artifact_status="uploading", downloads=3),
        True,
        None,
        "artifact-uploading",
        id="artifact uploading, no grant, used up: artifact first",
    ),
    pytest.param(link(recipient=OUTSIDER), False, None, "grant-missing", id="other organisation, no grant"),
    pytest.param(
        link(recipient=OUTSIDER, grant_revoked_at_ms=EARLIER),
        False,
        None,
        "grant-missing",
        id="other organisation, no grant row, stray revocation: missing first",
    ),
    pytest.param(
        link(GRANTED, grant_revoked_at_ms=EARLIER),
        False,
        None,
        "grant-revoked",
        id="other organisation, grant revoked",
    ),
    pytest.param(
        link(GRANTED, grant_revoked_at_ms=EARLIER, grant_expires_at_ms=EARLIER),
        False,
        None,
        "grant-revoked",
        id="other organisation, grant revoked and expired: revoked first",
    ),
    pytest.param(
        link(GRANTED, grant_expires_at_ms=NOW),
        False,
        None,
        "grant-expired",
        id="other organisation, grant expiring this millisecond",
    ),
    pytest.param(
        link(GRANTED, grant_expires_at_ms=EARLIER, downloads=3),
        True,
        None,
        "grant-expired",
        id="other organisation, grant expired, used up: grant first",
    ),
    pytest.param(link(downloads=3), True, None, "link-exhausted", id="used up, opening a session"),
    pytest.param(link(downloads=5), True, None, "link-exhausted", id="over-used, opening a session"),
    pytest.param(
        link(max_downloads=0, downloads=0), True, None, "link-exhausted", id="no downloads allowed at all"
    ),
    pytest.param(
        link(GRANTED, downloads=3), True, None, "link-exhausted", id="other organisation, granted, used up"
    ),
]


@pytest.mark.parametrize(("record", "counting", "ip", "reason"), REFUSED)
def test_links_refused(record: LinkRecord, counting: bool, ip: str | None, reason: str) -> None:
    with pytest.raises(LinkRefused) as refused:
        check_link(record, NOW, counting=counting, ip=ip)
    assert type(refused.value) is LinkRefused
    assert refused.value.reason == reason
    assert refused.value.code == "link-unavailable" and refused.value.status == 404
    assert refused.value.link_id == record.id


ALLOWED = [
    pytest.param(LINK, True, None, id="fresh, opening a session"),
    pytest.param(link(expires_at_ms=NOW + 1), True, None, id="one millisecond left"),
    pytest.param(link(downloads=2), True, None, id="one download left, opening a session"),
    pytest.param(link(downloads=3), False, None, id="used up, within an open session"),
    pytest.param(link(max_downloads=None, downloads=10**6), True, None, id="no download limit"),
    pytest.param(FENCED, True, "198.51.100.200", id="from inside its IPv4 network"),
    pytest.param(FENCED, True, "::ffff:198.51.100.7", id="IPv4-mapped, from inside its network"),
    pytest.param(FENCED, True, "2001:db8:1::5", id="from inside its IPv6 network"),
    pytest.param(LINK, True, "203.0.113.9", id="no networks: from anywhere"),
    pytest.param(GRANTED, True, None, id="other organisation, grant without expiry"),
    pytest.param(
        link(GRANTED, grant_expires_at_ms=NOW + 1), True, None, id="other organisation, grant current"
    ),
    pytest.param(
        link(has_grant=False, grant_revoked_at_ms=EARLIER, grant_expires_at_ms=EARLIER),
        True,
        None,
        id="same organisation: grants do not matter",
    ),
    pytest.param(
        link(recipient=principal("dev", role="developer")), True, None, id="a developer of the organisation"
    ),
]


@pytest.mark.parametrize(("record", "counting", "ip"), ALLOWED)
def test_links_allowed(record: LinkRecord, counting: bool, ip: str | None) -> None:
    check_link(record, NOW, counting=counting, ip=ip)


# -- upload links ---------------------------------------------------------------------------------

UPLOADER = principal("uploader", org="org_lab")

UPLOAD_LINK = UploadLink(
    id="upl_1",
    org_id="org_dev",
    org_name="dev",
    uploader_id=UPLOADER.id,
    uploader_name=UPLOADER.name,
    kind="report",
    max_bytes=10**6,
    note="",
    created_by_name="dev",
    created_at_ms=EARLIER,
    expires_at_ms=LATER,
    revoked_at_ms=None,
    artifact_id=None,
    used_at_ms=None,
)


def upload_link(**changes: Any) -> UploadLink:
    return replace(UPLOAD_LINK, **changes)


USED = {"artifact_id": "art_1", "used_at_ms": EARLIER}

# (link, who asks, resuming, the reason it is refused)
UPLOAD_REFUSED = [
    pytest.param(UPLOAD_LINK, INSIDER, False, "not-the-uploader", id="asked by another principal"),
    pytest.param(
        upload_link(revoked_at_ms=EARLIER, expires_at_ms=EARLIER),
        INSIDER,
        False,
        "not-the-uploader",
        id="another principal, revoked and expired: the asker first",
    ),
    pytest.param(
        upload_link(**USED), INSIDER, True, "not-the-uploader", id="another principal resuming its upload"
    ),
    pytest.param(upload_link(revoked_at_ms=EARLIER), UPLOADER, False, "link-revoked", id="revoked"),
    pytest.param(
        upload_link(revoked_at_ms=EARLIER, **USED),
        UPLOADER,
        True,
        "link-revoked",
        id="revoked while its upload runs, resuming: revoked first",
    ),
    pytest.param(upload_link(**USED), UPLOADER, False, "link-used", id="used"),
    pytest.param(
        upload_link(expires_at_ms=EARLIER, **USED),
        UPLOADER,
        False,
        "link-used",
        id="used and expired: used first",
    ),
    pytest.param(upload_link(expires_at_ms=EARLIER), UPLOADER, False, "link-expired", id="expired"),
    pytest.param(
        upload_link(expires_at_ms=NOW), UPLOADER, False, "link-expired", id="expiring this millisecond"
    ),
    pytest.param(
        upload_link(expires_at_ms=EARLIER), UPLOADER, True, "link-expired", id="expired, resuming nothing"
    ),
]


@pytest.mark.parametrize(("record", "asker", "resuming", "reason"), UPLOAD_REFUSED)
def test_upload_links_refused(record: UploadLink, asker: Principal, resuming: bool, reason: str) -> None:
    with pytest.raises(LinkRefused) as refused:
        check_usable(record, asker, NOW, resuming=resuming)
    assert type(refused.value) is LinkRefused
    assert refused.value.reason == reason
    assert refused.value.code == "link-unavailable" and refused.value.link_id == record.id


UPLOAD_ALLOWED = [
    pytest.param(UPLOAD_LINK, False, id="fresh"),
    pytest.param(upload_link(expires_at_ms=NOW + 1), False, id="one millisecond left"),
    pytest.param(UPLOAD_LINK, True, id="fresh, resuming"),
    pytest.param(upload_link(**USED), True, id="used, resuming its upload"),
    pytest.param(upload_link(expires_at_ms=EARLIER, **USED), True, id="used and since expired, resuming"),
]


@pytest.mark.parametrize(("record", "resuming"), UPLOAD_ALLOWED)
def test_upload_links_allowed(record: UploadLink, resuming: bool) -> None:
    check_usable(record, UPLOADER, NOW, resuming=resuming)

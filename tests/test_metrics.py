"""`/metrics` on its own listener: counters that move by exactly what was sent, route templates
as labels, and no link token anywhere in a scrape."""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exchange.api import refusals
from exchange.api.audit import PUBLISHER
from exchange.api.metrics import start_metrics_site
from exchange.errors import ValidationError
from exchange.settings import Settings
from tests.conftest import FakeClock, Stack

TOKEN = "exl1_" + secrets.token_urlsafe(32)  # 43 base64url characters, like a real link token

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def scrape_url(stack: Stack) -> AsyncIterator[str]:
    runner, port = await start_metrics_site(stack.app, host="127.0.0.1", port=0)
    yield f"http://127.0.0.1:{port}/metrics"
    await runner.cleanup()


async def scrape(url: str) -> tuple[str, Samples]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return text, samples


def requests_of(samples: Samples, route: str, method: str, status: int) -> float:
    return samples.get(
        ("exchange_http_requests_total", (("method", method), ("route", route), ("status", str(status)))), 0.0
    )


async def test_counters_move_by_what_was_sent_and_no_token_is_a_label(stack: Stack, scrape_url: str) -> None:
    _, before = await scrape(scrape_url)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(stack.url + "/healthz") as resp:
                assert resp.status == 200
        async with session.get(stack.url + "/v1/whoami") as resp:
            assert resp.status == 401
        for _ in range(2):
            async with session.get(f"{stack.url}/l/{TOKEN}") as resp:
                assert resp.status == 404  # a well-formed token no link has: a refused redemption
        async with session.get(f"{stack.url}/nowhere/{TOKEN}") as resp:
            assert resp.status == 404
    text, after = await scrape(scrape_url)

    def moved(route: str, method: str, status: int) -> float:
        return requests_of(after, route, method, status) - requests_of(before, route, method, status)

    assert moved("/healthz", "GET", 200) == 3
    assert moved("/v1/whoami", "GET", 401) == 1
    assert moved("/l/{token}", "GET", 404) == 2
    assert moved("unmatched", "GET", 404) == 1
    redemptions = ("exchange_link_redemptions_total", (("kind", "view"), ("outcome", "refused")))
    assert after[redemptions] - before.get(redemptions, 0.0) == 2
    assert (
        after["exchange_http_request_duration_seconds_count", (("method", "GET"), ("route", "/healthz"))] >= 3
    )
    # The link's lookup went to the database; the token never reached a label or anything else.
    assert after["exchange_database_seconds_count", (("op", "read"),)] > 0
    assert TOKEN not in text and TOKEN[5:] not in text and "/nowhere" not in text
    # The registry is the app's own: nothing of the process-wide default registry's.
    assert "python_gc_objects_collected_total" not in text


async def test_audit_appends_refusal_summaries_and_storage(
    stack: Stack, scrape_url: str, clock: FakeClock
) -> None:
    _, before = await scrape(scrape_url)
    assert math.isnan(before["exchange_checkpoint_age_seconds", ()])  # none published yet
    events_before = await stack.count("audit_events")
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.url + "/readyz") as resp:  # pings storage
            assert resp.status == 200
        # Two past the allowance: those two are counted into a summary, not appended alone.
        for _ in range(stack.settings.refusal_log_allowance_events + 2):
            async with session.get(stack.url + "/v1/whoami") as resp:
                assert resp.status == 401
    summaries = await refusals.flush(stack.app, final=True)
    assert summaries >= 1
    events = await stack.count("audit_events") - events_before
    _, after = await scrape(scrape_url)
    appends = after["exchange_audit_appends_total", ()] - before.get(
        ("exchange_audit_appends_total", ()), 0.0
    )
    assert events > 0 and appends == events
    moved = after["exchange_refusal_summaries_total", ()] - before.get(
        ("exchange_refusal_summaries_total", ()), 0.0
    )
    assert moved == summaries
    assert any(name == "exchange_storage_seconds_count" and v > 0 for (name, _), v in after.items())
    # The checkpoint's age counts from when it was stored, on the service's clock.
    assert await stack.app[PUBLISHER].publish() is not None
    clock.advance(7)
    _, aged = await scrape(scrape_url)
    assert aged["exchange_checkpoint_age_seconds", ()] == 7.0


@pytest.mark.parametrize(
    "changes",
    [
        {"log_format": "xml"},
        {"metrics_port": 70000},
        {"metrics_port": 8080},
        {"shutdown_grace_s": float("nan")},
    ],
)
def test_operations_settings_are_checked(changes: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**changes)  # type: ignore[arg-type]  # deliberately wrong values

"""Debian's Chromium, headless, driven by Playwright (its driver only: it never downloads a browser).

`page` is a fresh browser context and page for each test: no shared cookies, storage or
clipboard. The flags are the ones this closed network needs (no background connections, no
component updates) plus what running as root in a container needs (`--no-sandbox`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

CHROMIUM = os.environ.get("EXCHANGE_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
#: Where the screenshots README shows live. The tests take every screenshot on every run, but
#: write them there only with EXCHANGE_UPDATE_SCREENSHOTS=1 (so a test run leaves the tree as it
#: was); otherwise into a temporary folder.
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
SCREENSHOTS = (
    DOCS_SCREENSHOTS
    if os.environ.get("EXCHANGE_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "exchange-screenshots"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One browser per module: sync Playwright runs an event loop on this thread while it is
    open, which the async tests of other modules must not find running."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: scripts/test installs Debian's chromium (apt-get install chromium)"
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB", timezone_id="UTC")
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def screenshot(page: Page, name: str) -> Path:
    """Save the whole page as NAME.png in SCREENSHOTS (docs/screenshots/ when updating them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    return path

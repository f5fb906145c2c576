"""The link pages in a real browser (Debian's Chromium through Playwright) against a real
`exchange serve`: what a person sees, that the copy buttons copy exactly what is shown, and that
what they copy, run in a shell, fetches and decrypts the files (with the real `curl`, `age` and
`exchange`) and runs nothing an uploader wrote.

One stack for the module: `dana` (developer of lab) uploads an artifact whose name and paths are
hostile, grants it to `tess` (tester of aisi) and makes her a link; `tess` opens it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Request

from exchange.sizes import format_size
from tests.artifacts.conftest import write
from tests.browser.conftest import screenshot
from tests.conftest import Served

#: The artifact's name: markup, a quote and a shell command (the service refuses '/' and controls).
NAME = "<img src=x onerror=alert(1)>'; rm -rf ~"
#: Its files, by path under the uploaded directory, with their sizes.
FILES = {
    "$(touch PWNED).bin": 150_000,
    'it\'s "quoted" `touch PWNED`.txt': 2_048,
    "<script>alert(1)</script>": 700,  # a directory `<script>alert(1)<` holding `script>`
    "$(touch /tmp/pwned)": 5,
    "report\u202egnp.exe": 1_500_000,  # a right-to-left override: shown spelled out, not obeyed
}


@dataclass
class Shared:
    served: Served
    dev: Path
    tester: Path
    root: Path
    data: dict[str, bytes]
    artifact: str
    url: str
    upload_url: str

    @property
    def token(self) -> str:
        return self.url.rsplit("/", 1)[1]


@dataclass
class Watch:
    """What the page did: console messages, uncaught errors, and every request it made."""

    console: list[ConsoleMessage] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def problems(self) -> list[str]:
        # A CSP violation is a console error ("Refused to …"); a missing file one too.
        return [m.text for m in self.console if m.type in ("error", "warning")] + self.errors


def watch(page: Page) -> Watch:
    seen = Watch()
    page.on("console", lambda message: seen.console.append(message))
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    page.on("request", lambda request: seen.requests.append(request))
    return seen


@pytest.fixture(scope="module")
def shared(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Shared:
    assert not Path("/tmp/pwned").exists()  # what the hostile path would make
    home = tmp_path_factory.mktemp("link-page")
    dev, tester = home / "dana.identity", home / "tess.identity"
    served.enrol("developer", "lab", "dana", dev)
    served.enrol("tester", "aisi", "tess", tester)
    root = home / "src" / "model"
    data = {path: write(root / path, size, seed=i + 1) for i, (path, size) in enumerate(FILES.items())}
    made = served.run(
        "--json", "upload", str(root), "--name", NAME, "--kind", "model-weights", "--to", "tess", identity=dev
    )
    assert made.returncode == 0, made.stderr
    artifact = json.loads(made.stdout)["id"]
    link = served.run(
        "link", "create", artifact, "--for", "tess", "--max-downloads", "3", "--expires", "3d", identity=dev
    )
    assert link.returncode == 0, link.stderr
    upload = served.run(
        "upload-link", "create", "--for", "tess", "--max-size", "1MB", "--kind", "report", identity=dev
    )
    assert upload.returncode == 0, upload.stderr
    return Shared(served, dev, tester, root, data, artifact, link.stdout.strip(), upload.stdout.strip())


def shell(command: str, cwd: Path, shared: Shared) -> subprocess.CompletedProcess[str]:
    """`command` as a person pastes it into bash: as tess, with exchange, curl and age on PATH."""
    env = shared.served.client_env() | {
        "EXCHANGE_IDENTITY": str(shared.tester),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy(page: Page, label: str) -> str:
    """Click the copy button of the command box `label`; return what the clipboard holds."""
    box = page.locator(
        ".command", has=page.locator(".bar span", has_text=re.compile(f"^{re.escape(label)}$"))
    )
    button = box.get_by_role("button", name=f"Copy: {label}")
    button.click()
    page.wait_for_function("b => b.textContent === 'Copied'", arg=button.element_handle())
    copied: str = page.evaluate("navigator.clipboard.readText()")
    shown = box.locator("pre, code").first.inner_text()
    assert copied == shown
    return copied


def view(shared: Shared) -> dict[str, Any]:
    """The link's JSON view, as an API client sees it."""
    with urllib.request.urlopen(shared.url, timeout=30) as answer:  # noqa: S310 - loopback
        return json.loads(answer.read())  # type: ignore[no-any-return]


def pwned(*roots: Path) -> list[Path]:
    found = [p for root in roots for p in root.rglob("PWNED")]
    return found + [p for p in (Path.cwd() / "PWNED", Path("/tmp/pwned")) if p.exists()]


def test_the_link_page_shows_the_artifact_and_its_copied_commands_fetch_it(
    shared: Shared, context: BrowserContext, page: Page, tmp_path: Path
) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=shared.served.url)
    seen = watch(page)
    page.goto(shared.url)

    # What it is, literally as the uploader named it, for whom, and what is left.
    assert page.locator("h1").inner_text() == NAME
    assert page.title() == f"{NAME} — exchange"
    assert page.locator("dd.kind").inner_text() == "model-weights"
    assert page.locator("dd.from").inner_text() == "lab, uploaded by dana"
    assert page.locator("dd.recipient").inner_text() == "tess of aisi"
    assert page.locator("dd.downloads").inner_text() == "0 of 3 used, 3 left"
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 3 days\)", page.locator("dd.expires").inner_text()
    )
    total = sum(FILES.values())
    assert page.locator("dd.total").inner_text() == f"{format_size(total)} in {len(FILES)} files"
    assert page.locator("dd.total span").get_attribute("title") == f"{total:,} bytes"
    rows = page.locator("tbody tr")
    shown = {
        rows.nth(i).locator("td.path").inner_text(): (
            rows.nth(i).locator("td.size").inner_text(),
            rows.nth(i).locator("td.size span").get_attribute("title"),
        )
        for i in range(rows.count())
    }
    spelled = {p: p.replace("\u202e", "\\u202e") for p in FILES}
    assert shown == {f"model/{spelled[p]}": (format_size(n), f"{n:,} bytes") for p, n in FILES.items()}
    # The name became no element, and no script but the page's own ran.
    assert page.locator("img").count() == 0 and page.locator("main script").count() == 0
    buttons = page.locator("button.copy")
    assert buttons.count() == 3 and all(buttons.nth(i).is_visible() for i in range(3))
    screenshot(page, "link-page")

    # Copy the key step, then the curl lines, and run them as pasted, in an empty directory.
    scratch = tmp_path / "curl"
    scratch.mkdir()
    key_step = copy(page, "age key")
    assert key_step == "exchange identity --age-secret --out key.txt"
    done = shell(key_step, scratch, shared)
    assert done.returncode == 0, done.stderr
    curl = copy(page, "curl + age")
    assert curl.splitlines() == view(shared)["commands"]["curl"]
    done = shell(curl, scratch, shared)
    assert done.returncode == 0, done.stderr
    files = view(shared)["files"]
    assert sorted(os.listdir(scratch)) == sorted(["key.txt"] + [f"file-{f['index']}" for f in files])
    for f in files:
        assert (scratch / f"file-{f['index']}").read_bytes() == shared.data[f["path"].removeprefix("model/")]

    # The exchange command, as copied (DIR is its one placeholder: a directory of that name).
    cli = tmp_path / "cli"
    cli.mkdir()
    command = copy(page, "exchange")
    assert command == view(shared)["commands"]["exchange"] and command.endswith(" -o DIR")
    done = shell(command, cli, shared)
    assert done.returncode == 0, done.stderr
    assert os.listdir(cli / "DIR") == ["model"]  # the paths as uploaded, under DIR
    for path, content in shared.data.items():
        assert (cli / "DIR" / "model" / path).read_bytes() == content
    assert pwned(tmp_path, shared.root.parent) == []

    # Two downloads counted; the page says so when opened again.
    page.reload()
    assert page.locator("dd.downloads").inner_text() == "2 of 3 used, 1 left"

    # No console error or CSP violation; the assets were asked for without a referrer, and no
    # request but the page's own navigation named the token.
    assert seen.problems() == []
    assets = [r for r in seen.requests if "/assets/" in r.url]
    assert {r.url.rsplit("/", 1)[1].split(".")[0] for r in assets} == {"link", "page", "icon"}
    for request in seen.requests:
        headers = request.all_headers()
        # Chromium reports a referrer it withheld as an empty value; without the policy this
        # would be the page's whole URL, token and all (same origin).
        assert not headers.get("referer"), (request.url, headers)
        if request.url != shared.url:
            assert shared.token not in request.url and shared.token[5:25] not in request.url


def test_without_the_clipboard_api_the_button_selects_and_copies(
    shared: Shared, context: BrowserContext, page: Page
) -> None:
    """Where `navigator.clipboard` is missing (a page over plain HTTP on another host), the button
    selects the block and copies it with `document.execCommand('copy')`."""
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=shared.served.url)
    # Run by Playwright before the page's own script, outside the page's CSP: no clipboard API.
    page.add_init_script("Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined})")
    seen = watch(page)
    page.goto(shared.url)
    assert page.evaluate("navigator.clipboard") is None
    # Another page of the same origin, with the clipboard API, sets and reads the clipboard.
    other = context.new_page()
    other.goto(shared.served.url + "/healthz")
    other.evaluate("navigator.clipboard.writeText('not copied yet')")
    page.bring_to_front()
    box = page.locator(".command", has=page.get_by_role("button", name="Copy: curl + age"))
    box.get_by_role("button").click()
    assert box.get_by_role("button").inner_text() == "Copied"
    shown = box.locator("pre").inner_text()
    assert page.evaluate("window.getSelection().toString()") == shown
    other.bring_to_front()
    assert other.evaluate("navigator.clipboard.readText()") == shown
    assert seen.problems() == []


@pytest.fixture
def no_script(browser: Browser) -> Iterator[Page]:
    """A page in a browser context with JavaScript off."""
    off = browser.new_context(java_script_enabled=False, locale="en-GB", timezone_id="UTC")
    yield off.new_page()
    off.close()


def test_without_javascript_the_commands_are_plain_text(shared: Shared, no_script: Page) -> None:
    page = no_script
    seen = watch(page)
    page.goto(shared.url)
    blocks = page.locator(".command pre")
    assert [blocks.nth(i).inner_text() for i in range(blocks.count())] == [
        view(shared)["commands"]["exchange"],
        "\n".join(view(shared)["commands"]["curl"]),
    ]
    assert page.locator("button.copy").count() == 3
    assert not any(page.locator("button.copy").nth(i).is_visible() for i in range(3))
    # The text selects like any other.
    page.locator(".command pre").first.select_text()
    assert page.evaluate("window.getSelection().toString()") == view(shared)["commands"]["exchange"]
    assert seen.problems() == []


def test_the_upload_link_page_says_what_it_is_and_its_command_uploads(
    shared: Shared, context: BrowserContext, page: Page, tmp_path: Path
) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=shared.served.url)
    seen = watch(page)
    page.goto(shared.upload_url)
    assert page.locator("h1").inner_text() == "An exchange upload link"
    assert "a browser cannot use it" in page.locator("main").inner_text()
    screenshot(page, "upload-link-page")
    command = copy(page, "exchange")
    assert command == f"exchange upload PATH --link '{shared.upload_url}'"
    # Run as copied, where PATH is the file to send.
    work = tmp_path / "upload"
    write(work / "PATH", 4096, seed=9)
    done = shell(command, work, shared)
    assert done.returncode == 0, done.stderr
    listed = shared.served.run("--json", "artifacts", "ls", identity=shared.dev)
    assert listed.returncode == 0, listed.stderr
    (sent,) = [a for a in json.loads(listed.stdout) if a["name"] == "PATH"]
    assert (sent["kind"], sent["status"], sent["size"]) == ("report", "complete", 4096)
    assert seen.problems() == []
    for request in seen.requests:
        assert not request.all_headers().get("referer"), request.url

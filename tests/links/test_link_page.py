"""The pages a browser gets, over HTTP: a download link's page and an upload link's help page,
and the static files they use.

Strict headers on every page (the exact CSP, no-store, no-referrer, nosniff); every name an
uploader chose shown escaped and never in a command; assets at token-free, content-named paths
with the right types; the upload link's page for a browser that signs nothing (and looks nothing
up), while unsigned API clients still get the 401 and signed ones the JSON; and the token in no
access-log line, no asset URL and no error. Real stack: SeaweedFS, SQLite and PostgreSQL, and a
real `exchange serve` process for its log.
"""

from __future__ import annotations

import html
import json
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.api.pages import ASSETS, asset_url, relative
from exchange.client import links as links_api
from exchange.client import uploadlinks as uploadlinks_api
from exchange.client.transfer import upload
from exchange.dev.seaweed import SeaweedFS
from exchange.errors import ValidationError
from exchange.sizes import format_size
from tests.artifacts.conftest import write
from tests.conftest import Served, Stack, serve_process
from tests.links.conftest import Shared, fetch, make_link, share

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; base-uri 'none';"
    " form-action 'none'; frame-ancestors 'none'"
)
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
ASSETS_DIR = Path(__file__).resolve().parents[2] / "exchange" / "api" / "assets"

#: Artifact names an uploader may choose (the service refuses '/' and control characters in one).
HOSTILE_NAME = "<img src=x onerror=alert(1)>'; rm -rf ~ \u202e$(touch PWNED)"
#: File paths (a '/' separates directories, so the first is a directory and a file in it).
HOSTILE_PATHS = [
    "<script>alert(1)</script>",
    "$(touch /tmp/pwned)",
    "\"'; rm -rf ~ #.bin",
    "$(touch PWNED).bin",
    "report\u202egnp.exe",
    "`id`&<b>bold</b>.txt",
]


def assert_page_headers(headers: dict[str, str]) -> None:
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == CSP
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Robots-Tag"] == "noindex, nofollow"


def references(page: str) -> list[str]:
    """Every URL the page makes the browser load (src= and href= of its elements)."""
    return re.findall(r"\b(?:src|href)=\"?([^\s\">]+)", page)


def visible(text: str) -> str:
    """How the page spells a name: invisible characters as escapes (the CLI's `printable`)."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


async def hostile_share(stack: Stack, tmp_path: Path) -> Shared:
    dev = await stack.principal("dana", "developer", org="lab")
    tester = await stack.principal("tess", "tester", org="aisi")
    root = tmp_path / "src" / "model"
    for i, path in enumerate(HOSTILE_PATHS):
        write(root / path, 1000 * (i + 1) + 24, seed=i + 1)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, root, name=HOSTILE_NAME, kind="model-weights")
        await links_api.grant(c, artifact_id, "tess")
    return Shared(dev, tester, artifact_id, b"", root)


# -- the download link's page ---------------------------------------------------------------------


async def test_the_link_page_has_strict_headers_and_loads_only_its_own_token_free_assets(
    stack: Stack, tmp_path: Path
) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=3)
    token = url.rsplit("/", 1)[1]
    page = await fetch("GET", url, headers=BROWSER)
    assert page.status == 200
    assert_page_headers(page.headers)
    text = page.body.decode()
    assert '<meta name=robots content="noindex, nofollow">' in text
    assert "<meta name=referrer content=no-referrer>" in text
    # Exactly the service's three assets, by root-relative paths that hold no token.
    loaded = references(text)
    assert sorted(loaded) == sorted(asset_url(f) for f in ("link.js", "page.css", "icon.svg"))
    for ref in loaded:
        assert token not in ref and token[5:25] not in ref
    # Nothing inline: no style attribute or element, no event handler, one external script.
    assert re.findall(r"<script[^>]*>", text) == [f"<script src={asset_url('link.js')} defer>"]
    assert "<style" not in text and " style=" not in text and not re.search(r"\son\w+=", text)
    # The facts: human sizes with the bytes in a title, recipient, downloads left, expiry.
    assert f'<span title="150,000 bytes">{format_size(150_000)}</span> in 1 file' in text
    assert "<bdi>tess</bdi> of <bdi>aisi</bdi>" in text
    assert "0 of 3 used, 3 left" in text
    assert re.search(r"<time datetime=\"[0-9T:+-]+\">[0-9-]+ [0-9:]+ UTC</time> \(in 1 day\)", text), text
    # The commands, each in its copy box: the exchange and curl blocks, and the key step.
    data = (await fetch("GET", url)).json()
    blocks = [html.unescape(b) for b in re.findall(r"<pre>(.*?)</pre>", text, flags=re.S)]
    assert blocks == [data["commands"]["exchange"], "\n".join(data["commands"]["curl"])]
    assert "<code>exchange identity --age-secret --out key.txt</code>" in text
    assert text.count("<button type=button class=copy data-copy hidden") == 3


async def test_every_name_an_uploader_chose_is_escaped_and_reaches_no_command(
    stack: Stack, tmp_path: Path
) -> None:
    shared = await hostile_share(stack, tmp_path)
    url = await make_link(stack, shared)
    page = await fetch("GET", url, headers=BROWSER)
    assert page.status == 200
    text = page.body.decode()
    # Nothing the uploader wrote became markup, and no invisible character reached the page.
    assert "<script>" not in text and "<img" not in text and "<b>" not in text
    assert "\u202e" not in text
    assert len(re.findall(r"<script[^>]*>", text)) == 1
    # Each name is shown, escaped, spelled out, and isolated from the text around it.
    assert f"<h1><bdi>{html.escape(visible(HOSTILE_NAME))}</bdi></h1>" in text
    assert f"<title>{html.escape(visible(HOSTILE_NAME))} — exchange</title>" in text
    for path in HOSTILE_PATHS:
        assert f"<td class=path><bdi>{html.escape(visible('model/' + path))}</bdi></td>" in text
    # The commands name no path and no artifact name.
    for block in re.findall(r"<pre>(.*?)</pre>", text, flags=re.S):
        command = html.unescape(block)
        for name in [HOSTILE_NAME, *HOSTILE_PATHS, "model"]:
            assert name not in command
        assert "rm -rf" not in command and "touch" not in command and "<" not in command


async def test_a_control_character_never_reaches_the_page(stack: Stack, tmp_path: Path) -> None:
    """Newlines and ANSI escapes cannot be in a name at all: the client refuses them at upload."""
    dev = await stack.principal("dana", "developer", org="lab")
    src = tmp_path / "src" / "weights.bin"
    write(src, 10)
    async with stack.client(dev) as c:
        for name in ("line\nbreak", "\x1b[31mred\x1b[0m"):
            with pytest.raises(ValidationError):
                await upload(c, src, name=name, kind="model-weights")
    assert await stack.db.fetchval("SELECT COUNT(*) FROM artifacts") == 0


async def test_refusals_of_a_browser_name_no_token(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared)
    dead = url[: url.rindex("/") + 1] + "exl1_" + secrets.token_urlsafe(32)
    for target in (dead, url + "x", dead + "/challenge"):
        token = target.split("/l/", 1)[1].split("/", 1)[0]
        answer = await fetch("GET", target, headers=BROWSER)
        assert answer.status == 404
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert answer.json()["code"] == "link-unavailable"
        assert token not in answer.body.decode() and token[5:25] not in answer.body.decode()


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (3 * 86400 - 5, "in 3 days"),
        (36 * 3600, "in 2 days"),
        (86400, "in 1 day"),
        (5 * 3600 + 60, "in 5 hours"),
        (90, "in 2 minutes"),
        (60, "in 1 minute"),
        (59, "in under a minute"),
        (0, "now past"),
    ],
)
def test_expiry_is_said_as_people_say_it(seconds: int, said: str) -> None:
    assert relative(seconds * 1000) == said


# -- the assets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "content_type"),
    [("link.js", "text/javascript"), ("page.css", "text/css"), ("icon.svg", "image/svg+xml")],
)
async def test_assets_are_served_as_themselves_and_cacheable(
    stack: Stack, file: str, content_type: str
) -> None:
    path = asset_url(file)
    stem, suffix = file.split(".")
    assert re.fullmatch(rf"/assets/{stem}\.[0-9a-f]{{12}}\.{suffix}", path)
    answer = await fetch("GET", stack.url + path)
    assert answer.status == 200
    assert answer.headers["Content-Type"] == f"{content_type}; charset=utf-8"
    assert answer.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert answer.body == (ASSETS_DIR / file).read_bytes()


async def test_an_asset_name_that_is_not_served_is_a_problem(stack: Stack) -> None:
    # The file's plain name, another digest, a path out of the folder: none is served.
    stale = re.sub(r"\.[0-9a-f]{12}\.", ".000000000000.", asset_url("link.js"))
    for path in ("/assets/link.js", stale, "/assets/..%2Fpages.py", "/assets/%2e%2e%2fapp.py"):
        answer = await fetch("GET", stack.url + path)
        assert answer.status == 404, path
        assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert set(ASSETS) == {asset_url(f).rsplit("/", 1)[1] for f in ("link.js", "page.css", "icon.svg")}


# -- the upload link's page -----------------------------------------------------------------------


async def test_a_browser_opening_an_upload_link_gets_a_help_page_that_looks_nothing_up(
    stack: Stack,
) -> None:
    dana = await stack.principal("dana", "developer", org="lab")
    await stack.principal("tess", "tester", org="aisi")
    async with stack.client(dana) as c:
        made = await uploadlinks_api.create(c, "tess", kind="report", max_bytes=1_000_000)
    public = stack.settings.effective_public_url
    _, token = uploadlinks_api.split_upload_link(made["url"])
    events = len(await stack.events())
    page = await fetch("GET", f"{stack.url}/u/{token}", headers=BROWSER)
    assert page.status == 200
    assert_page_headers(page.headers)
    text = page.body.decode()
    assert "An exchange upload link" in text and "a browser cannot use it" in text
    (block,) = re.findall(r"<pre>(.*?)</pre>", text, flags=re.S)
    assert html.unescape(block) == f"exchange upload PATH --link '{public}/u/{token}'"
    assert sorted(references(text)) == sorted(asset_url(f) for f in ("link.js", "page.css", "icon.svg"))
    # A static page: no audit event, and a token never made gets the very same page (its own URL).
    unknown = "exu1_" + secrets.token_urlsafe(32)
    other = await fetch("GET", f"{stack.url}/u/{unknown}", headers=BROWSER)
    assert other.status == 200
    assert other.body.decode() == text.replace(token, unknown)
    assert len(await stack.events()) == events
    # A malformed token is not put into a command: the uniform 404, as a problem, naming no token.
    bad = await fetch("GET", f"{stack.url}/u/exu1_'$(touch PWNED)'", headers=BROWSER)
    assert bad.status == 404 and bad.json()["code"] == "link-unavailable"
    assert "PWNED" not in bad.body.decode()


async def test_api_clients_of_an_upload_link_keep_their_answers(stack: Stack) -> None:
    dana = await stack.principal("dana", "developer", org="lab")
    tess = await stack.principal("tess", "tester", org="aisi")
    async with stack.client(dana) as c:
        made = await uploadlinks_api.create(c, "tess", kind="report", max_bytes=1_000_000)
    _, token = uploadlinks_api.split_upload_link(made["url"])
    url = f"{stack.url}/u/{token}"
    # Unsigned, not a browser: the 401 problem, as before.
    for headers in ({}, {"Accept": "application/json"}, {"Accept": "text/html, application/json"}):
        answer = await fetch("GET", url, headers=headers)
        assert answer.status == 401, headers
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert answer.json()["code"] == "missing-signature"
    # A signature, even with a browser's Accept, goes through authentication: a bad one is a 401.
    forged = await fetch(
        "GET",
        url,
        headers=BROWSER | {"Signature-Input": 'sig=("@method");keyid="x"', "Signature": "sig=:AA==:"},
    )
    assert forged.status == 401 and forged.headers["Content-Type"].startswith("application/problem+json")
    # Signed by its uploader: the JSON view.
    async with stack.client(tess) as c:
        view = await uploadlinks_api.view(c, token)
    assert (view["uploader"], view["kind"], view["org"]) == ("tess", "report", "lab")


# -- the log of a real `exchange serve` -----------------------------------------------------------


@pytest.fixture(scope="module")
def logged(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`exchange serve` writing its access log (one JSON object a line, the format that has it)."""
    yield from serve_process(seaweed, tmp_path_factory, EXCHANGE_LOG_FORMAT="json")


def get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - a loopback test server
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def test_viewing_the_pages_leaves_no_token_in_the_log(logged: Served, tmp_path: Path) -> None:
    dev, tester = tmp_path / "dana.identity", tmp_path / "tess.identity"
    logged.enrol("developer", "lab", "dana", dev)
    logged.enrol("tester", "aisi", "tess", tester)
    write(tmp_path / "weights.bin", 5000, seed=3)
    made = logged.run("--json", "upload", str(tmp_path / "weights.bin"), "--to", "tess", identity=dev)
    assert made.returncode == 0, made.stderr
    artifact = json.loads(made.stdout)["id"]
    link = logged.run("link", "create", artifact, "--for", "tess", identity=dev)
    assert link.returncode == 0, link.stderr
    upload_link = logged.run("upload-link", "create", "--for", "tess", "--max-size", "1MB", identity=dev)
    assert upload_link.returncode == 0, upload_link.stderr
    urls = [link.stdout.strip(), upload_link.stdout.strip()]
    for url in urls:
        status, body = get(url, BROWSER)
        assert status == 200 and b"<!doctype html>" in body
        for ref in references(body.decode()):
            assert get(logged.url + ref, {})[0] == 200
    assert get(urls[0] + "/files/0", BROWSER)[0] == 403  # a refusal, logged and audited
    log = (logged.home / "serve.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [line["message"] for line in lines if line.get("logger") == "exchange.access"]
    # The access log is on and names each route by its template (the log's own redaction
    # spells a link's as `[redacted]`)...
    for line in (
        r"GET /l/\S+ 200",
        r"GET /u/\S+ 200",
        r"GET /assets/\{name\} 200",
        r"GET /l/\S+/files/\S+ 403",
    ):
        assert any(re.match(line + " ", message) for message in access), (line, access)
    # ...and no token, nor a good part of one, is anywhere in the log.
    for url in urls:
        token = url.rsplit("/", 1)[1]
        assert token not in log and token[5:] not in log and token[5:25] not in log

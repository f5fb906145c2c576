"""The pages a person's browser is shown, and the static files they use.

Two pages: a download link's (`GET /l/TOKEN` asking for HTML: what the artifact is, who it is
for, its files, when the link expires, what is left of it, and the exact commands that fetch and
decrypt it), and an upload link's help page (`GET /u/TOKEN` from a browser, which cannot use that
signed API: what the link is, and the command that uses it). The handlers in `api/links.py` and
`api/uploadlinks.py` decide and fetch; this module only renders, from plain values.

Every string an uploader chose (artifact and file names, kinds, organisation and principal
names) is hostile: it is shown with its controls, bidirectional overrides and other invisible
characters spelled out as escapes (as the CLI's `printable` does), HTML-escaped, and isolated in
a `<bdi>` so that right-to-left text cannot reorder the sentence around it. No such string
reaches a command: the commands are built from the link's URL alone (`inert_url`).

The pages carry a strict CSP (`default-src 'none'`, then `'self'` for scripts, styles and images
only, and nothing inline), `Referrer-Policy: no-referrer` (a page's URL holds a capability: no
request it makes, for its own assets either, may name it), `Cache-Control: no-store` and
`noindex`. The one script (`assets/link.js`) only adds copy buttons; without it the commands are
plain selectable text. Assets are served under names that carry a digest of their content
(`/assets/link.1a2b3c4d5e6f.js`), so they can be cached as immutable and never go stale; their
URLs hold no token.

What this module does not do: look anything up, count anything or write to the audit log (the
download link's view is an audit event, written by `services.links.view`; the upload link's help
page is static and writes none), or serve any file that is not in `assets/`.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ..errors import NotFound
from ..settings import Settings
from ..sizes import format_size
from ..text import printable
from .routing import Route, path_param
from .schemas import Schema

__all__ = [
    "ASSETS",
    "PAGE_HEADERS",
    "ROUTES",
    "asset_url",
    "inert_url",
    "link_page",
    "relative",
    "schemas",
    "upload_link_page",
    "wants_html",
    "wants_page",
]

#: Every page's headers. The CSP is the whole policy: no inline script or style, nothing from
#: elsewhere, no forms, no framing, no <base>.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; base-uri 'none';"
        " form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
}

#: An asset's answer: cacheable for a year (its name changes with its content), and nothing in
#: it may run or load anything when opened on its own (an SVG is a document too).
_ASSET_HEADERS = {
    "Cache-Control": "public, max-age=31536000, immutable",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@dataclass(frozen=True)
class Asset:
    file: str  # in assets/: link.js
    name: str  # as served: link.1a2b3c4d5e6f.js
    body: bytes
    content_type: str


def _load_assets() -> dict[str, Asset]:
    """The files of `assets/`, by their served name (stem, digest, suffix), read once at import."""
    found: dict[str, Asset] = {}
    for entry in resources.files(__package__).joinpath("assets").iterdir():
        stem, dot, suffix = entry.name.rpartition(".")
        if not dot or f".{suffix}" not in _TYPES:
            continue
        body = entry.read_bytes()
        served = f"{stem}.{hashlib.sha256(body).hexdigest()[:12]}.{suffix}"
        found[served] = Asset(entry.name, served, body, _TYPES[f".{suffix}"])
    return found


#: The assets, by served name.
ASSETS = _load_assets()
_BY_FILE = {a.file: a for a in ASSETS.values()}


def asset_url(file_name: str) -> str:
    """The path `assets/FILE_NAME` is served at (a KeyError for a file that is not there)."""
    return f"/assets/{_BY_FILE[file_name].name}"


async def asset(request: web.Request) -> web.Response:
    found = ASSETS.get(request.match_info["name"])
    if found is None:
        raise NotFound("no such asset")
    return web.Response(
        body=found.body, content_type=found.content_type, charset="utf-8", headers=_ASSET_HEADERS
    )


# -- who gets a page ------------------------------------------------------------------------------


def wants_html(request: web.Request) -> bool:
    """A browser navigating: it asks for HTML, and not for JSON."""
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "application/json" not in accept


def wants_page(request: web.Request) -> bool:
    """A browser navigating to a signed route (`Route.page`): it asks for HTML and signs nothing.
    A request with any signature header goes through authentication as usual."""
    signed = "Signature" in request.headers or "Signature-Input" in request.headers
    return wants_html(request) and not signed


# -- text -----------------------------------------------------------------------------------------


#: What a URL put into a printed command may hold: nothing a shell gives a meaning to inside
#: single or double quotes (no quote, `$`, backquote, backslash or `!`), no space, no control.
_INERT_URL = re.compile(r"https?://[A-Za-z0-9.:\[\]%/_~-]+")


def inert_url(url: str) -> str:
    """`url` percent-encoded for a command line; ValueError if a shell would still give any of it
    a meaning (then no command is printed at all)."""
    quoted = quote(url, safe=":/[]")
    if not _INERT_URL.fullmatch(quoted):
        raise ValueError("the link URL has characters a shell would interpret")
    return quoted


def _chosen(text: object) -> str:
    """A string somebody else chose, ready for HTML: visible, escaped, and isolated."""
    return f"<bdi>{html.escape(printable(text))}</bdi>"


def _size(n: int) -> str:
    """A human size, the exact bytes in its title (shown on hover)."""
    return f'<span title="{n:,} bytes">{format_size(n)}</span>'


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def relative(delta_ms: int) -> str:
    """How far off a moment is, as people say it: 'in 3 days', 'in 5 hours', 'in 1 minute'
    (rounded to the nearest of the largest unit that fits), 'in under a minute', 'now past'."""
    if delta_ms <= 0:
        return "now past"
    seconds = delta_ms / 1000
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            return f"in {_plural(int(seconds / size + 0.5), unit)}"  # half up, not to even
    return "in under a minute"


def _command(label: str, text: str, *, block: bool = True) -> str:
    """A command box: its label, a copy button (hidden until the page's script shows it) and the
    command as plain text. Commands are ours, never an uploader's; escaped all the same."""
    body = f"<pre>{html.escape(text)}</pre>" if block else f"<code>{html.escape(text)}</code>"
    return (
        f"<div class=command><div class=bar><span>{html.escape(label)}</span>"
        f'<button type=button class=copy data-copy hidden aria-label="Copy: {html.escape(label)}">'
        f"Copy</button></div>{body}</div>"
    )


def _document(title: str, eyebrow: str, body: str) -> str:
    """The page around `body`; `title` is HTML already (escaped by the caller)."""
    return (
        "<!doctype html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        '<meta name=viewport content="width=device-width, initial-scale=1">\n'
        '<meta name=robots content="noindex, nofollow">\n<meta name=referrer content=no-referrer>\n'
        f"<title>{title}</title>\n"
        f"<link rel=icon href={asset_url('icon.svg')}>\n"
        f"<link rel=stylesheet href={asset_url('page.css')}>\n"
        f"<script src={asset_url('link.js')} defer></script>\n"
        f"</head>\n<body>\n<main>\n<p class=eyebrow>{html.escape(eyebrow)}</p>\n{body}\n</main>\n"
        "</body>\n</html>\n"
    )


# -- the pages ------------------------------------------------------------------------------------


def link_page(view: dict[str, Any], *, recipient_org: str, now_ms: int) -> str:
    """A download link's page, from the link's JSON view (`api.links._view`)."""
    a = view["artifact"]
    files = view["files"]
    commands = view["commands"]
    rows = "\n".join(
        f"<tr><td><code>file-{int(f['index'])}</code></td><td class=path>{_chosen(f['path'])}</td>"
        f"<td class=size>{_size(int(f['size']))}</td></tr>"
        for f in files
    )
    total = int(a["size"])
    if view["max_downloads"] is None:
        downloads = f"{_plural(int(view['downloads']), 'download')} so far, no limit"
    else:
        used, most = int(view["downloads"]), int(view["max_downloads"])
        downloads = f"{used:,} of {most:,} used, {max(most - used, 0):,} left"
    expires = int(view["expires_at_ms"])
    iso = datetime.fromtimestamp(expires / 1000, tz=UTC).isoformat(timespec="seconds")
    when = f'<time datetime="{iso}">{_utc(expires)}</time>'
    body = f"""<h1>{_chosen(a["name"])}</h1>
<p class=lede>An encrypted {_chosen(a["kind"])} from {_chosen(a["org"])}, for {_chosen(view["recipient"])}
alone: only that principal's key decrypts it.</p>
<dl class=facts>
<dt>Kind</dt><dd class=kind>{_chosen(a["kind"])}</dd>
<dt>From</dt><dd class=from>{_chosen(a["org"])}, uploaded by {_chosen(a["created_by"])}</dd>
<dt>For</dt><dd class=recipient>{_chosen(view["recipient"])} of {_chosen(recipient_org)}</dd>
<dt>Size</dt><dd class=total>{_size(total)} in {_plural(len(files), "file")}</dd>
<dt>Expires</dt><dd class=expires>{when} ({relative(expires - now_ms)})</dd>
<dt>Downloads</dt><dd class=downloads>{downloads}</dd>
</dl>
<h2>Files</h2>
<table>
<thead><tr><th>saved by curl as</th><th>path</th><th class=size>size</th></tr></thead>
<tbody>
{rows}
</tbody>
<tfoot><tr><td></td><td>total</td><td class=size>{_size(total)}</td></tr></tfoot>
</table>
<h2>Download with exchange</h2>
<p>With the recipient's identity, exchange fetches every file, checks each against the uploader's
signed manifest, writes the real names into DIR and signs a receipt. One download, however many
files.</p>
{_command("exchange", commands["exchange"])}
<h2>Or with nothing but curl and age</h2>
<p>First write the recipient's age identity to key.txt (it is a secret: delete the file
afterwards):</p>
{_command("age key", "exchange identity --age-secret --out key.txt", block=False)}
<p>Then run these lines in the same shell: the first proves you hold the key and opens one download
session; each further line fetches one file and decrypts it into <code>file-N</code> (the table
above says which path each is).</p>
{_command("curl + age", chr(10).join(commands["curl"]))}
<footer>Looking at this page counts no download. The files are encrypted end to end: the service
never sees them in the clear. Every view and download is recorded in the service's audit log.</footer>"""
    return _document(f"{html.escape(printable(a['name']))} — exchange", "exchange · download link", body)


def upload_command(url: str) -> str:
    """The command that uses an upload link (`exchange upload … --link URL`), shell-inert."""
    return f"exchange upload PATH --link '{inert_url(url)}'"


def upload_link_page(url: str) -> str:
    """An upload link's help page: what it is and how to use it. Names nothing from the database."""
    body = f"""<h1>An exchange upload link</h1>
<p class=lede>This link lets one named principal upload one artifact into the organisation that
made it (a tester returning results, say). The upload is encrypted end to end, to that
organisation's developers and to the uploader.</p>
<p>It is not a web page to use: every request made with it must be signed by the key of the
principal it was made for, so a browser cannot use it, and nobody else can either. Use it with the
exchange CLI, signed in as that principal (<code>exchange whoami</code> shows who you are), with
PATH the file or directory to send:</p>
{_command("exchange", upload_command(url))}
<p class=note>The link can start one upload, of the kind and up to the size its maker chose, until
it expires. Run the same command again to resume an interrupted upload.</p>
<footer>This page looks nothing up: it says what any upload link is. The upload is recorded in the
service's audit log.</footer>"""
    return _document("Upload link — exchange", "exchange · upload link", body)


ROUTES = [
    Route(
        "GET",
        "/assets/{name}",
        asset,
        "page.asset",
        "A static file of the browser pages (script, style, icon), named by its content's digest;"
        " cacheable as immutable",
        "pages",
        auth="none",
        parameters=(path_param("name", "the file's served name, e.g. link.1a2b3c4d5e6f.js"),),
        errors=(404,),
    ),
]


def schemas(settings: Settings) -> dict[str, Schema]:
    return {}

"""A link opens a download only for whoever proves the recipient's key; the commands the link's
page prints are inert whatever the uploader named things, and fetch a whole artifact in one
counted session.

Real stack (SeaweedFS, SQLite and PostgreSQL), the real `curl`, `age`, `bash` and `exchange`.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from exchange.client import links as api
from exchange.client.transfer import upload
from exchange.errors import AgeNoIdentityMatch
from exchange.format import age, linkproof
from exchange.identity import Identity
from tests.artifacts.conftest import write
from tests.conftest import FakeClock, Stack, requires_age
from tests.links.conftest import Shared, fetch, make_link, proof, refusals, share

#: Names an uploader may choose that a shell would run, if they reached a command unquoted.
HOSTILE_NAMES = [
    "model.bin; touch PWNED; echo .bin",
    "$(touch PWNED).bin",
    "`touch PWNED`.bin",
    'it\'s "quoted" & | > PWNED.bin',
    "-rf --help.bin",
    "${IFS}touch${IFS}PWNED",
]


async def hostile_share(stack: Stack, tmp_path: Path) -> tuple[Shared, dict[str, bytes]]:
    dev = await stack.principal("dana", "developer", org="lab")
    tester = await stack.principal("tess", "tester", org="aisi")
    root = tmp_path / "src" / "$(touch PWNED)"
    data = {name: write(root / name, 1000 + i, seed=i + 1) for i, name in enumerate(HOSTILE_NAMES)}
    async with stack.client(dev) as c:
        artifact_id = await upload(c, root, kind="model-weights")
        await api.grant(c, artifact_id, "tess")
    return Shared(dev, tester, artifact_id, b"", root), data


def page_commands(page: str) -> list[str]:
    blocks = [html.unescape(b) for b in re.findall(r"<pre>(.*?)</pre>", page, flags=re.S)]
    assert len(blocks) == 2, page
    return blocks


def pwned(tmp_path: Path) -> list[Path]:
    """Files the payloads would have made (`touch PWNED` makes exactly that name)."""
    return [*tmp_path.rglob("PWNED"), *Path.cwd().glob("PWNED")]


@requires_age
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_pages_commands_are_inert_and_fetch_a_whole_artifact_in_one_download(
    stack: Stack, tmp_path: Path
) -> None:
    shared, data = await hostile_share(stack, tmp_path)
    # Six files behind a link that allows two downloads: one session must carry them all.
    url = await make_link(stack, shared, max_downloads=2)
    page = await fetch("GET", url, headers={"Accept": "text/html"})
    assert page.status == 200
    exchange_line, curl_lines = page_commands(page.body.decode())
    # The page names the configured public URL; the test server took a free port.
    public = stack.settings.effective_public_url
    for name in HOSTILE_NAMES:
        assert name not in exchange_line and name not in curl_lines
        assert html.escape(name) in page.body.decode()  # the table names them, escaped
    assert (await fetch("GET", url)).json()["commands"] == {
        "exchange": exchange_line,
        "curl": curl_lines.splitlines(),
    }

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "key.txt").write_text(shared.tester.age_key_file())
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        curl_lines.replace(public, stack.url),
        cwd=scratch,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    files = (await fetch("GET", url)).json()["files"]
    assert sorted(os.listdir(scratch)) == sorted(["key.txt"] + [f"file-{f['index']}" for f in files])
    for f in files:
        assert (scratch / f"file-{f['index']}").read_bytes() == data[f["path"].rsplit("/", 1)[1]]
    assert pwned(tmp_path) == []
    # All six files were one download.
    assert await stack.db.fetchval("SELECT downloads FROM links") == 1
    assert await stack.db.fetchval("SELECT COUNT(*) FROM link_sessions") == 1

    # The exchange line, run as printed (DIR is the one placeholder), writes the real names.
    identity = tmp_path / "tess.identity"
    shared.tester.save(identity)
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    env = os.environ | {
        "EXCHANGE_IDENTITY": str(identity),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    line = exchange_line.replace(public, stack.url).replace(" -o DIR", " -o out")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", line, cwd=cli_dir, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    (top,) = os.listdir(cli_dir / "out")
    assert top == "$(touch PWNED)"
    for name, content in data.items():
        assert (cli_dir / "out" / top / name).read_bytes() == content
    assert pwned(tmp_path) == []
    assert await stack.db.fetchval("SELECT downloads FROM links") == 2


async def test_a_name_with_a_newline_never_reaches_a_page(stack: Stack, tmp_path: Path) -> None:
    """The one hostile name that could break out of a line is refused at upload."""
    dev = await stack.principal("dana", "developer", org="lab")
    root = tmp_path / "src" / "model"
    write(root / "a\ntouch PWNED", 10)
    async with stack.client(dev) as c:
        with pytest.raises(Exception) as refused:
            await upload(c, root, kind="model-weights")
    assert getattr(refused.value, "code", None) == "unsafe-path"  # the client refuses before sending
    assert await stack.db.fetchval("SELECT COUNT(*) FROM artifacts") == 0


async def test_a_non_recipient_spends_nothing(stack: Stack, tmp_path: Path, clock: FakeClock) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=1)
    server, token = api.split_link(url)
    other = await make_link(stack, shared)
    mallory = Identity.generate()
    # The link alone gets the description, and a challenge mallory cannot open.
    assert (await fetch("GET", url)).status == 200
    sealed = (await fetch("GET", f"{url}/challenge")).body
    with pytest.raises(AgeNoIdentityMatch):
        age.decrypt(sealed, [mallory.age_identity])
    async with stack.client(mallory) as c:
        c.server = server
        with pytest.raises(AgeNoIdentityMatch):
            await api.download_link(c, token, tmp_path / "mallory")
    # Every way in without the proof is refused, in the log, and counts nothing.
    link_id = (await fetch("GET", url)).json()["link"]
    forged = linkproof.make_proof(os.urandom(32), link_id, clock.now_ms)  # not the service's key
    attempts = {
        f"{url}/files/0": "proof-required",
        f"{url}/header": "proof-required",
        f"{url}/files/0?proof=exp1_nonsense": "proof-malformed",
        f"{url}/files/0?proof={forged}": "proof-invalid",
        f"{url}/header?proof={await proof(other, shared.tester)}": "proof-invalid",  # another link's
    }
    for target, reason in attempts.items():
        before = len(await stack.events())
        answer = await fetch("GET", target)
        assert answer.status == 403, (target, answer.body)
        assert answer.json()["code"] == reason
        assert "Location" not in answer.headers
        (event,) = (await stack.events())[before:]
        assert event["outcome"] == {"result": "denied", "reason": reason}
        assert token not in str(event)
    no_proof = await fetch("POST", f"{url}/session", body={})
    assert (no_proof.status, no_proof.json()["code"]) == (403, "proof-required")
    assert await stack.db.fetchval("SELECT downloads FROM links WHERE max_downloads = 1") == 0
    assert await stack.db.fetchval("SELECT COUNT(*) FROM link_sessions") == 0
    # The recipient's single download still works.
    out = tmp_path / "out"
    async with stack.client(shared.tester) as c:
        c.server = server
        written, receipt = await api.download_link(c, token, out)
    assert written[0].read_bytes() == shared.data
    assert receipt["recipient"] == "tess"
    reasons = [e["outcome"]["reason"] for e in await refusals(stack)]
    assert reasons.count("proof-required") == 3


async def test_a_proof_opens_a_session_only_while_fresh(
    stack: Stack, tmp_path: Path, clock: FakeClock
) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, expires_in_s=86400)
    used = await proof(url, shared.tester)
    stale = await proof(url, shared.tester)
    opened = await fetch("GET", f"{url}/files/0?proof={used}")
    assert opened.status == 307
    clock.advance(stack.settings.link_proof_max_age_s + 1)
    late = await fetch("GET", f"{url}/files/0?proof={stale}")
    assert (late.status, late.json()["code"]) == (403, "proof-expired")
    # The proof that opened a session continues it, however old: it names that session.
    again = await fetch("GET", f"{url}/files/0?proof={used}")
    assert again.status == 307
    assert again.headers["X-Exchange-Session"] == opened.headers["X-Exchange-Session"]
    assert await stack.db.fetchval("SELECT downloads FROM links") == 1


async def test_one_proof_racing_itself_opens_one_session(stack: Stack, tmp_path: Path) -> None:
    shared = await share(stack, tmp_path)
    url = await make_link(stack, shared, max_downloads=5)
    key = await proof(url, shared.tester)
    answers = await asyncio.gather(
        *(fetch("GET", f"{url}/files/0?proof={key}") for _ in range(6)),
        *(fetch("POST", f"{url}/session", body={"proof": key}) for _ in range(4)),
    )
    assert [a.status for a in answers] == [307] * 6 + [200] * 4
    sessions = {a.headers["X-Exchange-Session"] for a in answers[:6]} | {
        a.json()["session"] for a in answers[6:]
    }
    assert len(sessions) == 1
    assert await stack.db.fetchval("SELECT downloads FROM links") == 1
    opened = [e for e in await stack.events() if e["action"] == "link.session"]
    assert len(opened) == 1 and opened[0]["actor"]["name"] == "tess"

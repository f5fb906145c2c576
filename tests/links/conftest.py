"""Fixtures for grants and links: a developer's complete upload, granted to a tester."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from exchange.client import links as api
from exchange.client.transfer import upload
from exchange.format import age
from exchange.identity import Identity
from tests.artifacts.conftest import write
from tests.conftest import Stack

#: What the tests' own HTTP requests call themselves, to find them in the log.
USER_AGENT = "links-test/1.0"


@dataclass
class Shared:
    dev: Identity
    tester: Identity
    artifact_id: str
    data: bytes
    path: Path


async def share(stack: Stack, tmp_path: Path, *, size: int = 150_000, grant: bool = True) -> Shared:
    """`dana` (developer of lab) uploads one file; `tess` (tester of aisi) is granted it."""
    dev = await stack.principal("dana", "developer", org="lab")
    tester = await stack.principal("tess", "tester", org="aisi")
    src = tmp_path / "src" / "weights.bin"
    data = write(src, size, seed=7)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, src, kind="model-weights")
        if grant:
            await api.grant(c, artifact_id, "tess")
    return Shared(dev, tester, artifact_id, data, src)


async def make_link(stack: Stack, shared: Shared, **options: Any) -> str:
    async with stack.client(shared.dev) as c:
        made = await api.create_link(c, shared.artifact_id, "tess", **options)
    # Links are written with the configured public URL; the test server took a free port.
    public = stack.settings.effective_public_url
    assert made["url"].startswith(public + "/l/exl1_")
    return stack.url + str(made["url"])[len(public) :]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(method: str, url: str, *, headers: dict[str, str] | None = None, body: Any = None) -> Answer:
    """One plain HTTP request, redirects not followed: what a browser or curl would send."""
    sent = {"User-Agent": USER_AGENT} | (headers or {})
    async with aiohttp.ClientSession() as session:
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            sent["Content-Type"] = "application/json"
        async with session.request(method, url, headers=sent, data=data, allow_redirects=False) as resp:
            return Answer(resp.status, dict(resp.headers), await resp.read())


async def proof(url: str, identity: Identity) -> str:
    """What the link's challenge decrypts to with `identity`'s age key: the download's proof."""
    answer = await fetch("GET", f"{url}/challenge")
    assert answer.status == 200, answer.body
    return age.decrypt(answer.body, [identity.age_identity]).decode("ascii")


async def refusals(stack: Stack, action: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in await stack.events()
        if e["outcome"]["result"] == "denied" and (action is None or e["action"] == action)
    ]


__all__ = ["USER_AGENT", "Answer", "Shared", "fetch", "make_link", "proof", "refusals", "share"]

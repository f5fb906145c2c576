"""Downloads by id as sessions with receipts, and grants that bound them (issue 18).

Each download by id opens one session, counted against the grant that allows it when the grant
bounds its downloads; a download interrupted and run again continues its session uncounted;
each ends with the downloader's receipt, which an auditor can check against its key. In-process
against a real stack (small parts, so an interruption falls between parts)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from nacl.signing import VerifyKey

from exchange.client import artifacts as api
from exchange.client import links as links_api
from exchange.client.transfer import download_with_receipt, upload
from exchange.errors import NotFound, PermissionDenied, ValidationError
from exchange.format.receipt import receipt_message
from tests.artifacts.conftest import write
from tests.artifacts.test_transfers import MIB, Interrupted, interrupt_after, session_marker
from tests.conftest import Stack


async def _grants(stack: Stack, artifact_id: str) -> tuple[int, int | None]:
    row = await stack.db.fetchone(
        "SELECT downloads, max_downloads FROM grants WHERE artifact_id = $1", artifact_id
    )
    assert row is not None
    return row["downloads"], row["max_downloads"]


async def test_a_bounded_grant_counts_sessions_and_receipts_close_them(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    tess = await stack.principal("tess", "tester", org="aisi")
    data = write(tmp_path / "src" / "big.bin", 12 * MIB + 3)
    async with stack.client(dev) as d:
        artifact_id = await upload(d, tmp_path / "src" / "big.bin")
        granted = await links_api.grant(d, artifact_id, "tess", max_downloads=2)
    assert (granted["downloads"], granted["max_downloads"]) == (0, 2)

    async with stack.client(tess) as t:
        # Interrupted, then resumed: one session, counted once.
        out = tmp_path / "one"
        with pytest.raises(Interrupted):
            await download_with_receipt(t, artifact_id, out, concurrency=1, progress=interrupt_after(6 * MIB))
        assert (out / session_marker(artifact_id)).is_file()
        assert await _grants(stack, artifact_id) == (1, 2)
        written, receipt = await download_with_receipt(t, artifact_id, out)
        assert (out / "big.bin").read_bytes() == data and written == [out / "big.bin"]
        assert not (out / session_marker(artifact_id)).exists()
        assert await _grants(stack, artifact_id) == (1, 2)

        # The receipt: tess's signature over the session, checkable from the event alone.
        event = [e for e in await stack.events() if e["action"] == "artifact.receipt"][-1]
        assert event["actor"]["name"] == "tess" and event["details"]["via"] == "grant"
        message = receipt_message(
            artifact=artifact_id,
            link=None,
            session=event["details"]["session"],
            manifest_sha256=bytes.fromhex(event["details"]["manifest_sha256"]),
        )
        VerifyKey(tess.public.signing_public_key).verify(
            message, base64.b64decode(event["details"]["signature"])
        )
        assert receipt["session"] == event["details"]["session"]
        with pytest.raises(Exception) as again:  # one receipt per session
            await api.send_receipt(
                t, artifact_id, receipt["session"], base64.b64decode(event["details"]["signature"])
            )
        assert getattr(again.value, "code", "") == "receipt-exists"

        await download_with_receipt(t, artifact_id, tmp_path / "two")
        assert await _grants(stack, artifact_id) == (2, 2)
        # Used up: refused before anything is written, and only the refusal is logged.
        before = await stack.count("download_sessions")
        with pytest.raises(PermissionDenied) as spent:
            await download_with_receipt(t, artifact_id, tmp_path / "three")
        assert spent.value.code == "downloads-exhausted"
        assert not (tmp_path / "three").exists() or not any((tmp_path / "three").iterdir())
        assert await stack.count("download_sessions") == before
        assert (await stack.events())[-1]["outcome"] == {"result": "denied", "reason": "downloads-exhausted"}

        # Someone else's session, or a made-up one, renews nothing.
        with pytest.raises(NotFound):
            await api.download_info(t, artifact_id, session="ses_" + "0" * 20)
        with pytest.raises(ValidationError):
            await api.download_info(t, artifact_id, session="../../x")

    # Granting again is a new decision: the count starts over.
    async with stack.client(dev) as d:
        renewed = await links_api.grant(d, artifact_id, "tess", max_downloads=1)
        # The uploader's own downloads are sessions with receipts, never counted against a grant.
        _, own = await download_with_receipt(d, artifact_id, tmp_path / "dev")
    assert (renewed["downloads"], renewed["max_downloads"]) == (0, 1)
    assert own["recipient"] == "dana"
    async with stack.client(tess) as t:
        await download_with_receipt(t, artifact_id, tmp_path / "four")
    assert await _grants(stack, artifact_id) == (1, 1)
    opened = [
        e
        for e in await stack.events()
        if e["action"] == "artifact.download" and e["outcome"]["result"] == "allowed"
    ]
    assert [(e["actor"]["name"], e["details"]["counted"]) for e in opened] == [
        ("tess", True),
        ("tess", True),
        ("dana", False),
        ("tess", True),
    ]


async def test_the_last_download_goes_to_exactly_one_of_several(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    tess = await stack.principal("tess", "tester", org="aisi")
    write(tmp_path / "small.bin", 10_000, seed=3)
    async with stack.client(dev) as d:
        artifact_id = await upload(d, tmp_path / "small.bin")
        await links_api.grant(d, artifact_id, "tess", max_downloads=1)
    async with stack.client(tess) as t:
        results = await asyncio.gather(
            *(api.download_info(t, artifact_id) for _ in range(6)), return_exceptions=True
        )
    won = [r for r in results if isinstance(r, dict)]
    assert len(won) == 1, results
    assert all(isinstance(r, PermissionDenied) for r in results if not isinstance(r, dict))
    assert await _grants(stack, artifact_id) == (1, 1)
    assert await stack.count("download_sessions") == 1

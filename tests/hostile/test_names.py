"""Hostile file names, end to end: through the real client, service and SeaweedFS.

Storage keys are the server's own; names live only in metadata, so a name can do harm only where
it is checked (declaration), shown (the CLI) or written (a download). Refused at declaration,
each with a 400 problem, a stable code and an audit event: '..' components, NUL, CR/LF and other
C0/C1 controls (`invalid-input`), a name over MAX_COMPONENT_BYTES or a path over MAX_PATH_BYTES
(`path-too-long`), Unicode-normalisation twins such as "café" composed and decomposed
(`path-collision`, naming both). Accepted names (a bidirectional override, decomposed accents,
zero-width characters, right-to-left scripts, a 1,025-byte path) are stored and returned exactly,
shown escaped by `exchange artifacts show`, exact in its JSON, and written exactly where they
belong; a download never writes outside its destination, whatever the manifest says.
"""

from __future__ import annotations

import base64
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from exchange.client import artifacts as api
from exchange.client import transfer
from exchange.client.transfer import PARTIAL_SUFFIX, download, upload
from exchange.errors import LocalFileError, ManifestError, ValidationError
from exchange.format import age
from exchange.format.manifest import MAX_COMPONENT_BYTES, MAX_PATH_BYTES
from exchange.identity import Identity
from tests.artifacts.conftest import write
from tests.conftest import Served, Stack

NFC = unicodedata.normalize("NFC", "café.bin")
NFD = unicodedata.normalize("NFD", "café.bin")
assert NFC != NFD

#: Accepted: stored, listed and written exactly; shown escaped where a terminal would act on them.
ACCEPTED = {
    "rtl-\u202egnp.exe": "a right-to-left override (shows as 'rtl-exe.png' if not escaped)",
    NFD: "decomposed accent, alone in its directory",
    "zero\u200bwidth.bin": "a zero-width space",
    "שלום-مرحبا.txt": "right-to-left scripts",
}


def long_path(total: int) -> str:
    """A relative path of exactly `total` UTF-8 bytes, every component within the limit."""
    parts, left = [], total
    while left > MAX_COMPONENT_BYTES + 1:
        parts.append("d" * 200)
        left -= 201
    parts.append("f" * left)
    path = "/".join(parts)
    assert len(path.encode()) == total
    return path


async def declare(stack: Stack, dev: Identity, paths: list[str]) -> dict[str, Any]:
    """Declare an upload of these paths through the SDK: what a client that skipped its own
    checks, or a hostile one, would send."""
    async with stack.client(dev) as c:
        me = await c.whoami()
        header = age.wrap_file_key(age.generate_file_key(), [me["age_recipient"]]).to_bytes()
        return await api.create(
            c,
            name="names",
            kind="other",
            files=[(p, 1, os.urandom(16)) for p in paths],
            headers={me["name"]: header},
        )


def refusals(events: list[dict[str, Any]]) -> list[str]:
    return [
        e["outcome"]["reason"]
        for e in events
        if e["action"] == "artifact.create" and e["outcome"]["result"] == "denied"
    ]


# -- refused at declaration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "code", "says"),
    [
        ("names/../escape.bin", "invalid-input", "'..'"),
        ("../escape.bin", "invalid-input", "'..'"),
        ("names/nul\x00.bin", "invalid-input", "control character"),
        ("names/crlf\r\nX-Injected: 1.bin", "invalid-input", "control character"),
        ("names/lf\n.bin", "invalid-input", "control character"),
        ("names/esc\x1b[31m.bin", "invalid-input", "control character"),
        ("names/csi\x9b31m.bin", "invalid-input", "control character"),
        ("names/" + "x" * 1025, "path-too-long", f"1025 bytes long, over the limit of {MAX_COMPONENT_BYTES}"),
        ("names/" + "é" * 128, "path-too-long", f"256 bytes long, over the limit of {MAX_COMPONENT_BYTES}"),
        # 4,097 bytes in 4,096 characters: past the request schema's character count, refused
        # by the byte limit; 4,097 ASCII characters are refused by the schema itself.
        (
            "é" + long_path(MAX_PATH_BYTES - 1),
            "path-too-long",
            f"4097 bytes long, over the limit of {MAX_PATH_BYTES}",
        ),
        (long_path(MAX_PATH_BYTES + 1), "invalid-input", str(MAX_PATH_BYTES)),
    ],
    ids=[
        "dotdot",
        "leading-dotdot",
        "nul",
        "crlf",
        "lf",
        "esc",
        "c1-csi",
        "name-1025",
        "name-256",
        "path-4097-bytes",
        "path-4097-chars",
    ],
)
async def test_hostile_names_are_refused_at_declaration(
    stack: Stack, path: str, code: str, says: str
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    with pytest.raises(ValidationError) as err:
        await declare(stack, dev, ["names/ok.bin", path])
    assert err.value.code == code and err.value.extra["status"] == 400
    assert says in err.value.message
    # The refusal quotes the name escaped: the detail itself carries no raw control character.
    assert not any(unicodedata.category(ch) == "Cc" for ch in err.value.message)
    assert await stack.count("artifacts") == 0 and await stack.count("artifact_files") == 0
    assert refusals(await stack.events()) == [code]


async def test_limits_are_exact(stack: Stack) -> None:
    """A name of exactly MAX_COMPONENT_BYTES and a path of exactly MAX_PATH_BYTES are accepted;
    so is a 1,025-byte path of ordinary names."""
    dev = await stack.principal("dana", "developer", org="lab")
    paths = ["names/" + "n" * MAX_COMPONENT_BYTES, "names/" + long_path(MAX_PATH_BYTES - 6), long_path(1025)]
    detail = await declare(stack, dev, paths)
    assert sorted(f["path"] for f in detail["files"]) == sorted(paths)


@pytest.mark.parametrize(
    "paths",
    [
        [f"names/{NFC}", f"names/{NFD}"],
        ["names/café", "names/cafe\u0301/inside.bin"],  # a file, and a twin directory of it
        ["names/\u212b.bin", "names/\u00c5.bin"],  # ANGSTROM SIGN and A WITH RING: NFC twins
    ],
    ids=["file-twins", "file-and-directory-twins", "angstrom"],
)
async def test_normalisation_twins_are_refused_naming_both(stack: Stack, paths: list[str]) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    with pytest.raises(ValidationError) as err:
        await declare(stack, dev, paths)
    assert err.value.code == "path-collision" and err.value.extra["status"] == 400
    for p in paths:
        # Named both, escaped so that the two spellings can be told apart.
        assert ascii(p) in err.value.message or ascii(p.rsplit("/", 1)[0]) in err.value.message
    assert await stack.count("artifacts") == 0
    assert refusals(await stack.events()) == ["path-collision"]


async def test_the_client_refuses_twins_and_control_characters_before_declaring(
    stack: Stack, tmp_path: Path
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    twins = tmp_path / "twins"
    write(twins / NFC, 10)
    write(twins / NFD, 10)
    crlf = tmp_path / "crlf"
    write(crlf / "bad\r\nname.bin", 10)
    async with stack.client(dev) as c:
        with pytest.raises(ValidationError) as err:
            await upload(c, twins)
        assert err.value.code == "path-collision"
        assert ascii(f"twins/{NFC}") in err.value.message and ascii(f"twins/{NFD}") in err.value.message
        with pytest.raises(LocalFileError) as refused:
            await upload(c, crlf)
        assert refused.value.code == "unsafe-path" and "control character" in refused.value.message
    assert await stack.count("artifacts") == 0


# -- accepted: stored, returned and written exactly -------------------------------------------------------


def hostile_tree(root: Path) -> dict[str, bytes]:
    """A directory of accepted hostile names (and a 1,025-byte path); return {path: content}."""
    contents = {}
    for i, name in enumerate([*ACCEPTED, long_path(1025 - len(root.name) - 1)]):
        contents[f"{root.name}/{name}"] = write(root / name, 100 + i, seed=i + 1)
    return contents


async def test_accepted_names_round_trip_exactly(stack: Stack, tmp_path: Path) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    src = tmp_path / "src" / "names"
    contents = hostile_tree(src)
    assert any(len(p.encode()) == 1025 for p in contents)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, src)
        detail = await api.get(c, artifact_id)
        out = tmp_path / "out"
        out.mkdir()
        assert await download(c, artifact_id, out) == [out / "names"]
    # Exactly the names sent: not normalised, not escaped, not re-encoded.
    assert sorted(f["path"] for f in detail["files"]) == sorted(contents)
    assert sorted(f["path"] for f in detail["manifest"]["files"]) == sorted(contents)
    rows = await stack.db.fetchall("SELECT path, object_key FROM artifact_files")
    assert sorted(r["path"] for r in rows) == sorted(contents)
    for r in rows:  # storage keys are the server's own, never derived from a name
        assert re.fullmatch(r"artifacts/[0-9a-f]{32}", r["object_key"])
    written = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert written == contents
    assert (out / "names" / NFD).exists() and os.fsencode(NFD) in os.listdir(os.fsencode(out / "names"))


# -- the CLI shows names escaped, JSON exact ---------------------------------------------------------------


def test_cli_show_escapes_names_and_json_is_exact(served: Served, tmp_path: Path) -> None:
    admin = served.admin
    assert served.run("org", "create", "names-lab", identity=admin).returncode == 0
    invite = served.run("--json", "invite", "--role", "developer", "--org", "names-lab", identity=admin)
    dev = tmp_path / "dev.json"
    assert (
        served.run(
            "enroll", json.loads(invite.stdout)["code"], "--name", "names-dev", identity=dev
        ).returncode
        == 0
    )
    src = tmp_path / "src" / "rtl\u202eevil"
    contents = hostile_tree(src)
    up = served.run("upload", str(src), identity=dev)
    assert up.returncode == 0, up.stderr
    artifact_id = up.stdout.strip()

    shown = served.run("artifacts", "show", artifact_id, identity=dev)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    # Nothing a terminal would act on: no control, format (bidi, zero-width) or separator character.
    unsafe = [ch for ch in text if ch != "\n" and not ch.isprintable()]
    assert unsafe == []
    assert "rtl\\u202eevil/rtl-\\u202egnp.exe" in text
    assert "zero\\u200bwidth.bin" in text
    assert "rtl\\u202eevil  (other, complete)" in text  # the artifact's name too
    assert "שלום-مرحبا.txt" in text and NFD in text  # printable text stays as it is
    listed = served.run("artifacts", "ls", identity=dev)
    assert "rtl\\u202eevil" in listed.stdout and "\u202e" not in listed.stdout

    as_json = served.run("--json", "artifacts", "show", artifact_id, identity=dev)
    detail = json.loads(as_json.stdout)
    assert detail["name"] == "rtl\u202eevil"
    assert sorted(f["path"] for f in detail["files"]) == sorted(contents)

    out = tmp_path / "out"
    down = served.run("download", artifact_id, "-o", str(out), identity=dev)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == str(out / "rtl\\u202eevil")
    written = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert written == contents
    down_json = served.run("--json", "download", artifact_id, "-o", str(tmp_path / "out2"), identity=dev)
    assert json.loads(down_json.stdout)["paths"] == [str(tmp_path / "out2" / "rtl\u202eevil")]


# -- a download never writes outside its destination ------------------------------------------------------


def forge(monkeypatch: pytest.MonkeyPatch, dev: Identity, *, path: str | None, name: str | None) -> None:
    """A hostile service (or one whose database was changed) serving a hostile uploader's
    manifest: paths or name rewritten and re-signed with the uploader's own key, past every
    server-side check. Only the client's own checks stand between it and the disk."""
    real_info, real_get = transfer.api.download_info, transfer.api.get

    def forged(info: dict[str, Any]) -> dict[str, Any]:
        manifest = info["manifest"]
        if path is not None:
            manifest["files"][0]["path"] = info["files"][0]["path"] = path
        if name is not None:
            manifest["name"] = info["name"] = name
        signature = dev.signing_key.sign(bytes(rfc8785.dumps(manifest))).signature
        info["manifest_signature"] = base64.b64encode(signature).decode()
        return info

    async def download_info(client: Any, artifact_id: str, **kw: Any) -> dict[str, Any]:
        return forged(await real_info(client, artifact_id, **kw))

    async def get(client: Any, artifact_id: str) -> dict[str, Any]:
        return forged(await real_get(client, artifact_id))

    # Both answers the client reads the manifest from: the detail (checked before the download
    # session opens) and the session's.
    monkeypatch.setattr(transfer.api, "download_info", download_info)
    monkeypatch.setattr(transfer.api, "get", get)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("../../escape.bin", None),
        ("w.bin/../../../escape.bin", None),
        ("/tmp/escape.bin", None),
        ("w\x00.bin", None),
        (None, ".."),
        (None, "../escape"),
    ],
    ids=["dotdot", "inner-dotdot", "absolute", "nul", "name-dotdot", "name-escape"],
)
async def test_a_manifest_that_points_outside_writes_nothing(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str | None, name: str | None
) -> None:
    dev = await stack.principal("dana", "developer", org="lab")
    write(tmp_path / "w.bin", 1000)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, tmp_path / "w.bin")
    forge(monkeypatch, dev, path=path, name=name)
    out = tmp_path / "deep" / "er" / "out"
    out.mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    async with stack.client(dev) as c:
        with pytest.raises(ManifestError) as err:
            await download(c, artifact_id, out)
    assert ("path" if path else "name") in err.value.message
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/escape.bin").exists()


async def test_a_planted_partial_directory_link_is_not_followed(stack: Stack, tmp_path: Path) -> None:
    """Someone who can write to the destination plants NAME.exchange-partial as a link to a
    directory of theirs (or yours): the download must neither write there nor prune it."""
    dev = await stack.principal("dana", "developer", org="lab")
    src = tmp_path / "src" / "model"
    write(src / "w.bin", 1000)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ("model" + PARTIAL_SUFFIX)).symlink_to(elsewhere, target_is_directory=True)
    async with stack.client(dev) as c:
        artifact_id = await upload(c, src)
        with pytest.raises(LocalFileError) as err:
            await download(c, artifact_id, out)
    assert err.value.code == "symlink"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]
    assert (elsewhere / "precious.txt").read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["model" + PARTIAL_SUFFIX]

"""Rotating keys as principals do it: `exchange identity rotate`, through the real CLI against
`exchange serve`.

A tester and a developer each rotate. Afterwards the old key's signatures are refused and the
new ones work; what was granted to the old age key is re-wrapped for the new one by the
principal itself (resumably: a run that only changed the keys is finished by `--resume`, and a
run that stopped after the service took the keys but before the files were swapped is finished
by running it again); the developer's artifacts signed by its previous key still download and
verify, by id and through a link, and its new uploads are signed by its new key. Every step is
an event, and an auditor's verification of the whole log still passes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
from pathlib import Path
from typing import Any

from exchange.client import Client
from exchange.identity import Identity
from tests.artifacts.conftest import write
from tests.conftest import Served


def _json(served: Served, *args: str, identity: Path, server: bool = True) -> Any:
    done = served.run("--json", *args, identity=identity, server=server)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _events(served: Served, auditor: Path, action: str) -> list[dict[str, Any]]:
    out = served.run("--json", "audit", "query", "--action", action, "--format", "jsonl", identity=auditor)
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["event"] for line in out.stdout.splitlines()]


def _download(served: Served, what: str, out: Path, identity: Path, *, by_link: bool = False) -> bytes:
    done = served.run("download", what, "-o", str(out), identity=identity, server=not by_link)
    assert done.returncode == 0, done.stderr
    return (out / "weights.bin").read_bytes()


def test_rotate_keys_and_rewrap(served: Served, tmp_path: Path) -> None:
    dev, tess, audrey = tmp_path / "dev.json", tmp_path / "tess.json", tmp_path / "audrey.json"
    served.enrol("developer", "rot-lab", "rot-dev", dev)
    served.enrol("tester", "rot-aisi", "rot-tess", tess)
    served.enrol("auditor", "rot-aisi", "rot-audrey", audrey)
    vkey = served.run("audit", "vkey", identity=audrey).stdout.strip()
    pinned = served.run("audit", "verify", "--vkey", vkey, identity=audrey)
    assert pinned.returncode == 0, pinned.stderr

    data = write(tmp_path / "src" / "weights.bin", 70_000, seed=9)
    up = served.run("upload", str(tmp_path / "src" / "weights.bin"), "--to", "rot-tess", identity=dev)
    assert up.returncode == 0, up.stderr
    first = up.stdout.strip()
    dev_old = Identity.load(dev)

    # -- the tester rotates, changing only its keys first -------------------------------------
    tess_old = tmp_path / "tess-old.json"
    shutil.copy(tess, tess_old)
    old_key = Identity.load(tess).key_id
    changed = _json(served, "identity", "rotate", "--no-rewrap", identity=tess)
    new_key = Identity.load(tess).key_id
    assert changed["old_key_id"] == old_key and changed["key_id"] == new_key != old_key
    assert Identity.load(tess).name == "rot-tess"  # the file still remembers who and where
    retired = tmp_path / f"tess.json.retired-{old_key}"
    assert Identity.load(retired).key_id == old_key
    assert stat.S_IMODE(retired.stat().st_mode) == 0o600 and stat.S_IMODE(tess.stat().st_mode) == 0o600
    assert not (tmp_path / "tess.json.next").exists()

    # The old key is refused, the new one works.
    refused = served.run("whoami", identity=tess_old)
    assert refused.returncode == 3 and "unknown-key" in refused.stderr, refused.stderr
    me = _json(served, "whoami", identity=tess)
    assert (me["name"], me["key_id"]) == ("rot-tess", new_key)
    # Until re-wrapped, the header is for the old age key: the download fails, writes nothing.
    early = served.run("download", first, "-o", str(tmp_path / "early"), identity=tess)
    assert early.returncode != 0
    assert not (tmp_path / "early" / "weights.bin").exists()

    # The interrupted rotation resumes: one header re-wrapped, the retired file removed.
    resumed = _json(served, "identity", "rotate", "--resume", identity=tess)
    assert resumed["key_id"] == new_key and resumed["rewrapped"] == [first]
    assert resumed["unopenable"] == [] and not retired.exists()
    again = _json(served, "identity", "rotate", "--resume", identity=tess)
    assert again["rewrapped"] == [] and again["already_current"] == 1
    assert _download(served, first, tmp_path / "t1", tess) == data

    # A link made after the rotation seals its proof to the tester's new age key.
    made = served.run("link", "create", first, "--for", "rot-tess", identity=dev)
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert _download(served, url, tmp_path / "t2", tess, by_link=True) == data
    assert (
        served.run("download", url, "-o", str(tmp_path / "t3"), identity=tess_old, server=False).returncode
        != 0
    )

    # -- the developer's rotation stops after the service took the keys ------------------------
    # (as a crash would leave it: the new identity pending beside the old file, not swapped in)
    pending = tmp_path / "dev.json.next"
    dev_new = Identity.generate().with_enrolment(name="rot-dev", server=served.url)
    dev_new.save(pending)

    async def change() -> None:
        async with Client(served.url, dev_old) as c:
            await c.rotate_keys(dev_new)

    asyncio.run(change())
    assert served.run("whoami", identity=dev).returncode == 3  # the file still holds the old key
    finished = _json(served, "identity", "rotate", identity=dev)
    assert finished["old_key_id"] == dev_old.key_id and finished["key_id"] == dev_new.key_id
    assert finished["changed"] is False  # taken before; this run only swapped the files
    assert finished["rewrapped"] == [first] and not pending.exists()
    assert Identity.load(dev).key_id == dev_new.key_id

    # Its old artifact still verifies (signed by its previous key), by id and through a link.
    shown = _json(served, "principals", "show", "rot-dev", identity=tess)
    assert shown["key_id"] == dev_new.key_id
    assert [k["key_id"] for k in shown["previous_keys"]] == [dev_old.key_id]
    assert _json(served, "artifacts", "show", first, identity=dev)["manifest"]["uploader"] == dev_old.key_id
    assert _download(served, first, tmp_path / "t4", tess) == data
    assert _download(served, url, tmp_path / "t5", tess, by_link=True) == data
    assert _download(served, first, tmp_path / "t6", dev) == data

    # Its new uploads are signed by its new key.
    newer = write(tmp_path / "src2" / "weights.bin", 30_000, seed=11)
    up2 = served.run("upload", str(tmp_path / "src2" / "weights.bin"), "--to", "rot-tess", identity=dev)
    assert up2.returncode == 0, up2.stderr
    second = up2.stdout.strip()
    assert _json(served, "artifacts", "show", second, identity=dev)["manifest"]["uploader"] == dev_new.key_id
    assert _download(served, second, tmp_path / "t7", tess) == newer

    # -- the log -----------------------------------------------------------------------------------
    rotations = _events(served, audrey, "principal.rotate")
    allowed = [e for e in rotations if e["outcome"]["result"] == "allowed"]
    assert [
        (e["details"]["name"], e["details"]["old_key_id"], e["details"]["new_key_id"]) for e in allowed
    ] == [
        ("rot-tess", old_key, new_key),
        ("rot-dev", dev_old.key_id, dev_new.key_id),
    ]
    assert [e["actor"]["key_id"] for e in allowed] == [old_key, dev_old.key_id]
    rewraps = [e for e in _events(served, audrey, "artifact.rewrap") if e["outcome"]["result"] == "allowed"]
    assert sorted((e["details"]["principal"], e["resource"]["id"]) for e in rewraps) == [
        ("rot-dev", first),
        ("rot-tess", first),
    ]
    verified = served.run("audit", "verify", "--vkey", vkey, identity=audrey)
    assert verified.returncode == 0, verified.stderr


def test_rotate_refusals_through_the_cli(served: Served, tmp_path: Path) -> None:
    """A disabled principal cannot rotate, and the refusal leaves its files as they were; a
    retired identity cannot rotate again."""
    tess = tmp_path / "tess.json"
    served.enrol("tester", "rot-aisi", "rot-tess2", tess)
    before = tess.read_bytes()
    off = served.run("principals", "disable", "rot-tess2", identity=served.admin)
    assert off.returncode == 0, off.stderr
    refused = served.run("identity", "rotate", identity=tess)
    assert refused.returncode == 4 and "principal-disabled" in refused.stderr, refused.stderr
    assert tess.read_bytes() == before
    assert not (tmp_path / "tess.json.next").exists()
    assert list(tmp_path.glob("tess.json.retired-*")) == []
    on = served.run("principals", "enable", "rot-tess2", identity=served.admin)
    assert on.returncode == 0, on.stderr

    old = tmp_path / "tess-old.json"
    shutil.copy(tess, old)
    done = served.run("identity", "rotate", identity=tess)
    assert done.returncode == 0, done.stderr
    assert "new keys in use" in done.stdout
    stale = served.run("identity", "rotate", identity=old)
    assert stale.returncode == 3 and "unknown-key" in stale.stderr, stale.stderr
    assert not (tmp_path / "tess-old.json.next").exists()  # refused: its pending keys are dropped
    # The options of `exchange identity` itself do not mix with its subcommand.
    mixed = served.run("identity", "--age-secret", "rotate", identity=tess)
    assert mixed.returncode == 2, mixed.stderr


def test_lost_keys_reenrol_and_regrant(served: Served, tmp_path: Path) -> None:
    """Keys lost: an admin's re-enrol invite, the principal enrols new keys under its own name,
    its grants show as needing a re-grant, and the uploader's re-grant brings back both the
    download by id and the link issued before."""
    dev, tess = tmp_path / "dev.json", tmp_path / "tess.json"
    served.enrol("developer", "lost-lab", "lost-dev", dev)
    served.enrol("tester", "lost-aisi", "lost-tess", tess)
    data = write(tmp_path / "src" / "weights.bin", 40_000, seed=5)
    up = served.run("upload", str(tmp_path / "src" / "weights.bin"), "--to", "lost-tess", identity=dev)
    assert up.returncode == 0, up.stderr
    artifact = up.stdout.strip()
    made = served.run("link", "create", artifact, "--for", "lost-tess", identity=dev)
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    old_key = Identity.load(tess).key_id

    # Only an admin may, for a principal that exists, and --reenroll goes alone.
    assert served.run("invite", "--reenroll", "lost-tess", identity=dev).returncode == 4
    assert served.run("invite", "--reenroll", "nobody-here", identity=served.admin).returncode == 5
    both = served.run("invite", "--reenroll", "lost-tess", "--role", "tester", identity=served.admin)
    assert both.returncode == 2, both.stderr
    invite = _json(served, "invite", "--reenroll", "lost-tess", identity=served.admin)
    assert invite["reenroll"] == "lost-tess" and invite["enroll_command"].endswith("--name lost-tess")
    shown = served.run("invite", "--reenroll", "lost-tess", identity=served.admin)
    assert shown.returncode == 0 and "replacing the keys of lost-tess" in shown.stdout, shown.stderr

    tess.unlink()  # the keys are lost
    enrolled = _json(served, "enroll", invite["code"], "--name", "lost-tess", identity=tess)
    assert enrolled["key_id"] == Identity.load(tess).key_id != old_key

    grants = served.run("grants", artifact, identity=dev)
    assert grants.returncode == 0 and "needs re-grant" in grants.stdout, grants.stdout
    failed = served.run("download", artifact, "-o", str(tmp_path / "none"), identity=tess)
    assert failed.returncode != 0 and not (tmp_path / "none" / "weights.bin").exists()

    regrant = served.run("grant", artifact, "lost-tess", identity=dev)
    assert regrant.returncode == 0, regrant.stderr
    assert "needs re-grant" not in served.run("grants", artifact, identity=dev).stdout
    assert _download(served, artifact, tmp_path / "by-id", tess) == data
    assert _download(served, url, tmp_path / "by-link", tess, by_link=True) == data
    auditor = tmp_path / "audrey.json"
    served.enrol("auditor", "lost-aisi", "lost-audrey", auditor)
    (event,) = [
        e for e in _events(served, auditor, "principal.reenroll") if e["details"]["name"] == "lost-tess"
    ]
    assert event["details"]["old_key_id"] == old_key and event["details"]["headers_dropped"] == 1

"""exchange.files.write_atomic: modes, replace against create-only, nothing partial, the race."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from exchange.errors import ValidationError
from exchange.files import write_atomic
from exchange.identity import Identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("overwrite", [False, True])
def test_private_by_default_whatever_the_umask(tmp_path: Path, overwrite: bool) -> None:
    old = os.umask(0)  # a permissive umask must not widen the file
    try:
        write_atomic(tmp_path / "key", b"secret", overwrite=overwrite)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "key") == 0o600
    assert (tmp_path / "key").read_bytes() == b"secret"


def test_a_given_mode_is_used_exactly(tmp_path: Path) -> None:
    old = os.umask(0o077)  # nor may a strict umask narrow a mode asked for
    try:
        write_atomic(tmp_path / "public", b"x", overwrite=False, mode=0o644)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "public") == 0o644


def test_overwrite_replaces_content_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old and longer")
    path.chmod(0o644)
    write_atomic(path, b"new", overwrite=True)
    assert path.read_bytes() == b"new" and _mode(path) == 0o600
    assert _names(tmp_path) == ["state.json"]  # no temporary file left behind


def test_create_only_refuses_an_existing_file_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", overwrite=False)
    assert path.read_bytes() == b"first"
    assert _names(tmp_path) == ["key"]


def test_create_only_refuses_a_symbolic_link_without_following_it(tmp_path: Path) -> None:
    # Planted by someone who can write to the directory: following it would write elsewhere.
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "key").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "key", b"secret", overwrite=False)
    assert not elsewhere.exists()


def test_overwrite_replaces_a_symbolic_link_rather_than_writing_through_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    (tmp_path / "key").symlink_to(elsewhere)
    write_atomic(tmp_path / "key", b"secret", overwrite=True)
    assert not (tmp_path / "key").is_symlink() and (tmp_path / "key").read_bytes() == b"secret"
    assert elsewhere.read_bytes() == b"untouched"


def test_a_missing_directory_is_an_error_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "key", b"x", overwrite=True)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_write_failing_midway_leaves_neither_target_nor_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    """The disk fills after the first bytes: the caller gets the error, the directory holds
    exactly what it held before (a previous version stays whole)."""
    path = tmp_path / "state.json"
    if overwrite:
        path.write_bytes(b"previous")
    real_write = os.write
    calls = 0

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data)[:3])  # a short write: the loop must go on
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, b"0123456789", overwrite=overwrite)
    monkeypatch.undo()
    assert calls == 2
    assert _names(tmp_path) == (["state.json"] if overwrite else [])
    if overwrite:
        assert path.read_bytes() == b"previous"


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:2]))
    write_atomic(tmp_path / "f", b"0123456789", overwrite=False)
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"0123456789"


def test_the_file_is_synced_before_it_appears_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "key"
    real_fsync = os.fsync
    seen: list[tuple[bool, bool]] = []  # (a directory?, target visible yet?)

    def fsync(fd: int) -> None:
        seen.append((stat.S_ISDIR(os.fstat(fd).st_mode), path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(path, b"x", overwrite=False)
    assert seen == [(False, False), (True, True)]


def _race(n: int, attempt: Callable[[int], None]) -> tuple[list[int], list[BaseException]]:
    """Run `attempt(i)` in `n` threads released together; (winners, errors)."""
    start = threading.Barrier(n)
    winners: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        start.wait()
        try:
            attempt(i)
        except BaseException as exc:  # collected and judged by the test
            with lock:
                errors.append(exc)
        else:
            with lock:
                winners.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return winners, errors


def test_of_writers_racing_to_create_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "key"
    payload = {i: (f"writer {i}\n" * 20_000).encode() for i in range(16)}  # big enough to overlap

    for _ in range(5):
        path.unlink(missing_ok=True)
        winners, errors = _race(16, lambda i: write_atomic(path, payload[i], overwrite=False))
        assert len(winners) == 1, winners
        assert len(errors) == 15 and all(isinstance(e, FileExistsError) for e in errors), errors
        assert path.read_bytes() == payload[winners[0]]
        assert _names(tmp_path) == ["key"]


def _both_pause_after_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold each writer at its first fsync (its data written, nothing placed yet) until the other
    has got there too: the interleaving a busy machine produces now and then, made certain."""
    real_fsync = os.fsync
    gate = threading.Barrier(2, timeout=10)
    paused = threading.local()

    def fsync(fd: int) -> None:
        if not getattr(paused, "done", False):
            paused.done = True
            gate.wait()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_identity_save_refuses_a_racing_second_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `exchange keygen` runs at once on the same path. The old `save` checked `exists()`
    first and then `os.replace`d: both passed the check before either wrote, both "succeeded",
    and the first caller's key (perhaps already enrolled) was silently replaced. With a
    create-only write, exactly one succeeds and the other gets the usual refusal."""
    path = tmp_path / "id.json"
    identities = [Identity.generate(), Identity.generate()]
    _both_pause_after_writing(monkeypatch)
    winners, errors = _race(2, lambda i: identities[i].save(path))
    monkeypatch.undo()
    assert len(winners) == 1, "both writers were told they had created the identity"
    (error,) = errors
    assert isinstance(error, ValidationError) and "refusing to overwrite an identity" in error.message
    assert Identity.load(path).public == identities[winners[0]].public
    assert _names(tmp_path) == ["id.json"]
    assert _mode(path) == 0o600


def test_identity_save_overwrites_when_told(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    Identity.generate().save(path)
    second = Identity.generate()
    second.save(path, overwrite=True)
    assert Identity.load(path).public == second.public and _mode(path) == 0o600

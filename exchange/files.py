"""Writing a small file whole: the new bytes or the old, never a mixture, and private by default.

`write_atomic` writes into a temporary file beside the target (made by `mkstemp`, so mode 0600
and a name nobody else can have chosen), flushes and fsyncs it, then puts it in place in one
step, and fsyncs the directory so that the step survives a crash:

- `overwrite=True`: `os.replace`. Readers see the old file or the new one; a symbolic link at
  the target is replaced, not followed.
- `overwrite=False`: `os.link`, which fails with `FileExistsError` when anything (a file, a
  symbolic link, even a dangling one) is at the target. Checking and creating are one system
  call, so of several writers racing to create a file exactly one wins and the others are told,
  where "check `exists()`, then replace" lets every one of them think it won.

On any failure the temporary file is removed and the target is untouched.

What this module does not do: create missing directories (a caller that wants them says so), take
locks (a create-only write needs none; read-modify-write cycles are the caller's to serialise),
write large or streamed files (downloads have their own machinery in `client/_download.py`), or
work on filesystems without hard links when `overwrite=False`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["fsync_directory", "write_atomic"]


def write_atomic(path: Path, data: bytes, *, overwrite: bool, mode: int = 0o600) -> None:
    """Put `data` at `path` in one step, with `mode`; refuse an existing target unless `overwrite`.

    Raises `FileExistsError` when `overwrite` is false and something is already at `path`, and
    whatever `OSError` the disk gives (no directory, no space, no permission)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            if mode != 0o600:  # mkstemp made it 0600; fchmod ignores the umask, as wanted
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        # After a replace the name is gone; after a link it is the second name of the target.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or link in `directory` durable (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

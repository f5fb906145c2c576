"""What people read: aligned tables with a header and human sizes, and progress that leaves a
final line (issue 18's "small things people notice").

The table and the `artifacts ls` listing go through the real CLI against `exchange serve`; the
progress line goes through the real CLI with its stderr on a pseudo-terminal (the bar and the
line appear only there), reading what a person would see.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
from pathlib import Path

import pytest

from exchange.cli import _base
from exchange.cli.artifacts import _bar
from tests.artifacts.conftest import write
from tests.conftest import EXCHANGE, Served


def test_table_aligns_columns_and_escapes_cells() -> None:
    text = _base.table(
        ("ID", "SIZE", "NAME"),
        [("a", "1.5 KiB", "plain"), ("bbbb", "10 B", "rtl\u202eevil"), ("c", "3.0 GiB", "模型")],
        right={1},
    )
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "SIZE", "NAME"]
    assert "\u202e" not in text and "rtl\\u202eevil" in text  # a cell cannot reorder the line
    # every NAME starts in the same column, sizes end in the same column
    starts = {line.index(name) for line, name in zip(lines, ["NAME", "plain", "rtl", "模型"], strict=True)}
    assert len(starts) == 1
    ends = {
        line.index(size) + len(size)
        for line, size in zip(lines, ["SIZE", "1.5 KiB", "10 B", "3.0 GiB"], strict=True)
    }
    assert len(ends) == 1
    assert all(line == line.rstrip() for line in lines)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_says_it_resumes_and_leaves_a_final_line(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = _Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    with _bar("download") as bar:
        bar.start(4 * 1024**2, 1024**2)
        bar.update(3 * 1024**2)
    shown = screen.getvalue()
    assert "resuming: 1.0 MiB of 4.0 MiB already here" in shown
    assert re.search(r"download: 4\.0 MiB in [0-9.]+ s, [0-9.]+ [KMGT]?i?B/s\n$", shown), shown

    failed = _Terminal()
    monkeypatch.setattr("sys.stderr", failed)
    with pytest.raises(RuntimeError), _bar("upload") as bar:
        bar.start(100)
        raise RuntimeError("interrupted")
    assert not re.search(r"upload: .* in [0-9.]+ s", failed.getvalue())  # no summary of a failure


def test_artifacts_ls_is_a_table_with_human_sizes(served: Served, tmp_path: Path) -> None:
    dev = tmp_path / "dev.json"
    served.enrol("developer", "ls-lab", "ls-dev", dev)
    write(tmp_path / "one" / "weights.bin", 3 * 1024 * 1024)
    write(tmp_path / "two-with-a-longer-name" / "data.bin", 1500)
    for src in ("one", "two-with-a-longer-name"):
        assert served.run("upload", str(tmp_path / src), identity=dev).returncode == 0

    listed = served.run("artifacts", "ls", identity=dev)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "KIND", "SIZE", "CREATED", "NAME"]
    assert len(rows) == 2
    assert "1.5 KiB" in listed.stdout and re.search(r"3\.0 MiB", listed.stdout)
    assert {row.index("complete") for row in rows} == {header.index("STATUS")}
    assert {row.rindex("one") if row.endswith("one") else row.index("two-") for row in rows} == {
        header.index("NAME")
    }
    # Programs keep the exact JSON: raw byte counts.
    as_json = json.loads(served.run("--json", "artifacts", "ls", identity=dev).stdout)
    assert sorted(a["size"] for a in as_json) == [1500, 3 * 1024 * 1024]


def test_a_download_on_a_terminal_ends_with_a_summary_line(served: Served, tmp_path: Path) -> None:
    dev = tmp_path / "dev.json"
    served.enrol("developer", "tty-lab", "tty-dev", dev)
    write(tmp_path / "src" / "w.bin", 2 * 1024 * 1024)
    artifact = served.run("upload", str(tmp_path / "src"), identity=dev).stdout.strip()

    primary, secondary = pty.openpty()
    cmd = [
        *EXCHANGE,
        "--server",
        served.url,
        "--identity",
        str(dev),
        "download",
        artifact,
        "-o",
        str(tmp_path / "o"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=secondary, env=served.client_env())
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed: the command is done
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0
    os.close(primary)
    text = seen.decode("utf-8", "replace")
    assert re.search(r"download: 2\.0 MiB in [0-9.]+ s, [0-9.]+ [KMGT]?i?B/s", text), text
    assert "Traceback" not in text

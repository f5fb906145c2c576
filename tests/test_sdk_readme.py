"""README's SDK example runs as written: extracted from README, run as its own Python process
against a real `exchange serve`, with a developer and a tester enrolled through the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.artifacts.conftest import write
from tests.conftest import Served

README = Path(__file__).resolve().parent.parent / "README.md"


def sdk_example() -> str:
    match = re.search(r"<!-- sdk-example -->\n```python\n(.*?)\n```", README.read_text(), re.DOTALL)
    assert match is not None, "README's SDK example (after <!-- sdk-example -->) is missing"
    return match.group(1)


def test_the_readme_sdk_example_runs_as_written(served: Served, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(sdk_example())
    dev, tess = tmp_path / "dev.json", tmp_path / "tess.json"
    served.enrol("developer", "sdk-lab", "sdk-dana", dev)
    served.enrol("tester", "sdk-aisi", "sdk-tess", tess)
    data = write(tmp_path / "weights" / "model.bin", 300_000)
    out = tmp_path / "out"
    ran = subprocess.run(
        [sys.executable, str(script), served.url, str(dev), str(tess), str(tmp_path / "weights"), str(out)],
        capture_output=True,
        text=True,
        env=served.client_env(),
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("downloaded ") and "manifest " in ran.stdout
    assert (out / "weights" / "model.bin").read_bytes() == data  # decrypted and verified as it was sent


def test_the_documented_shell_completion_works() -> None:
    assert 'eval "$(_EXCHANGE_COMPLETE=bash_source exchange)"' in README.read_text()
    exchange = Path(sys.executable).parent / "exchange"  # the installed command, as a shell finds it
    made = subprocess.run(
        [str(exchange)], env={"_EXCHANGE_COMPLETE": "bash_source"}, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0 and "complete -o nosort -F _exchange_completion exchange" in made.stdout
    words = subprocess.run(
        [str(exchange)],
        env={"_EXCHANGE_COMPLETE": "bash_complete", "COMP_WORDS": "exchange aud", "COMP_CWORD": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "plain,audit" in words.stdout.splitlines()

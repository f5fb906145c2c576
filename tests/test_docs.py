"""README documents every setting, and the two commands it promises."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from exchange.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [
        f"EXCHANGE_{f.name.upper()}" for f in fields(Settings) if f"EXCHANGE_{f.name.upper()}" not in README
    ]
    assert missing == []


def test_readme_shows_the_two_commands() -> None:
    assert "scripts/run" in README and "scripts/test" in README

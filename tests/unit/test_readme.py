"""The README's settings table lists every setting, and nothing that is not one."""

from __future__ import annotations

import re
from pathlib import Path

from services.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_settings_table_matches_the_settings() -> None:
    section = README[README.index("## Settings") :]
    section = section[: section.index("\n## ", 1)]
    documented = set(re.findall(r"^\| `(ACTIVITIES_[A-Z_]+)`", section, re.MULTILINE))
    actual = {f"ACTIVITIES_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual

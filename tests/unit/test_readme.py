"""The documentation lists every setting, stays within the repository, and keeps the README short."""

from __future__ import annotations

import os
import re
from pathlib import Path

from services.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def test_settings_table_matches_the_settings() -> None:
    """docs/operations.md's settings table lists every setting, and nothing that is not one."""
    section = OPERATIONS[OPERATIONS.index("## Settings") :]
    section = section[: section.index("\n## ", 1)]
    documented = set(re.findall(r"^\| `(ACTIVITIES_[A-Z_]+)`", section, re.MULTILINE))
    actual = {f"ACTIVITIES_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual


def test_readme_links_the_settings_table() -> None:
    assert "docs/operations.md" in README


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= 250


def test_documents_stand_alone() -> None:
    """A clone has only the repository: no document points outside it."""
    documents = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    outside = os.pardir + "/" + "shared"  # the folder beside a working copy that a clone does not have
    for path in documents:
        if path.exists():
            assert outside not in path.read_text(), path
    for path in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README.md links to missing {target}"

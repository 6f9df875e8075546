"""Code shown in docs/ is the code tested: each block after a
``<!-- snippet: FILE NAME -->`` marker must equal the part of FILE between
``# --8<-- [start:NAME]`` and ``# --8<-- [end:NAME]``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- snippet: (\S+) (\S+) -->\n```python\n(.*?)\n```", re.DOTALL)


def snippets() -> list[tuple[str, str, str, str]]:
    found = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for file, name, code in MARKER.findall(page.read_text()):
            found.append((page.name, file, name, code))
    return found


def section(file: str, name: str) -> str:
    text = (ROOT / file).read_text()
    match = re.search(rf"# --8<-- \[start:{name}\]\n(.*?)# --8<-- \[end:{name}\]", text, re.DOTALL)
    assert match is not None, f"{file} has no section {name!r}"
    return match.group(1).strip("\n")


def test_the_testing_guide_shows_its_examples() -> None:
    assert {name for page, _, name, _ in snippets() if page == "testing.md"} >= {
        "worker",
        "unit",
        "property",
        "fixtures",
        "traffic",
        "outage",
        "asyncio",
    }


@pytest.mark.parametrize(("page", "file", "name", "code"), snippets(), ids=lambda v: str(v)[:30])
def test_snippet_matches_its_source(page: str, file: str, name: str, code: str) -> None:
    assert code == section(file, name), f"docs/{page}: snippet {name} differs from {file}"

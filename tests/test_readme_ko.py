"""README.ko.md stays in step with README.md: same sections, same commands and code,
same config keys in the same order. Prose is translated; everything a reader copies is not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
ENGLISH = (ROOT / "README.md").read_text(encoding="utf-8")
KOREAN = (ROOT / "README.ko.md").read_text(encoding="utf-8")


def headings(text: str) -> list[str]:
    """The level of each section heading, in order (titles are translated)."""
    return [line.split(" ", 1)[0] for line in _outside_code(text) if re.match(r"#{1,3} ", line)]


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[str]:
    """Fenced blocks and 4-space indented blocks, verbatim."""
    fenced = re.findall(r"^[ ]*```[^\n]*\n(.*?)^[ ]*```", text, flags=re.M | re.S)
    indented = re.findall(r"(?:^\n)((?:^    .*\n)+)", text, flags=re.M)
    return fenced + indented


def table_first_cells(text: str) -> list[str]:
    """First cells of table rows that are only code: config keys, commands, options, events."""
    cells = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `")]
    return [cell for cell in cells if not re.search(r"\w", re.sub(r"`[^`]*`", "", cell))]


def test_same_sections_in_the_same_order() -> None:
    assert headings(KOREAN) == headings(ENGLISH)


def test_same_code_and_commands() -> None:
    assert code_blocks(KOREAN) == code_blocks(ENGLISH)


def test_same_config_keys_commands_and_options_in_tables() -> None:
    assert table_first_cells(KOREAN) == table_first_cells(ENGLISH)


@pytest.mark.parametrize("term", ["웹훅", "웹훅 키", "인앱결제", "구매", "환불", "대시보드"])
def test_uses_nachocodes_korean_terms(term: str) -> None:
    assert term in KOREAN


def test_each_readme_links_to_the_other() -> None:
    assert "[한국어 README](README.ko.md)" in ENGLISH.splitlines()[:5]
    assert "[English README](README.md)" in KOREAN.splitlines()[:5]

"""README.ko.md stays in step with README.md: same sections, same commands and code, same
links. Prose is translated; everything a reader copies or follows is not. Both stay short:
the manual in docs/ holds the rest."""

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
    """Fenced blocks, verbatim, with their language."""
    return re.findall(r"^```[^\n]*\n.*?^```", text, flags=re.M | re.S)


def link_targets(text: str) -> list[str]:
    """Where the prose's links and inline URLs point, in order, except the link to the other
    language's README."""
    prose = "\n".join(_outside_code(text))
    targets = re.findall(r"\]\(([^)]+)\)|<(https?://[^>]+)>", prose)
    return [a or b for a, b in targets if (a or b) not in ("README.md", "README.ko.md")]


def test_same_sections_in_the_same_order() -> None:
    assert headings(KOREAN) == headings(ENGLISH)


def test_same_code_and_commands() -> None:
    assert code_blocks(ENGLISH)
    assert code_blocks(KOREAN) == code_blocks(ENGLISH)


def test_same_links() -> None:
    assert link_targets(KOREAN) == link_targets(ENGLISH)


@pytest.mark.parametrize("text", [ENGLISH, KOREAN], ids=["en", "ko"])
def test_short_enough_to_read_on_one_screen(text: str) -> None:
    assert len(text.splitlines()) <= 100


@pytest.mark.parametrize("text", [ENGLISH, KOREAN], ids=["en", "ko"])
def test_links_to_the_manual_in_both_languages(text: str) -> None:
    assert "(docs/)" in text
    assert "-D language=ko docs docs/_build/html-ko" in text
    assert "docs docs/_build/html " in text


@pytest.mark.parametrize("term", ["웹훅", "웹훅 키", "인앱결제", "구매", "환불", "대시보드"])
def test_uses_nachocodes_korean_terms(term: str) -> None:
    assert term in KOREAN


def test_each_readme_links_to_the_other() -> None:
    assert "[한국어 README](README.ko.md)" in ENGLISH.splitlines()[:5]
    assert "[English README](README.md)" in KOREAN.splitlines()[:5]

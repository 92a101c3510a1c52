"""Fail when the Korean manual strays from its glossary or shows English.

Usage: python docs/check_korean.py PO_DIR KOREAN_HTML_DIR

Three checks, each against what a Korean reader gets:

- the rejected forms of ``docs/glossary.rst`` (the block after ``.. _rejected-forms:``) in
  the translations of the Korean catalogs, outside code;
- comments of the manual's code blocks (messages of their own, through
  ``gettext_additional_targets``) left in English in the translation;
- the theme's English words (and the subtitle and copyright of ``docs/conf.py``) in the
  built Korean HTML, as text, tooltips or placeholders.

PO_DIR holds the Korean .po files (the theme's own ``sphinx.po`` included),
KOREAN_HTML_DIR the output of the Korean HTML build. That every message is translated at
all is ``docs/check_translations.py``'s job.
"""

from __future__ import annotations

import re
import runpy
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from babel.messages.pofile import read_po

DOCS = Path(__file__).resolve().parent

#: The theme's words (alabaster and Sphinx's basic theme) that a Korean page must not show.
THEME_ENGLISH = {
    "Related Topics",
    "Documentation overview",
    "Previous",
    "Next",
    "previous chapter",
    "next chapter",
    "Page source",
    "Show Source",
    "This Page",
    "Quick search",
    "Search",
    "Go",
    "Navigation",
    "Contents",
    "Table of Contents",
    "Index",
    "Module Index",
    "modules",
    "Search Page",
    "Powered by",
    "Link to this heading",
    "Link to this definition",
    "Link to this table",
    "Link to this code",
    "Link to this term",
    "Link to this image",
    "Link to this toctree",
    "Keyword-only parameters separator (PEP 3102)",
    "Source code for",
    "All modules for which code is available",
    "Fork me on GitHub",
}

#: Attributes a reader sees (tooltips, placeholders, text in place of an image).
_SHOWN_ATTRIBUTES = ("title", "placeholder", "alt", "value")

#: Markup whose text is code, kept in English: inline literals, roles, link targets, URLs.
_CODE = re.compile(r"``.+?``|:[\w:.-]+:`[^`]*`|`[^`]*`_{0,2}|<[^<>\s]+>|https?://\S+", flags=re.S)
#: A comment in a line of code: ``# ...`` (Python, shells, TOML) or ``// ...`` (JavaScript).
_COMMENT = re.compile(r"(?:^|\s)(?:#|//) +(.+)$", flags=re.M)
_TOOL_COMMENT = re.compile(r"^(?:type:|noqa|pragma|fmt:)")
_HANGUL = "가-힣"


def glossary() -> tuple[int, list[str], list[tuple[str, str]], str]:
    """How many terms, their accepted Korean forms, the rejected forms with their advice,
    and the block that lists the rejected forms (a quotation of them, not prose)."""
    page = (DOCS / "glossary.rst").read_text(encoding="utf-8")
    rows = re.findall(r"^   \* - .+\n     - (.+)$", page, flags=re.M)[1:]  # after the header
    forms = {form.strip() for row in rows for form in row.split(",")}
    accepted = sorted(forms, key=len, reverse=True)  # "전송 저장소" before "전송"
    section = page.split(".. _rejected-forms:", 1)[1]
    match = re.search(r"\.\. code-block:: text\n\n((?:   .*\n|\n)+)", section)
    if match is None:
        raise SystemExit("docs/glossary.rst: no block of rejected forms after its label")
    block = "\n".join(line[3:] for line in match.group(1).rstrip("\n").splitlines())
    rejected = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("#"):
            form, advice = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            rejected.append((form, advice))
    return len(rows), accepted, rejected, block


def _pattern(form: str) -> re.Pattern[str]:
    if form.isascii():  # a Latin word, in any case, not part of an identifier
        return re.compile(rf"(?<![\w.-]){re.escape(form)}\w*", flags=re.I)
    # A Korean form at the start of a word: 락 is rejected, 단락 is not.
    return re.compile(rf"(?<![{_HANGUL}]){re.escape(form)}")


def catalogs(po_dir: Path) -> Iterator[tuple[str, str, str]]:
    """(catalog, English, Korean) of every translated message."""
    for path in sorted(po_dir.glob("*.po")):
        with path.open("rb") as handle:
            catalog = read_po(handle, locale="ko")
        for message in catalog:
            if message.id and message.string and not message.fuzzy:
                yield path.name, str(message.id), str(message.string)


def _prose(text: str) -> str:
    """What of a message is prose: a code block's comments, or a paragraph without its
    inline code. Only code blocks keep line breaks in a catalog."""
    if "\n" in text:
        return "\n".join(_COMMENT.findall(text))
    return _CODE.sub(" ", text)


def rejected_forms_used(po_dir: Path) -> list[str]:
    _terms, accepted, rejected, block = glossary()
    patterns = [(advice, _pattern(form)) for form, advice in rejected]
    problems = []
    for name, english, korean in catalogs(po_dir):
        if korean == english or english == block:
            continue  # a quotation (a name, a code block, the glossary's own list), not prose
        prose = _prose(korean)
        for term in accepted:
            prose = prose.replace(term, " ")
        for advice, pattern in patterns:
            for found in pattern.finditer(prose):
                where = prose[max(0, found.start() - 20) : found.end() + 20].replace("\n", " ")
                problems.append(f"{name}: {found.group()!r} (use {advice}): ...{where}...")
    return problems


def _english_comments(text: str) -> list[str]:
    if "\n" not in text:
        text = _CODE.sub(" ", text)  # a comment quoted in a paragraph is code
    return [
        comment.strip()
        for comment in _COMMENT.findall(text)
        # English words in a row: "still pending", not code such as {status: "granted"}.
        if not _TOOL_COMMENT.match(comment) and re.search(r"[A-Za-z]{2,} [A-Za-z]{2,}", comment)
    ]


def comments_left_in_english(po_dir: Path) -> tuple[int, list[str]]:
    """How many code blocks have comments, and the comments their translation kept."""
    blocks, problems = 0, []
    for name, english, korean in catalogs(po_dir):
        comments = _english_comments(english)
        if not comments:
            continue
        blocks += 1
        kept = set(_english_comments(korean))
        problems += [f"{name}: comment not translated: {c[:70]!r}" for c in comments if c in kept]
    return blocks, problems


class _ShownText(HTMLParser):
    """The text and the shown attributes of a page, outside code and scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = 0
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [value for key, value in attrs if key in _SHOWN_ATTRIBUTES and value]
        if tag in ("script", "style", "pre", "code"):
            self.hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "pre", "code") and self.hidden:
            self.hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self.hidden and data.strip():
            self.found.append(data)


def theme_english_shown(html_dir: Path) -> tuple[int, list[str]]:
    conf = runpy.run_path(str(DOCS / "conf.py"))
    english = THEME_ENGLISH | {conf["html_theme_options"]["description"], conf["copyright"]}
    # Short words are UI only on their own ("Next"); longer phrases anywhere in a text.
    words = {text for text in english if len(text) < 12}
    phrases = english - words
    pages = sorted(html_dir.glob("**/*.html"))
    problems = set()
    for page in pages:
        parser = _ShownText()
        parser.feed(page.read_text(encoding="utf-8"))
        for text in parser.found:
            shown = " ".join(text.split()).rstrip(":")
            for found in {shown} & words | {phrase for phrase in phrases if phrase in shown}:
                problems.add(f"{page.relative_to(html_dir)}: English {found!r}")
    return len(pages), sorted(problems)


def main(po_dir: str, html_dir: str) -> int:
    terms, _accepted, rejected, _block = glossary()
    used = rejected_forms_used(Path(po_dir))
    blocks, comments = comments_left_in_english(Path(po_dir))
    pages, shown = theme_english_shown(Path(html_dir))
    for problem in [*used, *comments, *shown]:
        print(problem)
    print(
        f"glossary: {terms} terms, {len(rejected)} rejected forms; "
        f"rejected forms used: {len(used)}; "
        f"code blocks with comments: {blocks}, comments left in English: {len(comments)}; "
        f"Korean pages: {pages}, English theme words shown: {len(shown)}"
    )
    return 1 if used or comments or shown else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

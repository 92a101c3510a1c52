"""Fail when the Korean manual lags behind the English one.

Usage: python docs/check_translations.py GETTEXT_DIR PO_DIR

GETTEXT_DIR holds the .pot catalogs that ``sphinx-build -b gettext`` made from the pages
as they are now; PO_DIR the Korean .po files. Every message of every .pot must have a
translation in the .po of the same name that is neither empty nor fuzzy. Comparing against
fresh catalogs (not against the .po alone) is what catches an English sentence that changed:
its old translation no longer matches, and Sphinx would silently show the English.
Update the catalogs with ``sphinx-intl update -p docs/_build/gettext -l ko -d docs/locale``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from babel.messages.pofile import read_po


def main(gettext_dir: str, po_dir: str) -> int:
    problems: list[str] = []
    total = 0
    for pot_path in sorted(Path(gettext_dir).glob("**/*.pot")):
        name = pot_path.relative_to(gettext_dir).with_suffix(".po")
        with pot_path.open("rb") as handle:
            template = read_po(handle)
        po_path = Path(po_dir) / name
        if not po_path.exists():
            count = sum(1 for message in template if message.id)
            total += count
            problems += [f"{name}: missing, {count} messages untranslated"] * count
            continue
        with po_path.open("rb") as handle:
            catalog = read_po(handle, locale="ko")
        for message in template:
            if not message.id:
                continue
            total += 1
            translated = catalog.get(message.id, message.context)
            if translated is None or not translated.string:
                problems.append(f"{name}: untranslated: {str(message.id)[:70]!r}")
            elif translated.fuzzy:
                problems.append(f"{name}: fuzzy: {str(message.id)[:70]!r}")
    for problem in problems:
        print(problem)
    print(f"{total} messages, {total - len(problems)} translated, {len(problems)} to do")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

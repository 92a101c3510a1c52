"""The one way the tests drive a browser: Debian's headless Chromium through Playwright.

:func:`chromium` skips the test that asks for it when Chromium or Playwright is
missing, so a machine without them still gets a passing run (the test module's
other tests still run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``), closed when the block ends."""
    if not CHROMIUM.exists():
        pytest.skip(
            "browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
        )
    pytest.importorskip(
        "playwright.sync_api", reason="browser tests need Playwright (pip install -e '.[test]')"
    )
    from playwright.sync_api import sync_playwright

    # Playwright's own browser download is not used: the machine's network only
    # reaches package registries. Background networking is off because every
    # connection Chromium tries on its own is refused here.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()

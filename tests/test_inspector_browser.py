"""The delivery inspector end to end: a real server (``flask run``), deliveries
sent with ``flask nachocode send``, and a real headless Chromium driven by
Playwright. Screenshots of each page go to ``test-artifacts/inspector/``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from inspector_app import BROKEN_MARKER, INSPECTOR_TOKEN, INSTANCE_ENV
from live import BIN, ROOT, flask_run_args, free_port, live_server

from browser import chromium  # skips this module without Chromium or Playwright

from playwright.sync_api import Browser, Dialog, Page, ViewportSize, expect  # noqa: E402

APP = "tests/inspector_app.py"
ARTIFACTS = ROOT / "test-artifacts" / "inspector"
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
#: How long to wait for a page to show what the server did; polling runs every 2 s.
WAIT_MS = 20_000
XSS = '<script>alert("xss")</script>'

OpenPage = Callable[..., Page]


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inspector-app")


@pytest.fixture(scope="module")
def app_env(instance: Path) -> dict[str, str]:
    return {INSTANCE_ENV: str(instance), "FLASK_APP": APP}


@pytest.fixture(scope="module")
def base_url(app_env: dict[str, str], instance: Path) -> Iterator[str]:
    port = free_port()
    with live_server(
        flask_run_args(APP, port), port=port, env=app_env, log_path=instance / "server.log"
    ) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def open_page(browser: Browser, base_url: str) -> Iterator[OpenPage]:
    """A page in a fresh browser session, signed in with the token."""
    contexts = []

    def open_page(viewport: ViewportSize = DESKTOP) -> Page:
        context = browser.new_context(viewport=viewport, base_url=base_url)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"/nachocode/deliveries?token={INSPECTOR_TOKEN}")
        # Signed in, and the token is gone from the address bar.
        expect(page).to_have_url(f"{base_url}/nachocode/deliveries")
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def broken_handler(instance: Path) -> Iterator[Path]:
    """The marker file that makes the purchase handler fail; removed afterwards."""
    marker = instance / BROKEN_MARKER
    marker.touch()
    yield marker
    marker.unlink(missing_ok=True)


@pytest.fixture
def send(app_env: dict[str, str], base_url: str) -> Callable[..., int]:
    """Run ``flask nachocode send purchase --set FIELD=VALUE ...`` as a user
    does; return the id of the delivery it created."""

    def run(*assignments: str) -> int:
        command = [
            str(BIN / "flask"), "nachocode", "send", "purchase",
            "--url", f"{base_url}/nachocode/webhooks/purchase",
        ]
        for assignment in assignments:
            command += ["--set", assignment]
        result = subprocess.run(
            command, cwd=ROOT, env={**os.environ, **app_env}, capture_output=True, text=True, timeout=60
        )
        answer: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{"):])
        return int(answer["delivery"])

    return run


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fits_the_width(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_deliveries_arrive_live_and_a_failed_one_is_replayed(
    open_page: OpenPage, send: Callable[..., int], instance: Path, base_url: str
) -> None:
    page = open_page()
    page.evaluate("window.notReloaded = true")

    handled = send("userId=live-alice")
    handled_row = page.locator(f'tr[data-id="{handled}"]')
    expect(handled_row.locator("td.outcome")).to_contain_text("handled")
    expect(handled_row.locator("td.user")).to_have_text("live-alice")

    (instance / BROKEN_MARKER).touch()
    try:
        failed = send("userId=live-bob")
    finally:
        (instance / BROKEN_MARKER).unlink()
    failed_row = page.locator(f'tr[data-id="{failed}"]')
    expect(failed_row.locator("td.outcome")).to_contain_text("failed")
    expect(failed_row.locator("td.status")).to_have_text("500")
    expect(page.locator("tr.delivery").first).to_have_attribute("data-id", str(failed))  # newest first
    assert page.evaluate("window.notReloaded") is True, "the rows came by reloading the page"
    screenshot(page, "deliveries")

    failed_row.locator("td.user").click()  # the whole row opens the delivery
    expect(page).to_have_url(f"{base_url}/nachocode/deliveries/{failed}")
    expect(page.locator("#outcome")).to_have_text("failed")
    expect(page.locator("pre.traceback")).to_contain_text("RuntimeError: the coin service is down")
    expect(page.locator("#body")).to_contain_text('"userId": "live-bob"')
    expect(page.locator("dl.headers")).not_to_contain_text("Authorization")
    screenshot(page, "delivery-failed")

    page.locator("#replay").click()  # the handler is fixed: the marker is gone
    expect(page.locator("#outcome")).to_have_text("handled")
    expect(page.locator(".flash")).to_contain_text("handled (200)")
    expect(page.locator("#replays tr.delivery")).to_have_count(1)
    expect(page.locator("#replay")).to_have_count(0)
    screenshot(page, "delivery-replayed")

    page.goto("/nachocode/deliveries?outcome=failed")
    expect(page.locator(f'tr[data-id="{failed}"]')).to_have_count(0)
    page.goto("/nachocode/deliveries?q=live-bob")
    expect(page.locator(f'tr[data-id="{failed}"] td.outcome')).to_contain_text("handled")


def test_a_script_in_a_delivery_is_shown_as_text(open_page: OpenPage, send: Callable[..., int]) -> None:
    page = open_page()
    dialogs: list[str] = []

    def record(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", record)

    delivery = send(f"userId={XSS}")
    cell = page.locator(f'tr[data-id="{delivery}"] td.user')
    expect(cell).to_have_text(XSS)  # arrived through the live update
    page.reload()
    expect(cell).to_have_text(XSS)  # rendered with the page
    cell.click()
    expect(page.locator("dd.user")).to_have_text(XSS)
    expect(page.locator("#body")).to_contain_text('"userId": "<script>alert(\\"xss\\")</script>"')
    screenshot(page, "delivery-xss")

    assert dialogs == []
    # The only script on the page is the inspector's own.
    assert page.locator("script").count() == 1
    assert str(page.locator("script").get_attribute("src")).endswith("/inspector.js")


def test_pages_fit_a_phone(
    open_page: OpenPage, send: Callable[..., int], broken_handler: Path, base_url: str
) -> None:
    delivery = send("userId=phone-user-with-a-rather-long-identifier-0123456789")
    page = open_page(PHONE)
    expect(page.locator(f'tr[data-id="{delivery}"]')).to_be_visible()
    expect(page.locator("table#deliveries thead")).to_be_hidden()  # rows are cards on a phone
    assert fits_the_width(page)
    screenshot(page, "deliveries-phone")

    page.goto(f"/nachocode/deliveries/{delivery}")
    expect(page.locator("pre.traceback")).to_be_visible()
    expect(page.locator("#replay")).to_be_visible()
    assert fits_the_width(page)
    screenshot(page, "delivery-phone")

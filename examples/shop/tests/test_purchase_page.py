"""The coin shop's purchase flow: the ledger-aware handlers, and the receipt page
that shows "processing" until the webhook lands, in a real headless Chromium
against the shop served by ``flask run``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from examples.shop import create_app
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload

from support.browser import chromium
from support.live import flask_run_args, free_port, live_server

KEY = "shop-test-key"


@pytest.fixture
def shop(tmp_path: Path) -> Flask:
    return create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'shop.db'}",
            "NACHOCODE_WEBHOOK_KEY": KEY,
        }
    )


def test_a_refund_before_its_purchase_never_grants_the_refunded_coins(shop: Flask) -> None:
    client = shop.test_client()
    bought = purchase_payload(productId="coins_500", quantity=3, userId="ann")
    post_delivery(client, "refund", refund_payload(bought, refundQuantity=1))
    assert client.get("/balances").get_json() == {}  # no debt for coins never granted

    post_delivery(client, "purchase", bought)
    assert client.get("/balances").get_json() == {"ann": 1000}
    assert client.get("/users/ann/purchases").get_json() == [
        {
            "iapLogId": bought["iapLogId"],
            "productId": "coins_500",
            "environment": "sandbox",
            "status": "partially_refunded",
            "quantity": 3,
            "netQuantity": 2,
        }
    ]

    post_delivery(client, "refund", refund_payload(bought, refundQuantity=2))
    assert client.get("/balances").get_json() == {"ann": 0}


def test_the_receipt_page_polls_the_status_route_of_its_user(shop: Flask) -> None:
    page = shop.test_client().get('/receipt/77?userId=ann"</script>').get_data(as_text=True)
    assert 'const statusUrl = "/nachocode/purchases/77?userId=ann%22%3C/script%3E";' in page
    assert "Processing your purchase" in page


# --- in a real browser -------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as browser:  # skips without Chromium or Playwright
        page = browser.new_page()
        page.set_default_timeout(30_000)
        yield page


@pytest.fixture
def served_shop(tmp_path: Path) -> Callable[..., AbstractContextManager[str]]:
    """Serve the shop with ``flask run`` on its own SQLite file; keyword arguments
    become ``FLASK_*`` config."""

    def serve(**config: str) -> AbstractContextManager[str]:
        port = free_port()
        env = {
            "FLASK_SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'shop.db'}",
            "NACHOCODE_WEBHOOK_KEY": KEY,
            **{f"FLASK_{name}": value for name, value in config.items()},
        }
        return live_server(
            flask_run_args("examples/shop", port),
            port=port,
            env=env,
            log_path=tmp_path / "shop.log",
        )

    return serve


def send_purchase(base_url: str, payload: dict[str, Any]) -> None:
    answer = requests.post(
        f"{base_url}/nachocode/webhooks/purchase",
        json=payload,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert answer.status_code == 200, answer.text


STILL_PROCESSING = "Still processing. Your purchase will appear in your account shortly."


def status_line(page: Any) -> tuple[str, str]:
    line = page.locator("#purchase-status")
    return line.get_attribute("data-state"), line.inner_text()


def wait_until_settled(page: Any) -> tuple[str, str]:
    """Wait until the page leaves "processing", then the status line. A bound on
    waiting, not a timing assertion: the page normally gets there well under a second."""
    page.wait_for_function(
        "document.querySelector('#purchase-status').dataset.state !== 'processing'"
    )
    return status_line(page)


@pytest.mark.integration
@pytest.mark.browser  # .ci/matrix leaves these out
def test_processing_until_the_webhook_lands_then_granted(
    browser: Any, served_shop: Callable[..., AbstractContextManager[str]]
) -> None:
    bought = purchase_payload(productId="coins_500", quantity=2, userId="ann")
    with served_shop() as url:
        browser.goto(f"{url}/receipt/{bought['iapLogId']}?userId=ann")
        assert status_line(browser) == ("processing", "Processing your purchase…")

        send_purchase(url, bought)
        assert wait_until_settled(browser) == (
            "granted",
            "Thank you! 2 × coins_500 added to your account.",
        )


@pytest.mark.integration
@pytest.mark.browser
def test_a_late_webhook_shows_still_processing_and_check_again_finds_it(
    browser: Any, served_shop: Callable[..., AbstractContextManager[str]]
) -> None:
    bought = purchase_payload(productId="coins_500", userId="ann")
    with served_shop(SHOP_STATUS_GIVE_UP_MS="1500") as url:
        browser.goto(f"{url}/receipt/{bought['iapLogId']}?userId=ann")
        check_again = browser.locator("#check-again")
        check_again.wait_for(state="visible")
        assert status_line(browser) == ("processing", STILL_PROCESSING)

        send_purchase(url, bought)
        check_again.click()
        assert wait_until_settled(browser) == (
            "granted",
            "Thank you! 1 × coins_500 added to your account.",
        )

        # Another user's receipt for the same purchase never learns it exists.
        browser.goto(f"{url}/receipt/{bought['iapLogId']}?userId=bob")
        browser.locator("#check-again").wait_for(state="visible")
        assert status_line(browser) == ("processing", STILL_PROCESSING)

"""The purchase ledger: kept from purchase and refund deliveries, read through
``nachocode.ledger``. Every test runs on SQLite and PostgreSQL, with the
extension's own engine and with a shared Flask-SQLAlchemy ``db``; the last one
also under gunicorn with several workers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from flask_nachocode import NachocodeWebhook, Purchase, PurchaseEvent, RefundEvent
from flask_nachocode.reads import get_delivery
from flask_nachocode.schemas import MAX_COUNT
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload

from support.common import WEBHOOK_KEY, load_fixture
from support.effects_app import serve

pytestmark = pytest.mark.every_store


@dataclass
class Shop:
    """An app whose handlers note what the ledger showed them."""

    app: Flask
    ext: NachocodeWebhook
    seen: list[tuple[str, Purchase | None]] = field(default_factory=list)
    fail_with: Exception | None = None

    def post(self, event: str, payload: dict[str, Any]) -> Any:
        return post_delivery(self.app.test_client(), event, payload)

    def read(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.app.app_context():
            return function(*args, **kwargs)

    def get(self, payload: dict[str, Any]) -> Purchase | None:
        return self.read(self.ext.ledger.get, payload["iapLogId"], environment=None)

    def outcome(self, answer: Any) -> str:
        delivery = answer.get_json()["delivery"]
        store = self.app.extensions["nachocode"].store
        return str(self.read(get_delivery, store, delivery).outcome)


@pytest.fixture
def shop(make_app: Callable[..., Any]) -> Shop:
    app, ext = make_app()
    shop = Shop(app, ext)

    def note(event: PurchaseEvent | RefundEvent) -> None:
        shop.seen.append((event.name, ext.ledger.find(event)))
        if shop.fail_with is not None:
            raise shop.fail_with

    ext.on_purchase(note)
    ext.on_refund(note)
    return shop


def test_purchase_then_refund(shop: Shop) -> None:
    bought = purchase_payload(productType="non-consumable", environment="production")
    assert shop.post("purchase", bought).status_code == 200

    purchase = shop.get(bought)
    assert purchase is not None
    assert (purchase.state, purchase.status, purchase.net_quantity) == ("active", "granted", 1)
    assert purchase.user_id == "test-user"
    assert purchase.purchase_received
    assert shop.read(shop.ext.ledger.owns, "test-user", bought["productId"])
    # The handler already saw its own row, inside the delivery's transaction.
    assert shop.seen[-1][1] == purchase

    assert shop.post("refund", refund_payload(bought)).status_code == 200
    refunded = shop.get(bought)
    assert refunded is not None
    assert (refunded.state, refunded.status, refunded.refunded_quantity) == (
        "refunded",
        "refunded",
        1,
    )
    assert refunded.refunded_at is not None
    assert not shop.read(shop.ext.ledger.owns, "test-user", bought["productId"])
    assert not shop.read(shop.ext.ledger.owns, "test-user", bought["nachoProductId"])


def test_partial_refunds_sum_to_the_quantity(shop: Shop) -> None:
    bought = load_fixture("purchase-android")  # 3 units of coins_500, production
    shop.post("purchase", bought)

    assert shop.post("refund", load_fixture("refund-android-partial")).status_code == 200
    purchase = shop.get(bought)
    assert purchase is not None
    assert (purchase.state, purchase.status, purchase.refunded_quantity) == (
        "partially_refunded",
        "partially_refunded",
        1,
    )
    assert shop.read(shop.ext.ledger.net_quantity, "player-42", "coins_500") == 2
    assert shop.read(shop.ext.ledger.owns, "player-42", "coins_500")

    rest = refund_payload(bought, refundQuantity=2, refundedAt="2025-03-10T08:00:00.000Z")
    assert shop.post("refund", rest).status_code == 200
    purchase = shop.get(bought)
    assert purchase is not None
    assert (purchase.state, purchase.refunded_quantity, purchase.net_quantity) == ("refunded", 3, 0)
    assert shop.read(shop.ext.ledger.net_quantity, "player-42", "coins_500") == 0


def test_a_refund_beyond_the_quantity_is_refused_and_changes_nothing(shop: Shop) -> None:
    bought = purchase_payload(quantity=3)
    shop.post("purchase", bought)
    shop.post("refund", refund_payload(bought, refundQuantity=2))
    handled = len(shop.seen)

    answer = shop.post("refund", refund_payload(bought, refundQuantity=2))
    assert answer.status_code == 422
    assert answer.get_json()["error"] == "refund_exceeds_quantity"
    assert shop.outcome(answer) == "refused"
    assert len(shop.seen) == handled  # no handler ran for it
    purchase = shop.get(bought)
    assert purchase is not None
    assert (purchase.refunded_quantity, purchase.state) == (2, "partially_refunded")

    # Refused, not claimed: the right refund of the last unit still goes through.
    assert shop.post("refund", refund_payload(bought, refundQuantity=1)).status_code == 200
    assert shop.get(bought).refunded_quantity == 3  # type: ignore[union-attr]


def test_a_refund_before_its_purchase_is_applied_when_the_purchase_arrives(shop: Shop) -> None:
    bought = purchase_payload(quantity=2, productId="coins_500", price=9.99)
    assert shop.post("refund", refund_payload(bought, refundQuantity=1)).status_code == 200

    early = shop.get(bought)
    assert early is not None
    assert not early.purchase_received
    assert early.status == "pending"
    assert early.refunded_quantity == 1
    assert early.purchased_at is None
    # Nothing is owned and nothing counted before the purchase itself arrived.
    assert (
        shop.read(shop.ext.ledger.net_quantity, "test-user", "coins_500", environment="sandbox")
        == 0
    )

    assert shop.post("purchase", bought).status_code == 200
    event_name, seen = shop.seen[-1]
    assert event_name == "purchase"
    assert seen is not None
    assert seen.purchase_received
    assert seen.state == "partially_refunded"
    assert seen.refunded_quantity == 1
    assert seen.refunded_at is not None
    # The purchase fills in what only it carries.
    assert (seen.quantity, seen.unit_price) == (2, Decimal("9.99"))
    assert seen.purchased_at == datetime.fromisoformat(bought["purchasedAt"].replace("Z", "+00:00"))
    assert (
        shop.read(shop.ext.ledger.net_quantity, "test-user", "coins_500", environment="sandbox")
        == 1
    )


def test_a_purchase_fully_refunded_before_it_arrives_is_seen_refunded(shop: Shop) -> None:
    bought = purchase_payload()
    shop.post("refund", refund_payload(bought))
    shop.post("purchase", bought)
    seen = shop.seen[-1][1]
    assert seen is not None
    assert seen.status == "refunded"
    assert seen.net_quantity == 0


def test_a_purchase_of_fewer_units_than_already_refunded_is_refused(shop: Shop) -> None:
    bought = purchase_payload(quantity=1)
    early = refund_payload(bought, quantity=3, refundQuantity=2)  # a refund's copy that disagrees
    shop.post("refund", early)

    answer = shop.post("purchase", bought)
    assert answer.status_code == 422
    assert answer.get_json()["error"] == "refund_exceeds_quantity"
    purchase = shop.get(bought)
    assert purchase is not None
    assert not purchase.purchase_received
    assert purchase.quantity == 3


@pytest.mark.parametrize("order", ["purchase first", "refund first"])
def test_duplicates_never_count_twice(shop: Shop, order: str) -> None:
    bought = purchase_payload(quantity=4)
    refund = refund_payload(bought, refundQuantity=1)
    deliveries = [("purchase", bought), ("refund", refund)]
    if order == "refund first":
        deliveries.reverse()
    for event, payload in deliveries:
        assert shop.post(event, payload).get_json()["duplicate"] is False
        assert shop.post(event, payload).get_json()["duplicate"] is True

    purchase = shop.get(bought)
    assert purchase is not None
    assert (purchase.quantity, purchase.refunded_quantity, purchase.state) == (
        4,
        1,
        "partially_refunded",
    )
    assert len(shop.seen) == 2


def test_a_duplicate_that_says_something_else_leaves_the_ledger_alone(shop: Shop) -> None:
    # The claim decides whether the ledger is written, also where both are one
    # statement (PostgreSQL): a re-send that says something else must change nothing.
    bought = purchase_payload(os="android", quantity=2)
    assert shop.post("purchase", bought).get_json()["duplicate"] is False
    before = shop.get(bought)
    changed = {**bought, "quantity": 7, "userId": "someone-else", "price": 1}
    again = shop.post("purchase", changed)
    assert again.status_code == 200
    assert again.get_json()["duplicate"] is True
    assert len(shop.seen) == 1
    after = shop.get(bought)
    assert after == before
    assert after is not None
    assert after.quantity == 2
    assert after.user_id == bought["userId"]
    assert len(shop.read(shop.ext.ledger.purchases_of, bought["userId"], environment=None)) == 1


def test_refunds_of_the_largest_quantity_cannot_overflow_the_ledger(shop: Shop) -> None:
    bought = purchase_payload(quantity=MAX_COUNT)
    assert shop.post("purchase", bought).status_code == 200
    refund_all = refund_payload(
        bought, refund_quantity=MAX_COUNT, refunded_at="2030-01-01T00:00:00Z"
    )
    assert shop.post("refund", refund_all).status_code == 200
    one_more = refund_payload(bought, refund_quantity=MAX_COUNT, refunded_at="2030-01-02T00:00:00Z")
    answer = shop.post("refund", one_more)
    assert answer.status_code == 422
    assert answer.get_json()["error"] == "refund_exceeds_quantity"
    # Like every 422, it says what is wrong in `errors`: here the whole body.
    assert answer.get_json()["errors"] == {"_body": [answer.get_json()["message"]]}
    too_many = shop.post("purchase", purchase_payload(quantity=MAX_COUNT + 1))
    assert too_many.status_code == 422
    assert list(too_many.get_json()["errors"]) == ["quantity"]


@pytest.mark.parametrize("event", ["purchase", "refund"])
def test_a_handler_that_raises_rolls_the_ledger_back(shop: Shop, event: str) -> None:
    bought = purchase_payload(quantity=2)
    payload = bought if event == "purchase" else refund_payload(bought, refundQuantity=1)
    if event == "refund":
        shop.post("purchase", bought)

    shop.fail_with = RuntimeError("the shop's database is full")
    answer = shop.post(event, payload)
    assert answer.status_code == 500
    assert shop.outcome(answer) == "failed"
    after_failure = shop.get(bought)
    if event == "purchase":
        assert after_failure is None
    else:
        assert after_failure is not None
        assert after_failure.refunded_quantity == 0

    # The cause fixed, the re-sent delivery is handled and counted once.
    shop.fail_with = None
    assert shop.post(event, payload).get_json()["duplicate"] is False
    purchase = shop.get(bought)
    assert purchase is not None
    assert purchase.purchase_received
    assert purchase.refunded_quantity == (1 if event == "refund" else 0)


def test_refunds_arriving_out_of_order_keep_the_latest_refund_time(shop: Shop) -> None:
    bought = purchase_payload(quantity=2)
    shop.post("purchase", bought)
    shop.post(
        "refund", refund_payload(bought, refundQuantity=1, refundedAt="2025-05-02T00:00:00.000Z")
    )
    shop.post(
        "refund", refund_payload(bought, refundQuantity=1, refundedAt="2025-05-01T00:00:00.000Z")
    )
    purchase = shop.get(bought)
    assert purchase is not None
    assert purchase.refunded_quantity == 2
    assert purchase.refunded_at is not None
    assert purchase.refunded_at.isoformat() == "2025-05-02T00:00:00+00:00"


@pytest.mark.parametrize("purchase_first", [True, False], ids=["purchase_first", "refunds_first"])
def test_refunds_of_one_purchase_at_once_queue_instead_of_deadlocking(
    shop: Shop, caplog: pytest.LogCaptureFixture, purchase_first: bool
) -> None:
    # Six one-unit refunds of a five-unit purchase, each in a thread of its own with
    # its own connection, started together, five times over. On MySQL each refund
    # used to take the purchase row's lock shared (a caught duplicate key) before
    # updating it, and two refunds doing that at once deadlocked: about 170 of 240
    # in this shape on MariaDB, each one retried (or, out of retries, answered 503).
    for _ in range(5):
        bought = purchase_payload(quantity=5)
        if purchase_first:
            assert shop.post("purchase", bought).status_code == 200
        refunds = [
            refund_payload(bought, refundQuantity=1, refundedAt=f"2025-06-01T00:00:0{i}.000Z")
            for i in range(6)
        ]
        statuses: list[int] = []
        start = threading.Barrier(len(refunds))

        def send(payload: dict[str, Any], start: Any, statuses: list[int]) -> None:
            client = shop.app.test_client()
            start.wait()
            statuses.append(post_delivery(client, "refund", payload).status_code)

        threads = [
            threading.Thread(target=send, args=(refund, start, statuses)) for refund in refunds
        ]
        with caplog.at_level(logging.INFO, logger="flask_nachocode"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert sorted(statuses) == [200] * 5 + [422]
        purchase = shop.get(bought)
        assert purchase is not None
        assert purchase.refunded_quantity == 5
    assert "claim tried again" not in caplog.text


@pytest.mark.integration
def test_concurrent_partial_refunds_never_exceed_the_quantity(
    shop: Shop, database_url: str, store_mode: str, tmp_path: Path
) -> None:
    """Eight different one-unit refunds of a five-unit purchase, posted at once to
    three gunicorn workers: exactly five are granted, three refused."""
    store = shop.app.extensions["nachocode"].store
    shop.read(store.ensure_ready)  # tables in place before the workers start
    bought = purchase_payload(quantity=5)
    refunds = [
        refund_payload(bought, refundQuantity=1, refundedAt=f"2025-06-01T00:00:0{i}.000Z")
        for i in range(8)
    ]
    headers = {"Authorization": f"Bearer {WEBHOOK_KEY}"}
    server = serve(database_url, 3, tmp_path, key=WEBHOOK_KEY, mode=store_mode, log_level="INFO")
    with server as (url, _, _):
        assert requests.post(f"{url}/nachocode/webhooks/purchase", json=bought, headers=headers).ok
        statuses: list[int] = []
        start = threading.Barrier(len(refunds))

        def send(payload: dict[str, Any]) -> None:
            start.wait()
            answer = requests.post(
                f"{url}/nachocode/webhooks/refund", json=payload, headers=headers, timeout=60
            )
            statuses.append(answer.status_code)

        threads = [threading.Thread(target=send, args=(payload,)) for payload in refunds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        status = requests.get(
            f"{url}/nachocode/purchases/{bought['iapLogId']}", params={"userId": "test-user"}
        ).json()

    assert sorted(statuses) == [200] * 5 + [422] * 3
    assert (status["status"], status["refundedQuantity"], status["netQuantity"]) == (
        "refunded",
        5,
        0,
    )
    purchase = shop.get(bought)
    assert purchase is not None
    assert purchase.refunded_quantity == 5

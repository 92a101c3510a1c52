"""The request path the benchmarks measure: what it must keep doing while it is
made fast. One commit per delivery, exactly-once on both databases, and the
same validation answers (messages and dotted paths) as before any optimisation.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from flask_nachocode import PurchaseEvent
from flask_nachocode.events import AppStorePurchaseData, PlayStorePurchaseData
from flask_nachocode.schemas import MAX_COUNT, MAX_ID_LENGTH
from flask_nachocode.testing import (
    post_delivery,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)

from conftest import load_fixture


def _statements(engine: sa.Engine) -> list[str]:
    """Record the statements and COMMITs the engine sends from now on."""
    sent: list[str] = []
    sa.event.listen(
        engine, "before_cursor_execute",
        lambda conn, cursor, statement, *args: sent.append(statement.split()[0].upper()),
    )
    sa.event.listen(engine, "commit", lambda conn: sent.append("COMMIT"))
    return sent


@pytest.mark.parametrize("os", ["ios", "android"])
def test_purchase_handled_once_with_one_commit(make_app: Any, database_url: str, os: str) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    seen: list[PurchaseEvent] = []
    nachocode.on_purchase(seen.append)
    client = app.test_client()
    post_delivery(client, "purchase", purchase_payload(os=os))  # connects, creates tables
    with app.app_context():
        sent = _statements(app.extensions["nachocode"].store.engine)
    payload = purchase_payload(os=os)

    first = post_delivery(client, "purchase", payload)
    assert first.status_code == 200
    assert first.json["duplicate"] is False
    assert len(seen) == 2
    assert sent.count("COMMIT") == 1
    # claim, ledger row, delivery record: no reads, no second transaction; on
    # PostgreSQL the claim and the ledger row go in one statement (a CTE), after the
    # transaction's lock timeout.
    writes = ["SET", "WITH", "INSERT"] if database_url.startswith("postgresql") else ["INSERT"] * 3
    assert [s for s in sent if s != "COMMIT"] == writes

    sent.clear()
    again = post_delivery(client, "purchase", payload)
    assert again.status_code == 200
    assert again.json["duplicate"] is True
    assert len(seen) == 2
    assert sent.count("COMMIT") == 1
    with app.app_context():
        purchase = nachocode.ledger.find(seen[-1])
    assert purchase is not None and purchase.quantity == 1 and purchase.status == "granted"


def test_duplicate_purchase_leaves_the_ledger_alone(make_app: Any, database_url: str) -> None:
    # The claim decides whether the ledger is written, also where both are one
    # statement: a re-send that says something else must change nothing.
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    seen: list[PurchaseEvent] = []
    nachocode.on_purchase(seen.append)
    client = app.test_client()
    payload = purchase_payload(os="android", quantity=2)
    assert post_delivery(client, "purchase", payload).json["duplicate"] is False
    with app.app_context():
        before = nachocode.ledger.find(seen[0])
    changed = {**payload, "quantity": 7, "userId": "someone-else", "price": 1}
    again = post_delivery(client, "purchase", changed)
    assert again.status_code == 200 and again.json["duplicate"] is True
    assert len(seen) == 1
    with app.app_context():
        after = nachocode.ledger.find(seen[0])
        rows = nachocode.ledger.purchases_of(payload["userId"], environment=None)
    assert after == before
    assert after is not None and after.quantity == 2 and after.user_id == payload["userId"]
    assert len(rows) == 1


def test_refund_after_purchase_updates_the_ledger(make_app: Any, database_url: str) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    nachocode.on_purchase(lambda event: None)
    nachocode.on_refund(lambda event: None)
    client = app.test_client()
    purchase = purchase_payload(os="android", quantity=3)
    seen: list[PurchaseEvent] = []
    nachocode.on_purchase(seen.append)
    assert post_delivery(client, "purchase", purchase).json["duplicate"] is False
    refund = refund_payload(purchase, refundQuantity=1)
    assert post_delivery(client, "refund", refund).json["duplicate"] is False
    assert post_delivery(client, "refund", refund).json["duplicate"] is True
    too_many = post_delivery(client, "refund", refund_payload(purchase, refundQuantity=3))
    assert too_many.status_code == 422
    with app.app_context():
        row = nachocode.ledger.find(seen[0])
    assert row is not None
    assert (row.refunded_quantity, row.state) == (1, "partially_refunded")


def test_purchase_after_its_refund_completes_the_row(make_app: Any, database_url: str) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    seen: list[PurchaseEvent] = []
    nachocode.on_purchase(seen.append)
    nachocode.on_refund(lambda event: None)
    client = app.test_client()
    purchase = purchase_payload(os="ios", quantity=2, price=9.99)
    assert post_delivery(client, "refund", refund_payload(purchase, refundQuantity=1)).status_code == 200
    assert post_delivery(client, "purchase", purchase).json["duplicate"] is False
    with app.app_context():
        row = nachocode.ledger.find(seen[0])
    assert row is not None
    assert (row.purchase_received, row.refunded_quantity, row.state) == (True, 1, "partially_refunded")
    assert (row.quantity, row.unit_price, row.purchased_at) == (2, Decimal("9.99"), seen[0].purchased_at)
    assert row.refunded_at is not None


def test_documented_bodies_load_into_the_same_events(make_app: Any) -> None:
    app, nachocode = make_app()
    seen: list[Any] = []
    nachocode.on_purchase(seen.append)
    client = app.test_client()
    assert post_delivery(client, "purchase", load_fixture("purchase-ios")).status_code == 200
    assert post_delivery(client, "purchase", load_fixture("purchase-android")).status_code == 200
    ios, android = seen
    assert ios == PurchaseEvent(
        user_id="testUser", iap_log_id=1, nacho_product_id="NP-NXGLSTOEXK-0001", os="ios",
        product_id="com.nachocode.example.consumable", product_type="consumable", quantity=1,
        price=Decimal(1000), environment="sandbox",
        data=AppStorePurchaseData(original_transaction_id="2000000123456789",
                                  transaction_id="2000000123456789"),
        requested_at=datetime(2025, 2, 19, 2, 0, 31, 280000, tzinfo=timezone.utc),
        purchased_at=datetime(2025, 2, 19, 2, 0, 31, 280000, tzinfo=timezone.utc),
        verified_at=datetime(2025, 2, 19, 2, 0, 31, 280000, tzinfo=timezone.utc),
        raw=load_fixture("purchase-ios"),
    )
    assert ios.raw == load_fixture("purchase-ios")
    assert android.data == PlayStorePurchaseData(
        purchase_token="opaque-token-abc.AO-J1Oz9x7Qe", order_id="GPA.3312-4581-2334-55012"
    )
    assert (android.quantity, android.price, android.environment) == (3, Decimal(1200), "production")
    assert android.verified_at == datetime(2025, 3, 2, 11, 15, 5, 10000, tzinfo=timezone.utc)


_RANGE_ID = "Must be greater than or equal to 0 and less than or equal to 9223372036854775807."
_RANGE_COUNT = f"Must be greater than or equal to 1 and less than or equal to {MAX_COUNT}."
_TIMESTAMP = "Not an ISO 8601 timestamp with a zone, such as 2025-02-19T02:00:31.280Z."

#: (event, os, overrides, the 422 answer's ``errors``): pinned before the hot path
#: was optimised, so a faster schema cannot answer differently.
INVALID = [
    ("purchase", "ios", {"userId": None}, {"userId": ["Field may not be null."]}),
    ("purchase", "ios", {"userId": ""}, {"userId": [f"Length must be between 1 and {MAX_ID_LENGTH}."]}),
    ("purchase", "ios", {"userId": 5}, {"userId": ["Not a valid string."]}),
    ("purchase", "ios", {"iapLogId": "5"}, {"iapLogId": ["Not a valid integer."]}),
    ("purchase", "ios", {"iapLogId": True}, {"iapLogId": ["Not a valid integer."]}),
    ("purchase", "ios", {"iapLogId": 1.5}, {"iapLogId": ["Not a valid integer."]}),
    ("purchase", "ios", {"iapLogId": -1}, {"iapLogId": [_RANGE_ID]}),
    ("purchase", "ios", {"iapLogId": 2**63}, {"iapLogId": [_RANGE_ID]}),
    ("purchase", "ios", {"os": "web"}, {"os": ["Must be one of: android, ios."]}),
    ("purchase", "ios", {"productType": "subscription"},
     {"productType": ["Must be one of: consumable, non-consumable."]}),
    ("purchase", "ios", {"quantity": 0}, {"quantity": [_RANGE_COUNT]}),
    ("purchase", "ios", {"quantity": MAX_COUNT + 1}, {"quantity": [_RANGE_COUNT]}),
    ("purchase", "ios", {"price": "9.99"}, {"price": ["Not a number."]}),
    ("purchase", "ios", {"price": -1}, {"price": ["Must be 0 or more."]}),
    ("purchase", "ios", {"price": True}, {"price": ["Not a number."]}),
    ("purchase", "ios", {"environment": "staging"},
     {"environment": ["Must be one of: sandbox, production."]}),
    ("purchase", "ios", {"data": []}, {"data": ["Not a JSON object."]}),
    ("purchase", "ios", {"data": None}, {"data": ["Field may not be null."]}),
    ("purchase", "ios", {"os": "web", "data": {}}, {"os": ["Must be one of: android, ios."]}),
    ("purchase", "android", {"data": {"orderId": ""}},
     {"data.orderId": [f"Length must be between 1 and {MAX_ID_LENGTH}."]}),
    ("purchase", "android", {"data": {"purchaseToken": None}},
     {"data.purchaseToken": ["Field may not be null."]}),
    ("purchase", "ios", {"data": {"transactionId": 7}}, {"data.transactionId": ["Not a valid string."]}),
    ("purchase", "ios", {"purchasedAt": "2025-02-19T02:00:31"}, {"purchasedAt": [_TIMESTAMP]}),
    ("purchase", "ios", {"verifiedAt": "2025-13-19T02:00:31.280Z"}, {"verifiedAt": [_TIMESTAMP]}),
    ("purchase", "ios", {"requestedAt": 1739930431}, {"requestedAt": [_TIMESTAMP]}),
    ("purchase", "ios", {"userId": ..., "data": {"transactionId": ...}},
     {"userId": ["Missing data for required field."],
      "data.transactionId": ["Missing data for required field."]}),
    ("refund", "ios", {"refundQuantity": 2}, {"refundQuantity": ["Must not exceed quantity."]}),
    ("refund", "android", {"refundQuantity": 0, "refundedAt": "yesterday"},
     {"refundQuantity": [_RANGE_COUNT], "refundedAt": [_TIMESTAMP]}),
    ("unavailable_users", None, {"tokenNotFoundUserIds": ["a", 5], "tokenInvalidUserIds": "b"},
     {"tokenNotFoundUserIds.1": ["Not a valid string."], "tokenInvalidUserIds": ["Not a valid list."]}),
]


def _body(event: str, os: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    if event == "purchase":
        body = purchase_payload(os=os or "ios")
    elif event == "refund":
        body = refund_payload(os=os or "ios")
    else:
        body = unavailable_users_payload()
    for key, value in overrides.items():
        target = body
        if key == "data" and isinstance(value, dict) and value:
            target, (key, value) = body["data"], next(iter(value.items()))
        if value is ...:
            del target[key]
        else:
            target[key] = value
    return body


@pytest.mark.parametrize(("event", "os", "overrides", "errors"), INVALID)
def test_invalid_bodies_answer_as_before(
    make_app: Any, event: str, os: str | None, overrides: dict[str, Any], errors: dict[str, list[str]]
) -> None:
    app, nachocode = make_app()
    called: list[Any] = []
    nachocode.handler(event)(called.append)
    answer = post_delivery(app.test_client(), event, _body(event, os, overrides))
    assert answer.status_code == 422
    assert answer.json["errors"] == errors
    assert called == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"userId": NaN}', "the body is not valid JSON: NaN is not valid JSON"),
        ('{"userId": Infinity}', "the body is not valid JSON: Infinity is not valid JSON"),
        ('{"userId": ', "the body is not valid JSON: Expecting value: line 1 column 12 (char 11)"),
        ("[1, 2]", "the body must be a JSON object"),
    ],
)
def test_bodies_that_are_not_a_json_object_answer_400(make_app: Any, body: str, message: str) -> None:
    app, nachocode = make_app()
    nachocode.on_purchase(lambda event: None)
    answer = post_delivery(app.test_client(), "purchase", body)
    assert answer.status_code == 400
    assert answer.json["message"] == message

"""The reads shared by the CLI, the inspector, the metrics and the ledger's reader.
The pages and commands built on them are tested in their own modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload


class Shop:
    """An app (built by ``make_app``) with a handler for purchases and refunds."""

    def __init__(self, make_app: Callable[..., Any]) -> None:
        self.built = make_app()
        self.app = self.built.app
        self.client = self.app.test_client()
        self.built.ext.on_purchase(lambda event: None)
        self.built.ext.on_refund(lambda event: None)

    def post(self, event: str, payload: dict[str, Any]) -> None:
        assert post_delivery(self.client, event, payload).status_code == 200


@pytest.fixture
def shop(make_app: Callable[..., Any]) -> Shop:
    return Shop(make_app)


@pytest.mark.every_store
def test_ledger_queries_find_every_environment_unless_one_is_asked_for(shop: Shop) -> None:
    ledger = shop.built.ext.ledger
    live = purchase_payload(environment="production", quantity=2, userId="u1")
    # What `flask nachocode send` and the test factories build: a sandbox purchase.
    test = purchase_payload(quantity=5, userId="u1")
    assert test["environment"] == "sandbox"
    other_user = purchase_payload(environment="production", quantity=7, userId="u2")
    for payload in (live, test, other_user):
        shop.post("purchase", payload)
    product = live["productId"]

    with shop.app.app_context():
        assert ledger.get(test["iapLogId"]).environment == "sandbox"
        assert ledger.get(test["iapLogId"], environment="production") is None
        assert ledger.get(test["iapLogId"], environment="sandbox") is not None
        assert ledger.get(live["iapLogId"], user_id="u2") is None
        assert ledger.net_quantity("u1", product) == 7
        assert ledger.net_quantity("u1", product, environment="production") == 2
        assert ledger.net_quantity("u1", product, environment="sandbox") == 5
        assert [p.iap_log_id for p in ledger.purchases_of("u1")] == [
            test["iapLogId"],
            live["iapLogId"],  # newest first
        ]
        assert [p.iap_log_id for p in ledger.purchases_of("u1", environment="production")] == [
            live["iapLogId"]
        ]

    shop.post("refund", refund_payload(live))
    with shop.app.app_context():
        assert ledger.owns("u1", product)  # the sandbox units are still held
        assert not ledger.owns("u1", product, environment="production")
        assert ledger.owns("u1", product, environment="sandbox")

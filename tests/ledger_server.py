"""The app that live-server ledger tests run under gunicorn:
``gunicorn --chdir tests "ledger_server:create_app()"`` with NACHOCODE_DATABASE_URI
and NACHOCODE_WEBHOOK_KEY in the environment."""

from __future__ import annotations

import os

from flask import Flask

from flask_nachocode import NachocodeWebhook, PurchaseEvent, RefundEvent


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        NACHOCODE_DATABASE_URI=os.environ["NACHOCODE_DATABASE_URI"],
        NACHOCODE_WEBHOOK_KEY=os.environ["NACHOCODE_WEBHOOK_KEY"],
        NACHOCODE_PURCHASE_STATUS_ROUTE=True,
    )
    nachocode = NachocodeWebhook(app)

    @nachocode.on_purchase
    @nachocode.on_refund
    def accept(event: PurchaseEvent | RefundEvent) -> None:
        """The ledger does the bookkeeping; the handler only has to exist."""

    return app

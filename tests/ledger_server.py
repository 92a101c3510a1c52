"""The app that live-server ledger tests run under gunicorn:
``gunicorn --chdir tests "ledger_server:create_app()"`` with NACHOCODE_DATABASE_URI
and NACHOCODE_WEBHOOK_KEY in the environment; with NACHOCODE_TEST_SHARED_DB=1 the
store goes through a Flask-SQLAlchemy ``db`` shared with the app, whose tables
the test has created."""

from __future__ import annotations

import os

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_nachocode import NachocodeWebhook, PurchaseEvent, RefundEvent


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        NACHOCODE_WEBHOOK_KEY=os.environ["NACHOCODE_WEBHOOK_KEY"],
        NACHOCODE_PURCHASE_STATUS_ROUTE=True,
    )
    if os.environ.get("NACHOCODE_TEST_SHARED_DB") == "1":
        app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["NACHOCODE_DATABASE_URI"]
        db = SQLAlchemy(app)
        nachocode = NachocodeWebhook(app, db=db)
    else:
        app.config["NACHOCODE_DATABASE_URI"] = os.environ["NACHOCODE_DATABASE_URI"]
        nachocode = NachocodeWebhook(app)

    @nachocode.on_purchase
    @nachocode.on_refund
    def accept(event: PurchaseEvent | RefundEvent) -> None:
        """The ledger does the bookkeeping; the handler only has to exist."""

    return app

"""A small app for end-to-end tests of ``flask nachocode send``: run it with
``flask --app tests/recording_app.py``. Its handlers append what they received
to ``handled.jsonl`` in the instance folder, so a test can tell exactly which
bodies reached them. Configured from the environment, because ``flask run``
and ``flask nachocode send`` each build the app in their own process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flask import Flask

from flask_nachocode import NachocodeWebhook

#: Set by the test: the instance folder (database, last sent bodies, handled.jsonl).
INSTANCE_ENV = "RECORDING_APP_INSTANCE"
#: Set by the test: the webhook key the app accepts.
KEY_ENV = "RECORDING_APP_KEY"


def create_app() -> Flask:
    instance = Path(os.environ[INSTANCE_ENV])
    app = Flask(__name__, instance_path=str(instance))
    app.config.update(
        NACHOCODE_WEBHOOK_KEY=os.environ[KEY_ENV],
        NACHOCODE_DATABASE_URI=f"sqlite:///{instance / 'nachocode.db'}",
    )
    nachocode = NachocodeWebhook(app)
    handled = instance / "handled.jsonl"

    def record(event: Any, **typed: Any) -> None:
        line = json.dumps({"event": event.name, "raw": event.raw, **typed})
        with handled.open("a", encoding="utf-8") as log:
            log.write(line + "\n")

    @nachocode.on_purchase
    def purchase(event: Any) -> None:
        record(event, quantity=event.quantity, price=str(event.price), store_id=event.store_purchase_id)

    @nachocode.on_refund
    def refund(event: Any) -> None:
        record(event, refund_quantity=event.refund_quantity, store_id=event.store_purchase_id)

    @nachocode.on_unavailable_users
    def unavailable_users(event: Any) -> None:
        record(event, user_ids=event.user_ids)

    return app

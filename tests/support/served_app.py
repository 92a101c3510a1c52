"""The one app the tests serve with ``flask run`` and reach with ``flask nachocode
send``: ``flask --app tests/support/served_app.py``. Configured from the
environment, because ``flask run`` and ``flask nachocode send`` each build the app
in their own process.

Its handlers append what they received to ``handled.jsonl`` in the instance
folder, so a test can tell exactly which bodies reached them. The purchase
handler fails while the file ``handler-broken`` exists in the instance folder,
which is how a test breaks it and then fixes it before replaying. The inspector
is on and token-protected (not in debug mode, as in production).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flask import Flask

from flask_nachocode import NachocodeWebhook

#: Set by the test: the instance folder (database, last sent bodies, handled.jsonl, marker).
INSTANCE_ENV = "SERVED_APP_INSTANCE"
#: Set by the test if it wants another webhook key than :data:`WEBHOOK_KEY`.
KEY_ENV = "SERVED_APP_KEY"
WEBHOOK_KEY = "served-app-key-3b9d"
INSPECTOR_TOKEN = "served-app-token-81c4e07a"
#: While this file exists in the instance folder, the purchase handler raises.
BROKEN_MARKER = "handler-broken"


def create_app() -> Flask:
    instance = Path(os.environ[INSTANCE_ENV])
    app = Flask(__name__, instance_path=str(instance))
    app.config.update(
        SECRET_KEY="served-app-secret",
        NACHOCODE_WEBHOOK_KEY=os.environ.get(KEY_ENV, WEBHOOK_KEY),
        NACHOCODE_DATABASE_URI=f"sqlite:///{instance / 'nachocode.db'}",
        NACHOCODE_INSPECTOR=True,
        NACHOCODE_INSPECTOR_TOKEN=INSPECTOR_TOKEN,
    )
    nachocode = NachocodeWebhook(app)
    handled = instance / "handled.jsonl"

    def record(event: Any, **typed: Any) -> None:
        line = json.dumps({"event": event.name, "raw": event.raw, **typed})
        with handled.open("a", encoding="utf-8") as log:
            log.write(line + "\n")

    @nachocode.on_purchase
    def purchase(event: Any) -> None:
        if (instance / BROKEN_MARKER).exists():
            raise RuntimeError("the coin service is down")
        record(
            event,
            quantity=event.quantity,
            price=str(event.price),
            store_id=event.store_purchase_id,
        )

    @nachocode.on_refund
    def refund(event: Any) -> None:
        record(event, refund_quantity=event.refund_quantity, store_id=event.store_purchase_id)

    @nachocode.on_unavailable_users
    def unavailable_users(event: Any) -> None:
        record(event, user_ids=event.user_ids)

    return app

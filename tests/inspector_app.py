"""A small app for the inspector's browser tests: run it with
``flask --app tests/inspector_app.py``. The inspector is on and token-protected
(not in debug mode, as in production). The purchase handler fails while the
file ``handler-broken`` exists in the instance folder, which is how a test
breaks the handler and then fixes it before replaying. Configured from the
environment, because ``flask run`` and ``flask nachocode send`` each build the
app in their own process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask

from flask_nachocode import NachocodeWebhook

#: Set by the test: the instance folder (database, marker file).
INSTANCE_ENV = "INSPECTOR_APP_INSTANCE"
WEBHOOK_KEY = "inspector-app-key-3b9d"
INSPECTOR_TOKEN = "inspector-app-token-81c4e07a"
#: While this file exists in the instance folder, the purchase handler raises.
BROKEN_MARKER = "handler-broken"


def create_app() -> Flask:
    instance = Path(os.environ[INSTANCE_ENV])
    app = Flask(__name__, instance_path=str(instance))
    app.config.update(
        SECRET_KEY="inspector-app-secret",
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
        NACHOCODE_DATABASE_URI=f"sqlite:///{instance / 'nachocode.db'}",
        NACHOCODE_INSPECTOR=True,
        NACHOCODE_INSPECTOR_TOKEN=INSPECTOR_TOKEN,
    )
    nachocode = NachocodeWebhook(app)

    @nachocode.on_purchase
    def grant(event: Any) -> None:
        if (instance / BROKEN_MARKER).exists():
            raise RuntimeError("the coin service is down")

    return app

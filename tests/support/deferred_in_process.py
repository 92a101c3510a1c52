"""A deferred app in the test process, on Celery's own in-process modes: eager (each
attempt, and its retries, runs at once inside the request) or a memory broker that
no worker reads (deliveries stay queued)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from flask import Flask

from flask_nachocode import NachocodeWebhook

from support.common import WEBHOOK_KEY


def make_deferred_app(
    tmp_path: Path,
    url: str,
    handler: Callable[[Any], None],
    *,
    eager: bool,
    broker: str = "memory://",
    **config: Any,
) -> Flask:
    """``broker``: a real one for the tests that only ask it whether it answers."""
    app = Flask("deferred_in_process", instance_path=str(tmp_path / "instance"))
    app.config.update(
        TESTING=True,
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
        NACHOCODE_DATABASE_URI=url,
        NACHOCODE_DEFERRED=True,
        NACHOCODE_RETRY_DELAYS=[0, 0],
        **config,
    )
    app.extensions["celery"] = Celery("deferred_in_process", broker=broker, task_always_eager=eager)
    NachocodeWebhook(app).on_purchase(handler)
    return app

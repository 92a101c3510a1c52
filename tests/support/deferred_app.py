"""A test app with NACHOCODE_DEFERRED, run by gunicorn and by a real Celery worker
(``celery -A support.deferred_app:celery_app worker``), set up as in Flask's
"Background Tasks with Celery" pattern.

Configured by environment variables:
  DEFERRED_APP_DATABASE_URL  the database (SQLite file or PostgreSQL); the app shares
                             its Flask-SQLAlchemy ``db``, so the handler's effect row
                             (in ``test_effects``) commits with the delivery's move to
                             ``handled``
  DEFERRED_APP_BROKER_URL    the Celery broker (Redis or RabbitMQ)
  DEFERRED_APP_QUEUE         the queue's name (each test run its own)
  DEFERRED_APP_DIR           a directory through which the test steers the handler:
                             every run appends a line to ``runs`` (which no rollback
                             undoes); ``fail_times`` (a number N) makes the first N runs
                             of each identity raise; ``fail`` makes every run raise
                             while it exists; ``block`` makes a run write ``started``
                             and wait while it exists; ``store_faults`` (a number N)
                             makes the worker's next N statements that take a
                             queued delivery raise AttributeError, as flask-nachocode's
                             own code would (not a handler)
  DEFERRED_APP_RETRY_DELAYS  NACHOCODE_RETRY_DELAYS, comma-separated seconds
  NACHOCODE_WEBHOOK_KEY      the bearer key
  DEFERRED_APP_METRICS_TOKEN switches metrics and their route on, with this token
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery, Task
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_nachocode import NachocodeWebhook

from support.effects_app import effects_table

db = SQLAlchemy()
deferred_effects = effects_table(db.metadata)
nachocode = NachocodeWebhook(db=db)


def celery_init_app(app: Flask) -> Celery:
    """Flask's pattern, as its documentation shows it."""

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app() -> Flask:
    app = Flask(__name__)
    queue = os.environ["DEFERRED_APP_QUEUE"]
    delays = os.environ.get("DEFERRED_APP_RETRY_DELAYS", "")
    app.config.update(
        NACHOCODE_WEBHOOK_KEY=os.environ["NACHOCODE_WEBHOOK_KEY"],
        NACHOCODE_DEFERRED=True,
        NACHOCODE_PURCHASE_STATUS_ROUTE=True,
        NACHOCODE_RETRY_DELAYS=[float(delay) for delay in delays.split(",") if delay],
        SQLALCHEMY_DATABASE_URI=os.environ["DEFERRED_APP_DATABASE_URL"],
        CELERY={
            "broker_url": os.environ["DEFERRED_APP_BROKER_URL"],
            "task_default_queue": queue,
            "task_ignore_result": True,
            # With late acknowledgement, a worker should hold one task at a time.
            "worker_prefetch_multiplier": 1,
            # Redis only: how long before an unacknowledged task (its worker killed) is
            # delivered again, and how often a worker looks for such tasks; short, so
            # that the kill test does not wait an hour.
            "broker_transport_options": {
                "visibility_timeout": 8,
                "unacked_restore_interval": 1,
                "unacked_restore_throttle": 1,
            },
            "broker_connection_retry_on_startup": True,
            # An attempt that could not be made is tried again after 0.2 s, 0.4 s, ...
            # instead of 10 s, 20 s, ...
            "task_annotations": {"flask_nachocode.handle": {"retry_backoff": 0.2}},
        },
    )
    if os.environ.get("DEFERRED_APP_METRICS_TOKEN"):
        app.config.update(
            NACHOCODE_METRICS=True,
            NACHOCODE_METRICS_ROUTE=True,
            NACHOCODE_METRICS_TOKEN=os.environ["DEFERRED_APP_METRICS_TOKEN"],
        )
    db.init_app(app)
    celery_init_app(app)
    nachocode.init_app(app)
    return app


def control(name: str) -> Path:
    return Path(os.environ["DEFERRED_APP_DIR"]) / name


@sa.event.listens_for(sa.engine.Engine, "before_cursor_execute")
def store_fault(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
    """Raise in the extension's own code while ``store_faults`` counts down: in the
    statement with which the worker takes a queued delivery (Store.take_queued)."""
    faults = control("store_faults")
    if not statement.startswith("UPDATE nachocode_deliveries SET outcome") or not faults.exists():
        return
    left = int(faults.read_text())
    if left <= 0:
        return
    faults.write_text(str(left - 1))
    raise AttributeError("Could not locate column in row for column 'event'")


@nachocode.on_purchase
@nachocode.on_refund
@nachocode.on_unavailable_users
def handle(event: Any) -> None:
    identity = event.identity or event.name
    with open(control("runs"), "a") as runs:
        runs.write(f"{identity} {os.getpid()}\n")
    if control("block").exists():
        control("started").write_text(str(os.getpid()))
        while control("block").exists():
            time.sleep(0.05)
    db.session.execute(sa.insert(deferred_effects).values(identity=identity))
    if control("fail").exists():
        raise RuntimeError(f"the grant API is down (while handling {identity})")
    fail_times = control("fail_times")
    if fail_times.exists():
        runs_of_identity = sum(
            1 for line in control("runs").read_text().splitlines() if line.split()[0] == identity
        )
        if runs_of_identity <= int(fail_times.read_text()):
            raise RuntimeError(f"flaky grant API, run {runs_of_identity} of {identity}")


app = create_app()
# As the README does: the tables at import, so that gunicorn and the Celery worker's
# parent hold a pooled connection when they fork (each child must open its own).
with app.app_context():
    db.create_all()
celery_app: Celery = app.extensions["celery"]

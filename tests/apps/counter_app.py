"""A test app for the concurrency tests, run by gunicorn with several workers.

Configured by environment variables:
  COUNTER_APP_DATABASE_URL  the database (SQLite file or PostgreSQL)
  COUNTER_APP_MODE          "shared_db": NachocodeWebhook(app, db=db) and the handler
                            counts in the table ``counter_effects`` (created by the
                            test beforehand); "own_engine": the extension's own engine
                            creates its tables on first use, and the handler appends
                            a line to COUNTER_APP_EFFECTS_FILE
  NACHOCODE_WEBHOOK_KEY     the bearer key
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_nachocode import NachocodeWebhook


def effects_table(metadata: sa.MetaData, name: str) -> sa.Table:
    """A table with one row per handler run that took effect (the tests count them)."""
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("identity", sa.String(512), nullable=False),
    )


db = SQLAlchemy()
counter_effects = effects_table(db.metadata, "counter_effects")


def create_app() -> Flask:
    app = Flask(__name__)
    url = os.environ["COUNTER_APP_DATABASE_URL"]
    mode = os.environ["COUNTER_APP_MODE"]
    app.config["NACHOCODE_WEBHOOK_KEY"] = os.environ["NACHOCODE_WEBHOOK_KEY"]
    if mode == "shared_db":
        app.config["SQLALCHEMY_DATABASE_URI"] = url
        db.init_app(app)
        nachocode = NachocodeWebhook(app, db=db)

        def count(event: Any) -> None:
            db.session.execute(sa.insert(counter_effects).values(identity=event.identity or event.name))
    else:
        app.config["NACHOCODE_DATABASE_URI"] = url
        nachocode = NachocodeWebhook(app)
        effects_file = os.environ["COUNTER_APP_EFFECTS_FILE"]

        def count(event: Any) -> None:
            # One short O_APPEND write per run: atomic across the workers.
            with open(effects_file, "a") as effects:
                effects.write(f"{event.identity or event.name} {os.getpid()}\n")

    for name in ("purchase", "refund", "unavailable_users"):
        nachocode.handler(name)(count)
    return app

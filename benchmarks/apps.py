"""The three apps the benchmark compares, served by gunicorn as
``benchmarks.apps:create_app()`` with the variant chosen by environment:

- ``A``: the floor of receiving — constant-time key check, ``request.get_json()``,
  a JSON answer.
- ``B``: the floor of keeping every delivery — A plus one INSERT of the raw body
  under a key unique to the request and one COMMIT, through Flask-SQLAlchemy.
- ``C``: flask-nachocode on the same ``db`` (store and ledger on) with a no-op
  purchase handler.

``BENCH_VARIANT`` (A, B or C) and ``BENCH_DATABASE_URL`` choose; ``BENCH_LEDGER=off``
runs C with ``NACHOCODE_LEDGER = False``, to show what the ledger row costs, and
``BENCH_METRICS=on`` with ``NACHOCODE_METRICS`` (in multiprocess mode when
``PROMETHEUS_MULTIPROC_DIR`` is set), to show what counting costs; the key is
:data:`KEY`. B and C share one database and one ``db`` setup, so the only
difference between them is what the extension does.
"""

from __future__ import annotations

import hmac
import os
import uuid
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, jsonify, request
from sqlalchemy import insert
from flask_sqlalchemy import SQLAlchemy

from flask_nachocode import NachocodeWebhook, PurchaseEvent

KEY = "bench-key-5b1e"
PATH = "/nachocode/webhooks/purchase"
_EXPECTED = f"Bearer {KEY}".encode()


def _raw_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "bench_raw_deliveries",
        metadata,
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )


def _check_key() -> None:
    presented = request.headers.get("Authorization", "").encode("latin-1", "replace")
    if not hmac.compare_digest(presented, _EXPECTED):
        abort(401)


def create_app(
    variant: str | None = None, database_url: str | None = None, ledger: bool | None = None
) -> Flask:
    variant = (variant or os.environ.get("BENCH_VARIANT", "A")).upper()
    database_url = database_url or os.environ.get("BENCH_DATABASE_URL", "sqlite:///bench.db")
    if ledger is None:
        ledger = os.environ.get("BENCH_LEDGER", "on") != "off"
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        NACHOCODE_WEBHOOK_KEY=KEY,
        NACHOCODE_LEDGER=ledger,
        NACHOCODE_KEEP_BODIES=True,
    )
    db = SQLAlchemy(app)
    raw = _raw_table(db.metadata)
    app.extensions["bench_raw"] = raw

    if variant == "A":

        @app.post(PATH)
        def bare() -> Any:
            _check_key()
            request.get_json()
            return jsonify(success=True)

    elif variant == "B":
        if sa.engine.make_url(database_url).get_backend_name() == "sqlite":
            # The same connection set-up the extension gives SQLite, so B is not
            # slower (or faster) only for want of WAL or a busy timeout.
            from flask_nachocode.store import _sqlite_pragmas

            with app.app_context():
                sa.event.listen(db.engine, "connect", _sqlite_pragmas)

        @app.post(PATH)
        def keep() -> Any:
            _check_key()
            request.get_json()
            # A re-sent delivery is kept too, so duplicates cost B the same as new ones.
            db.session.execute(insert(raw).values(key=uuid.uuid4().hex, body=request.get_data()))
            db.session.commit()
            return jsonify(success=True)

    elif variant == "C":
        app.config["NACHOCODE_METRICS"] = os.environ.get("BENCH_METRICS") == "on"
        nachocode = NachocodeWebhook(app, db=db)

        @nachocode.on_purchase
        def noop(event: PurchaseEvent) -> None:
            pass

    else:
        raise ValueError(f"BENCH_VARIANT must be A, B or C, not {variant!r}")

    @app.get("/ping")
    def ping() -> Any:
        return jsonify(ok=True)

    return app


def prepare_database(database_url: str) -> None:
    """Create fresh tables for B and C, before any server starts (several workers
    creating tables at once would race).

    Dropped and created, not emptied: a DELETE leaves PostgreSQL's dead rows and
    their index entries behind until a vacuum, and C's three tables kept those of
    every earlier run while B's got a new table, so C got slower with each run
    on the same database.
    """
    app = create_app("C", database_url)
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        db.drop_all()
        db.create_all()
        app.extensions["nachocode"].store.ensure_ready()  # switches SQLite to WAL
        db.engine.dispose()

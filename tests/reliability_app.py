"""The app the reliability tests run under gunicorn (``reliability_app:create_app()``
with ``--chdir tests``).

Its handlers write one row per call into ``reliability_effects`` through the
shared Flask-SQLAlchemy ``db``, so the tests can count handler effects exactly:
a doubled delivery shows as two rows, a lost one as none. Behaviour for fault
injection comes from the environment:

``RELIABILITY_DATABASE_URI``  the database (SQLite file or PostgreSQL).
``NACHOCODE_WEBHOOK_KEY``     comma-separated keys; unset runs without a key.
``RELIABILITY_MARKER``        while this file exists, handlers sleep after writing
                              (a window for SIGKILL or a slow-handler test).
``RELIABILITY_STARTED_DIR``   handlers create a file here when they start.
``RELIABILITY_BUDGET``        overrides ``dispatch.DELIVERY_BUDGET_SECONDS`` (and the
                              warning threshold, half of it).
``RELIABILITY_LOG_LEVEL``     root log level (DEBUG in the key-leak tests).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_nachocode import ExactText, NachocodeWebhook, PurchaseEvent, RefundEvent, UnavailableUsersEvent
from flask_nachocode import delivery as nachocode_dispatch


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
nachocode = NachocodeWebhook(db=db)


class Effect(db.Model):  # type: ignore[name-defined,misc]
    """One handler call. No unique key on purpose: doubles must be countable."""

    __tablename__ = "reliability_effects"
    id: Mapped[int] = mapped_column(primary_key=True)
    identity: Mapped[str] = mapped_column(ExactText(512))
    event: Mapped[str] = mapped_column(String(32))
    pid: Mapped[int]


def _effect(event: PurchaseEvent | RefundEvent | UnavailableUsersEvent, identity: str) -> None:
    db.session.add(Effect(identity=identity, event=event.name, pid=os.getpid()))
    # Flushed before the pause, so a worker killed while paused leaves a written
    # but uncommitted row: the test checks it never becomes visible.
    db.session.flush()
    started = os.environ.get("RELIABILITY_STARTED_DIR")
    if started:
        Path(started, f"{os.getpid()}-{time.monotonic_ns()}").touch()
    marker = os.environ.get("RELIABILITY_MARKER")
    while marker and os.path.exists(marker):
        time.sleep(0.05)


@nachocode.on_purchase
def on_purchase(event: PurchaseEvent) -> None:
    _effect(event, event.identity)


@nachocode.on_refund
def on_refund(event: RefundEvent) -> None:
    _effect(event, event.identity)


@nachocode.on_unavailable_users
def on_unavailable_users(event: UnavailableUsersEvent) -> None:
    _effect(event, "unavailable:" + ",".join(event.user_ids))


def create_app() -> Flask:
    level = os.environ.get("RELIABILITY_LOG_LEVEL")
    if level:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        # SQLAlchemy holds its loggers at WARNING unless told: at DEBUG every
        # statement, parameter (stored headers, bodies) and row is logged too.
        logging.getLogger("sqlalchemy").setLevel(level)
    if os.environ.get("RELIABILITY_BUDGET"):
        budget = float(os.environ["RELIABILITY_BUDGET"])
        nachocode_dispatch.DELIVERY_BUDGET_SECONDS = budget
        nachocode_dispatch.SLOW_DELIVERY_SECONDS = budget / 2
    keys: Any = os.environ.get("NACHOCODE_WEBHOOK_KEY")
    app = Flask(__name__, instance_path=os.environ.get("RELIABILITY_INSTANCE", "/tmp"))
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ["RELIABILITY_DATABASE_URI"],
        NACHOCODE_WEBHOOK_KEY=keys.split(",") if keys else None,
    )
    db.init_app(app)
    nachocode.init_app(app)
    # Tables are created by the test before the server starts: several workers
    # racing on CREATE TABLE is not what these tests are about.
    return app


def create_tables(uri: str) -> None:
    """Create every table the app uses (the test calls this before starting gunicorn)."""
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=uri, TESTING=True)
    db.init_app(app)
    NachocodeWebhook(db=db).init_app(app)
    with app.app_context():
        db.create_all()
        db.engine.dispose()


@contextmanager
def serve(
    uri: str, workers: int, folder: Path, *, key: str | None, log_level: str = "DEBUG", **env: str
) -> Iterator[tuple[str, int, Path]]:
    """Create the tables on ``uri`` and run this app under gunicorn with ``workers``
    workers, logging everything at ``log_level`` into ``folder/gunicorn-PORT.log``; yield
    (base URL, port, log path). ``env`` sets the RELIABILITY_* knobs above."""
    from live import ROOT, free_port, gunicorn_args, live_server

    create_tables(uri)
    port = free_port()
    log = folder / f"gunicorn-{port}.log"
    full_env = {
        "RELIABILITY_DATABASE_URI": uri,
        "RELIABILITY_INSTANCE": str(folder),
        "RELIABILITY_LOG_LEVEL": log_level,
        "NACHOCODE_WEBHOOK_KEY": key or "",
        **env,
    }
    args = gunicorn_args("reliability_app:create_app()", port, workers) + [
        "--chdir", str(ROOT / "tests"), "--log-level", log_level.lower(), "--access-logfile", "-",
    ]
    with live_server(args, port=port, env=full_env, log_path=log) as base_url:
        yield base_url, port, log

"""The one app the tests run under gunicorn (``support.effects_app:create_app()``, with
``--chdir tests``), and under ``flask run`` where a test needs Werkzeug's server.

Every handler writes one effect per call, so a test can count handler effects
exactly: a doubled delivery shows as two, a lost one as none. With the shared
Flask-SQLAlchemy ``db`` (the default) the effect is a row of ``test_effects``,
written in the delivery's transaction; with the extension's own engine it is a
line appended to a file (the handler's writes are not the extension's to roll
back). Configured from the environment, because every worker builds the app:

``EFFECTS_APP_DATABASE_URI``  the database (SQLite file or PostgreSQL).
``EFFECTS_APP_MODE``          ``shared_db`` (default): ``NachocodeWebhook(app, db=db)``;
                              ``own_engine``: the extension's engine, which creates its
                              tables on first use.
``EFFECTS_APP_FILE``          own engine: the file that gets one ``identity pid`` line per effect.
``NACHOCODE_WEBHOOK_KEY``     comma-separated keys; unset or empty runs without a key.
``EFFECTS_APP_MARKER``        while this file exists, handlers wait after writing
                              (a window for SIGKILL or a slow-handler test).
``EFFECTS_APP_STARTED_DIR``   handlers create a file here when they start.
``EFFECTS_APP_BUDGET``        overrides ``dispatch.DELIVERY_BUDGET_SECONDS`` (and the
                              warning threshold, half of it).
``EFFECTS_APP_LOG_LEVEL``     root log level (DEBUG in the key-leak tests).
``EFFECTS_APP_INSTANCE``      the instance folder.
``EFFECTS_APP_METRICS_TOKEN`` switches metrics and their route on, with this token.

The purchase-status route is on, for the ledger's concurrency test.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_nachocode import NachocodeWebhook
from flask_nachocode import delivery as nachocode_dispatch


def effects_table(metadata: sa.MetaData) -> sa.Table:
    """One row per handler call that took effect. No unique key on purpose:
    doubles must be countable."""
    return sa.Table(
        "test_effects",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("identity", sa.String(512), nullable=False),
        sa.Column("event", sa.String(32)),
        sa.Column("pid", sa.Integer),
    )


db = SQLAlchemy()
effects = effects_table(db.metadata)


def identity_of(event: Any) -> str:
    """What an effect records: the event's identity, or the users an
    ``unavailable_users`` event names."""
    return event.identity or "unavailable:" + ",".join(event.user_ids)


def _pause() -> None:
    started = os.environ.get("EFFECTS_APP_STARTED_DIR")
    if started:
        Path(started, f"{os.getpid()}-{time.monotonic_ns()}").touch()
    marker = os.environ.get("EFFECTS_APP_MARKER")
    while marker and os.path.exists(marker):
        time.sleep(0.05)


def create_app() -> Flask:
    level = os.environ.get("EFFECTS_APP_LOG_LEVEL")
    if level:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        # SQLAlchemy holds its loggers at WARNING unless told: at DEBUG every
        # statement, parameter (stored headers, bodies) and row is logged too.
        logging.getLogger("sqlalchemy").setLevel(level)
    if os.environ.get("EFFECTS_APP_BUDGET"):
        budget = float(os.environ["EFFECTS_APP_BUDGET"])
        nachocode_dispatch.DELIVERY_BUDGET_SECONDS = budget
        nachocode_dispatch.SLOW_DELIVERY_SECONDS = budget / 2
    keys = os.environ.get("NACHOCODE_WEBHOOK_KEY")
    uri = os.environ["EFFECTS_APP_DATABASE_URI"]
    app = Flask(__name__, instance_path=os.environ.get("EFFECTS_APP_INSTANCE", "/tmp"))
    app.config.update(
        NACHOCODE_WEBHOOK_KEY=keys.split(",") if keys else None,
        NACHOCODE_PURCHASE_STATUS_ROUTE=True,
    )
    if os.environ.get("EFFECTS_APP_METRICS_TOKEN"):
        app.config.update(
            NACHOCODE_METRICS=True,
            NACHOCODE_METRICS_ROUTE=True,
            NACHOCODE_METRICS_TOKEN=os.environ["EFFECTS_APP_METRICS_TOKEN"],
        )
    if os.environ.get("EFFECTS_APP_MODE", "shared_db") == "shared_db":
        app.config["SQLALCHEMY_DATABASE_URI"] = uri
        db.init_app(app)
        nachocode = NachocodeWebhook(app, db=db)

        def record(event: Any) -> None:
            values = {"identity": identity_of(event), "event": event.name, "pid": os.getpid()}
            db.session.execute(sa.insert(effects).values(**values))
            # Written before the pause, so a worker killed while paused leaves a
            # written but uncommitted row: the test checks it never becomes visible.
            _pause()

    else:
        app.config["NACHOCODE_DATABASE_URI"] = uri
        nachocode = NachocodeWebhook(app)
        effects_file = os.environ["EFFECTS_APP_FILE"]

        def record(event: Any) -> None:
            # One short O_APPEND write per call: atomic across the workers.
            with open(effects_file, "a") as lines:
                lines.write(f"{identity_of(event)} {os.getpid()}\n")
            _pause()

    for name in ("purchase", "refund", "unavailable_users"):
        nachocode.handler(name)(record)
    return app


def create_tables(uri: str) -> None:
    """Create every table the shared-db app uses (a test does this before starting
    the workers: several of them racing on CREATE TABLE is not what it is about)."""
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=uri, TESTING=True)
    db.init_app(app)
    NachocodeWebhook(app, db=db)
    with app.app_context():
        db.create_all()
        db.engine.dispose()


def read_effects(uri: str, effects_file: Path | None = None) -> list[str]:
    """The identity of every effect, from the table or (own engine) the file."""
    if effects_file is not None:
        return [line.split()[0] for line in effects_file.read_text().splitlines()]
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        found = list(connection.execute(sa.select(effects.c.identity)).scalars())
    engine.dispose()
    return found


@contextmanager
def serve(
    uri: str,
    workers: int,
    folder: Path,
    *,
    key: str | None,
    mode: str = "shared_db",
    log_level: str = "DEBUG",
    gunicorn_config: Path | None = None,
    environment: dict[str, str] | None = None,
    **env: str,
) -> Iterator[tuple[str, int, Path]]:
    """Run this app under gunicorn with ``workers`` workers on ``uri``, logging at
    ``log_level`` into ``folder/gunicorn-PORT.log``; yield (base URL, port, log path).
    With the shared db the tables are created first; with the own engine the
    workers create them on first use, and effects go to ``folder/effects.txt``.
    ``env`` sets the EFFECTS_APP_* knobs above (without the prefix: ``MARKER=...``),
    ``environment`` other variables; ``gunicorn_config`` is gunicorn's ``--config``."""
    from support.live import ROOT, free_port, gunicorn_args, live_server

    if mode == "shared_db":
        create_tables(uri)
    port = free_port()
    log = folder / f"gunicorn-{port}.log"
    full_env = {
        "EFFECTS_APP_DATABASE_URI": uri,
        "EFFECTS_APP_MODE": mode,
        "EFFECTS_APP_FILE": str(folder / "effects.txt"),
        "EFFECTS_APP_INSTANCE": str(folder),
        "EFFECTS_APP_LOG_LEVEL": log_level,
        "NACHOCODE_WEBHOOK_KEY": key or "",
        **{f"EFFECTS_APP_{name}": value for name, value in env.items()},
        **(environment or {}),
    }
    args = gunicorn_args("support.effects_app:create_app()", port, workers)
    args += ["--chdir", str(ROOT / "tests"), "--log-level", log_level.lower()]
    args += ["--access-logfile", "-"]
    if gunicorn_config is not None:
        args += ["--config", str(gunicorn_config)]
    with live_server(args, port=port, env=full_env, log_path=log) as base_url:
        yield base_url, port, log

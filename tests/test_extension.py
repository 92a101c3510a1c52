"""What ``init_app`` wires beyond the blueprint: Flask-Migrate's rendering hook."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_nachocode import NachocodeWebhook

from support.common import WEBHOOK_KEY

flask_migrate = pytest.importorskip("flask_migrate")


class Money(sa.types.TypeDecorator[str]):
    """An app's own custom type, which the app's own ``render_item`` writes."""

    impl = sa.String(32)
    cache_ok = True


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """Flask-Migrate's env.py runs logging.config.fileConfig, which disables every
    logger that exists (flask_nachocode's among them) and replaces the root's
    handlers: put them back for the tests that read logs."""
    loggers = [
        logger
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    kept = [(logger, logger.disabled, logger.level, list(logger.handlers)) for logger in loggers]
    root = (logging.root.level, list(logging.root.handlers))
    yield
    for logger, disabled, level, handlers in kept:
        logger.disabled, logger.level, logger.handlers = disabled, level, handlers
    logging.root.level, logging.root.handlers = root[0], root[1]


@pytest.mark.usefixtures("logging_restored")
@pytest.mark.parametrize("migrate_first", [True, False], ids=["migrate-first", "migrate-last"])
def test_generated_migrations_run_whichever_is_set_up_first(
    tmp_path: Path, migrate_first: bool
) -> None:
    # Flask-Migrate's default env.py passes Migrate(app, db, **kwargs) on to Alembic,
    # and Migrate.init_app replaces that config: the hook must reach it in either
    # order, and must leave the app's own render_item in charge of the app's types.
    seen: list[str] = []

    def render_money(kind: str, obj: Any, autogen_context: Any) -> Any:
        if kind == "type" and isinstance(obj, Money):
            seen.append(kind)
            return "sa.String(length=32)"
        return False

    db = SQLAlchemy()
    sa.Table("wallets", db.metadata, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table("prices", db.metadata, sa.Column("amount", Money(), primary_key=True))
    app = Flask("migrated_app", instance_path=str(tmp_path / "instance"))
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'app.db'}",
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
    )
    db.init_app(app)
    migrate = flask_migrate.Migrate(render_item=render_money)
    if migrate_first:
        migrate.init_app(app, db)
    NachocodeWebhook(app, db=db)
    if not migrate_first:
        migrate.init_app(app, db)
    directory = str(tmp_path / "migrations")

    with app.app_context():
        flask_migrate.init(directory)
        flask_migrate.migrate(directory)
        flask_migrate.upgrade(directory)
        tables = set(sa.inspect(db.engine).get_table_names())
        db.engine.dispose()
    assert {"nachocode_deliveries", "nachocode_claims", "wallets", "prices"} <= tables
    assert seen == ["type"]
    (script,) = (tmp_path / "migrations" / "versions").glob("*.py")
    assert "flask_nachocode" not in script.read_text()


@pytest.mark.parametrize("migrate_first", [True, False], ids=["migrate-first", "migrate-last"])
def test_requests_stop_paying_for_the_rendering_hook_once_set_up_is_over(
    tmp_path: Path, migrate_first: bool
) -> None:
    # The hook listens to every app context push until the app has handled a request:
    # Flask-Migrate, set up before that in either order, has it in its config for good,
    # and later requests push their contexts without running it.
    from flask.signals import appcontext_pushed

    db = SQLAlchemy()
    app = Flask("served_app", instance_path=str(tmp_path / "instance"))
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'app.db'}",
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
    )
    db.init_app(app)
    migrate = flask_migrate.Migrate()
    if migrate_first:
        migrate.init_app(app, db)
    NachocodeWebhook(app, db=db)
    if not migrate_first:
        migrate.init_app(app, db)

    def listening() -> bool:
        return any(True for _ in appcontext_pushed.receivers_for(app))

    assert listening()
    client = app.test_client()
    for _ in range(2):
        assert client.get("/nachocode/webhooks/purchase").status_code == 405
    assert not listening()
    assert app.extensions["nachocode"].migrate_listener is None
    render_item = app.extensions["migrate"].configure_args["render_item"]
    assert getattr(render_item, "func", None) is not None
    assert render_item("type", sa.String(8), None) is False

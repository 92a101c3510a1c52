"""Shared fixtures: apps, databases (SQLite always, PostgreSQL when configured), bodies."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_nachocode import NachocodeWebhook

FIXTURES = Path(__file__).parent / "fixtures"
WEBHOOK_KEY = "test-key-7d4c"

#: A PostgreSQL URL for the store tests, e.g.
#: postgresql+psycopg://postgres@127.0.0.1:5432/test. Its public schema is
#: wiped before each test that uses it: point it at a throwaway database.
POSTGRES_URL = os.environ.get("NACHOCODE_TEST_POSTGRES_URL")
#: A MySQL or MariaDB URL for the same tests, e.g.
#: mysql+pymysql://root@127.0.0.1:3306/test. Every table in its database is
#: dropped before each test that uses it: point it at a throwaway database.
MYSQL_URL = os.environ.get("NACHOCODE_TEST_MYSQL_URL")


def load_fixture(name: str) -> dict[str, Any]:
    """One of Nachocode's documented example bodies (copied from shared/nachocode/fixtures)."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


def delivery_rows(app: Flask) -> int:
    """How many deliveries ``app``'s store holds."""
    with app.app_context():
        store = app.extensions["nachocode"].store
        store.ensure_ready()
        total = store.session.execute(sa.select(sa.func.count()).select_from(store.deliveries)).scalar_one()
        store.session.rollback()  # end the read: SQLite writers must not wait on it
        return int(total)


def reset_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        connection.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


def reset_mysql(url: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        tables = connection.exec_driver_sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
        ).scalars().all()
        connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        for table in tables:
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS `{table}`")
        connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
    engine.dispose()


@pytest.fixture
def postgres_url() -> str:
    if not POSTGRES_URL:
        pytest.skip("NACHOCODE_TEST_POSTGRES_URL is not set; PostgreSQL tests skipped")
    reset_postgres(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture
def mysql_url() -> str:
    if not MYSQL_URL:
        pytest.skip("NACHOCODE_TEST_MYSQL_URL is not set; MySQL/MariaDB tests skipped")
    reset_mysql(MYSQL_URL)
    return MYSQL_URL


#: The server databases, by ``database_url`` parameter: the fixture giving each one's URL.
SERVER_URL_FIXTURES = {"postgresql": "postgres_url", "mysql": "mysql_url"}


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on an SQLite file, on PostgreSQL and on MySQL/MariaDB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nachocode.db'}"
    return str(request.getfixturevalue(SERVER_URL_FIXTURES[request.param]))


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., tuple[Flask, NachocodeWebhook]]:
    """Build a fresh app with the extension; keyword arguments are config."""

    def make(**config: Any) -> tuple[Flask, NachocodeWebhook]:
        app = Flask("nachocode_test_app", instance_path=str(tmp_path / "instance"))
        app.config.update(
            TESTING=True,
            NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
            NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / 'nachocode.db'}",
        )
        app.config.update(config)
        return app, NachocodeWebhook(app)

    return make


def stored_deliveries(app: Flask) -> list[Any]:
    """Every delivery the app's store holds, oldest first (rows with ``outcome``,
    ``status``, ``event``, ``body``, ``headers``, ``traceback``...)."""
    store = app.extensions["nachocode"].store
    with app.app_context():
        store.ensure_ready()
        rows = store.session.execute(sa.select(store.deliveries).order_by(store.deliveries.c.id)).all()
        store.session.rollback()
    return list(rows)


# --- Delivery store: the same tests on the extension's own engine and on a shared db ---


class StoreApp:
    """An app whose handlers record their effects, for the store tests.

    ``mode`` is ``"own_engine"`` (the extension's engine on NACHOCODE_DATABASE_URI)
    or ``"shared_db"`` (``NachocodeWebhook(app, db=db)``). Every event's handler
    writes one row to ``test_effects``: with the shared db through ``db.session``,
    so it commits or rolls back with the delivery; with the own engine into
    ``effects_seen`` (its writes are not the extension's to roll back). Set
    ``broken`` to make the handler write its effect and then raise.
    """

    def __init__(self, app: Flask, ext: NachocodeWebhook, db: Any, url: str, mode: str) -> None:
        self.app, self.ext, self.db, self.url, self.mode = app, ext, db, url, mode
        self.client = app.test_client()
        self.broken: bool | Callable[[Any], bool] = False
        self.effects_seen: list[str] = []

    @property
    def store(self) -> Any:
        return self.app.extensions["nachocode"].store

    def effects(self) -> list[str]:
        """The identity (or event name) of every handler run that took effect."""
        if self.db is None:
            return list(self.effects_seen)
        with self.app.app_context():
            rows = self.db.session.execute(sa.text("SELECT identity FROM test_effects ORDER BY id"))
            return [row[0] for row in rows]

    def rows(self, table: str, url: str | None = None) -> list[Any]:
        """Every row of ``table``, read on a connection of its own (to ``url``
        instead of the app's database URL when given)."""
        engine = sa.create_engine(url or self.url, poolclass=sa.pool.NullPool)
        # The store's own tables through their column types: on MySQL the exact-text
        # columns hold UTF-8 bytes that the types read back as text.
        known = self.store.metadata.tables.get(table)
        query = sa.select(known).order_by(*known.primary_key) if known is not None else sa.text(f"SELECT * FROM {table} ORDER BY 1")
        try:
            with engine.connect() as connection:
                return list(connection.execute(query))
        finally:
            engine.dispose()

    def deliveries(self) -> list[Any]:
        return self.rows("nachocode_deliveries")

    def close(self) -> None:
        with self.app.app_context():
            engine = self.store._engine if self.db is None else self.db.engine
            if engine is not None:
                engine.dispose()


@pytest.fixture(params=["own_engine", "shared_db"])
def store_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def build_store_app(url: str, mode: str, instance_path: str, *, create_tables: bool = True, **config: Any) -> StoreApp:
    """A :class:`StoreApp` on ``url`` in ``mode``; keyword arguments are config.
    ``create_tables=False`` leaves a shared db without tables."""
    from flask_sqlalchemy import SQLAlchemy

    app = Flask("nachocode_store_app", instance_path=instance_path)
    app.config.update({"TESTING": True, "NACHOCODE_WEBHOOK_KEY": WEBHOOK_KEY, **config})
    db = None
    if mode == "shared_db":
        db = SQLAlchemy()
        from apps.counter_app import effects_table as define_effects

        effects_table = define_effects(db.metadata, "test_effects")
        app.config["SQLALCHEMY_DATABASE_URI"] = url
        db.init_app(app)
        ext = NachocodeWebhook(app, db=db)
    else:
        app.config["NACHOCODE_DATABASE_URI"] = url
        ext = NachocodeWebhook(app)
    store_app = StoreApp(app, ext, db, url, mode)

    def record_effect(event: Any) -> None:
        identity = event.identity or event.name
        if db is not None:
            db.session.execute(sa.insert(effects_table).values(identity=identity))
        else:
            store_app.effects_seen.append(identity)
        broken = store_app.broken
        if broken(event) if callable(broken) else broken:
            raise RuntimeError(f"handler bug while handling {identity}")

    for name in ("purchase", "refund", "unavailable_users"):
        ext.handler(name)(record_effect)
    if db is not None and create_tables:
        with app.app_context():
            db.create_all()
    return store_app


@pytest.fixture
def store_apps(tmp_path: Path) -> Any:
    """``store_apps(url, mode, **config)`` builds a :class:`StoreApp` and disposes
    of its engines after the test (other test runs share the PostgreSQL server)."""
    made: list[StoreApp] = []

    def build(url: str, mode: str, **config: Any) -> StoreApp:
        made.append(build_store_app(url, mode, str(tmp_path / "instance"), **config))
        return made[-1]

    yield build
    for store_app in made:
        store_app.close()


@pytest.fixture
def make_store_app(database_url: str, store_mode: str, store_apps: Any) -> Any:
    """Build a :class:`StoreApp` on ``database_url`` (SQLite and PostgreSQL) in
    ``store_mode`` (own engine and shared db): each test using it runs four times.
    Keyword arguments as for :func:`build_store_app`, plus ``url=``."""

    def make(*, url: str | None = None, **config: Any) -> StoreApp:
        return store_apps(url or database_url, store_mode, **config)  # type: ignore[no-any-return]

    return make


@pytest.fixture(params=["own-engine", "shared-db"])
def make_ledger_app(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[Flask, NachocodeWebhook]]]:
    """Build an app whose store is on ``database_url`` (SQLite and PostgreSQL),
    set up both ways: the extension's own engine, and the app's Flask-SQLAlchemy
    ``db`` shared with the extension. Keyword arguments are config."""
    apps: list[Flask] = []

    def make(**config: Any) -> tuple[Flask, NachocodeWebhook]:
        app = Flask("nachocode_test_app", instance_path=str(tmp_path / "instance"))
        app.config.update(TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY)
        if request.param == "own-engine":
            app.config.update(NACHOCODE_DATABASE_URI=database_url, **config)
            ext = NachocodeWebhook(app)
        else:
            app.config.update(SQLALCHEMY_DATABASE_URI=database_url, **config)
            db = SQLAlchemy()
            db.init_app(app)
            ext = NachocodeWebhook(app, db=db)
            with app.app_context():
                db.create_all()
        apps.append(app)
        return app, ext

    yield make
    # Idle pooled connections would add up across tests on a shared PostgreSQL server.
    for app in apps:
        with app.app_context():
            app.extensions["nachocode"].store.engine.dispose()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the reliability tests tried (tests/figures.py), when any ran."""
    from figures import FIGURES, write_figures

    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")
        terminalreporter.write_line(f"written to {write_figures()}")

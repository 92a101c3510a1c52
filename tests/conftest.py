"""Shared fixtures: the one app factory (``make_app``) and what builds on it.

``make_app`` builds an app with the extension on one store *variant*: a database
(an SQLite file, or PostgreSQL when NACHOCODE_TEST_POSTGRES_URL is set) and a mode
(``own_engine``: the extension's engine on NACHOCODE_DATABASE_URI; ``shared_db``:
``NachocodeWebhook(app, db=db)`` with the app's Flask-SQLAlchemy ``db``). A test
runs on SQLite with the own engine unless it is marked:

``@pytest.mark.every_database``  runs it on SQLite and on PostgreSQL;
``@pytest.mark.every_mode``      runs it with the own engine and with a shared db;
``@pytest.mark.every_store``     both: all four variants.
 ``database_url`` and
``store_mode`` name the variant, for tests that need them without an app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_nachocode import NachocodeWebhook

from support.common import POSTGRES_URL, WEBHOOK_KEY, reset_postgres
from support.effects_app import effects_table
from support.fuzz import Harness

DATABASES = ("sqlite", "postgresql")
MODES = ("own_engine", "shared_db")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``store_variant`` as the test's marks ask (see the module docstring)."""
    if "store_variant" not in metafunc.fixturenames:
        return
    marked = {
        name
        for name in ("every_database", "every_mode", "every_store")
        if metafunc.definition.get_closest_marker(name)
    }
    databases = DATABASES if marked & {"every_database", "every_store"} else ("sqlite",)
    modes = MODES if marked & {"every_mode", "every_store"} else ("own_engine",)
    variants = [(database, mode) for database in databases for mode in modes]
    if len(variants) > 1:
        ids = [f"{database}-{mode}" for database, mode in variants]
        metafunc.parametrize("store_variant", variants, indirect=True, ids=ids)


@pytest.fixture
def store_variant(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(database, mode) of the test's variant; SQLite and the own engine when unmarked."""
    return getattr(request, "param", ("sqlite", "own_engine"))  # type: ignore[no-any-return]


@pytest.fixture
def postgres_url() -> str:
    if not POSTGRES_URL:
        pytest.skip("NACHOCODE_TEST_POSTGRES_URL is not set; PostgreSQL tests skipped")
    reset_postgres(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture
def database_url(
    request: pytest.FixtureRequest, store_variant: tuple[str, str], tmp_path: Path
) -> str:
    """The variant's database: an SQLite file in ``tmp_path``, or PostgreSQL (wiped)."""
    if store_variant[0] == "sqlite":
        return f"sqlite:///{tmp_path / 'nachocode.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store_mode(store_variant: tuple[str, str]) -> str:
    return store_variant[1]


class TestApp:
    """An app built by ``make_app``. Unpacks as ``app, ext = make_app()``.

    ``db`` is the app's Flask-SQLAlchemy ``db`` in the shared-db mode (else None);
    ``url`` the database the store is on.
    """

    __test__ = False  # not a test class, whatever its name

    def __init__(self, app: Flask, ext: NachocodeWebhook, db: Any, url: str, mode: str) -> None:
        self.app, self.ext, self.db, self.url, self.mode = app, ext, db, url, mode
        self.client = app.test_client()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.app, self.ext))

    @property
    def store(self) -> Any:
        return self.app.extensions["nachocode"].store

    def rows(self, table: str, url: str | None = None) -> list[Any]:
        """Every row of ``table``, read on a connection of its own (to ``url``
        instead of the app's database when given)."""
        engine = sa.create_engine(url or self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                return list(connection.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1")))
        finally:
            engine.dispose()

    def deliveries(self) -> list[Any]:
        return self.rows("nachocode_deliveries")

    def close(self) -> None:
        """Dispose of the engines: idle pooled connections would add up across
        tests on a shared PostgreSQL server."""
        with self.app.app_context():
            engine = self.store._engine if self.db is None else self.db.engine
            if engine is not None:
                engine.dispose()


class EffectsApp(TestApp):
    """A :class:`TestApp` whose handlers (one per event) record their effects.

    With the shared db each effect is a row of ``test_effects`` written through
    ``db.session``, so it commits or rolls back with the delivery; with the own
    engine it goes to ``effects_seen`` (its writes are not the extension's to roll
    back). Set ``broken`` (or a function of the event) to make the handler write
    its effect and then raise.
    """

    def __init__(self, built: TestApp, effects: sa.Table | None) -> None:
        super().__init__(built.app, built.ext, built.db, built.url, built.mode)
        self.broken: bool | Callable[[Any], bool] = False
        self.effects_seen: list[str] = []

        def record_effect(event: Any) -> None:
            identity = event.identity or event.name
            if effects is not None:
                self.db.session.execute(
                    sa.insert(effects).values(identity=identity, event=event.name)
                )
            else:
                self.effects_seen.append(identity)
            broken = self.broken
            if broken(event) if callable(broken) else broken:
                raise RuntimeError(f"handler bug while handling {identity}")

        for name in ("purchase", "refund", "unavailable_users"):
            self.ext.handler(name)(record_effect)

    def effects(self) -> list[str]:
        """The identity (or event name) of every handler run that took effect."""
        if self.db is None:
            return list(self.effects_seen)
        with self.app.app_context():
            rows = self.db.session.execute(sa.text("SELECT identity FROM test_effects ORDER BY id"))
            return [row[0] for row in rows]


@pytest.fixture
def make_app(
    store_variant: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., TestApp]]:
    """``make_app(**config)`` builds a fresh :class:`TestApp` on the test's store
    variant; keyword arguments are config. ``url=`` puts it on another database,
    ``create_tables=False`` leaves a shared db without tables."""
    database, mode = store_variant
    built: list[TestApp] = []

    def make(*, url: str | None = None, create_tables: bool = True, **config: Any) -> TestApp:
        if url is None:
            url = str(request.getfixturevalue("database_url"))
        app = Flask("nachocode_test_app", instance_path=str(tmp_path / "instance"))
        app.config.update(TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY)
        db = None
        if mode == "shared_db":
            db = SQLAlchemy()
            effects_table(db.metadata)
            app.config["SQLALCHEMY_DATABASE_URI"] = url
            app.config.update(config)
            db.init_app(app)
            ext = NachocodeWebhook(app, db=db)
            if create_tables:
                with app.app_context():
                    db.create_all()
        else:
            app.config["NACHOCODE_DATABASE_URI"] = url
            app.config.update(config)
            ext = NachocodeWebhook(app)
        built.append(TestApp(app, ext, db, url, mode))
        return built[-1]

    yield make
    for test_app in built:
        test_app.close()


@pytest.fixture
def make_effects_app(make_app: Callable[..., TestApp]) -> Callable[..., EffectsApp]:
    """``make_effects_app(**config)``: an :class:`EffectsApp` built by ``make_app``."""

    def make(**config: Any) -> EffectsApp:
        built = make_app(**config)
        effects = built.db.metadata.tables["test_effects"] if built.db is not None else None
        return EffectsApp(built, effects)

    return make


@pytest.fixture
def app_and_calls(make_app: Callable[..., TestApp]) -> tuple[Flask, list[Any]]:
    """An app built by ``make_app`` with a recording handler for every event."""
    app, nachocode = make_app()
    calls: list[Any] = []
    for name in ("purchase", "refund", "unavailable_users"):
        nachocode.handler(name)(calls.append)
    return app, calls


@pytest.fixture
def harness(make_app: Callable[..., TestApp]) -> Harness:
    """An app built by ``make_app`` whose handlers record their calls (property tests)."""
    return Harness(make_app)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the reliability tests tried (tests/support/figures.py), when any ran."""
    from support.figures import FIGURES, write_figures

    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")
        terminalreporter.write_line(f"written to {write_figures()}")

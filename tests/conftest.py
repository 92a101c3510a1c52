"""Shared fixtures: apps, databases (SQLite always, PostgreSQL when configured), bodies."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_nachocode import NachocodeWebhook

FIXTURES = Path(__file__).parent / "fixtures"
WEBHOOK_KEY = "test-key-7d4c"

#: A PostgreSQL URL for the store tests, e.g.
#: postgresql+psycopg://postgres@127.0.0.1:5432/test. Its public schema is
#: wiped before each test that uses it: point it at a throwaway database.
POSTGRES_URL = os.environ.get("NACHOCODE_TEST_POSTGRES_URL")


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


@pytest.fixture
def postgres_url() -> str:
    if not POSTGRES_URL:
        pytest.skip("NACHOCODE_TEST_POSTGRES_URL is not set; PostgreSQL tests skipped")
    reset_postgres(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on an SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nachocode.db'}"
    return str(request.getfixturevalue("postgres_url"))


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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the reliability tests tried (tests/figures.py), when any ran."""
    from figures import FIGURES, write_figures

    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")
        terminalreporter.write_line(f"written to {write_figures()}")

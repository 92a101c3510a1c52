"""What every test module shares: the webhook key, Nachocode's documented bodies,
the PostgreSQL URL, and readers of what an app's store holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
WEBHOOK_KEY = "test-key-7d4c"

#: A PostgreSQL URL for the store tests, e.g.
#: postgresql+psycopg://postgres@127.0.0.1:5432/test. Its public schema is
#: wiped before each test that uses it: point it at a throwaway database.
POSTGRES_URL = os.environ.get("NACHOCODE_TEST_POSTGRES_URL")


def load_fixture(name: str) -> dict[str, Any]:
    """One of Nachocode's documented example bodies (copied from shared/nachocode/fixtures)."""
    return json.loads((FIXTURES / f"{name}.json").read_text())  # type: ignore[no-any-return]


def reset_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        connection.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


def delivery_rows(app: Flask) -> int:
    """How many deliveries ``app``'s store holds."""
    with app.app_context():
        store = app.extensions["nachocode"].store
        store.ensure_ready()
        table = store.deliveries
        total = store.session.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        store.session.rollback()  # end the read: SQLite writers must not wait on it
        return int(total)


def stored_deliveries(app: Flask) -> list[Any]:
    """Every delivery the app's store holds, oldest first (rows with ``outcome``,
    ``status``, ``event``, ``body``, ``headers``, ``traceback``...)."""
    store = app.extensions["nachocode"].store
    with app.app_context():
        store.ensure_ready()
        query = sa.select(store.deliveries).order_by(store.deliveries.c.id)
        rows = store.session.execute(query).all()
        store.session.rollback()
    return list(rows)

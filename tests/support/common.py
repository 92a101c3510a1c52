"""What every test module shares: the webhook key, Nachocode's documented bodies,
the database servers' URLs, and readers of what an app's store holds."""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
WEBHOOK_KEY = "test-key-7d4c"

#: This test run's id, in the name of every database it creates: two runs at the same
#: time (two checkouts, CI beside a developer) never share one.
RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"
#: Each run's databases, created on first use: {this run's URL: the configured URL}.
_RUN_DATABASES: dict[str, str] = {}
_CREATED: list[str] = []


def run_database(configured: str | None) -> str | None:
    """This run's own database on the server that ``configured`` names: the configured
    database's name with ``_run_`` and :data:`RUN_ID` appended. It is created (with the
    configured database's character set) by the first reset and dropped when the run
    ends; the configured database is only connected to, never written."""
    if not configured:
        return None
    url = sa.engine.make_url(configured)
    # 64 characters at most on MySQL, 63 on PostgreSQL; letters, digits and _ only.
    base = re.sub(r"[^A-Za-z0-9_]", "_", url.database or "test")[:40]
    own = url.set(database=f"{base}_run_{RUN_ID}").render_as_string(hide_password=False)
    _RUN_DATABASES[own] = configured
    return own


#: A PostgreSQL server and a database on it to start from, e.g.
#: postgresql+psycopg://postgres@127.0.0.1:5432/test (its user may create databases).
#: The tests use :func:`run_database`'s database of it, whose public schema is wiped
#: before each test that uses it.
POSTGRES_URL = run_database(os.environ.get("NACHOCODE_TEST_POSTGRES_URL"))
#: A MySQL or MariaDB server and a database to start from, e.g.
#: mysql+pymysql://root@127.0.0.1:3306/test. The tests use :func:`run_database`'s
#: database of it, every table of which is dropped before each test that uses it.
MYSQL_URL = run_database(os.environ.get("NACHOCODE_TEST_MYSQL_URL"))
#: The database servers, by name: the fixture (tests/conftest.py) that gives each
#: one's URL, wiped, or skips the test when it is not configured.
SERVER_URL_FIXTURES = {"postgresql": "postgres_url", "mysql": "mysql_url"}


def _server(url: str) -> sa.Engine:
    """An engine on the configured database that ``url`` (a run's database) started from."""
    return sa.create_engine(
        _RUN_DATABASES[url], isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )


def _ensure_created(url: str) -> None:
    if url in _CREATED:
        return
    name = sa.engine.make_url(url).database
    engine = _server(url)
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            encoding, collate, ctype = connection.exec_driver_sql(
                "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database "
                "WHERE datname = current_database()"
            ).one()
            connection.exec_driver_sql(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING '{encoding}' "
                f"LC_COLLATE '{collate}' LC_CTYPE '{ctype}'"
            )
        else:
            # The configured database's defaults (this machine's MariaDB: latin1), which
            # the tables must not depend on.
            defaults = connection.exec_driver_sql(
                "SELECT default_character_set_name, default_collation_name "
                "FROM information_schema.schemata WHERE schema_name = DATABASE()"
            ).first()
            like = f" CHARACTER SET {defaults[0]} COLLATE {defaults[1]}" if defaults else ""
            connection.exec_driver_sql(f"CREATE DATABASE `{name}`{like}")
    engine.dispose()
    if not _CREATED:
        atexit.register(_drop_created, os.getpid())
    _CREATED.append(url)


def _drop_created(creator: int) -> None:
    """Drop this run's databases, ending any connection still open to them."""
    if os.getpid() != creator:  # a forked child exiting: the run is not over
        return
    for url in _CREATED:
        name = sa.engine.make_url(url).database
        engine = _server(url)
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                connection.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                )
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            else:
                sessions = connection.exec_driver_sql(
                    "SELECT id FROM information_schema.processlist "
                    f"WHERE db = '{name}' AND id <> CONNECTION_ID()"
                ).scalars()
                for session in list(sessions):
                    connection.exec_driver_sql(f"KILL {int(session)}")
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        engine.dispose()


def load_fixture(name: str) -> dict[str, Any]:
    """One of Nachocode's documented example bodies (copied from shared/nachocode/fixtures)."""
    return json.loads((FIXTURES / f"{name}.json").read_text())  # type: ignore[no-any-return]


def reset_postgres(url: str) -> None:
    _ensure_created(url)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        connection.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


def reset_mysql(url: str) -> None:
    _ensure_created(url)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        tables = connection.exec_driver_sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
        ).scalars()
        for table in list(tables):
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS `{table}`")
    engine.dispose()


def drop_queue(broker_url: str, queue: str) -> None:
    """Delete what a test's Celery ``queue`` left in the broker. Each test has a queue
    of its own, and deletes nothing else: other test runs share the broker (even the
    Redis database)."""
    if broker_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker_url)
        # The queue's lists and its exchange's bindings (named after the queue).
        for key in list(client.scan_iter(match=f"*{queue}*")):
            client.delete(key)
        client.close()
    else:
        from kombu import Connection

        with Connection(broker_url) as connection:
            connection.default_channel.queue_delete(queue)
            connection.default_channel.exchange_delete(queue)


def text_of(value: Any) -> Any:
    """A value read with raw SQL, as text: MySQL's exact-text columns (identities,
    store and user ids) hold UTF-8 bytes."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else value


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

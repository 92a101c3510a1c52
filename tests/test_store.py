"""The delivery store: what is kept of every delivery, where, and what never is."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_nachocode import NachocodeWebhook
from flask_nachocode.delivery import REDACTED
from flask_nachocode.store import SQLITE_BUSY_TIMEOUT_MS, resolve_database_uri
from flask_nachocode.testing import post_delivery, purchase_payload, unavailable_users_payload

from conftest import WEBHOOK_KEY, load_fixture


def test_every_delivery_past_the_key_check_is_stored_with_every_column(make_store_app: Any) -> None:
    store_app = make_store_app()
    payload = load_fixture("purchase-ios")
    body = json.dumps(payload, indent=1).encode()
    answer = store_app.client.post(
        "/nachocode/webhooks/purchase",
        data=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {WEBHOOK_KEY}",
            "Cookie": "session=secret-cookie",
            "X-Request-Id": "req-1",
        },
    )
    assert answer.status_code == 200, answer.get_json()

    if store_app.db is not None:
        # On the app's metadata: db.create_all() and Alembic autogenerate see them.
        assert {"nachocode_deliveries", "nachocode_claims"} <= set(store_app.db.metadata.tables)

    [row] = store_app.deliveries()
    assert answer.get_json()["delivery"] == row.id
    assert (row.event, row.route, row.outcome, row.status) == ("purchase", "purchase", "handled", 200)
    assert bytes(row.body) == body
    headers = row.headers if isinstance(row.headers, dict) else json.loads(row.headers)
    assert headers["X-Request-Id"] == "req-1"
    assert {name.lower() for name in headers} & {"authorization", "cookie"} == set()
    assert row.remote_addr == "127.0.0.1"
    assert row.received_at is not None and row.finished_at is not None
    assert row.duration_ms >= 0
    assert row.error is None and row.traceback is None
    transaction_id = payload["data"]["transactionId"]
    assert row.identity == f"purchase:ios:{transaction_id}"
    assert row.user_id == payload["userId"] and row.iap_log_id == payload["iapLogId"]
    assert (row.replay_of, row.replay_count) == (None, 0)

    # A failure keeps what was raised and where.
    store_app.broken = True
    answer = post_delivery(store_app.client, "purchase", purchase_payload())
    assert answer.status_code == 500
    failed = store_app.deliveries()[-1]
    assert (failed.outcome, failed.status) == ("failed", 500)
    assert failed.error.startswith("RuntimeError: handler bug while handling purchase:ios:")
    assert "Traceback (most recent call last)" in failed.traceback
    assert "record_effect" in failed.traceback

    # Refused before a handler ran: stored too, with why.
    answer = post_delivery(store_app.client, "purchase", {"userId": "u"})
    assert answer.status_code == 422
    invalid = store_app.deliveries()[-1]
    assert (invalid.outcome, invalid.status, invalid.identity) == ("invalid", 422, None)
    assert invalid.error == "the body is not a valid purchase event"
    assert bytes(invalid.body) == b'{"userId": "u"}'


def test_a_delivery_without_the_key_leaves_no_trace(make_store_app: Any) -> None:
    store_app = make_store_app()
    post_delivery(store_app.client, "purchase", purchase_payload())
    for key in ("wrong-key", ""):
        answer = post_delivery(store_app.client, "purchase", purchase_payload(), key=key)
        assert answer.status_code == 401
    answer = store_app.client.post("/nachocode/webhooks/purchase", json=purchase_payload())
    assert answer.status_code == 401
    assert len(store_app.deliveries()) == 1
    assert len(store_app.rows("nachocode_claims")) == 1


def test_keep_bodies_off_stores_no_body(make_store_app: Any) -> None:
    store_app = make_store_app(NACHOCODE_KEEP_BODIES=False)
    post_delivery(store_app.client, "purchase", purchase_payload(userId="private-user"))
    post_delivery(store_app.client, "purchase", b'{"not": "valid"}')
    assert [row.body for row in store_app.deliveries()] == [None, None]


def test_text_postgresql_cannot_hold_is_refused_and_recorded(make_store_app: Any) -> None:
    # NUL in text and store ids longer than the claim key used to fail at INSERT
    # on PostgreSQL: a 503 and a lost delivery. They are refused bodies instead.
    store_app = make_store_app()
    too_long = purchase_payload(os="android", data={"orderId": "GPA." + "1" * 600})
    for payload in (purchase_payload(userId="user\x00id"), too_long):
        answer = post_delivery(store_app.client, "purchase", payload)
        assert answer.status_code == 422, answer.get_json()
    assert [row.outcome for row in store_app.deliveries()] == ["invalid", "invalid"]
    assert store_app.deliveries()[0].user_id == "user\\x00id"


def test_the_bearer_key_never_reaches_the_database_or_the_logs(
    make_store_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    key = "nachocode-key-Zq8wV3xR"
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")  # every statement and its parameters
    store_app = make_store_app(NACHOCODE_WEBHOOK_KEY=key)
    purchase = purchase_payload()
    post_delivery(store_app.client, "purchase", purchase)
    post_delivery(store_app.client, "purchase", purchase)  # duplicate
    post_delivery(store_app.client, "unavailable_users", unavailable_users_payload())
    post_delivery(store_app.client, "purchase", b"{broken")
    store_app.broken = True
    post_delivery(store_app.client, "purchase", purchase_payload())
    store_app.client.post(
        "/nachocode/webhooks/purchase",
        json=purchase_payload(),
        headers={
            "Authorization": f"bearer {key}",
            "Proxy-Authorization": f"Bearer {key}",
            # An API gateway that copies the key into a header of its own.
            "X-Forwarded-Authorization": f"Bearer {key}",
            "X-Request-Id": "req-42",
        },
    )
    assert len(store_app.deliveries()) == 6
    raw = store_app.deliveries()[-1].headers
    headers = json.loads(raw) if isinstance(raw, str) else raw
    assert headers["X-Forwarded-Authorization"] == REDACTED
    assert headers["X-Request-Id"] == "req-42"
    assert "Authorization" not in headers and "Proxy-Authorization" not in headers
    assert "SELECT" in caplog.text or "INSERT" in caplog.text  # the statements were logged
    assert key not in caplog.text

    url = sa.engine.make_url(store_app.url)
    if url.get_backend_name() == "sqlite":
        database = Path(url.database)
        # While connections are open the newest pages are in the -wal file; closing
        # the last one checkpoints them into the main file and removes it.
        wal = database.with_name(database.name + "-wal")
        assert wal.stat().st_size > 0
        for path in (database, wal):
            assert key.encode() not in path.read_bytes(), path
        store_app.close()
        assert not wal.exists()
        assert key.encode() not in database.read_bytes()
    else:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as connection:
            tables = connection.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
            for table in tables:
                dump = connection.execute(sa.text(f"SELECT string_agg(t::text, '') FROM {table} t")).scalar()
                assert key not in (dump or ""), table
        engine.dispose()


def test_own_engine_creates_its_tables_on_first_use(database_url: str, tmp_path: Path) -> None:
    app = Flask("first_use", instance_path=str(tmp_path / "instance"))
    app.config.update(TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY, NACHOCODE_DATABASE_URI=database_url)
    ext = NachocodeWebhook(app)
    ext.on_purchase(lambda event: None)
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    assert "nachocode_deliveries" not in sa.inspect(engine).get_table_names()
    answer = post_delivery(app.test_client(), "purchase", purchase_payload())
    assert answer.status_code == 200
    assert {"nachocode_deliveries", "nachocode_claims", "nachocode_purchases"} <= set(
        sa.inspect(engine).get_table_names()
    )
    engine.dispose()
    with app.app_context():
        app.extensions["nachocode"].store.engine.dispose()


def test_the_default_database_is_nachocode_db_in_the_instance_folder(tmp_path: Path) -> None:
    app = Flask("default_db", instance_path=str(tmp_path / "instance"))
    app.config.update(TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY)
    ext = NachocodeWebhook(app)
    ext.on_purchase(lambda event: None)
    assert post_delivery(app.test_client(), "purchase", purchase_payload()).status_code == 200
    database = tmp_path / "instance" / "nachocode.db"
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT outcome FROM nachocode_deliveries")).scalar() == "handled"
    engine.dispose()
    with app.app_context():
        app.extensions["nachocode"].store.engine.dispose()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, "sqlite:///{instance}/nachocode.db"),
        ({"SQLALCHEMY_DATABASE_URI": "sqlite:///app.db"}, "sqlite:///{instance}/app.db"),
        ({"SQLALCHEMY_DATABASE_URI": "sqlite:////srv/app.db"}, "sqlite:////srv/app.db"),
        (
            {"SQLALCHEMY_DATABASE_URI": "sqlite:///app.db", "NACHOCODE_DATABASE_URI": "sqlite:///hooks.db"},
            "sqlite:///{instance}/hooks.db",
        ),
        (
            {"NACHOCODE_DATABASE_URI": "postgresql+psycopg://u:p@db/hooks"},
            "postgresql+psycopg://u:p@db/hooks",
        ),
        ({"NACHOCODE_DATABASE_URI": "sqlite://"}, "sqlite://"),
    ],
)
def test_database_uri_resolution(tmp_path: Path, config: dict[str, str], expected: str) -> None:
    app = Flask("resolution", instance_path=str(tmp_path / "instance"))
    app.config.update(config)
    assert resolve_database_uri(app) == expected.format(instance=app.instance_path)


def test_sqlite_connections_use_wal_and_wait_for_locks(make_store_app: Any) -> None:
    store_app = make_store_app()
    if not store_app.url.startswith("sqlite"):
        pytest.skip("SQLite set-up only")
    assert post_delivery(store_app.client, "purchase", purchase_payload()).status_code == 200
    with store_app.app.app_context():
        # Every connection of the pool the store uses, the app's own included.
        with store_app.store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS


def test_in_memory_sqlite_is_one_database_for_every_thread(tmp_path: Path) -> None:
    import threading

    app = Flask("memory", instance_path=str(tmp_path / "instance"))
    app.config.update(TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY, NACHOCODE_DATABASE_URI="sqlite://")
    ext = NachocodeWebhook(app)
    ext.on_purchase(lambda event: None)
    statuses: list[int] = []
    for _ in range(2):
        thread = threading.Thread(
            target=lambda: statuses.append(post_delivery(app.test_client(), "purchase", purchase_payload()).status_code)
        )
        thread.start()
        thread.join()
    assert statuses == [200, 200]


def test_a_warning_when_flask_sqlalchemy_uses_the_same_sqlite_file_through_another_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flask_sqlalchemy import SQLAlchemy

    app = Flask("two_engines", instance_path=str(tmp_path / "instance"))
    # The default: the extension's own engine on the app's SQLALCHEMY_DATABASE_URI.
    app.config.update(TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY, SQLALCHEMY_DATABASE_URI="sqlite:///app.db")
    db = SQLAlchemy(app)
    ext = NachocodeWebhook(app)
    ext.on_purchase(lambda event: None)
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        post_delivery(app.test_client(), "purchase", purchase_payload())
    assert "Pass your db: NachocodeWebhook(app, db=db)" in caplog.text
    with app.app_context():
        db.engine.dispose()
        app.extensions["nachocode"].store.engine.dispose()


def test_replays_are_found_through_the_partial_replay_index(database_url: str) -> None:
    # The replay_of index is partial (replay_of IS NOT NULL): empty for ordinary
    # deliveries, and still the one the inspector's "replays of" lookup uses.
    from flask_nachocode.tables import define_deliveries

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    table = define_deliveries(sa.MetaData())
    table.drop(engine, checkfirst=True)
    table.create(engine)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                # An empty table is scanned whatever the indexes: ask for the plan
                # the index allows.
                connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = connection.exec_driver_sql(
                    "EXPLAIN SELECT id FROM nachocode_deliveries WHERE replay_of = 5"
                ).all()
            else:
                plan = connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT id FROM nachocode_deliveries WHERE replay_of = ?", (5,)
                ).all()
            assert "ix_nachocode_deliveries_replay_of" in " ".join(str(row) for row in plan)
    finally:
        table.drop(engine)
        engine.dispose()


def test_the_portable_claim_refuses_a_second_insert_and_keeps_the_transaction(
    database_url: str,
) -> None:
    # The claim used on databases without ON CONFLICT: exercised here on the two
    # the suite has, inside one outer transaction as a delivery would run it.
    from flask_nachocode.events import utcnow
    from flask_nachocode.store import _savepoint_insert
    from flask_nachocode.tables import define_claims

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    claims = define_claims(sa.MetaData())
    claims.drop(engine, checkfirst=True)
    claims.create(engine)
    values = {"identity": "purchase:ios:portable-1", "event": "purchase", "claimed_at": utcnow()}
    try:
        with engine.connect() as connection:
            with connection.begin():
                assert _savepoint_insert(connection, claims, values) is True
                assert _savepoint_insert(connection, claims, values) is False
                other = {**values, "identity": "purchase:ios:portable-2"}
                assert _savepoint_insert(connection, claims, other) is True
            count = connection.execute(sa.select(sa.func.count()).select_from(claims)).scalar()
        assert count == 2
    finally:
        claims.drop(engine)
        engine.dispose()


def test_missing_tables_are_a_503_whose_log_says_what_to_run(
    database_url: str, store_apps: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # With db= the tables are the app's to create; forgetting to is a 503 for every
    # delivery (nothing was handled), and both the first use and each failure say why.
    store_app = store_apps(database_url, "shared_db", create_tables=False)
    hint = "run `flask nachocode init-db`, or create them with your app's tables (db.create_all() or a migration)"
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        answer = post_delivery(store_app.client, "purchase", purchase_payload())
    assert answer.status_code == 503 and answer.get_json()["error"] == "store_unavailable"
    [warning, error] = [record.getMessage() for record in caplog.records]
    assert "the tables nachocode_deliveries, nachocode_claims, nachocode_purchases are missing" in warning
    assert hint in warning
    assert "delivery not recorded" in error and "the nachocode tables are missing: " + hint in error

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        post_delivery(store_app.client, "purchase", purchase_payload())
    # The warning once, at first use; the hint on every failure.
    assert [hint in record.getMessage() and "not recorded" in record.getMessage() for record in caplog.records] == [True]
    listed = store_app.app.test_cli_runner().invoke(args=["nachocode", "deliveries"])
    assert listed.exit_code == 1 and hint in listed.output and "Traceback" not in listed.output

    with store_app.app.app_context():
        store_app.db.create_all()
    assert post_delivery(store_app.client, "purchase", purchase_payload()).status_code == 200

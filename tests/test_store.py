"""The delivery store: what is kept of every delivery, where, on which engine and
with which connection settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_nachocode import NachocodeWebhook
from flask_nachocode.store import SQLITE_BUSY_TIMEOUT_MS, resolve_database_uri
from flask_nachocode.testing import post_delivery, purchase_payload

from support.common import WEBHOOK_KEY, load_fixture


@pytest.mark.every_store
def test_every_delivery_past_the_key_check_is_stored_with_every_column(
    make_effects_app: Any,
) -> None:
    store_app = make_effects_app()
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
    assert (row.event, row.route, row.outcome, row.status) == (
        "purchase",
        "purchase",
        "handled",
        200,
    )
    assert bytes(row.body) == body
    headers = row.headers if isinstance(row.headers, dict) else json.loads(row.headers)
    assert headers["X-Request-Id"] == "req-1"
    assert {name.lower() for name in headers} & {"authorization", "cookie"} == set()
    assert row.remote_addr == "127.0.0.1"
    assert row.received_at is not None
    assert row.finished_at is not None
    assert row.duration_ms >= 0
    assert row.error is None
    assert row.traceback is None
    transaction_id = payload["data"]["transactionId"]
    assert row.identity == f"purchase:ios:{transaction_id}"
    assert row.user_id == payload["userId"]
    assert row.iap_log_id == payload["iapLogId"]
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


@pytest.mark.every_store
def test_keep_bodies_off_stores_no_body(make_effects_app: Any) -> None:
    store_app = make_effects_app(NACHOCODE_KEEP_BODIES=False)
    post_delivery(store_app.client, "purchase", purchase_payload(userId="private-user"))
    post_delivery(store_app.client, "purchase", b'{"not": "valid"}')
    assert [row.body for row in store_app.deliveries()] == [None, None]


@pytest.mark.every_database
def test_own_engine_creates_its_tables_on_first_use(database_url: str, tmp_path: Path) -> None:
    app = Flask("first_use", instance_path=str(tmp_path / "instance"))
    app.config.update(
        TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY, NACHOCODE_DATABASE_URI=database_url
    )
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
        assert (
            connection.execute(sa.text("SELECT outcome FROM nachocode_deliveries")).scalar()
            == "handled"
        )
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
            {
                "SQLALCHEMY_DATABASE_URI": "sqlite:///app.db",
                "NACHOCODE_DATABASE_URI": "sqlite:///hooks.db",
            },
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


@pytest.mark.every_mode
def test_sqlite_connections_use_wal_and_wait_for_locks(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    assert post_delivery(store_app.client, "purchase", purchase_payload()).status_code == 200
    # Every connection of the pool the store uses, the app's own included.
    with store_app.app.app_context(), store_app.store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS


def test_in_memory_sqlite_is_one_database_for_every_thread(tmp_path: Path) -> None:
    import threading

    app = Flask("memory", instance_path=str(tmp_path / "instance"))
    app.config.update(
        TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY, NACHOCODE_DATABASE_URI="sqlite://"
    )
    ext = NachocodeWebhook(app)
    ext.on_purchase(lambda event: None)
    statuses: list[int] = []
    for _ in range(2):
        thread = threading.Thread(
            target=lambda: statuses.append(
                post_delivery(app.test_client(), "purchase", purchase_payload()).status_code
            )
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
    app.config.update(
        TESTING=True, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY, SQLALCHEMY_DATABASE_URI="sqlite:///app.db"
    )
    db = SQLAlchemy(app)
    ext = NachocodeWebhook(app)
    ext.on_purchase(lambda event: None)
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        post_delivery(app.test_client(), "purchase", purchase_payload())
    assert "Pass your db: NachocodeWebhook(app, db=db)" in caplog.text
    with app.app_context():
        db.engine.dispose()
        app.extensions["nachocode"].store.engine.dispose()


# Shared db only: with its own engine the extension creates the tables itself.
@pytest.mark.parametrize(
    "store_variant", [("sqlite", "shared_db"), ("postgresql", "shared_db")], indirect=True
)
def test_missing_tables_are_a_503_whose_log_says_what_to_run(
    make_effects_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    # With db= the tables are the app's to create; forgetting to is a 503 for every
    # delivery (nothing was handled), and both the first use and each failure say why.
    built = make_effects_app(create_tables=False)
    hint = (
        "run `flask nachocode init-db`, or create them with your app's tables "
        "(db.create_all() or a migration)"
    )
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        answer = post_delivery(built.client, "purchase", purchase_payload())
    assert answer.status_code == 503
    assert answer.get_json()["error"] == "store_unavailable"
    [warning, error] = [record.getMessage() for record in caplog.records]
    missing = "nachocode_deliveries, nachocode_claims, nachocode_purchases"
    assert f"the tables {missing} are missing" in warning
    assert hint in warning
    assert "delivery not recorded" in error
    assert "the nachocode tables are missing: " + hint in error

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        post_delivery(built.client, "purchase", purchase_payload())
    # The warning once, at first use; the hint on every failure.
    [again] = [record.getMessage() for record in caplog.records]
    assert hint in again
    assert "not recorded" in again
    listed = built.app.test_cli_runner().invoke(args=["nachocode", "deliveries"])
    assert listed.exit_code == 1
    assert hint in listed.output
    assert "Traceback" not in listed.output

    with built.app.app_context():
        built.db.create_all()
    assert post_delivery(built.client, "purchase", purchase_payload()).status_code == 200


@pytest.mark.every_store
def test_a_database_made_before_deferral_keeps_working_without_the_attempts_table(
    make_effects_app: Any,
) -> None:
    """A database whose migrations have not added ``nachocode_attempts`` yet:
    deliveries, ``show``, the inspector's data and ``prune`` work as before."""
    store_app = make_effects_app()
    client = store_app.app.test_client()
    # The first delivery creates the own engine's tables, then the table goes.
    assert post_delivery(client, "purchase", purchase_payload()).status_code == 200
    engine = sa.create_engine(store_app.url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE nachocode_attempts")
    engine.dispose()
    answer = post_delivery(client, "purchase", purchase_payload())
    assert answer.status_code == 200
    cli = store_app.app.test_cli_runner()
    shown = cli.invoke(args=["nachocode", "show", str(answer.get_json()["delivery"])])
    assert shown.exit_code == 0, shown.output
    assert "handled (200)" in shown.output
    pruned = cli.invoke(args=["nachocode", "prune", "--older-than", "0"])
    assert pruned.output.startswith("deleted 2 deliveries"), pruned.output

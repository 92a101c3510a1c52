"""The delivery store: what is kept of every delivery, where, on which engine and
with which connection settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_nachocode import NachocodeWebhook
from flask_nachocode.events import utcnow
from flask_nachocode.reads import queued_summary
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


def _check_out_at_once(path: str, barrier: Any, errors: Any) -> None:
    app = Flask("racing", instance_path=str(Path(path).parent))
    app.config.update(NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY, NACHOCODE_DATABASE_URI=f"sqlite:///{path}")
    NachocodeWebhook(app)
    barrier.wait()
    try:
        with app.extensions["nachocode"].store.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except Exception as error:
        errors.put(repr(error))


def test_workers_opening_a_new_sqlite_file_at_the_same_moment_all_get_a_connection(
    tmp_path: Path,
) -> None:
    # Gunicorn workers start together, and the first connection of each switches
    # the new file to WAL. Racing that switch fails about one round in five without
    # the store's retry, so forty rounds all but never pass by luck.
    import multiprocessing

    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    for round_ in range(40):
        path = str(tmp_path / f"race-{round_}.db")
        barrier = context.Barrier(3)
        workers = [
            context.Process(target=_check_out_at_once, args=(path, barrier, errors))
            for _ in range(3)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert errors.empty(), errors.get()


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


# -- what MySQL's defaults would get wrong: collation, fractions of a second, character set --


@pytest.mark.every_store
def test_ids_that_differ_only_in_case_accents_or_spaces_stay_apart(make_effects_app: Any) -> None:
    # MySQL's default collation would make these one claim, one ledger row, one user.
    store_app = make_effects_app()
    order_ids = ["GPA.abc-1", "GPA.ABC-1", "GPA.abc-1 ", "GPA.ábc-1"]
    users = ["testUser", "TESTUSER", "testUser ", "téstUser"]
    payloads = [
        purchase_payload(
            os="android", userId=user, data={"orderId": order_id, "purchaseToken": f"t-{i}"}
        )
        for i, (order_id, user) in enumerate(zip(order_ids, users, strict=False))
    ]
    for payload in payloads:
        answer = post_delivery(store_app.client, "purchase", payload)
        assert (answer.status_code, answer.get_json()["duplicate"]) == (200, False), payload
    assert sorted(row.identity for row in store_app.rows("nachocode_claims")) == sorted(
        f"purchase:android:{order_id}" for order_id in order_ids
    )
    rows = store_app.rows("nachocode_purchases")
    assert sorted((row.store_purchase_id, row.user_id) for row in rows) == sorted(
        zip(order_ids, users, strict=False)
    )
    ledger = store_app.ext.ledger
    with store_app.app.app_context():
        assert [p.user_id for p in ledger.purchases_of("TESTUSER", environment=None)] == [
            "TESTUSER"
        ]
        assert ledger.get(payloads[0]["iapLogId"], environment=None, user_id="TESTUSER") is None
        assert ledger.get(payloads[0]["iapLogId"], environment=None, user_id="testUser") is not None


@pytest.mark.every_store
def test_korean_text_and_fractions_of_a_second_round_trip(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    store_app.broken = lambda event: event.user_id == "실패"
    user = "김나초🌮"
    purchase = purchase_payload(
        os="android",
        userId=user,
        productId="코인_500",
        data={"orderId": "GPA.주문-1", "purchaseToken": "토큰"},
        purchasedAt="2026-03-01T10:00:00.523Z",
    )
    assert post_delivery(store_app.client, "purchase", purchase).status_code == 200
    failing = purchase_payload(
        os="android", userId="실패", data={"orderId": "GPA.실패-1", "purchaseToken": "t"}
    )
    assert post_delivery(store_app.client, "purchase", failing).status_code == 500

    [row] = store_app.rows("nachocode_purchases")
    assert (row.user_id, row.product_id, row.store_purchase_id, row.store_token) == (
        user,
        "코인_500",
        "GPA.주문-1",
        "토큰",
    )
    assert (row.purchased_at.second, row.purchased_at.microsecond) == (0, 523_000)
    handled, failed = store_app.deliveries()
    assert handled.user_id == user
    assert json.loads(bytes(handled.body))["userId"] == user
    assert failed.user_id == "실패"
    # The text columns (not only the exact ids) hold Korean: the error and its traceback.
    assert failed.error == "RuntimeError: handler bug while handling purchase:android:GPA.실패-1"
    assert "handler bug while handling purchase:android:GPA.실패-1" in failed.traceback
    # Taken a few milliseconds apart: a database that dropped fractions of a second
    # would show them equal or a whole second apart.
    assert 0 < (handled.finished_at - handled.received_at).total_seconds() < 1
    assert handled.received_at.microsecond or handled.finished_at.microsecond
    with store_app.app.app_context():
        [owned] = store_app.ext.ledger.purchases_of(user, environment=None)
    assert owned.purchased_at.microsecond == 523_000


def test_a_mysql_session_that_cannot_hold_every_character_is_refused(
    mysql_url: str, make_app: Any
) -> None:
    # The URL asks for no character set (init_app sees nothing wrong); the session
    # gets latin1, through mysqlclient, whose init_command runs after the character
    # set was chosen. (Flask-SQLAlchemy adds charset=utf8mb4 to a MySQL URL naming
    # none, so a shared db cannot get here.)
    pytest.importorskip("MySQLdb")
    url = (
        sa.engine.make_url(mysql_url)
        .set(drivername="mysql+mysqldb")
        .update_query_dict({"init_command": "SET NAMES latin1"})
    )
    app = make_app(url=url.render_as_string(hide_password=False))
    with app.app.app_context(), pytest.raises(RuntimeError, match="latin1.*charset=utf8mb4"):
        app.store.ensure_ready()


@pytest.mark.parametrize(
    ("uri", "named"),
    [
        ("mssql+pyodbc://user:secret@db.example/shop", "mssql"),
        ("oracle+oracledb://user:secret@db.example/shop", "oracle"),
    ],
)
def test_a_database_the_store_does_not_run_on_is_refused_at_start_up(
    make_app: Any, uri: str, named: str
) -> None:
    with pytest.raises(RuntimeError, match=f"a {named} database") as refused:
        make_app(url=uri)
    assert "SQLite, PostgreSQL, and MySQL or MariaDB" in str(refused.value)
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize("charset", ["latin1", "utf8", "utf8mb3"])
def test_a_mysql_charset_that_cannot_hold_korean_is_refused_at_start_up(
    make_app: Any, charset: str
) -> None:
    with pytest.raises(RuntimeError, match=f"charset={charset}.*use charset=utf8mb4"):
        make_app(url=f"mysql+pymysql://root@127.0.0.1/shop?charset={charset}")
    make_app(url="mysql+pymysql://root@127.0.0.1/shop?charset=utf8mb4")  # never connects here


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


@pytest.mark.every_database
def test_the_queued_reads_go_through_the_queued_index(make_app: Callable[..., Any]) -> None:
    """``requeue``'s read, a duplicate's look for its queued delivery and the metrics'
    count of the queue cost what the queue holds, not what the store does: each goes
    through the queued index."""
    from flask_nachocode.events import utcnow

    built = make_app()
    store = built.store
    statements: list[tuple[str, Any]] = []

    def note(connection: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        statements.append((statement, parameters))

    with built.app.app_context():
        store.ensure_ready()
        sa.event.listen(store.engine, "before_cursor_execute", note)
        try:
            store.overdue_queued(utcnow() - utcnow())
            store.stranded_queued(store.session.connection(), "purchase:ios:1")
            store.session.rollback()
            assert queued_summary(store) == (0, None)
        finally:
            sa.event.remove(store.engine, "before_cursor_execute", note)
        queued_reads = [(sql, params) for sql, params in statements if "queued" in sql]
        assert len(queued_reads) == 3
        with store.engine.begin() as connection:
            explain = {"sqlite": "EXPLAIN QUERY PLAN "}.get(connection.dialect.name, "EXPLAIN ")
            if connection.dialect.name == "postgresql":
                # An empty table is scanned whatever the indexes: ask for the plan
                # the index allows.
                connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            for sql, params in queued_reads:
                plan = connection.exec_driver_sql(explain + sql, params).all()
                assert "ix_nachocode_deliveries_queued" in " ".join(map(str, plan)), sql


@pytest.mark.every_store
def test_prune_deletes_in_batches_each_its_own_transaction(make_effects_app: Any) -> None:
    # One transaction for every old delivery held SQLite's write lock for seconds on a
    # large table: each batch must commit, so that a delivery waits for one batch at most.
    store_app = make_effects_app()
    for _ in range(5):
        post_delivery(store_app.client, "purchase", purchase_payload())
    kept = post_delivery(store_app.client, "purchase", purchase_payload()).get_json()["delivery"]
    with store_app.app.app_context():
        store = store_app.store
        table = store.deliveries
        store.session.execute(
            sa.update(table)
            .where(table.c.id != kept)
            .values(received_at=utcnow() - timedelta(days=40))
        )
        store.session.commit()
        commits: list[object] = []
        sa.event.listen(store.engine, "commit", commits.append)
        assert store.prune(timedelta(days=30), batch=2) == 5
    assert len(commits) == 3  # 2 + 2 + 1
    assert [row.id for row in store_app.deliveries()] == [kept]

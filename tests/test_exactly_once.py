"""Exactly once: duplicates answered without handlers, failures rolled back and
replayable, one commit per delivery, outages answered 503 and survived, and
concurrent identical deliveries across gunicorn workers handled once."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import sqlalchemy as sa

from flask_nachocode.delivery import DELIVERY_BUDGET_SECONDS
from flask_nachocode.testing import (
    post_delivery,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)

from conftest import WEBHOOK_KEY
from live import free_port, gunicorn_args, live_server
from tcp_proxy import TcpProxy


def identity_of(payload: dict[str, Any]) -> str:
    store_id = payload["data"].get("orderId") or payload["data"]["transactionId"]
    if "refundedAt" in payload:
        return f"refund:{payload['os']}:{store_id}:{payload['refundedAt']}"
    return f"purchase:{payload['os']}:{store_id}"


@pytest.mark.parametrize("os_name", ["ios", "android"])
def test_the_same_purchase_twice_is_handled_once(make_store_app: Any, os_name: str) -> None:
    store_app = make_store_app()
    purchase = purchase_payload(os=os_name)
    first = post_delivery(store_app.client, "purchase", purchase)
    second = post_delivery(store_app.client, "purchase", purchase)
    assert (first.status_code, first.get_json()["duplicate"]) == (200, False)
    assert (second.status_code, second.get_json()["duplicate"]) == (200, True)
    assert store_app.effects() == [identity_of(purchase)]
    assert [row.outcome for row in store_app.deliveries()] == ["handled", "duplicate"]
    assert len(store_app.rows("nachocode_claims")) == 1
    [ledger_row] = store_app.rows("nachocode_purchases")
    assert ledger_row.quantity == 1 and ledger_row.refunded_quantity == 0


def test_two_partial_refunds_are_two_events_and_each_is_handled_once(make_store_app: Any) -> None:
    store_app = make_store_app()
    purchase = purchase_payload(os="android", quantity=3)
    first_refund = refund_payload(purchase, refundQuantity=1, refundedAt="2025-03-01T10:00:00.000Z")
    second_refund = refund_payload(purchase, refundQuantity=1, refundedAt="2025-03-02T10:00:00.000Z")
    answers = [
        post_delivery(store_app.client, event, payload).get_json()
        for event, payload in [
            ("purchase", purchase),
            ("refund", first_refund),
            ("refund", second_refund),
            ("refund", first_refund),
            ("refund", second_refund),
        ]
    ]
    assert [answer["duplicate"] for answer in answers] == [False, False, False, True, True]
    assert store_app.effects() == [identity_of(purchase), identity_of(first_refund), identity_of(second_refund)]
    [ledger_row] = store_app.rows("nachocode_purchases")
    assert ledger_row.refunded_quantity == 2


def test_unavailable_users_are_never_deduplicated(make_store_app: Any) -> None:
    store_app = make_store_app()
    payload = unavailable_users_payload()
    answers = [post_delivery(store_app.client, "unavailable_users", payload) for _ in range(2)]
    assert [(a.status_code, a.get_json()["duplicate"]) for a in answers] == [(200, False), (200, False)]
    assert store_app.effects() == ["unavailable_users", "unavailable_users"]
    assert store_app.rows("nachocode_claims") == []


def test_a_failing_handler_rolls_back_and_a_replay_handles_it_once(make_store_app: Any) -> None:
    store_app = make_store_app()
    purchase = purchase_payload()
    store_app.broken = True
    answer = post_delivery(store_app.client, "purchase", purchase)
    assert answer.status_code == 500
    assert answer.get_json()["error"] == "handler_failed"
    assert "RuntimeError" not in answer.get_data(as_text=True)  # the answer does not leak internals
    if store_app.db is not None:
        assert store_app.effects() == []  # the handler's own write was rolled back
    assert store_app.rows("nachocode_claims") == [] and store_app.rows("nachocode_purchases") == []
    [failed] = store_app.deliveries()
    assert (failed.outcome, failed.status) == ("failed", 500)
    assert failed.error and failed.traceback

    store_app.broken = False
    store_app.effects_seen.clear()
    runner = store_app.app.test_cli_runner()
    result = runner.invoke(args=["nachocode", "replay", str(failed.id)])
    assert result.exit_code == 0, result.output
    assert f"delivery {failed.id}: handled (200)" in result.output
    assert store_app.effects() == [identity_of(purchase)]
    original, replayed = store_app.deliveries()
    assert (original.outcome, original.status, original.replay_count) == ("handled", 200, 1)
    assert (replayed.route, replayed.replay_of, replayed.outcome) == ("replay", failed.id, "handled")
    assert bytes(replayed.body) == bytes(original.body)

    result = runner.invoke(args=["nachocode", "replay", str(failed.id)])
    assert result.exit_code == 0, result.output
    assert f"delivery {failed.id}: duplicate (200)" in result.output
    assert store_app.effects() == [identity_of(purchase)]
    original = store_app.deliveries()[0]
    assert (original.outcome, original.replay_count) == ("handled", 2)

    # The dashboard re-sends it too: still a duplicate.
    assert post_delivery(store_app.client, "purchase", purchase).get_json()["duplicate"] is True


def test_one_commit_per_delivery_on_the_happy_path(make_store_app: Any) -> None:
    store_app = make_store_app()
    assert post_delivery(store_app.client, "purchase", purchase_payload()).status_code == 200  # warm up
    with store_app.app.app_context():
        engine = store_app.store.engine
    commits: list[object] = []
    sa.event.listen(engine, "commit", commits.append)
    purchase = purchase_payload(quantity=2)
    for event, payload in [
        ("purchase", purchase),
        ("refund", refund_payload(purchase, refundQuantity=1)),
        ("unavailable_users", unavailable_users_payload()),
        ("purchase", purchase),  # a duplicate
    ]:
        before = len(commits)
        assert post_delivery(store_app.client, event, payload).status_code == 200
        assert len(commits) == before + 1, event
    assert len(store_app.effects()) == 4  # the handlers' writes were in those commits


def test_a_delivery_waiting_on_a_stuck_transaction_gives_up_inside_the_budget(
    make_store_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A network partition left a transaction open holding the purchase's claim (on
    # SQLite: the database's write lock). A re-send used to wait until gunicorn killed
    # the worker; it must answer a JSON 503 while Nachocode still listens.
    store_app = make_store_app()
    assert post_delivery(store_app.client, "purchase", purchase_payload()).status_code == 200  # tables made
    purchase = purchase_payload()
    stuck_engine = sa.create_engine(store_app.url, poolclass=sa.pool.NullPool)
    stuck = stuck_engine.connect()
    if stuck.dialect.name == "sqlite":
        stuck.exec_driver_sql("BEGIN IMMEDIATE")
    stuck.execute(
        sa.text("INSERT INTO nachocode_claims (identity, event, claimed_at) VALUES (:identity, 'purchase', CURRENT_TIMESTAMP)"),
        {"identity": identity_of(purchase)},
    )
    answers: list[Any] = []
    waiting = threading.Thread(target=lambda: answers.append(post_delivery(store_app.client, "purchase", purchase)))
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        waiting.start()
        # Generous: the point is that it answers at all, not how fast (benchmarks measure that).
        waiting.join(timeout=3 * DELIVERY_BUDGET_SECONDS)
    gave_up = not waiting.is_alive()
    stuck.rollback()
    stuck.close()
    stuck_engine.dispose()
    waiting.join()
    assert gave_up, "the delivery kept waiting on the stuck transaction"
    [answer] = answers
    assert answer.status_code == 503 and answer.mimetype == "application/json"
    assert answer.get_json()["error"] == "store_unavailable"
    assert "another transaction holds" in answer.get_json()["message"]
    assert any("gave up after waiting 5 s for a lock" in record.getMessage() for record in caplog.records)
    assert identity_of(purchase) not in store_app.effects()  # no handler ran

    # The stuck transaction gone, the re-send is handled.
    again = post_delivery(store_app.client, "purchase", purchase)
    assert (again.status_code, again.get_json()["duplicate"]) == (200, False)
    assert identity_of(purchase) in store_app.effects()


# --- the database unreachable ---


@pytest.fixture
def behind_proxy(postgres_url: str, store_mode: str, store_apps: Any) -> Iterator[tuple[Any, TcpProxy]]:
    """A store app that reaches PostgreSQL through a :class:`TcpProxy` the test can cut."""
    direct = sa.engine.make_url(postgres_url)
    with TcpProxy(direct.host or "127.0.0.1", direct.port or 5432) as proxy:
        url = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        store_app = store_apps(url, store_mode)
        yield store_app, proxy
        store_app.close()  # while the proxy still forwards: the server sees clean goodbyes


def test_postgresql_unreachable_answers_503_and_the_next_delivery_after_it_works(
    behind_proxy: tuple[Any, TcpProxy], postgres_url: str
) -> None:
    store_app, proxy = behind_proxy
    before = purchase_payload()
    assert post_delivery(store_app.client, "purchase", before).status_code == 200

    proxy.cut()
    during = purchase_payload()
    answer = post_delivery(store_app.client, "purchase", during)
    assert answer.status_code == 503
    assert answer.get_json()["error"] == "store_unavailable"
    assert [row.identity for row in store_app.rows("nachocode_claims", postgres_url)] == [identity_of(before)]
    assert len(store_app.rows("nachocode_deliveries", postgres_url)) == 1

    proxy.restore()
    answer = post_delivery(store_app.client, "purchase", during)  # the dashboard's re-send
    assert (answer.status_code, answer.get_json()["duplicate"]) == (200, False)

    # Back again with no delivery during the outage: the pool's dead
    # connections must not cost the next delivery.
    proxy.cut()
    proxy.restore()
    after = purchase_payload()
    assert post_delivery(store_app.client, "purchase", after).status_code == 200

    assert store_app.effects() == [identity_of(before), identity_of(during), identity_of(after)]
    rows = store_app.rows("nachocode_deliveries", postgres_url)
    assert [(row.identity, row.outcome) for row in rows] == [
        (identity_of(before), "handled"),
        (identity_of(during), "handled"),
        (identity_of(after), "handled"),
    ]


def test_postgresql_lost_during_a_delivery_leaves_nothing_half_written(
    behind_proxy: tuple[Any, TcpProxy], postgres_url: str
) -> None:
    store_app, proxy = behind_proxy
    # The claim and the ledger row are written, the handler ran; then the
    # database goes away before the delivery commits.
    store_app.broken = lambda event: bool(proxy.cut())
    purchase = purchase_payload()
    assert post_delivery(store_app.client, "purchase", purchase).status_code == 503
    for table in ("nachocode_claims", "nachocode_deliveries", "nachocode_purchases"):
        assert store_app.rows(table, postgres_url) == [], table
    if store_app.db is not None:
        assert store_app.rows("test_effects", postgres_url) == []

    proxy.restore()
    store_app.broken = False
    answer = post_delivery(store_app.client, "purchase", purchase)
    assert (answer.status_code, answer.get_json()["duplicate"]) == (200, False)
    assert [row.outcome for row in store_app.rows("nachocode_deliveries", postgres_url)] == ["handled"]
    assert len(store_app.rows("nachocode_purchases", postgres_url)) == 1
    if store_app.db is not None:
        assert [row.identity for row in store_app.rows("test_effects", postgres_url)] == [identity_of(purchase)]


def test_sqlite_unreachable_answers_503_and_the_next_delivery_after_it_works(
    tmp_path: Path, store_mode: str, store_apps: Any
) -> None:
    # The database's directory is missing (an unmounted volume, a wrong path):
    # the file cannot be opened until it is there.
    directory = tmp_path / "volume"
    url = f"sqlite:///{directory / 'nachocode.db'}"
    store_app = store_apps(url, store_mode, create_tables=False)
    purchase = purchase_payload()
    answer = post_delivery(store_app.client, "purchase", purchase)
    assert answer.status_code == 503
    assert answer.get_json()["error"] == "store_unavailable"
    assert not directory.exists()

    directory.mkdir()
    if store_app.db is not None:
        # A shared database's tables are the app's to create (or migrate).
        with store_app.app.app_context():
            store_app.db.create_all()
    answer = post_delivery(store_app.client, "purchase", purchase)
    assert (answer.status_code, answer.get_json()["duplicate"]) == (200, False)
    assert [row.outcome for row in store_app.deliveries()] == ["handled"]
    assert store_app.effects() == [identity_of(purchase)]


# --- concurrency across processes ---


def fire_at_once(url: str, bodies: list[bytes]) -> list[tuple[int, dict[str, Any]]]:
    """POST every body from its own thread, all released at the same moment."""
    barrier = threading.Barrier(len(bodies))
    answers: list[tuple[int, dict[str, Any]] | None] = [None] * len(bodies)

    def send(index: int) -> None:
        barrier.wait()
        response = requests.post(
            url,
            data=bodies[index],
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {WEBHOOK_KEY}"},
            timeout=120,
        )
        answers[index] = (response.status_code, response.json())

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(answer is not None for answer in answers)
    return answers  # type: ignore[return-value]


def test_identical_deliveries_at_the_same_moment_on_several_workers_are_handled_once(
    database_url: str, store_mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    postgres = database_url.startswith("postgresql")
    workers = 4 if postgres else 2
    effects_file = tmp_path / "effects.txt"
    effects_file.touch()
    env = {
        "COUNTER_APP_DATABASE_URL": database_url,
        "COUNTER_APP_MODE": store_mode,
        "COUNTER_APP_EFFECTS_FILE": str(effects_file),
        "NACHOCODE_WEBHOOK_KEY": WEBHOOK_KEY,
    }
    if store_mode == "shared_db":
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        from apps.counter_app import create_app, db

        app = create_app()
        with app.app_context():
            db.create_all()
            db.engine.dispose()
    # With the own engine the tables do not exist yet: the workers create them
    # on first use, all at the same moment.

    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    with live_server(
        gunicorn_args("tests.apps.counter_app:create_app()", port, workers),
        port=port,
        env=env,
        log_path=log_path,
    ) as base_url:
        purchase = json.dumps(purchase_payload()).encode()
        answers = fire_at_once(f"{base_url}/nachocode/webhooks/purchase", [purchase] * 25)
        distinct = [json.dumps(purchase_payload()).encode() for _ in range(30)]
        distinct_answers = fire_at_once(f"{base_url}/nachocode/webhooks/purchase", distinct)

    assert [status for status, _ in answers] == [200] * 25, answers
    assert sorted(answer["duplicate"] for _, answer in answers) == [False] + [True] * 24
    assert [status for status, _ in distinct_answers] == [200] * 30, distinct_answers
    assert "database is locked" not in log_path.read_text()

    identity = identity_of(json.loads(purchase))
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        if store_mode == "shared_db":
            effects = list(connection.execute(sa.text("SELECT identity FROM counter_effects")).scalars())
        else:
            effects = [line.split()[0] for line in effects_file.read_text().splitlines()]
        outcomes = connection.execute(
            sa.text("SELECT outcome, count(*) FROM nachocode_deliveries WHERE identity = :i GROUP BY outcome"),
            {"i": identity},
        ).all()
        claims = connection.execute(sa.text("SELECT count(*) FROM nachocode_claims")).scalar()
    engine.dispose()
    assert effects.count(identity) == 1
    assert len(effects) == 31
    assert dict(outcomes) == {"handled": 1, "duplicate": 24}
    assert claims == 31

"""Load and faults against real gunicorn servers: nothing lost, nothing doubled.

Each test drives ``tests/reliability_app.py`` (whose handlers write one row per
call into ``reliability_effects``, in the delivery's transaction) and then
counts rows: handler effects must equal the unique deliveries exactly.
Marked ``load``; ``NACHOCODE_LOAD_DELIVERIES`` sets the size of the load run
(2,000 by default). Every delivery, fault and outcome is counted in the
reliability figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from conftest import SERVER_URL_FIXTURES, WEBHOOK_KEY
from figures import count
from flask_nachocode.events import ROUTES_BY_EVENT
from flask_nachocode.testing import purchase_payload, refund_payload
from live import worker_pids
from reliability_app import serve

EVENT_PATHS = {event: route.path for event, route in ROUTES_BY_EVENT.items() if event != "any"}

pytestmark = pytest.mark.load

DELIVERIES = int(os.environ.get("NACHOCODE_LOAD_DELIVERIES", "2000"))
DUPLICATE_SHARE = 0.3
CONNECTIONS = 16
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {WEBHOOK_KEY}"}


@dataclass(frozen=True)
class Delivery:
    path: str
    body: bytes
    identity: str


def deliveries(total: int, duplicate_share: float, seed: int) -> tuple[list[Delivery], int]:
    """``total`` deliveries of which ``duplicate_share`` re-send an earlier one,
    shuffled; and the number of unique ones. A fifth of the unique ones are
    refunds of purchases in the same set, so they race their purchase too."""
    rng = random.Random(seed)
    unique_count = total - round(total * duplicate_share)
    unique: list[Delivery] = []
    while len(unique) < unique_count:
        purchase = purchase_payload(os=rng.choice(["android", "ios"]), quantity=rng.randint(1, 5))
        unique.append(delivery("purchase", purchase))
        if len(unique) < unique_count and rng.random() < 0.25:
            unique.append(delivery("refund", refund_payload(purchase, refundQuantity=1)))
    sent = unique + [rng.choice(unique) for _ in range(total - unique_count)]
    rng.shuffle(sent)
    return sent, unique_count


def delivery(event: str, payload: dict[str, Any]) -> Delivery:
    store_id = payload["data"].get("orderId") or payload["data"]["transactionId"]
    identity = f"{event}:{payload['os']}:{store_id}" + (f":{payload['refundedAt']}" if event == "refund" else "")
    return Delivery(f"/nachocode{EVENT_PATHS[event]}", json.dumps(payload).encode(), identity)


def send(base_url: str, items: list[Delivery], connections: int = CONNECTIONS) -> list[tuple[int | None, dict[str, Any]]]:
    """POST every item over ``connections`` concurrent connections; (status or None, answer) each."""
    local = threading.local()

    def post(item: Delivery) -> tuple[int | None, dict[str, Any]]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        try:
            response = local.session.post(base_url + item.path, data=item.body, headers=HEADERS, timeout=60)
        except requests.RequestException:
            return None, {}  # no answer: the worker died or the connection broke
        count("deliveries sent to gunicorn")
        return response.status_code, response.json()

    with ThreadPoolExecutor(connections) as pool:
        return list(pool.map(post, items))


def resend_until_accepted(base_url: str, items: list[Delivery], results: list[tuple[int | None, dict[str, Any]]]) -> list[tuple[int | None, dict[str, Any]]]:
    """Re-send what got no 2xx, as an operator would from the dashboard, until all got one."""
    for _ in range(10):
        pending = [index for index, (status, _) in enumerate(results) if status is None or status >= 300]
        if not pending:
            return results
        count("faults: re-sends", len(pending))
        for index, result in zip(pending, send(base_url, [items[index] for index in pending])):
            results[index] = result
    raise AssertionError(f"still refused after 10 rounds: {[results[i] for i in pending]}")


@dataclass
class Tally:
    effects: dict[str, int]
    handled: int
    claims: int
    ledger: int
    handled_purchases: int


def tally(uri: str) -> Tally:
    engine = sa.create_engine(uri)
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT identity, count(*) FROM reliability_effects GROUP BY identity").all()
        one = lambda sql: int(connection.exec_driver_sql(sql).scalar_one())  # noqa: E731
        result = Tally(
            # MySQL's exact-text columns hold UTF-8 bytes.
            effects={
                identity.decode() if isinstance(identity, bytes) else identity: number
                for identity, number in rows
            },
            handled=one("SELECT count(*) FROM nachocode_deliveries WHERE outcome = 'handled'"),
            claims=one("SELECT count(*) FROM nachocode_claims"),
            ledger=one("SELECT count(*) FROM nachocode_purchases WHERE purchase_received"),
            handled_purchases=one(
                "SELECT count(*) FROM nachocode_deliveries WHERE outcome = 'handled' AND event = 'purchase'"
            ),
        )
    engine.dispose()
    return result


def assert_exactly_once(uri: str, items: list[Delivery]) -> Tally:
    """Every unique delivery handled once: one effect, one claim, one handled record."""
    unique = {item.identity for item in items}
    found = tally(uri)
    doubles = sum(number - 1 for number in found.effects.values() if number > 1)
    lost = len(unique - set(found.effects))
    count("rows lost", lost)
    count("doubles", doubles)
    assert doubles == 0 and lost == 0, (doubles, lost)
    assert set(found.effects) == unique
    # Nothing half-written: claim, delivery record, handler effect and ledger row
    # exist together or not at all.
    assert found.claims == found.handled == len(unique)
    assert found.ledger == found.handled_purchases
    return found


def assert_key_not_in(log: Path) -> None:
    count("security: server log bytes searched", log.stat().st_size)
    assert WEBHOOK_KEY.encode() not in log.read_bytes()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'load.db'}"


def url_of(request: pytest.FixtureRequest, database: str) -> str:
    return str(request.getfixturevalue({"sqlite": "sqlite_url", **SERVER_URL_FIXTURES}[database]))


@pytest.mark.parametrize("database, workers", [("postgresql", 4), ("mysql", 4), ("sqlite", 2)])
def test_load_with_duplicates_handles_each_delivery_once(
    request: pytest.FixtureRequest, tmp_path: Path, database: str, workers: int
) -> None:
    uri = url_of(request, database)
    items, unique = deliveries(DELIVERIES, DUPLICATE_SHARE, seed=workers)
    # INFO, not DEBUG: logging every SQL statement of 2,000 deliveries would be
    # most of the run; the fault tests below and test_security log at DEBUG.
    with serve(uri, workers, tmp_path, key=WEBHOOK_KEY, log_level="INFO") as (base_url, _, log):
        results = send(base_url, items)
    statuses = [status for status, _ in results]
    assert statuses.count(200) == len(items), sorted(set(map(str, statuses)))
    refused_as_duplicate = sum(answer["duplicate"] for _, answer in results)
    count("load: duplicates refused", refused_as_duplicate)
    assert refused_as_duplicate == len(items) - unique
    assert_exactly_once(uri, items)
    assert_key_not_in(log)


@pytest.mark.parametrize("database", ["postgresql", "mysql", "sqlite"])
def test_worker_killed_in_handlers_leaves_nothing_half_written(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> None:
    uri = url_of(request, database)
    marker, started = tmp_path / "pause", tmp_path / "started"
    marker.touch()
    started.mkdir()
    items, _ = deliveries(12, 0.0, seed=7)
    env = {"RELIABILITY_MARKER": str(marker), "RELIABILITY_STARTED_DIR": str(started)}
    with serve(uri, 2, tmp_path, key=WEBHOOK_KEY, **env) as (base_url, port, log):
        with ThreadPoolExecutor(1) as background:
            pending = background.submit(send, base_url, items, len(items))
            # SQLite lets one transaction write at a time: one handler runs, the other waits.
            in_handlers = 1 if database == "sqlite" else 2
            deadline = time.monotonic() + 60
            while len(list(started.iterdir())) < in_handlers:
                assert time.monotonic() < deadline, "handlers did not start"
                time.sleep(0.05)
            victims = worker_pids(port)
            assert len(victims) == 2
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            count("faults: workers killed in handlers", len(victims))
            marker.unlink()
            results = pending.result()
        no_answer = [index for index, (status, _) in enumerate(results) if status is None]
        assert len(no_answer) >= in_handlers, results
        assert all(status in (None, 200) for status, _ in results), results
        # What the killed workers had flushed (claim, ledger, effect) was rolled back.
        killed = {items[index].identity for index in no_answer}
        assert not killed & set(tally(uri).effects)
        results = resend_until_accepted(base_url, items, results)
        assert all(answer["duplicate"] is False for _, answer in (results[index] for index in no_answer))
    assert_exactly_once(uri, items)
    assert_key_not_in(log)


def kill_other_connections(connection: sa.Connection) -> int:
    """Kill every other connection to this test's own database (the shared server
    keeps running); how many were killed."""
    if connection.dialect.name == "postgresql":
        return int(
            connection.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).scalar_one()
        )
    ids = connection.exec_driver_sql(
        "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()"
    ).scalars()
    killed = 0
    for connection_id in ids:
        try:
            connection.exec_driver_sql(f"KILL {int(connection_id)}")
            killed += 1
        except sa.exc.OperationalError:
            pass  # gone meanwhile ("Unknown thread id")
    return killed


@pytest.mark.parametrize("database", sorted(SERVER_URL_FIXTURES))
def test_connections_killed_during_load(request: pytest.FixtureRequest, database: str, tmp_path: Path) -> None:
    server_url = url_of(request, database)
    items, _ = deliveries(max(DELIVERIES // 4, 50), DUPLICATE_SHARE, seed=11)
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with serve(server_url, 4, tmp_path, key=WEBHOOK_KEY) as (base_url, _, log), admin.connect() as connection:
        with ThreadPoolExecutor(1) as background:
            pending = background.submit(send, base_url, items)
            terminated = outages = 0
            while not pending.done():
                terminated += kill_other_connections(connection)
                if outages < 3 and terminated:
                    # Away for a second: every connection killed as soon as it is made.
                    outages += 1
                    away_until = time.monotonic() + 1.0
                    while time.monotonic() < away_until:
                        terminated += kill_other_connections(connection)
                        time.sleep(0.01)
                time.sleep(0.3)
            results = pending.result()
        count(f"faults: {database} connections killed", terminated)
        count(f"faults: {database} outages", outages)
        statuses = [status for status, _ in results]
        unavailable = statuses.count(503)
        count(f"faults: answered 503 while {database} was away", unavailable)
        assert terminated > 0 and outages > 0
        assert set(statuses) <= {200, 503}, sorted(set(map(str, statuses)))
        assert unavailable > 0, "the faults never reached a delivery"
        results = resend_until_accepted(base_url, items, results)
        # Full service after: a fresh delivery is handled at once.
        (fresh_item,), _ = deliveries(1, 0.0, seed=12)
        (fresh,) = send(base_url, [fresh_item])
        assert fresh[0] == 200 and fresh[1]["duplicate"] is False
    admin.dispose()
    assert_exactly_once(server_url, items + [fresh_item])
    assert_key_not_in(log)


def test_a_handler_slower_than_the_budget_is_warned_and_a_resend_is_a_duplicate(
    sqlite_url: str, tmp_path: Path
) -> None:
    budget = 1.0  # seconds: the test lowers Nachocode's 10 s budget, not its logic
    marker = tmp_path / "pause"
    marker.touch()
    (item,), _ = deliveries(1, 0.0, seed=13)
    env = {"RELIABILITY_MARKER": str(marker), "RELIABILITY_BUDGET": str(budget)}
    with serve(sqlite_url, 1, tmp_path, key=WEBHOOK_KEY, **env) as (base_url, _, log):
        with ThreadPoolExecutor(1) as background:
            pending = background.submit(send, base_url, [item], 1)
            time.sleep(budget * 1.5)
            marker.unlink()
            ((status, answer),) = pending.result()
        assert status == 200 and answer["duplicate"] is False
        ((again, answer_again),) = send(base_url, [item], 1)
        count("faults: slow handlers")
        assert again == 200 and answer_again["duplicate"] is True
        assert f"of Nachocode's {budget:.0f} s budget" in log.read_text()
    assert_exactly_once(sqlite_url, [item])
    assert_key_not_in(log)

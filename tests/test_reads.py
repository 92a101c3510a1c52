"""The reads shared by the CLI, the inspector, the metrics and the ledger's reader:
one filter, lists, a stream in batches, counts per hour and day, and the ledger.
The pages and commands built on them are tested in their own modules."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from flask_nachocode.reads import (
    EXPORT_COLUMNS,
    DeliveryFilter,
    PeriodCount,
    count_by_period,
    count_deliveries,
    delivery_record,
    iter_deliveries,
    list_deliveries,
)
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload

UTC = timezone.utc


class Shop:
    """An app (built by ``make_app``) whose handlers fail for the user ``breaks``."""

    def __init__(self, make_app: Callable[..., Any], **config: Any) -> None:
        self.built = make_app(**config)
        self.app = self.built.app
        self.client = self.app.test_client()

        def handle(event: Any) -> None:
            if event.user_id == "breaks":
                raise RuntimeError("handler bug")

        self.built.ext.on_purchase(handle)
        self.built.ext.on_refund(handle)

    @property
    def store(self) -> Any:
        return self.app.extensions["nachocode"].store

    def post(self, event: str, payload: dict[str, Any]) -> int:
        """Deliver ``payload``; the new delivery's id."""
        answer = post_delivery(self.client, event, payload)
        assert answer.status_code in (200, 500), answer.get_json()
        return int(answer.get_json()["delivery"])

    def ids(self, where: DeliveryFilter, **options: Any) -> list[int]:
        with self.app.app_context():
            return [row.id for row in iter_deliveries(self.store, where, **options)]

    def received_at(self, times: dict[int, datetime]) -> None:
        """Give deliveries the times they were received at."""
        engine = sa.create_engine(self.built.url, poolclass=sa.pool.NullPool)
        table = self.store.deliveries
        with engine.begin() as connection:
            for delivery_id, moment in times.items():
                connection.execute(
                    sa.update(table).where(table.c.id == delivery_id).values(received_at=moment)
                )
        engine.dispose()


@pytest.fixture
def shop(make_app: Callable[..., Any]) -> Shop:
    return Shop(make_app)


@pytest.mark.every_database
def test_a_store_id_finds_its_purchase_and_refunds_even_failed_and_nothing_else(
    shop: Shop,
) -> None:
    """The store id is in no column: it is matched inside the identity, exactly
    (not LIKE, whose ``_`` matches any character and which ignores case on SQLite),
    and a failed delivery, which left no ledger row, is found too."""
    target = "GPA.1234-5678_90"
    bought = purchase_payload(os="android", quantity=2, data={"orderId": target})
    expected = [
        shop.post("purchase", bought),
        shop.post("refund", refund_payload(bought, refundQuantity=1)),
        shop.post("refund", refund_payload(bought, refundQuantity=1, userId="breaks")),
    ]
    for decoy in ("GPA.1234-5678x90", "gpa.1234-5678_90", f"{target}:2", "GPA.1234-5678"):
        other = purchase_payload(os="android", data={"orderId": decoy})
        shop.post("purchase", other)
        shop.post("refund", refund_payload(other))
    # The same id on the other platform is the same filter: an operator has the id alone.
    expected.append(shop.post("purchase", purchase_payload(os="ios", data=_ios(target))))

    assert shop.ids(DeliveryFilter(store_id=target)) == expected
    assert shop.ids(DeliveryFilter(store_id=target, outcome="failed")) == [expected[2]]
    assert shop.ids(DeliveryFilter(store_id="GPA.1234-5678_9")) == []


def _ios(transaction_id: str) -> dict[str, str]:
    return {"transactionId": transaction_id, "originalTransactionId": transaction_id}


@pytest.mark.every_database
def test_user_id_iap_log_id_and_a_time_range_filter_exactly(shop: Shop) -> None:
    mine = [
        shop.post("purchase", purchase_payload(userId="testUser", iapLogId=7001)),
        shop.post("purchase", purchase_payload(userId="testUser")),
        shop.post("purchase", purchase_payload(userId="testUser")),
    ]
    other = shop.post("purchase", purchase_payload(userId="TESTUSER", iapLogId=7002))
    start = datetime(2025, 3, 1, 12, tzinfo=UTC)
    shop.received_at(
        {
            mine[0]: start - timedelta(microseconds=1),
            mine[1]: start,
            mine[2]: start + timedelta(hours=1),
            other: start,
        }
    )

    assert shop.ids(DeliveryFilter(user_id="testUser")) == mine
    assert shop.ids(DeliveryFilter(iap_log_id=7001)) == [mine[0]]
    assert shop.ids(DeliveryFilter(q="7002")) == [other]
    hour = DeliveryFilter(received_from=start, received_until=start + timedelta(hours=1))
    assert shop.ids(hour) == [mine[1], other]
    # Any zone: the same instants.
    seoul = timezone(timedelta(hours=9))
    assert shop.ids(DeliveryFilter(received_from=start.astimezone(seoul))) == mine[1:] + [other]
    assert shop.ids(DeliveryFilter(user_id="testUser", received_until=start)) == [mine[0]]


@pytest.mark.every_database
@pytest.mark.parametrize(
    "where",
    [
        DeliveryFilter(user_id="test\x00User"),
        DeliveryFilter(user_id="u" * 257),
        DeliveryFilter(store_id="GPA\x00"),
        DeliveryFilter(q="\x00"),
        DeliveryFilter(iap_log_id=2**63),
        DeliveryFilter(iap_log_id=-1),
    ],
    ids=["nul-user", "long-user", "nul-store-id", "nul-search", "huge-iap", "negative-iap"],
)
def test_an_id_no_delivery_can_carry_matches_nothing_without_an_error(
    shop: Shop, where: DeliveryFilter
) -> None:
    """PostgreSQL refuses a NUL in a parameter as an error, and a database column
    cannot hold an iapLogId past 2**63 - 1: neither reaches the database."""
    shop.post("purchase", purchase_payload(userId="test"))
    assert shop.ids(where) == []
    with shop.app.app_context():
        assert count_deliveries(shop.store, where) == 0
        assert count_by_period(shop.store, where, period="day") == []


def test_times_without_a_zone_are_refused() -> None:
    with pytest.raises(ValueError, match="received_from must be timezone-aware"):
        DeliveryFilter(received_from=datetime(2025, 3, 1))
    with pytest.raises(ValueError, match="received_until must be timezone-aware"):
        DeliveryFilter(received_until=datetime(2025, 3, 1))


@pytest.mark.every_database
def test_the_stream_reads_in_batches_oldest_first_only_what_was_there_when_it_began(
    shop: Shop,
) -> None:
    """Bounded memory for an export or a bulk replay: ``batch_size`` rows per read,
    each read its own transaction, so a delivery can be written between rows; a
    delivery written meanwhile is not met (a bulk replay never meets its own replays)."""
    stored = [shop.post("purchase", purchase_payload()) for _ in range(5)]
    reads: list[str] = []

    def note(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM nachocode_deliveries" in statement:
            reads.append(statement)

    seen: list[int] = []
    written: list[int] = []
    with shop.app.app_context():
        engine = shop.store.engine
        sa.event.listen(engine, "before_cursor_execute", note)
        try:
            for row in iter_deliveries(shop.store, DeliveryFilter(), batch_size=2):
                seen.append(row.id)
                if len(written) < len(stored):
                    written.append(shop.post("purchase", purchase_payload()))
        finally:
            sa.event.remove(engine, "before_cursor_execute", note)

    assert seen == stored
    batches = [statement for statement in reads if "LIMIT" in statement.upper()]
    # The newest id when it began, then 2 + 2 + 1 rows.
    assert len(reads) == 4, reads
    assert len(batches) == 3, reads


@pytest.mark.every_database
def test_replayable_takes_the_originals_a_bulk_replay_runs_again(shop: Shop) -> None:
    failed = shop.post("purchase", purchase_payload(userId="breaks"))
    shop.post("purchase", purchase_payload())
    with shop.app.app_context():
        replayed = shop.app.test_cli_runner().invoke(args=["nachocode", "replay", str(failed)])
    assert replayed.exit_code == 1  # the replay failed too: a failed replay of it is stored
    where = DeliveryFilter(replayable=True, replays=True)
    assert shop.ids(where) == [failed]
    with shop.app.app_context():
        assert count_deliveries(shop.store, where) == 1
        assert count_deliveries(shop.store, DeliveryFilter(replays=True)) == 3


@pytest.mark.every_database
def test_counts_per_hour_and_day_are_grouped_in_utc_by_the_database(
    make_app: Callable[..., Any], database_url: str
) -> None:
    """On PostgreSQL the session's time zone is Seoul's: the periods stay UTC's."""
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.update_query_dict({"options": "-c timezone=Asia/Seoul"})
    shop = Shop(make_app, url=url.render_as_string(hide_password=False))
    bought = [purchase_payload() for _ in range(3)]
    ids = [shop.post("purchase", payload) for payload in bought]
    failed = shop.post("purchase", purchase_payload(userId="breaks"))
    refund = shop.post("refund", refund_payload(bought[0]))
    day = datetime(2025, 3, 2, tzinfo=UTC)
    shop.received_at(
        {
            ids[0]: day - timedelta(microseconds=1),
            ids[1]: day,
            failed: day + timedelta(minutes=30),
            refund: day + timedelta(hours=1, microseconds=-1),
            ids[2]: day + timedelta(hours=1),
        }
    )
    hour = timedelta(hours=1)
    with shop.app.app_context():
        assert count_by_period(shop.store, DeliveryFilter(), period="hour") == [
            PeriodCount(day - hour, "purchase", "handled", 1),
            PeriodCount(day, "purchase", "failed", 1),
            PeriodCount(day, "purchase", "handled", 1),
            PeriodCount(day, "refund", "handled", 1),
            PeriodCount(day + hour, "purchase", "handled", 1),
        ]
        assert count_by_period(shop.store, DeliveryFilter(), period="day") == [
            PeriodCount(day - timedelta(days=1), "purchase", "handled", 1),
            PeriodCount(day, "purchase", "failed", 1),
            PeriodCount(day, "purchase", "handled", 2),
            PeriodCount(day, "refund", "handled", 1),
        ]
        since = DeliveryFilter(received_from=day, event="purchase")
        assert count_by_period(shop.store, since, period="day") == [
            PeriodCount(day, "purchase", "failed", 1),
            PeriodCount(day, "purchase", "handled", 2),
        ]
        with pytest.raises(ValueError, match="period must be one of hour, day"):
            count_by_period(shop.store, since, period="week")  # type: ignore[arg-type]


def test_an_exported_delivery_is_json_with_its_times_in_utc(shop: Shop) -> None:
    delivery = shop.post("purchase", purchase_payload(userId="사용자"))
    with shop.app.app_context():
        [row] = iter_deliveries(shop.store, DeliveryFilter())
    record = json.loads(json.dumps(delivery_record(row), ensure_ascii=False))
    assert list(record) == list(EXPORT_COLUMNS)
    assert (record["id"], record["user_id"], record["outcome"]) == (delivery, "사용자", "handled")
    received = datetime.fromisoformat(record["received_at"])
    assert received == row.received_at
    assert received.utcoffset() == timedelta(0)


@pytest.mark.every_store
def test_ledger_queries_find_every_environment_unless_one_is_asked_for(shop: Shop) -> None:
    ledger = shop.built.ext.ledger
    live = purchase_payload(environment="production", quantity=2, userId="u1")
    # What `flask nachocode send` and the test factories build: a sandbox purchase.
    test = purchase_payload(quantity=5, userId="u1")
    assert test["environment"] == "sandbox"
    other_user = purchase_payload(environment="production", quantity=7, userId="u2")
    for payload in (live, test, other_user):
        shop.post("purchase", payload)
    product = live["productId"]

    with shop.app.app_context():
        assert ledger.get(test["iapLogId"]).environment == "sandbox"
        assert ledger.get(test["iapLogId"], environment="production") is None
        assert ledger.get(test["iapLogId"], environment="sandbox") is not None
        assert ledger.get(live["iapLogId"], user_id="u2") is None
        assert ledger.net_quantity("u1", product) == 7
        assert ledger.net_quantity("u1", product, environment="production") == 2
        assert ledger.net_quantity("u1", product, environment="sandbox") == 5
        assert [p.iap_log_id for p in ledger.purchases_of("u1")] == [
            test["iapLogId"],
            live["iapLogId"],  # newest first
        ]
        assert [p.iap_log_id for p in ledger.purchases_of("u1", environment="production")] == [
            live["iapLogId"]
        ]

    shop.post("refund", refund_payload(live))
    with shop.app.app_context():
        assert ledger.owns("u1", product)  # the sandbox units are still held
        assert not ledger.owns("u1", product, environment="production")
        assert ledger.owns("u1", product, environment="sandbox")


@pytest.mark.every_database
def test_a_user_id_is_read_through_its_index_on_every_page(shop: Shop) -> None:
    """A user id is read through its index on a next page and in a stream too (the
    id bounded), in a store of 20,000 deliveries. On MySQL the ``replay_of`` index
    holds every delivery (it cannot be partial there), and MariaDB, its statistics
    lagging behind a growing table, read "originals only" through it instead."""
    shop.post("purchase", purchase_payload())  # creates the tables
    table = shop.store.deliveries
    moment = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [
        {
            "event": "purchase",
            "route": "purchase",
            "outcome": "handled",
            "status": 200,
            "user_id": f"user-{number % 5000}",
            "received_at": moment,
            "finished_at": moment,
            "duration_ms": 1.0,
        }
        for number in range(20_000)
    ]
    engine = sa.create_engine(shop.built.url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.insert(table), rows)
        # The statistics a database keeps of a table that size, not of an empty one.
        analyze = {"postgresql": "ANALYZE", "sqlite": "ANALYZE"}.get(
            connection.dialect.name, "ANALYZE TABLE"
        )
        connection.exec_driver_sql(f"{analyze} nachocode_deliveries")
    statements: list[tuple[str, Any]] = []

    def note(connection: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "user_id =" in statement:
            statements.append((statement, parameters))

    where = DeliveryFilter(user_id="user-42")
    with shop.app.app_context():
        sa.event.listen(shop.store.engine, "before_cursor_execute", note)
        try:
            assert len(list(iter_deliveries(shop.store, where))) == 4
            assert len(list_deliveries(shop.store, where, limit=5, before=10_000)) == 2
        finally:
            sa.event.remove(shop.store.engine, "before_cursor_execute", note)
    assert len(statements) == 2
    with engine.begin() as connection:
        explain = {"sqlite": "EXPLAIN QUERY PLAN "}.get(connection.dialect.name, "EXPLAIN ")
        for sql, params in statements:
            plan = connection.exec_driver_sql(explain + sql, params).all()
            assert "ix_nachocode_deliveries_user_id" in " ".join(map(str, plan)), (sql, plan)
    engine.dispose()

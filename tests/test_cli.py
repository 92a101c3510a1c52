"""`flask nachocode deliveries | show | replay | prune | init-db` on the stored
deliveries, and `urls`; the operator's filters, exports and counts are in
test_cli_deliveries.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from flask_nachocode.events import utcnow
from flask_nachocode.testing import post_delivery, purchase_payload, unavailable_users_payload

from support.cli import delivery_id, listed_ids, run
from support.common import WEBHOOK_KEY


@pytest.mark.every_store
def test_deliveries_lists_newest_first_with_filters_and_a_limit(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    handled = delivery_id(
        post_delivery(store_app.client, "purchase", purchase_payload(userId="buyer-1"))
    )
    store_app.broken = True
    failed = delivery_id(
        post_delivery(store_app.client, "purchase", purchase_payload(userId="buyer-2"))
    )
    store_app.broken = False
    invalid = delivery_id(post_delivery(store_app.client, "purchase", b"[1]"))
    users = delivery_id(
        post_delivery(store_app.client, "unavailable_users", unavailable_users_payload())
    )

    result = run(store_app, "deliveries")
    assert result.exit_code == 0, result.output
    assert listed_ids(result.output) == [users, invalid, failed, handled]
    assert handled < failed < invalid < users
    assert "buyer-1" in result.output
    assert "handled" in result.output

    assert listed_ids(run(store_app, "deliveries", "--status", "failed").output) == [failed]
    assert listed_ids(run(store_app, "deliveries", "--event", "unavailable_users").output) == [
        users
    ]
    assert listed_ids(
        run(store_app, "deliveries", "--event", "purchase", "--limit", "2").output
    ) == [invalid, failed]
    assert "no deliveries" in run(store_app, "deliveries", "--status", "refused").output
    assert run(store_app, "deliveries", "--status", "nonsense").exit_code == 2


@pytest.mark.every_store
def test_show_pretty_prints_the_body_and_escapes_control_characters(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    first = delivery_id(
        post_delivery(store_app.client, "purchase", purchase_payload(userId="evil\x1b[2J"))
    )
    # Raw control characters make a body invalid JSON; it is stored as it came.
    second = delivery_id(
        post_delivery(store_app.client, "purchase", b'{"userId": "\x1b]0;owned\x07\r"}')
    )

    shown = run(store_app, "show", str(first))
    assert shown.exit_code == 0, shown.output
    assert f"delivery {first}: purchase on purchase, handled (200)" in shown.output
    assert '\n  "userId": "evil\\u001b[2J",' in shown.output  # indented JSON
    assert "Authorization" not in shown.output

    shown = run(store_app, "show", str(second))
    assert "invalid (400)" in shown.output
    assert "the body is not valid JSON" in shown.output
    for raw in ("\x1b", "\x07", "\r"):
        assert raw not in shown.output
    assert "\\x1b]0;owned\\x07\\r" in shown.output

    store_app.broken = True
    failed = delivery_id(post_delivery(store_app.client, "purchase", purchase_payload()))
    shown = run(store_app, "show", str(failed))
    assert "error:\nRuntimeError: handler bug" in shown.output
    assert "traceback:\nTraceback (most recent call last)" in shown.output

    missing = run(store_app, "show", "99")
    assert missing.exit_code == 1
    assert "no delivery 99" in missing.output


@pytest.mark.every_database
def test_show_prints_a_lone_surrogate_as_its_escape(make_effects_app: Any) -> None:
    # Valid JSON ("\\ud800") and a valid purchase, but no terminal can print the character.
    store_app = make_effects_app()
    body = json.dumps(purchase_payload(userId="lone", note="\ud800"))
    delivery = delivery_id(post_delivery(store_app.client, "purchase", body))
    shown = run(store_app, "show", str(delivery))
    assert shown.exit_code == 0, shown.output
    assert shown.exception is None
    assert '\n  "note": "\\ud800"\n' in shown.output


@pytest.mark.every_store
def test_replay_failed_replays_every_failed_delivery_and_fails_if_any_still_fails(
    make_effects_app: Any,
) -> None:
    store_app = make_effects_app()
    store_app.broken = True
    stuck, fixed = purchase_payload(userId="stuck"), purchase_payload(userId="fixed")
    answers = [post_delivery(store_app.client, "purchase", payload) for payload in (stuck, fixed)]
    assert [answer.status_code for answer in answers] == [500, 500]
    stuck_id, fixed_id = map(delivery_id, answers)
    resent_id = delivery_id(
        post_delivery(store_app.client, "purchase", purchase_payload())
    )  # a third failure...
    store_app.broken = False
    resent = store_app.deliveries()[-1]
    # ...that the dashboard re-sent successfully meanwhile.
    assert post_delivery(store_app.client, "purchase", json_body(resent)).status_code == 200

    store_app.broken = lambda event: event.user_id == "stuck"
    result = run(store_app, "replay", "--failed")
    assert result.exit_code == 1, result.output
    preview, lines = result.output.split("replaying 3 deliveries\n")
    assert listed_ids(preview) == [stuck_id, fixed_id, resent_id]  # oldest first
    lines = lines.splitlines()
    replays = [int(line.split(" as delivery ")[1].split(":")[0]) for line in lines[:3]]
    assert lines[0].startswith(
        f"delivery {stuck_id}: failed (500) as delivery {replays[0]}: RuntimeError: handler bug"
    )
    assert lines[1] == f"delivery {fixed_id}: handled (200) as delivery {replays[1]}"
    assert lines[2] == f"delivery {resent_id}: duplicate (200) as delivery {replays[2]}"
    outcomes = {row.id: (row.outcome, row.replay_count) for row in store_app.deliveries()}
    assert outcomes[stuck_id] == ("failed", 1)
    assert outcomes[fixed_id] == ("handled", 1)
    assert outcomes[resent_id] == ("duplicate", 1)
    assert {row.id: row.replay_of for row in store_app.deliveries() if row.id in replays} == {
        replays[0]: stuck_id,
        replays[1]: fixed_id,
        replays[2]: resent_id,
    }

    store_app.broken = False
    result = run(store_app, "replay", "--failed")
    assert result.exit_code == 0, result.output
    assert f"replaying 1 delivery\ndelivery {stuck_id}: handled (200) as delivery " in (
        result.output
    )
    assert run(store_app, "replay", "--failed").output.strip() == "nothing to replay"


def json_body(row: Any) -> bytes:
    return bytes(row.body)


@pytest.mark.every_store
def test_replay_refuses_what_cannot_be_replayed(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    post_delivery(store_app.client, "purchase", b"{}")
    post_delivery(store_app.client, "unavailable_users", unavailable_users_payload())
    for stored, reason in [
        ("1", "delivery 1 was invalid"),
        ("2", "delivery 2 was handled"),
        ("9", "no delivery 9"),
    ]:
        result = run(store_app, "replay", stored)
        assert result.exit_code == 1
        assert f"delivery {stored}: not replayed: {reason}" in result.output
    assert store_app.effects() == ["unavailable_users"]
    assert run(store_app, "replay").exit_code == 2
    assert run(store_app, "replay", "1", "--failed").exit_code == 2


@pytest.mark.every_store
def test_replay_of_a_replay_replays_its_original(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    store_app.broken = True
    post_delivery(
        store_app.client,
        "refund",
        purchase_payload() | {"refundQuantity": 1, "refundedAt": "2025-01-01T00:00:00.000Z"},
    )
    assert run(store_app, "replay", "1").exit_code == 1  # still broken: delivery 2 replays 1
    store_app.broken = False
    result = run(store_app, "replay", "2")
    assert result.output.strip() == "delivery 2: handled (200) as delivery 3"
    rows = store_app.deliveries()
    assert [(row.id, row.replay_of, row.outcome, row.replay_count) for row in rows] == [
        (1, None, "handled", 2),
        (2, 1, "failed", 0),
        (3, 1, "handled", 0),
    ]


@pytest.mark.every_store
def test_without_kept_bodies_nothing_is_shown_or_replayed(make_effects_app: Any) -> None:
    store_app = make_effects_app(NACHOCODE_KEEP_BODIES=False)
    store_app.broken = True
    failed = str(delivery_id(post_delivery(store_app.client, "purchase", purchase_payload())))
    assert "body:\n  (not kept)" in run(store_app, "show", failed).output
    store_app.broken = False
    result = run(store_app, "replay", failed)
    assert result.exit_code == 1
    assert "no stored body (NACHOCODE_KEEP_BODIES is off)" in result.output


@pytest.mark.every_store
def test_prune_deletes_old_deliveries_but_keeps_their_claims(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    old_purchase = purchase_payload()
    post_delivery(store_app.client, "purchase", old_purchase)
    post_delivery(store_app.client, "purchase", b"{}")
    post_delivery(store_app.client, "purchase", purchase_payload())
    with store_app.app.app_context():
        store = store_app.store
        table = store.deliveries
        store.session.execute(
            sa.update(table)
            .where(table.c.id.in_([1, 2]))
            .values(received_at=utcnow() - timedelta(days=40))
        )
        store.session.commit()

    result = run(store_app, "prune", "--older-than", "30")
    assert result.exit_code == 0, result.output
    assert "deleted 2 deliveries older than 30 days" in result.output
    assert [row.id for row in store_app.deliveries()] == [3]
    assert len(store_app.rows("nachocode_claims")) == 2

    # Re-sent from the dashboard long after: still recognised.
    answer = post_delivery(store_app.client, "purchase", old_purchase)
    assert answer.get_json()["duplicate"] is True
    assert run(store_app, "prune").exit_code == 2


@pytest.mark.every_store
def test_init_db_creates_the_tables(make_effects_app: Any) -> None:
    store_app = make_effects_app(create_tables=False)
    engine = sa.create_engine(store_app.url, poolclass=sa.pool.NullPool)
    assert "nachocode_claims" not in sa.inspect(engine).get_table_names()
    result = run(store_app, "init-db")
    assert result.exit_code == 0, result.output
    assert "created table nachocode_claims" in result.output
    assert "are up to date" in result.output
    assert {"nachocode_deliveries", "nachocode_claims", "nachocode_purchases"} <= set(
        sa.inspect(engine).get_table_names()
    )
    again = run(store_app, "init-db")  # nothing to do, no error
    assert again.exit_code == 0
    assert "created" not in again.output
    engine.dispose()


#: The tables as version 0.1.0 created them (``{...}``: what differs by database).
#: Deferral added ``nachocode_attempts`` since; later versions may add indexes.
FIRST_RELEASE_DDL = """
CREATE TABLE nachocode_claims (
    identity VARCHAR(512) NOT NULL, event VARCHAR(32) NOT NULL,
    claimed_at {stamp} NOT NULL, PRIMARY KEY (identity)
){without_rowid};
CREATE TABLE nachocode_deliveries (
    id {serial} NOT NULL, event VARCHAR(32), route VARCHAR(32) NOT NULL,
    outcome VARCHAR(16) NOT NULL, status INTEGER NOT NULL, identity VARCHAR(512),
    user_id TEXT, iap_log_id BIGINT, body {blob}, headers JSON, remote_addr VARCHAR(64),
    received_at {stamp} NOT NULL, finished_at {stamp} NOT NULL, duration_ms FLOAT NOT NULL,
    error TEXT, traceback TEXT, replay_of BIGINT, replay_count INTEGER DEFAULT '0' NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_nachocode_deliveries_user_id ON nachocode_deliveries (user_id);
CREATE INDEX ix_nachocode_deliveries_replay_of ON nachocode_deliveries (replay_of)
    WHERE replay_of IS NOT NULL;
CREATE INDEX ix_nachocode_deliveries_iap_log_id ON nachocode_deliveries (iap_log_id);
CREATE TABLE nachocode_purchases (
    id {serial} NOT NULL, platform VARCHAR(16) NOT NULL,
    store_purchase_id VARCHAR(256) NOT NULL, store_token TEXT NOT NULL, user_id TEXT NOT NULL,
    iap_log_id BIGINT NOT NULL, nacho_product_id TEXT NOT NULL, product_id TEXT NOT NULL,
    product_type VARCHAR(16) NOT NULL, environment VARCHAR(16) NOT NULL,
    quantity INTEGER NOT NULL, unit_price VARCHAR(64) NOT NULL,
    refunded_quantity INTEGER NOT NULL, state VARCHAR(24) NOT NULL,
    purchase_received BOOLEAN NOT NULL, purchased_at {stamp}, verified_at {stamp},
    refunded_at {stamp}, updated_at {stamp} NOT NULL, PRIMARY KEY (id),
    CONSTRAINT uq_nachocode_purchases_store_id UNIQUE (platform, store_purchase_id)
);
CREATE INDEX ix_nachocode_purchases_iap_log_id ON nachocode_purchases (iap_log_id);
CREATE INDEX ix_nachocode_purchases_user_id ON nachocode_purchases (user_id)
"""
FIRST_RELEASE_TYPES = {
    "sqlite": {
        "stamp": "DATETIME",
        "serial": "INTEGER",
        "blob": "BLOB",
        "without_rowid": " WITHOUT ROWID",
    },
    "postgresql": {
        "stamp": "TIMESTAMP WITH TIME ZONE",
        "serial": "BIGSERIAL",
        "blob": "BYTEA",
        "without_rowid": "",
    },
}


@pytest.mark.parametrize(
    "store_variant", [("sqlite", "own_engine"), ("postgresql", "own_engine")], indirect=True
)
def test_init_db_brings_a_first_release_database_up_to_date(
    make_effects_app: Any, database_url: str
) -> None:
    # 0.1.0 ran on SQLite and PostgreSQL only. Its purchases must still be known
    # (a re-sent one is a duplicate), and every table and index of this version
    # must be there after init-db, whatever this version added.
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    ddl = FIRST_RELEASE_DDL.format(**FIRST_RELEASE_TYPES[engine.dialect.name])
    old_purchase = purchase_payload()
    with engine.begin() as connection:
        for statement in ddl.split(";"):
            connection.exec_driver_sql(statement)
        connection.execute(
            sa.text("INSERT INTO nachocode_claims VALUES (:identity, 'purchase', :now)"),
            {"identity": f"purchase:ios:{old_purchase['data']['transactionId']}", "now": utcnow()},
        )
    store_app = make_effects_app(url=database_url)

    result = run(store_app, "init-db")
    assert result.exit_code == 0, result.output
    assert "created table nachocode_attempts" in result.output
    with store_app.app.app_context(), store_app.store.engine.connect() as connection:
        gaps = store_app.store.schema_gaps(connection)
    assert (gaps.tables, gaps.indexes, gaps.columns) == ([], [], [])
    assert run(store_app, "init-db").output.count("created") == 0

    assert post_delivery(store_app.client, "purchase", old_purchase).get_json()["duplicate"]
    new_purchase = purchase_payload()
    assert post_delivery(store_app.client, "purchase", new_purchase).status_code == 200
    assert store_app.effects() == [f"purchase:ios:{new_purchase['data']['transactionId']}"]
    engine.dispose()


@pytest.mark.every_database
def test_init_db_adds_a_missing_index_that_first_use_only_reports(
    make_effects_app: Any, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The first use creates missing tables itself, cheaply; an index on a table in
    # use is built by init-db, which the first use's log names.
    setup = make_effects_app(url=database_url)
    assert run(setup, "init-db").exit_code == 0
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    (index,) = [i for i in setup.store.purchases.indexes if i.name.endswith("iap_log_id")]
    index.drop(engine)

    store_app = make_effects_app(url=database_url)
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        answer = post_delivery(store_app.client, "purchase", purchase_payload())
    assert answer.status_code == 200
    assert f"index {index.name}" in caplog.text
    assert "flask nachocode init-db" in caplog.text

    result = run(store_app, "init-db")
    assert result.exit_code == 0, result.output
    assert f"created index {index.name}" in result.output
    names = {i["name"] for i in sa.inspect(engine).get_indexes("nachocode_purchases")}
    assert index.name in names
    engine.dispose()


@pytest.mark.every_database
def test_init_db_prints_the_statement_for_a_missing_column(
    make_effects_app: Any, database_url: str
) -> None:
    # A column is not added by init-db: it says what to run, and that is enough.
    store_app = make_effects_app(url=database_url)
    assert run(store_app, "init-db").exit_code == 0
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE nachocode_deliveries DROP COLUMN replay_count")

    result = run(store_app, "init-db")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    (statement,) = [
        line.strip().rstrip(";") for line in result.output.splitlines() if "ALTER TABLE" in line
    ]
    assert "replay_count" in statement
    with engine.begin() as connection:
        connection.exec_driver_sql(statement)
    again = run(store_app, "init-db")
    assert again.exit_code == 0, again.output
    assert "up to date" in again.output
    columns = {c["name"] for c in sa.inspect(engine).get_columns("nachocode_deliveries")}
    assert "replay_count" in columns
    engine.dispose()


@pytest.mark.every_mode
def test_an_unreachable_store_is_a_one_line_error(tmp_path: Any, make_effects_app: Any) -> None:
    missing = f"sqlite:///{tmp_path / 'missing' / 'nachocode.db'}"
    store_app = make_effects_app(url=missing, create_tables=False)
    for args in (
        ["deliveries"],
        ["show", "1"],
        ["replay", "--failed"],
        ["prune", "--older-than", "1"],
    ):
        result = run(store_app, *args)
        assert result.exit_code == 1
        assert result.output.startswith(
            "Error: the delivery store is unavailable: OperationalError: unable to open"
        ), result.output
        assert "Traceback" not in result.output


def test_urls_labels_each_route_and_never_shows_the_key(make_app: Callable[..., Any]) -> None:
    app, _ = make_app(NACHOCODE_URL_PREFIX="/hooks/nacho")
    result = app.test_cli_runner().invoke(
        args=["nachocode", "urls", "--base-url", "https://shop.example/"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:4] == [
        "In-app purchase: purchase webhook URL           https://shop.example/hooks/nacho/webhooks/purchase",
        "In-app purchase: refund webhook URL             https://shop.example/hooks/nacho/webhooks/refund",
        "Push: unavailable users webhook URL             https://shop.example/hooks/nacho/webhooks/unavailable-users",
        "All events on one URL (event told by the body)  https://shop.example/hooks/nacho/webhooks",
    ]
    assert (
        lines[4]
        == "OpenAPI document of these routes: https://shop.example/hooks/nacho/openapi.json"
    )
    assert "webhook key: configured (1 key)" in result.output
    assert WEBHOOK_KEY not in result.output


def test_urls_says_when_no_key_is_configured(make_app: Callable[..., Any]) -> None:
    app, _ = make_app(NACHOCODE_WEBHOOK_KEY=None)
    result = app.test_cli_runner().invoke(args=["nachocode", "urls"])
    assert result.exit_code == 0
    assert "http://127.0.0.1:5000/nachocode/webhooks/purchase" in result.output
    assert "webhook key: not configured" in result.output
    app, _ = make_app(NACHOCODE_OPENAPI=False)
    assert "OpenAPI" not in app.test_cli_runner().invoke(args=["nachocode", "urls"]).output


def test_urls_refuses_a_base_url_that_is_not_http(make_app: Callable[..., Any]) -> None:
    app, _ = make_app()
    result = app.test_cli_runner().invoke(args=["nachocode", "urls", "--base-url", "shop.example"])
    assert result.exit_code == 2
    assert "not an http:// or https:// URL" in result.output


def test_deliveries_lists_each_delivery_once_with_its_latest_outcome(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    store_app.broken = True
    original = delivery_id(
        post_delivery(store_app.client, "purchase", purchase_payload(userId="stuck"))
    )
    for _ in range(2):
        replayed = run(store_app, "replay", str(original))
        assert replayed.exit_code == 1
        assert f"delivery {original}: failed (500)" in replayed.output

    listed = run(store_app, "deliveries", "--status", "failed")
    assert listed_ids(listed.output) == [original]
    assert "(replayed 2x)" in listed.output

    store_app.broken = False
    assert run(store_app, "replay", str(original)).exit_code == 0  # the third replay handles it
    assert listed_ids(run(store_app, "deliveries", "--status", "failed").output) == []
    assert listed_ids(run(store_app, "deliveries", "--status", "handled").output) == [original]
    with_replays = run(store_app, "deliveries", "--replays")
    replays = listed_ids(with_replays.output)[:-1]
    assert listed_ids(with_replays.output)[-1] == original
    assert len(replays) == 3
    assert replays == sorted(replays, reverse=True)
    assert replays[-1] > original
    assert with_replays.output.count(f"(replay of {original})") == 3


# A bug here is a traceback whatever the store; PostgreSQL once said "bigint out of range".
@pytest.mark.every_database
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["prune", "--older-than", "800000"],
            "Invalid value for '--older-than': 800000 days ago is before the calendar's first year",
        ),
        (["prune", "--older-than", "9" * 20], "Invalid value for '--older-than'"),
        (["show", "9" * 20], "Invalid value for 'DELIVERY_ID': '99999999999999999999' is not"),
        (["replay", "9" * 20], "Invalid value for '[DELIVERY_ID]': '99999999999999999999'"),
    ],
)
def test_inputs_out_of_range_are_a_one_line_error(
    make_effects_app: Any, args: list[str], message: str
) -> None:
    store_app = make_effects_app()
    post_delivery(store_app.client, "purchase", purchase_payload())
    result = run(store_app, *args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(store_app.deliveries()) == 1


def test_show_prints_a_deeply_nested_body_as_received(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    deep = '{"userId": "deep", "nested": ' + "[" * 990 + "]" * 990 + "}"
    assert post_delivery(store_app.client, "purchase", deep.encode()).status_code in (400, 422)
    shown = run(store_app, "show", "1")
    assert shown.exit_code == 0, shown.output
    assert shown.exception is None
    assert deep in shown.output


def test_deliveries_takes_the_urls_spelling_of_unavailable_users(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    post_delivery(store_app.client, "purchase", purchase_payload())
    post_delivery(store_app.client, "unavailable_users", unavailable_users_payload())
    for spelling in ("unavailable_users", "unavailable-users"):
        result = run(store_app, "deliveries", "--event", spelling)
        assert result.exit_code == 0, result.output
        assert listed_ids(result.output) == [2]


@pytest.mark.parametrize(
    "base_url",
    [
        "http://[::1",
        "http://shop.example:80a",
        "http://shop.example:99999",
        "http://shop.example/a b",
        "http://shop.\x1b[2Jexample",
        "http://:80/",
        "http://\udcff.example",  # a byte that is not UTF-8, as Python passes it on
    ],
)
def test_urls_refuses_a_base_url_that_cannot_be_used_in_one_line(
    make_app: Callable[..., Any], base_url: str
) -> None:
    app, _ = make_app()
    result = app.test_cli_runner().invoke(args=["nachocode", "urls", "--base-url", base_url])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.splitlines()[-1].startswith("Error: Invalid value for --base-url: ")
    assert "\x1b" not in result.output  # not even in the error


# Click's int takes any script's digits ("٣" is 3), signs, spaces and underscores.
@pytest.mark.parametrize("number", ["\u0663", "\uff13", "+3", " 3", "3_0", "3a", "-1", ""])
@pytest.mark.parametrize(
    "args",
    [
        ["show"],
        ["replay"],
        ["prune", "--older-than"],
        ["requeue", "--older-than"],
        ["deliveries", "--limit"],
    ],
    ids=lambda args: args[0],
)
def test_numbers_are_ascii_digits_only(make_effects_app: Any, args: list[str], number: str) -> None:
    store_app = make_effects_app()
    store_app.broken = True  # failed, so that replay would act on them
    for _ in range(3):
        post_delivery(store_app.client, "purchase", purchase_payload())
    old = utcnow() - timedelta(days=30)
    with store_app.app.app_context():
        store = store_app.store
        store.session.execute(sa.update(store.deliveries).values(received_at=old))
        store.session.commit()
    result = run(store_app, *args, number)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.splitlines()[-1].startswith("Error: ")  # "Invalid value", "No such option"
    assert [row.replay_of for row in store_app.deliveries()] == [None] * 3  # nothing replayed
    assert run(store_app, *args, "3").exit_code in (0, 1)  # the ASCII spelling is taken

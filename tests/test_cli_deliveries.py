"""The operator's commands on every database: `deliveries`, `replay` and `stats`
with the filter options (user, iapLogId, store id, time range), `--json`,
`--dry-run`, and their one-line errors."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from flask_nachocode.reads import EXPORT_COLUMNS
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload

from support.cli import delivery_id, listed_ids, run

UTC = timezone.utc
START = datetime(2025, 3, 1, 12, tzinfo=UTC)


def received_at(store_app: Any, times: dict[int, datetime]) -> None:
    """Give deliveries the times they were received at."""
    engine = sa.create_engine(store_app.url, poolclass=sa.pool.NullPool)
    table = store_app.store.deliveries
    with engine.begin() as connection:
        for one, moment in times.items():
            connection.execute(sa.update(table).where(table.c.id == one).values(received_at=moment))
    engine.dispose()


def post(store_app: Any, event: str, payload: dict[str, Any]) -> int:
    return delivery_id(post_delivery(store_app.client, event, payload))


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines()]


@pytest.mark.every_database
def test_deliveries_filter_by_user_iap_log_id_store_id_and_time_as_a_table_or_json(
    make_effects_app: Any,
) -> None:
    store_app = make_effects_app()
    bought = purchase_payload(
        os="android", userId="buyer", iapLogId=7001, data={"orderId": "GPA.1"}
    )
    purchase = post(store_app, "purchase", bought)
    refund = post(store_app, "refund", refund_payload(bought))
    later = post(store_app, "purchase", purchase_payload(userId="buyer"))
    other = post(store_app, "purchase", purchase_payload(userId="BUYER", iapLogId=7002))
    received_at(
        store_app,
        {
            purchase: START - timedelta(days=1),
            refund: START,
            later: START + timedelta(hours=1),
            other: START + timedelta(hours=1),
        },
    )

    def listed(*args: str) -> list[int]:
        result = run(store_app, "deliveries", *args)
        assert result.exit_code == 0, result.output
        return listed_ids(result.output)

    assert listed("--user", "buyer") == [later, refund, purchase]
    assert listed("--iap-log-id", "7001") == [refund, purchase]  # a refund carries its purchase's
    assert listed("--store-id", "GPA.1") == [refund, purchase]
    assert listed("--store-id", "GPA.1", "--event", "refund") == [refund]
    assert listed("--since", "2025-03-01") == [other, later, refund]  # a date is its UTC midnight
    assert listed("--since", "2025-03-01T12:00", "--until", "2025-03-01T13:00") == [refund]
    # An offset names the same instants: 21:00 in Seoul is 12:00 UTC.
    assert listed("--since", "2025-03-01T21:00+09:00", "--user", "buyer") == [later, refund]
    assert listed("--until", "2025-03-01T12:00:00Z") == [purchase]
    assert listed("--since", "0001-01-01", "--until", "9999-12-31") == [
        other,
        later,
        refund,
        purchase,
    ]
    assert listed("--user", "nobody") == []

    exported = run(store_app, "deliveries", "--user", "buyer", "--json")
    assert exported.exit_code == 0, exported.output
    records = json_lines(exported.output)
    assert [record["id"] for record in records] == [purchase, refund, later]  # oldest first
    assert all(list(record) == list(EXPORT_COLUMNS) for record in records)
    assert records[1]["received_at"] == "2025-03-01T12:00:00+00:00"
    assert records[1]["identity"].startswith("refund:android:GPA.1:")
    assert (records[1]["iap_log_id"], records[1]["outcome"]) == (7001, "handled")
    # More than the table's 20: an export is every match.
    assert len(json_lines(run(store_app, "deliveries", "--json").output)) == 4


@pytest.mark.every_database
def test_an_exported_id_is_escaped_so_it_cannot_drive_the_terminal(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    post(store_app, "purchase", purchase_payload(userId="evil\x1b[2J\u2028사용자"))
    exported = run(store_app, "deliveries", "--json")
    assert exported.exit_code == 0, exported.output
    assert "\x1b" not in exported.output
    assert "\u2028" not in exported.output
    assert json_lines(exported.output)[0]["user_id"] == "evil\x1b[2J\u2028사용자"


@pytest.mark.every_database
def test_replay_with_filters_prints_what_it_takes_and_a_dry_run_replays_nothing(
    make_effects_app: Any,
) -> None:
    store_app = make_effects_app()
    store_app.broken = True
    mine = [post(store_app, "purchase", purchase_payload(userId="mine")) for _ in range(2)]
    theirs = post(store_app, "purchase", purchase_payload(userId="theirs"))
    store_app.broken = False
    handled = post(store_app, "purchase", purchase_payload(userId="mine"))
    invalid = post(store_app, "purchase", {"userId": "mine"})

    dry = run(store_app, "replay", "--user", "mine", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert listed_ids(dry.output) == mine  # failed ones only, oldest first
    assert dry.output.endswith("dry run: 2 deliveries would be replayed; nothing was replayed\n")
    assert run(store_app, "replay", "--failed", "--dry-run").output.count("\n") == 1 + 3 + 1
    assert [row.replay_of for row in store_app.deliveries()] == [None] * 5

    shown = run(store_app, "replay", str(theirs), "--dry-run")
    assert shown.output == f"dry run: delivery {theirs} would be replayed\n"
    refused = run(store_app, "replay", str(invalid), "--dry-run")
    assert refused.exit_code == 1
    assert refused.output == (
        f"delivery {invalid}: would not be replayed: delivery {invalid} was invalid; only failed, "
        "refused or unhandled deliveries and handled purchases or refunds (which come back as "
        "duplicates) are replayed\n"
    )

    result = run(store_app, "replay", "--user", "mine")
    assert result.exit_code == 0, result.output
    preview, replayed = result.output.split("replaying 2 deliveries\n")
    assert listed_ids(preview) == mine
    assert [line.split(":")[0] for line in replayed.splitlines()] == [
        f"delivery {one}" for one in mine
    ]
    outcomes = {row.id: row.outcome for row in store_app.deliveries() if row.replay_of is None}
    assert outcomes == {
        mine[0]: "handled",
        mine[1]: "handled",
        theirs: "failed",
        handled: "handled",
        invalid: "invalid",
    }
    assert run(store_app, "replay", "--user", "mine").output == "nothing to replay\n"


@pytest.mark.every_database
def test_stats_count_by_day_or_hour_event_and_outcome(make_effects_app: Any) -> None:
    store_app = make_effects_app()
    bought = purchase_payload()
    ids = [
        post(store_app, "purchase", bought),
        post(store_app, "purchase", bought),  # a re-send: duplicate
        post(store_app, "refund", refund_payload(bought)),
        post(store_app, "purchase", purchase_payload()),
    ]
    received_at(
        store_app,
        {
            ids[0]: START,
            ids[1]: START + timedelta(minutes=5),
            ids[2]: START + timedelta(hours=1),
            ids[3]: START + timedelta(days=1),
        },
    )
    window = ("--since", "2025-03-01", "--until", "2025-03-03")

    table = run(store_app, "stats", *window)
    assert table.exit_code == 0, table.output
    assert [line.split() for line in table.output.splitlines()] == [
        ["day", "(UTC)", "event", "outcome", "count"],
        ["2025-03-01", "purchase", "duplicate", "1"],
        ["2025-03-01", "purchase", "handled", "1"],
        ["2025-03-01", "refund", "handled", "1"],
        ["2025-03-02", "purchase", "handled", "1"],
        ["total", "4"],
    ]
    hours = run(store_app, "stats", *window, "--by", "hour", "--event", "purchase", "--json")
    assert hours.exit_code == 0, hours.output
    assert json_lines(hours.output) == [
        {
            "start": "2025-03-01T12:00:00+00:00",
            "event": "purchase",
            "outcome": "duplicate",
            "count": 1,
        },
        {
            "start": "2025-03-01T12:00:00+00:00",
            "event": "purchase",
            "outcome": "handled",
            "count": 1,
        },
        {
            "start": "2025-03-02T12:00:00+00:00",
            "event": "purchase",
            "outcome": "handled",
            "count": 1,
        },
    ]
    # By default the last 7 days, which these are not.
    assert run(store_app, "stats").output.splitlines()[1:] == ["no deliveries"]
    assert run(store_app, "stats", "--json").output == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deliveries", "--since", "2025-13-01"], "Invalid value for '--since': '2025-13-01'"),
        (["deliveries", "--since", "yesterday"], "Invalid value for '--since': 'yesterday'"),
        (["stats", "--until", "\u0662\u0660\u0662\u0665-03-01"], "Invalid value for '--until'"),
        (["replay", "--since", "\uff12\uff10\uff12\uff15-03-01"], "Invalid value for '--since'"),
        (["deliveries", "--since", "2025-03-02", "--until", "2025-03-01"], "is not after --since"),
        (["replay", "--since", "2025-03-01", "--until", "2025-03-01"], "is not after --since"),
        (["deliveries", "--iap-log-id", "\u0663"], "Invalid value for '--iap-log-id'"),
        (["replay", "--iap-log-id", "-1"], "Invalid value for '--iap-log-id'"),
        (["replay", "--user", ""], "Invalid value for '--user': is empty"),
        (["stats", "--store-id", ""], "Invalid value for '--store-id': is empty"),
        (["deliveries", "--user", "\udcff"], "Invalid value for '--user': '\\udcff' is not UTF-8"),
        (["stats", "--by", "week"], "Invalid value for '--by'"),
        (["deliveries", "--bogus"], "--bogus"),  # click's own wording varies by version
        (["deliveries", "--json", "--limit", "5"], "--limit is for the table"),
        (["replay", "1", "--user", "mine"], "give a delivery ID, or --failed or filter options"),
    ],
)
def test_bad_values_are_a_one_line_error_before_anything_is_read(
    make_effects_app: Any, args: list[str], message: str
) -> None:
    store_app = make_effects_app()
    store_app.broken = True  # failed, so that a replay would act on it
    post(store_app, "purchase", purchase_payload(userId="mine"))
    result = run(store_app, *args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.splitlines()[-1].startswith("Error: ")
    assert message in result.output.splitlines()[-1], result.output
    assert [row.replay_of for row in store_app.deliveries()] == [None]

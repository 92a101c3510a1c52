"""The operator's commands: list, export, show, replay and count the stored
deliveries (``deliveries``, ``show``, ``replay``, ``stats``), all through
:mod:`flask_nachocode.reads`, so that they mean by a filter what the inspector does."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import click
import sqlalchemy as sa
from flask.cli import with_appcontext

from .. import reads
from ..delivery import replay as replay_delivery
from ..delivery import replay_target
from ..display import escape_controls, pretty_json
from ..errors import WebhookError
from ..reads import DeliveryFilter
from ..state import current_state
from .params import WholeNumber, filter_options, has_filter, needs_store

#: What ``stats`` counts when given neither --since nor --until: this UTC day
#: and the six before it. ``received_at`` has no index, so an unbounded count
#: would read every delivery.
STATS_DAYS = 7


def _table_header() -> str:
    return (
        f"{'id':>6}  {'received (UTC)':19}  {'event':17}  {'outcome':9}  "
        f"{'status':>6}  {'ms':>8}  user"
    )


def _table_row(row: sa.Row[Any]) -> str:
    """A delivery as a line of the table: the :data:`~flask_nachocode.reads.LIST_COLUMNS`."""
    return (
        f"{row.id:>6}  {row.received_at:%Y-%m-%d %H:%M:%S}  "
        f"{row.event or '-':17}  {row.outcome:9}  {row.status:>6}  {row.duration_ms:>8.1f}  "
        f"{escape_controls(row.user_id or '-', keep='')}"
        + (f"  (replayed {row.replay_count}x)" if row.replay_count else "")
        + (f"  (replay of {row.replay_of})" if row.replay_of is not None else "")
    )


def _deliveries(count: int) -> str:
    return f"{count} deliver{'y' if count == 1 else 'ies'}"


def _json_line(record: dict[str, Any]) -> str:
    # ASCII escapes: a stored id or error cannot drive the terminal or break a
    # line, and jq reads them back as the characters they were.
    return json.dumps(record, ensure_ascii=True)


@click.command("deliveries")
@click.option(
    "--replays",
    is_flag=True,
    help="List replays too; by default each delivery is listed once, with its latest outcome.",
)
@click.option(
    "--limit",
    type=WholeNumber(1, 10_000),
    help="At most N rows of the table, the newest (default 20). Not with --json.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Every matching delivery, oldest first, one JSON object a line (for jq).",
)
@with_appcontext
@needs_store
@filter_options
def list_deliveries(where: DeliveryFilter, replays: bool, limit: int | None, as_json: bool) -> None:
    """A table of recent deliveries, newest first; or with --json, every one that
    matches, exported as the inspector exports them."""
    where = replace(where, replays=replays)
    store = current_state().store
    if as_json:
        if limit is not None:
            # An export is every match; a time range is what narrows it.
            raise click.UsageError("--limit is for the table: --json exports every match")
        for row in reads.iter_deliveries(store, where):
            click.echo(_json_line(reads.delivery_record(row)))
        return
    rows = reads.list_deliveries(store, where, limit=limit or 20)
    click.echo(_table_header())
    for row in rows:
        click.echo(_table_row(row))
    if not rows:
        click.echo("no deliveries")


@click.command("show")
@click.argument("delivery_id", type=WholeNumber())
@with_appcontext
@needs_store
def show(delivery_id: int) -> None:
    """One delivery: headers, body pretty-printed, error and traceback."""
    row = reads.get_delivery(current_state().store, delivery_id)
    if row is None:
        raise click.ClickException(f"no delivery {delivery_id}")
    outcome = f"{row.outcome} ({row.status})"
    if row.status == 202:  # deferred: what Nachocode was answered, then what the worker did
        outcome = "answered 202 (queued)" + (
            f", then {row.outcome} by the worker" if row.outcome != "queued" else ""
        )
    lines: list[str] = [
        f"delivery {row.id}: {row.event or '-'} on {row.route}, {outcome}",
        f"received {row.received_at.isoformat()}  finished {row.finished_at.isoformat()}  "
        f"{row.duration_ms:.1f} ms  from {row.remote_addr or '-'}",
        f"identity {row.identity or '-'}  replayed {row.replay_count}x"
        + (f"  replay of {row.replay_of}" if row.replay_of else ""),
        "headers:",
    ]
    lines += [f"  {name}: {value}" for name, value in (row.headers or {}).items()]
    lines.append("body:")
    lines.append(pretty_json(row.body)[0] if row.body is not None else "  (not kept)")
    if row.error:
        lines += ["error:", row.error]
    if row.traceback:
        lines += ["traceback:", row.traceback]
    attempts = reads.attempts_of(current_state().store, delivery_id)
    if attempts:
        lines.append("attempts:")
    for attempt in attempts:
        due = attempt.next_attempt_at
        lines.append(
            f"  {attempt.attempt}. {attempt.outcome}  started {attempt.started_at.isoformat()}  "
            f"finished {attempt.finished_at.isoformat()}"
            + (f"  next attempt {due.isoformat()}" if due is not None else "")
        )
        if attempt.error:
            lines.append(f"     {attempt.error}")
        if attempt.traceback:
            lines += [f"     {line}" for line in attempt.traceback.rstrip().splitlines()]
    click.echo(escape_controls("\n".join(lines)))


@click.command("replay")
@click.argument("delivery_id", type=WholeNumber(), required=False)
@click.option(
    "--failed",
    "all_failed",
    is_flag=True,
    help="Replay every delivery whose latest outcome is failed, refused or unhandled.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be replayed, and replay nothing.")
@with_appcontext
@needs_store
@filter_options
def replay(where: DeliveryFilter, delivery_id: int | None, all_failed: bool, dry_run: bool) -> None:
    """Run the handlers again on a stored delivery, or on every one that failed
    (--failed), or on those of them the filter options pick. Prints which
    deliveries, and how many, before replaying them.

    Failed, refused and unhandled deliveries run their handlers again. A purchase
    or refund that was handled (at first, by a re-send or by an earlier replay)
    comes back as a duplicate without running them: the exactly-once rule holds
    for replays too. Invalid bodies and handled unavailable_users deliveries are
    not replayed. Exits non-zero if any replay fails.
    """
    state = current_state()
    bulk = all_failed or has_filter(where)
    if (delivery_id is None) == (not bulk):
        raise click.UsageError("give a delivery ID, or --failed or filter options, not both")
    ids: list[int]
    if bulk:
        ids = _preview(replace(where, replayable=True), dry_run)
    else:
        assert delivery_id is not None
        ids = [delivery_id]
        if dry_run:
            try:
                target = replay_target(state.store, delivery_id)
            except (LookupError, ValueError) as error:
                click.echo(f"delivery {delivery_id}: would not be replayed: {error}")
                raise SystemExit(1) from None
            original = f" (the original of {delivery_id})" if target.id != delivery_id else ""
            click.echo(f"dry run: delivery {target.id}{original} would be replayed")
    if dry_run:
        return
    failures = 0
    for one in ids:
        failures += not _replay_one(one)
    if failures:
        raise SystemExit(1)


def _preview(where: DeliveryFilter, dry_run: bool) -> list[int]:
    """List the deliveries a bulk replay takes, then how many; their ids. Those
    stored when the listing starts only: the replays made next are not met again."""
    ids: list[int] = []
    for row in reads.iter_deliveries(current_state().store, where, columns=reads.LIST_COLUMNS):
        if not ids:
            click.echo(_table_header())
        click.echo(_table_row(row))
        ids.append(row.id)
    if not ids:
        click.echo("nothing to replay")
    elif dry_run:
        click.echo(f"dry run: {_deliveries(len(ids))} would be replayed; nothing was replayed")
    else:
        click.echo(f"replaying {_deliveries(len(ids))}")
    return ids


def _replay_one(delivery_id: int) -> bool:
    """Replay one delivery and print what happened; whether it was handled."""
    state = current_state()
    try:
        result = replay_delivery(state, delivery_id)
    except (LookupError, ValueError, WebhookError) as error:
        reason = escape_controls(str(getattr(error, "message", error)))
        click.echo(f"delivery {delivery_id}: not replayed: {reason}")
        return False
    detail = ""
    if result.error is not None:
        # The stored error says what the handler raised; the answer only that it failed.
        stored = reads.get_delivery(state.store, result.delivery_id) if result.delivery_id else None
        stored_error = stored.error if stored is not None else None
        detail = f": {escape_controls(stored_error or result.error.message)}"
    click.echo(
        f"delivery {delivery_id}: {result.outcome} ({result.status}) "
        f"as delivery {result.delivery_id}{detail}"
    )
    return bool(result.ok)


@click.command("stats")
@click.option("--replays", is_flag=True, help="Count replays too; by default each delivery once.")
@click.option(
    "--by",
    "period",
    type=click.Choice(["day", "hour"]),
    default="day",
    show_default=True,
    help="Count per UTC day or hour.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object a line (for jq) instead of a table."
)
@with_appcontext
@needs_store
@filter_options
def stats(where: DeliveryFilter, replays: bool, period: str, as_json: bool) -> None:
    """How many deliveries arrived per day (or hour), by event and latest outcome,
    counted by the database. Without --since or --until, the last 7 UTC days."""
    changes: dict[str, Any] = {"replays": replays}
    if where.received_from is None and where.received_until is None:
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        changes["received_from"] = today - timedelta(days=STATS_DAYS - 1)
    where = replace(where, **changes)
    counts = reads.count_by_period(
        current_state().store, where, period="hour" if period == "hour" else "day"
    )
    if as_json:
        for count in counts:
            record = {
                "start": count.start.isoformat(),
                "event": count.event,
                "outcome": count.outcome,
                "count": count.count,
            }
            click.echo(_json_line(record))
        return
    shown = "%Y-%m-%d %H:00" if period == "hour" else "%Y-%m-%d"
    width = len(datetime(2000, 1, 1).strftime(shown))
    click.echo(f"{period + ' (UTC)':{width}}  {'event':17}  {'outcome':9}  {'count':>8}")
    for count in counts:
        click.echo(
            f"{count.start.strftime(shown):{width}}  {count.event or '-':17}  "
            f"{count.outcome:9}  {count.count:>8}"
        )
    if not counts:
        click.echo("no deliveries")
        return
    total = sum(count.count for count in counts)
    click.echo(f"{'total':{width}}  {'':17}  {'':9}  {total:>8}")


COMMANDS = (list_deliveries, show, replay, stats)

"""The ``flask nachocode`` command group."""

from __future__ import annotations

import functools
import json
from datetime import timedelta
from typing import Any, Callable

import click
import sqlalchemy as sa
from flask import current_app
from flask.cli import with_appcontext

from .dispatch import replay as replay_delivery
from .errors import WebhookError
from .events import EVENT_NAMES
from .extension import AppState
from .store import OUTCOMES, REPLAYABLE, describe_database_error, utcnow


def _state() -> AppState:
    return current_app.extensions["nachocode"]  # type: ignore[no-any-return]


def escape_controls(text: str, keep: str = "\n\t") -> str:
    """Show control characters (except those in ``keep``) as escapes, so that a
    stored body cannot drive the terminal that displays it."""
    return "".join(
        ch if ch in keep or (ch.isprintable() and ch != "\x7f") else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def _needs_store(command: Callable[..., None]) -> Callable[..., None]:
    """A clear one-line error instead of a traceback when the database is unreachable."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except sa.exc.SQLAlchemyError as error:
            raise click.ClickException(f"the delivery store is unavailable: {describe_database_error(error)}") from None

    return run


@click.group("nachocode")
def nachocode_cli() -> None:
    """Nachocode webhooks: the delivery store, replay and retention."""


@nachocode_cli.command("init-db")
@with_appcontext
@_needs_store
def init_db() -> None:
    """Create the nachocode_* tables (deliveries, claims, purchases)."""
    store = _state().store
    store.create_tables()
    click.echo(f"created the nachocode tables on {store.engine.url.render_as_string(hide_password=True)}")


@nachocode_cli.command("deliveries")
@click.option("--status", "outcome", type=click.Choice(OUTCOMES))
@click.option("--event", type=click.Choice(EVENT_NAMES))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@with_appcontext
@_needs_store
def list_deliveries(outcome: str | None, event: str | None, limit: int) -> None:
    """A table of recent deliveries, newest first."""
    store = _state().store
    store.ensure_ready()
    table = store.deliveries
    query = sa.select(
        table.c.id, table.c.received_at, table.c.event, table.c.outcome, table.c.status,
        table.c.duration_ms, table.c.user_id, table.c.replay_count, table.c.replay_of,
    ).order_by(table.c.id.desc()).limit(limit)
    if outcome:
        query = query.where(table.c.outcome == outcome)
    if event:
        query = query.where(table.c.event == event)
    rows = store.session.execute(query).all()
    store.session.rollback()  # end the read: SQLite writers must not wait on it
    click.echo(f"{'id':>6}  {'received (UTC)':19}  {'event':17}  {'outcome':9}  {'status':>6}  {'ms':>8}  user")
    for row in rows:
        click.echo(
            f"{row.id:>6}  {row.received_at:%Y-%m-%d %H:%M:%S}  {row.event or '-':17}  {row.outcome:9}  "
            f"{row.status:>6}  {row.duration_ms:>8.1f}  {escape_controls(row.user_id or '-', keep='')}"
            + (f"  (replayed {row.replay_count}x)" if row.replay_count else "")
            + (f"  (replay of {row.replay_of})" if row.replay_of is not None else "")
        )
    if not rows:
        click.echo("no deliveries")


@nachocode_cli.command("show")
@click.argument("delivery_id", type=int)
@with_appcontext
@_needs_store
def show(delivery_id: int) -> None:
    """One delivery: headers, body pretty-printed, error and traceback."""
    row = _state().store.get_delivery(delivery_id)
    if row is None:
        raise click.ClickException(f"no delivery {delivery_id}")
    lines: list[str] = [
        f"delivery {row.id}: {row.event or '-'} on {row.route}, {row.outcome} ({row.status})",
        f"received {row.received_at.isoformat()}  finished {row.finished_at.isoformat()}  "
        f"{row.duration_ms:.1f} ms  from {row.remote_addr or '-'}",
        f"identity {row.identity or '-'}  replayed {row.replay_count}x"
        + (f"  replay of {row.replay_of}" if row.replay_of else ""),
        "headers:",
    ]
    lines += [f"  {name}: {value}" for name, value in (row.headers or {}).items()]
    lines.append("body:")
    lines.append(_pretty_body(row.body))
    if row.error:
        lines += ["error:", row.error]
    if row.traceback:
        lines += ["traceback:", row.traceback]
    click.echo(escape_controls("\n".join(lines)))


def _pretty_body(body: bytes | None) -> str:
    if body is None:
        return "  (not kept)"
    text = bytes(body).decode("utf-8", "replace")
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


@nachocode_cli.command("replay")
@click.argument("delivery_id", type=int, required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Replay every failed, refused or unhandled delivery.")
@with_appcontext
@_needs_store
def replay(delivery_id: int | None, all_failed: bool) -> None:
    """Run the handlers again on stored deliveries that failed or had no handler.

    A delivery whose event was handled meanwhile comes back as a duplicate: the
    exactly-once rule holds for replays too. Exits non-zero if any replay fails.
    """
    state = _state()
    if (delivery_id is None) == (not all_failed):
        raise click.UsageError("give a delivery ID or --failed, not both")
    if all_failed:
        table = state.store.deliveries
        state.store.ensure_ready()
        ids = list(
            state.store.session.execute(
                sa.select(table.c.id)
                .where(table.c.outcome.in_(REPLAYABLE), table.c.replay_of.is_(None))
                .order_by(table.c.id)
            ).scalars()
        )
        state.store.session.rollback()
        if not ids:
            click.echo("nothing to replay")
            return
    else:
        assert delivery_id is not None
        ids = [delivery_id]
    failures = 0
    for one in ids:
        try:
            result = replay_delivery(state, one)
        except (LookupError, ValueError, WebhookError) as error:
            failures += 1
            click.echo(f"delivery {one}: not replayed: {escape_controls(str(getattr(error, 'message', error)))}")
            continue
        failures += not result.ok
        detail = ""
        if result.error is not None:
            # The stored error says what the handler raised; the answer only that it failed.
            stored = state.store.get_delivery(result.delivery_id) if result.delivery_id else None
            detail = f": {escape_controls((stored.error if stored is not None else None) or result.error.message)}"
        click.echo(f"delivery {one}: {result.outcome} ({result.status}) as delivery {result.delivery_id}{detail}")
    if failures:
        raise SystemExit(1)


@nachocode_cli.command("prune")
@click.option("--older-than", "days", required=True, type=click.IntRange(0), help="Age in days.")
@with_appcontext
@_needs_store
def prune(days: int) -> None:
    """Delete deliveries received more than DAYS days ago.

    Claims are kept (they hold only store ids), so a very old purchase re-sent
    from the dashboard is still recognised as a duplicate.
    """
    store = _state().store
    store.ensure_ready()
    table = store.deliveries
    result: Any = store.session.execute(sa.delete(table).where(table.c.received_at < utcnow() - timedelta(days=days)))
    store.session.commit()
    click.echo(f"deleted {result.rowcount} deliveries older than {days} days")

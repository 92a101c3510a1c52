"""The ``flask nachocode`` command group."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import click
import sqlalchemy as sa
from flask.cli import with_appcontext

from . import reads
from .delivery import DELIVERY_BUDGET_SECONDS
from .delivery import replay as replay_delivery
from .display import escape_controls, pretty_json
from .errors import WebhookError
from .events import EVENT_SPELLINGS, ROUTES, ROUTES_BY_EVENT
from .schemas import MAX_ID, parse_id
from .sender import (
    DEFAULT_BASE_URL,
    check_key,
    check_url,
    deliver,
    encode_body,
    read_last_sent,
    refund_of_last_purchase,
    save_last_sent,
    set_field,
    show_answer,
)
from .state import current_state
from .store import add_column_statement, describe_database_error
from .tables import OUTCOMES
from .testing import payload_for
from .worker import requeue


def _needs_store(command: Callable[..., None]) -> Callable[..., None]:
    """A clear one-line error instead of a traceback when the database is unreachable."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except sa.exc.SQLAlchemyError as error:
            raise click.ClickException(
                f"the delivery store is unavailable: {describe_database_error(error)}"
            ) from None

    return run


class EventChoice(click.Choice):  # type: ignore[type-arg]
    """An event name, in either spelling (``unavailable_users`` or the URL's
    ``unavailable-users``); converted to the event name."""

    name = "event"

    def __init__(self) -> None:
        super().__init__(list(EVENT_SPELLINGS))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return EVENT_SPELLINGS[super().convert(value, param, ctx)]


class WholeNumber(click.IntRange):
    """A whole number in ASCII digits, from ``min`` to ``max``. Click's int also takes
    other scripts' digits ("٣" is 3), signs, spaces and underscores, as the inspector
    does not (it uses :func:`flask_nachocode.schemas.parse_id` too)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            number = parse_id(value)
            if number is None:
                wanted = f"a whole number in digits 0-9 up to {MAX_ID}"
                self.fail(f"{value!r} is not {wanted}", param, ctx)
            value = number
        return super().convert(value, param, ctx)


@click.group("nachocode")
def nachocode_cli() -> None:
    """Nachocode webhooks: the delivery store, replay and retention, and
    sending test deliveries to a running app."""


@nachocode_cli.command("init-db")
@with_appcontext
@_needs_store
def init_db() -> None:
    """Create the nachocode_* tables, or bring those of an earlier version up to
    date: the missing tables and indexes are added. A missing column is not: the
    command prints the statement to run and fails."""
    store = current_state().store
    gaps = store.upgrade_schema()
    where = store.engine.url.render_as_string(hide_password=True)
    for table in gaps.tables:
        click.echo(f"created table {table.name}")
    for index in gaps.addable_indexes():
        click.echo(f"created index {index.name}")
    if gaps.columns:
        dialect = store.engine.dialect
        statements = "".join(
            f"\n    {add_column_statement(column, dialect)};" for column in gaps.columns
        )
        raise click.ClickException(
            "the nachocode tables lack columns of this version, which init-db does not add "
            "(on a large table that can hold every delivery while the database rewrites it). "
            f"Run, at a quiet moment, on {where}:{statements}\n"
            "then `flask nachocode init-db` again."
        )
    click.echo(f"the nachocode tables on {where} are up to date")


@nachocode_cli.command("deliveries")
@click.option("--status", "outcome", type=click.Choice(OUTCOMES), help="Latest outcome.")
@click.option("--event", type=EventChoice())
@click.option(
    "--replays",
    is_flag=True,
    help="List replays too; by default each delivery is listed once, with its latest outcome.",
)
@click.option("--limit", default=20, show_default=True, type=WholeNumber(1, 10_000))
@with_appcontext
@_needs_store
def list_deliveries(outcome: str | None, event: str | None, replays: bool, limit: int) -> None:
    """A table of recent deliveries, newest first."""
    where = reads.DeliveryFilter(outcome=outcome or "", event=event or "", replays=replays)
    rows = reads.list_deliveries(current_state().store, where, limit=limit)
    click.echo(
        f"{'id':>6}  {'received (UTC)':19}  {'event':17}  {'outcome':9}  "
        f"{'status':>6}  {'ms':>8}  user"
    )
    for row in rows:
        click.echo(
            f"{row.id:>6}  {row.received_at:%Y-%m-%d %H:%M:%S}  "
            f"{row.event or '-':17}  {row.outcome:9}  {row.status:>6}  {row.duration_ms:>8.1f}  "
            f"{escape_controls(row.user_id or '-', keep='')}"
            + (f"  (replayed {row.replay_count}x)" if row.replay_count else "")
            + (f"  (replay of {row.replay_of})" if row.replay_of is not None else "")
        )
    if not rows:
        click.echo("no deliveries")


@nachocode_cli.command("show")
@click.argument("delivery_id", type=WholeNumber())
@with_appcontext
@_needs_store
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


@nachocode_cli.command("replay")
@click.argument("delivery_id", type=WholeNumber(), required=False)
@click.option(
    "--failed",
    "all_failed",
    is_flag=True,
    help="Replay every delivery whose latest outcome is failed, refused or unhandled.",
)
@with_appcontext
@_needs_store
def replay(delivery_id: int | None, all_failed: bool) -> None:
    """Run the handlers again on a stored delivery, or on every one that failed.

    Failed, refused and unhandled deliveries run their handlers again. A purchase
    or refund that was handled (at first, by a re-send or by an earlier replay)
    comes back as a duplicate without running them: the exactly-once rule holds
    for replays too. Invalid bodies and handled unavailable_users deliveries are
    not replayed. Exits non-zero if any replay fails.
    """
    state = current_state()
    if (delivery_id is None) == (not all_failed):
        raise click.UsageError("give a delivery ID or --failed, not both")
    ids: Iterable[int]
    if all_failed:
        where = reads.DeliveryFilter(replayable=True)
        ids = (row.id for row in reads.iter_deliveries(state.store, where, columns=("id",)))
    else:
        assert delivery_id is not None
        ids = [delivery_id]
    failures = replayed = 0
    for one in ids:
        replayed += 1
        try:
            result = replay_delivery(state, one)
        except (LookupError, ValueError, WebhookError) as error:
            failures += 1
            reason = escape_controls(str(getattr(error, "message", error)))
            click.echo(f"delivery {one}: not replayed: {reason}")
            continue
        failures += not result.ok
        detail = ""
        if result.error is not None:
            # The stored error says what the handler raised; the answer only that it failed.
            stored = (
                reads.get_delivery(state.store, result.delivery_id) if result.delivery_id else None
            )
            stored_error = stored.error if stored is not None else None
            detail = f": {escape_controls(stored_error or result.error.message)}"
        click.echo(
            f"delivery {one}: {result.outcome} ({result.status}) "
            f"as delivery {result.delivery_id}{detail}"
        )
    if not replayed:
        click.echo("nothing to replay")
    if failures:
        raise SystemExit(1)


@nachocode_cli.command("requeue")
@click.option(
    "--older-than",
    "minutes",
    default=10,
    show_default=True,
    type=WholeNumber(0),
    help="Minutes a queued delivery's next attempt has been due.",
)
@with_appcontext
@_needs_store
def requeue_command(minutes: int) -> None:
    """Send again the tasks of queued deliveries that should have run MINUTES ago.

    For a broker that lost its queue (Redis without persistence, a purged queue) or
    a task that could not be sent. A task that is still in the broker is harmless:
    whichever runs second does nothing. With NACHOCODE_DEFERRED off, the queued
    deliveries' attempts run here instead. Stops, and exits with status 1, at the
    first task that cannot be sent (or attempt that cannot be made): the rest stay
    queued for the next run.
    """
    state = current_state()
    try:
        sent, left = requeue(state, timedelta(minutes=minutes))
    except OverflowError:
        raise click.BadParameter(
            f"{minutes} minutes ago is before the calendar's first year",
            param_hint="'--older-than'",
        ) from None
    deferred = state.task_queue is not None
    click.echo(
        f"{'sent the tasks of' if deferred else 'ran'} {len(sent)} queued deliveries"
        + "".join(f"\n  {i} (attempt {n})" for i, n in sent)
    )
    if left:
        raise click.ClickException(
            f"stopped: {'a task could not be sent' if deferred else 'an attempt was not made'} "
            f"(see the log above); {left} queued deliveries left for the next requeue"
        )


@nachocode_cli.command("prune")
@click.option("--older-than", "days", required=True, type=WholeNumber(0), help="Age in days.")
@with_appcontext
@_needs_store
def prune(days: int) -> None:
    """Delete deliveries received more than DAYS days ago, except queued ones.

    Claims are kept (they hold only store ids), so a very old purchase re-sent
    from the dashboard is still recognised as a duplicate.
    """
    try:
        deleted = current_state().store.prune(timedelta(days=days))
    except OverflowError:
        raise click.BadParameter(
            f"{days} days ago is before the calendar's first year", param_hint="'--older-than'"
        ) from None
    click.echo(f"deleted {deleted} deliveries older than {days} days")


def webhook_url(base_url: str, route: str) -> str:
    """The full URL of this app's route for ``route`` (an event name or ``"any"``)."""
    return f"{base_url.rstrip('/')}{current_state().url_prefix}{ROUTES_BY_EVENT[route].path}"


@nachocode_cli.command("urls")
@click.option(
    "--base-url",
    default=DEFAULT_BASE_URL,
    show_default=True,
    help="Where Nachocode reaches this app, e.g. your tunnel's or server's https URL.",
)
@with_appcontext
def urls(base_url: str) -> None:
    """The URL of each webhook route, labelled with the Nachocode dashboard
    field it goes into, and whether a webhook key is configured."""
    check_url(base_url, "--base-url")
    width = max(len(route.dashboard_field) for route in ROUTES)
    for route in ROUTES:
        click.echo(
            f"{route.dashboard_field:{width}}  {webhook_url(base_url, route.event or 'any')}"
        )
    if current_state().openapi:
        document = f"{base_url.rstrip('/')}{current_state().url_prefix}/openapi.json"
        click.echo(f"OpenAPI document of these routes: {document}")
    count = len(current_state().keys)
    if count:
        # Never the key itself: this output ends up in terminals, logs and chat.
        click.echo(
            f"webhook key: configured ({count} key{'s' if count > 1 else ''}); "
            "set the same key in the dashboard"
        )
    else:
        click.echo(
            "webhook key: not configured; anyone who can reach these URLs can post "
            "purchases and refunds (set NACHOCODE_WEBHOOK_KEY)"
        )
    parts = urlsplit(base_url)
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        click.echo("warning: the key travels in a header; give Nachocode an https:// URL")


@nachocode_cli.command("send")
@click.argument("event", type=EventChoice())
@click.option(
    "--base-url",
    help=f"Where the app runs (default {DEFAULT_BASE_URL}): POST to its route for EVENT there.",
)
@click.option("--url", help="Where to POST: a full URL, instead of --base-url and the route.")
@click.option(
    "--key", help="Webhook key sent as Bearer. Default: the first NACHOCODE_WEBHOOK_KEY, if any."
)
@click.option(
    "--os",
    "platform",
    type=click.Choice(["android", "ios"]),
    help="Store platform of a built purchase or refund body (default ios).",
)
@click.option(
    "--file",
    "body_file",
    type=click.File("rb"),
    help="Send this JSON body instead of building one.",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Change a field of the body; dotted for nested fields (data.orderId=X). "
    "VALUE is JSON when it parses (numbers stay numbers), else a string. Repeatable.",
)
@click.option(
    "--repeat",
    is_flag=True,
    help="Send the last body sent for EVENT again, as a dashboard re-send does.",
)
@with_appcontext
def send(
    event: str,
    base_url: str | None,
    url: str | None,
    key: str | None,
    platform: str | None,
    body_file: Any,
    assignments: tuple[str, ...],
    repeat: bool,
) -> None:
    """Send a test EVENT delivery to a running app, as Nachocode sends it.

    The body is realistic, with fresh store ids and current timestamps, so it is
    never a duplicate unless --repeat re-sends the last one. A refund refunds the
    last purchase sent on the same platform, when there is one. Prints the
    status, the time taken and the answer; exits non-zero on any answer but 2xx,
    on no answer within 10 s, or when the URL cannot be reached.
    """
    if repeat and (body_file or platform or assignments):
        raise click.UsageError(
            "--repeat sends the last body unchanged; it takes no --file, --os or --set"
        )
    if body_file and platform:
        raise click.UsageError("--os applies to built bodies, not to --file")
    if platform and event == "unavailable_users":
        raise click.UsageError("--os applies to purchase and refund, not unavailable_users")
    if url and base_url:
        raise click.UsageError("--url is the whole URL; give it or --base-url, not both")
    if url:
        url = check_url(url, "--url")
    else:
        url = webhook_url(check_url(base_url or DEFAULT_BASE_URL, "--base-url"), event)
    if key is None and current_state().keys:
        key = current_state().keys[0].decode("utf-8")
    elif key:
        check_key(key)

    last_sent = read_last_sent()
    body: Any
    if repeat:
        if event not in last_sent:
            raise click.ClickException(
                f"no {event} body was sent from here yet; send one without --repeat first"
            )
        body = last_sent[event]
    elif body_file:
        try:
            body = json.load(body_file)
        except ValueError as error:
            raise click.BadParameter(
                f"{body_file.name} is not JSON: {error}", param_hint="--file"
            ) from None
        except RecursionError:
            raise click.BadParameter(
                f"{body_file.name} is nested too deeply", param_hint="--file"
            ) from None
    # Refund what was bought, so the ledger and the app's handlers find the purchase.
    elif (
        event == "refund"
        and (refund := refund_of_last_purchase(last_sent, platform or "ios")) is not None
    ):
        body = refund
    else:
        body = payload_for(event, os=platform)
    for assignment in assignments:
        set_field(body, assignment)
    data = encode_body(body)
    # Kept before sending: a body that found the app down is the one to send again.
    save_last_sent(event, body)

    click.echo(f"POST {url} ({event}{', Bearer key' if key else ', no key'})")
    status, reason, answer, seconds = deliver(url, data, key)
    click.echo(f"{status} {reason} in {seconds * 1000:.0f} ms")
    click.echo(show_answer(answer))
    if status == 404:
        click.echo(
            "hint: no route at this URL; `flask nachocode urls` lists this app's webhook URLs",
            err=True,
        )
    if seconds > DELIVERY_BUDGET_SECONDS:
        click.echo(
            f"answered after {seconds:.1f} s: Nachocode counts an answer slower than "
            f"{DELIVERY_BUDGET_SECONDS:g} s as failed",
            err=True,
        )
        raise SystemExit(1)
    if not 200 <= status < 300:
        raise SystemExit(1)

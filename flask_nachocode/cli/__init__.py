"""The ``flask nachocode`` command group: the store's upkeep (``init-db``,
``requeue``, ``prune``) and a developer's ``urls`` and ``send`` here; the
operator's reads and replays in :mod:`.deliveries`."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import click
from flask.cli import with_appcontext

from ..delivery import DELIVERY_BUDGET_SECONDS
from ..events import ROUTES, ROUTES_BY_EVENT
from ..sender import (
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
from ..state import current_state
from ..store import add_column_statement
from ..testing import payload_for
from ..worker import requeue
from .deliveries import COMMANDS as DELIVERY_COMMANDS
from .params import EventChoice, WholeNumber, needs_store


@click.group("nachocode")
def nachocode_cli() -> None:
    """Nachocode webhooks: the delivery store, replay and retention, and
    sending test deliveries to a running app."""


for _command in DELIVERY_COMMANDS:
    nachocode_cli.add_command(_command)


@nachocode_cli.command("init-db")
@with_appcontext
@needs_store
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
@needs_store
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
@needs_store
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

"""The ``flask nachocode`` command group."""

from __future__ import annotations

import functools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import sqlalchemy as sa
from flask import current_app
from flask.cli import with_appcontext

from . import __version__
from .dispatch import DELIVERY_BUDGET_SECONDS
from .dispatch import replay as replay_delivery
from .errors import WebhookError
from .events import EVENT_NAMES
from .extension import current_state
from .store import OUTCOMES, REPLAYABLE, describe_database_error, utcnow
from .testing import payload_for, refund_payload, webhook_path


def escape_controls(text: str, keep: str = "\n\t") -> str:
    """Show control characters (except those in ``keep``) as escapes, so that a
    stored body cannot drive the terminal that displays it."""
    return "".join(
        ch
        if ch in keep or (ch.isprintable() and ch != "\x7f")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


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


@click.group("nachocode")
def nachocode_cli() -> None:
    """Nachocode webhooks: the delivery store, replay and retention, and
    sending test deliveries to a running app."""


@nachocode_cli.command("init-db")
@with_appcontext
@_needs_store
def init_db() -> None:
    """Create the nachocode_* tables (deliveries, claims, purchases)."""
    store = current_state().store
    store.create_tables()
    click.echo(
        f"created the nachocode tables on {store.engine.url.render_as_string(hide_password=True)}"
    )


@nachocode_cli.command("deliveries")
@click.option("--status", "outcome", type=click.Choice(OUTCOMES))
@click.option("--event", type=click.Choice(EVENT_NAMES))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@with_appcontext
@_needs_store
def list_deliveries(outcome: str | None, event: str | None, limit: int) -> None:
    """A table of recent deliveries, newest first."""
    store = current_state().store
    store.ensure_ready()
    table = store.deliveries
    query = (
        sa.select(
            table.c.id,
            table.c.received_at,
            table.c.event,
            table.c.outcome,
            table.c.status,
            table.c.duration_ms,
            table.c.user_id,
            table.c.replay_count,
            table.c.replay_of,
        )
        .order_by(table.c.id.desc())
        .limit(limit)
    )
    if outcome:
        query = query.where(table.c.outcome == outcome)
    if event:
        query = query.where(table.c.event == event)
    rows = store.session.execute(query).all()
    store.session.rollback()  # end the read: SQLite writers must not wait on it
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
@click.argument("delivery_id", type=int)
@with_appcontext
@_needs_store
def show(delivery_id: int) -> None:
    """One delivery: headers, body pretty-printed, error and traceback."""
    row = current_state().store.get_delivery(delivery_id)
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
@click.option(
    "--failed",
    "all_failed",
    is_flag=True,
    help="Replay every failed, refused or unhandled delivery.",
)
@with_appcontext
@_needs_store
def replay(delivery_id: int | None, all_failed: bool) -> None:
    """Run the handlers again on stored deliveries that failed or had no handler.

    A delivery whose event was handled meanwhile comes back as a duplicate: the
    exactly-once rule holds for replays too. Exits non-zero if any replay fails.
    """
    state = current_state()
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
            reason = escape_controls(str(getattr(error, "message", error)))
            click.echo(f"delivery {one}: not replayed: {reason}")
            continue
        failures += not result.ok
        detail = ""
        if result.error is not None:
            # The stored error says what the handler raised; the answer only that it failed.
            stored = state.store.get_delivery(result.delivery_id) if result.delivery_id else None
            stored_error = stored.error if stored is not None else None
            detail = f": {escape_controls(stored_error or result.error.message)}"
        click.echo(
            f"delivery {one}: {result.outcome} ({result.status}) "
            f"as delivery {result.delivery_id}{detail}"
        )
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
    store = current_state().store
    store.ensure_ready()
    table = store.deliveries
    result: Any = store.session.execute(
        sa.delete(table).where(table.c.received_at < utcnow() - timedelta(days=days))
    )
    store.session.commit()
    click.echo(f"deleted {result.rowcount} deliveries older than {days} days")


#: Where ``send`` and ``urls`` expect the app when no URL is given: ``flask run``'s default.
DEFAULT_BASE_URL = "http://127.0.0.1:5000"

#: Route ("any" for the all-events URL) -> the Nachocode dashboard field its URL goes into.
DASHBOARD_FIELDS = {
    "purchase": "In-app purchase: purchase webhook URL",
    "refund": "In-app purchase: refund webhook URL",
    "unavailable_users": "Push: unavailable users webhook URL",
    "any": "All events on one URL (event told by the body)",
}

#: In the instance folder: the last body ``send`` sent for each event, for ``--repeat``.
LAST_SENT_FILE = "nachocode-last-sent.json"


def webhook_url(base_url: str, route: str) -> str:
    """The full URL of this app's route for ``route`` (an event name or ``"any"``)."""
    return f"{base_url.rstrip('/')}{current_state().url_prefix}{webhook_path(route)}"


def _check_http_url(value: str, option: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL", param_hint=option)
    return value


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
    _check_http_url(base_url, "--base-url")
    width = max(len(label) for label in DASHBOARD_FIELDS.values())
    for route, label in DASHBOARD_FIELDS.items():
        click.echo(f"{label:{width}}  {webhook_url(base_url, route)}")
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


def _last_sent_path() -> Path:
    return Path(current_app.instance_path) / LAST_SENT_FILE


def _read_last_sent() -> dict[str, Any]:
    try:
        saved = json.loads(_last_sent_path().read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _save_last_sent(event: str, body: Any) -> None:
    path = _last_sent_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {**_read_last_sent(), event: body}
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(saved, indent=2, ensure_ascii=False), encoding="utf-8")
    partial.replace(path)  # atomic: an interrupted send never leaves half a file


def set_field(body: Any, assignment: str) -> None:
    """Apply one ``--set path=value`` to ``body`` in place.

    The path is dotted (``data.orderId``; a number indexes a list); missing
    objects on the way are created. The value is parsed as JSON when it parses
    (``quantity=2`` stays a number, ``price=9.99`` too), else kept as a string;
    quote it to force a string (``userId='"42"'``).
    """
    path, equals, raw = assignment.partition("=")
    if not equals or not path:
        raise click.BadParameter(f"{assignment!r} is not FIELD=VALUE", param_hint="--set")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    keys = path.split(".")
    target = body
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth]) or "the body"
        if isinstance(target, dict):
            if last:
                target[key] = value
            else:
                target = target.setdefault(key, {})
        elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
            if last:
                target[int(key)] = value
            else:
                target = target[int(key)]
        elif isinstance(target, list):
            raise click.BadParameter(
                f"{path}: {where} is a list of {len(target)}; {key!r} is not an index in it",
                param_hint="--set",
            )
        else:
            raise click.BadParameter(f"{path}: {where} is not an object", param_hint="--set")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect is shown, not followed: following a 301/302 turns the POST into
    # a GET without the body, so the dashboard needs the final URL anyway.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def deliver(url: str, body: bytes, key: str | None) -> tuple[int, str, bytes, float]:
    """POST ``body`` to ``url`` as Nachocode does; return (status, reason,
    answer body, seconds taken). Raises ``click.ClickException`` when no answer
    came (unreachable, refused, timed out)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"flask-nachocode-send/{__version__}",
    }
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    started = time.perf_counter()
    try:
        with opener.open(request, timeout=DELIVERY_BUDGET_SECONDS) as response:
            status, reason, answer = response.status, response.reason, response.read()
    except urllib.error.HTTPError as error:  # a non-2xx answer: still an answer to show
        status, reason, answer = error.code, error.reason, error.read()
    except urllib.error.URLError as error:
        reason_text = error.reason
        if isinstance(reason_text, TimeoutError):
            raise _timed_out(url) from None
        if isinstance(reason_text, ConnectionRefusedError):
            raise click.ClickException(
                f"cannot reach {url}: connection refused. Is the app running "
                "(flask run), and on this host and port?"
            ) from None
        raise click.ClickException(f"cannot reach {url}: {reason_text}") from None
    except TimeoutError:
        raise _timed_out(url) from None
    except OSError as error:  # e.g. the connection reset mid-answer
        raise click.ClickException(f"no answer from {url}: {error}") from None
    return status, str(reason), answer, time.perf_counter() - started


def _timed_out(url: str) -> click.ClickException:
    return click.ClickException(
        f"no answer from {url} within {DELIVERY_BUDGET_SECONDS:g} s: Nachocode counts this "
        "delivery as failed"
    )


def _show_answer(answer: bytes) -> str:
    text = answer.decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    return escape_controls(text)


@nachocode_cli.command("send")
@click.argument("event", type=click.Choice(EVENT_NAMES))
@click.option(
    "--url", help=f"Where to POST. Default: this app's route for EVENT on {DEFAULT_BASE_URL}."
)
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
    url = _check_http_url(url, "--url") if url else webhook_url(DEFAULT_BASE_URL, event)
    if key is None and current_state().keys:
        key = current_state().keys[0].decode("utf-8")

    last_sent = _read_last_sent()
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
    elif event == "refund" and last_sent.get("purchase", {}).get("os") == (platform or "ios"):
        # Refund what was bought, so the ledger and the app's handlers find the purchase.
        body = refund_payload(last_sent["purchase"])
    else:
        body = payload_for(event, os=platform)
    for assignment in assignments:
        set_field(body, assignment)
    # Kept before sending: a body that found the app down is the one to send again.
    _save_last_sent(event, body)

    click.echo(f"POST {url} ({event}{', Bearer key' if key else ', no key'})")
    status, reason, answer, seconds = deliver(
        url, json.dumps(body, ensure_ascii=False).encode("utf-8"), key
    )
    click.echo(f"{status} {reason} in {seconds * 1000:.0f} ms")
    click.echo(_show_answer(answer))
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

"""The delivery inspector: pages in the app itself to watch deliveries arrive,
read one (headers, body, parsed event, error, traceback) and replay a failed one.

It is off unless ``NACHOCODE_INSPECTOR`` is true, and then mounted below the
extension's prefix: ``{prefix}/deliveries`` (with its exports and bulk replay),
``{prefix}/deliveries/<id>`` and ``{prefix}/overview``.
What protects it (config read once, in ``init_app``):

``NACHOCODE_INSPECTOR_DECORATORS``
    The app's own view decorators (callables or ``"module:name"`` strings), for
    example its ``login_required`` and an admin check, wrapped around every
    inspector view; the first one in the list is the outermost.
``NACHOCODE_INSPECTOR_TOKEN``
    A shared secret of at least 16 characters. Open
    ``{prefix}/deliveries?token=...`` once: the token is compared in constant
    time, a digest of it (never the token, the session cookie is only signed)
    is kept in the session, and the browser is redirected to the same URL
    without the token, so it stays out of history and logs.
neither
    Reachable only while ``app.debug`` is true. Outside debug mode every
    inspector URL answers 404, and ``init_app`` logs a warning, so switching it
    on in production without protection exposes nothing.

Both may be set; then both must pass. Replay is a POST that must carry the
session's CSRF token (a random value kept in the signed session cookie and put
in the form); see :func:`check_csrf` for why a token rather than an origin check.
Everything shown from a delivery goes through Jinja's autoescaping, and the
pages send a Content-Security-Policy without inline scripts as a second line.
"""

from __future__ import annotations

import csv
import dataclasses
import hmac
import io
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from . import overview as overview_charts
from . import reads
from .delivery import replay
from .display import NOT_JSON, parse_stored_event, pretty_json
from .errors import WebhookError
from .events import EVENT_NAMES, EVENT_SPELLINGS
from .schemas import parse_id
from .state import AppState, InspectorSettings, decorate
from .tables import OUTCOMES, REPLAYABLE

logger = logging.getLogger("flask_nachocode")

#: Deliveries per page unless ``?per_page=`` asks for another number (up to MAX_PAGE_SIZE).
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: Most rows one poll returns; a bigger burst arrives over the next polls.
POLL_BATCH = 100
MAX_SEARCH_LENGTH = 512
#: Most deliveries one bulk replay runs, oldest first: it runs the handlers inside
#: the request, which a proxy's timeout must not cut off halfway. Run it again for the rest.
BULK_REPLAY_LIMIT = 100
#: How the time range's bounds are written in links and in the form's inputs (UTC).
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
#: A cell that a spreadsheet would run as a formula starts with one of these.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

_SESSION_LOGIN = "nachocode_inspector"
_SESSION_CSRF = "nachocode_inspector_csrf"
#: Named apart from Flask-WTF's ``csrf_token`` so that the two never collide.
CSRF_FIELD = "nachocode_csrf"
_FLASH_OK = "nachocode-ok"
_FLASH_ERROR = "nachocode-error"

_SECURITY_HEADERS = {
    # No inline script or style anywhere in the templates, so a body that slipped
    # past escaping still could not run.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Delivery data (user ids, store receipts) must not stay in shared caches.
    "Cache-Control": "no-store",
}


def make_inspector_blueprint(state: AppState) -> Blueprint:
    """The ``inspector`` blueprint, nested in the ``nachocode`` one (endpoints
    ``nachocode.inspector.*``). Its templates live in ``templates/nachocode/``
    and can be overridden by the app's own templates of the same name."""
    settings = state.inspector
    assert settings is not None
    blueprint = Blueprint(
        "inspector",
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/inspector-static",
    )
    views = _Views(state)

    def protect(view: Callable[..., Any]) -> Callable[..., Any]:
        return decorate(view, settings.decorators)

    blueprint.before_request(lambda: _gate(settings))
    blueprint.after_request(_add_security_headers)
    blueprint.context_processor(lambda: {"csrf_token": csrf_token, "csrf_field": CSRF_FIELD})
    blueprint.register_error_handler(sa.exc.SQLAlchemyError, views.store_error)
    blueprint.add_url_rule("/deliveries", "deliveries", protect(views.deliveries))
    blueprint.add_url_rule("/deliveries/poll", "poll", protect(views.poll))
    blueprint.add_url_rule(
        "/deliveries/export.csv", "export_csv", protect(views.export), defaults={"fmt": "csv"}
    )
    blueprint.add_url_rule(
        "/deliveries/export.jsonl", "export_jsonl", protect(views.export), defaults={"fmt": "jsonl"}
    )
    blueprint.add_url_rule(
        "/deliveries/replay", "bulk_replay", protect(views.bulk_replay), methods=["GET", "POST"]
    )
    blueprint.add_url_rule("/overview", "overview", protect(views.overview))
    blueprint.add_url_rule("/deliveries/<delivery_id>", "delivery", protect(views.delivery))
    blueprint.add_url_rule(
        "/deliveries/<delivery_id>/replay", "replay", protect(views.replay), methods=["POST"]
    )
    return blueprint


def _gate(settings: InspectorSettings) -> BaseResponse | None:
    """Runs before every inspector request, static files included."""
    if settings.token is not None:
        expected = settings.token.encode()
        given = request.args.get("token")
        if given is not None:
            if not hmac.compare_digest(given.encode(), expected):
                abort(403, "Wrong inspector token.")
            session[_SESSION_LOGIN] = settings.session_mark
            rest = [
                (name, value) for name, value in request.args.items(multi=True) if name != "token"
            ]
            return redirect(request.path + (f"?{urlencode(rest)}" if rest else ""), 303)
        mark = session.get(_SESSION_LOGIN)
        if not isinstance(mark, str) or not hmac.compare_digest(
            mark.encode(), settings.session_mark.encode()
        ):
            abort(403, "Open this page once with ?token=<NACHOCODE_INSPECTOR_TOKEN> to sign in.")
    elif not settings.decorators and not current_app.debug:
        abort(404)
    return None


def _add_security_headers(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def csrf_token() -> str:
    """This session's CSRF token, made on first use."""
    token = session.get(_SESSION_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[_SESSION_CSRF] = token
    return token


def check_csrf() -> None:
    """Refuse a POST that does not carry this session's CSRF token.

    A synchronizer token rather than an Origin/Referer check plus SameSite:
    the inspector cannot choose the SameSite attribute of the app's session
    cookie (it is the app's), Referrer-Policy or privacy tools strip Referer,
    and a proxy that rewrites Host breaks origin comparison, while a random
    value that a cross-site page cannot read works the same behind all of them.
    """
    expected = session.get(_SESSION_CSRF)
    given = request.form.get(CSRF_FIELD, "")
    if not isinstance(expected, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        abort(
            400, "The form's CSRF token is missing or out of date: reload the page and try again."
        )


def filter_from_request() -> reads.DeliveryFilter:
    """The list's filters from the query string; 400 for values no delivery can have."""
    outcome = request.args.get("outcome", "")
    event = request.args.get("event", "")
    q = request.args.get("q", "").strip()
    if outcome and outcome not in OUTCOMES:
        abort(400, f"outcome must be one of {', '.join(OUTCOMES)}")
    if event and event not in EVENT_SPELLINGS:
        abort(400, f"event must be one of {', '.join(EVENT_NAMES)}")
    event = EVENT_SPELLINGS.get(event, "")
    if len(q) > MAX_SEARCH_LENGTH:
        abort(400, f"the search is longer than {MAX_SEARCH_LENGTH} characters")
    if "\x00" in q:
        # No stored user id holds one, and PostgreSQL refuses it in a query as an error.
        abort(400, "the search cannot contain a NUL character")
    received_from = _time_arg("from")
    received_until = _time_arg("until", end_of_day=True)
    if received_from and received_until and received_from >= received_until:
        abort(400, "from must be earlier than until")
    return reads.DeliveryFilter(
        outcome,
        event,
        q,
        replays=request.args.get("replays") == "1",
        received_from=received_from,
        received_until=received_until,
    )


def _time_arg(name: str, *, end_of_day: bool = False) -> datetime | None:
    """A time range bound: ``2026-12-01``, ``2026-12-01T09:30`` (what the form's
    inputs send) or with seconds and a UTC offset; without an offset, UTC. A date
    alone as ``until`` means the end of that day, so that from and until the same
    date is that whole day."""
    text = request.args.get(name, "").strip()
    if not text:
        return None
    try:
        moment = reads.parse_moment(text)
    except ValueError:
        abort(400, f"{name} must be a date or time such as 2026-12-01 or 2026-12-01T09:30")
    except OverflowError:
        abort(400, f"{name} is out of range")
    if not 1 < moment.year < 9999:
        # Leaves room to add a day, and no database stores year 1 alike.
        abort(400, f"{name} is out of range")
    if end_of_day and len(text) == len("2026-12-01"):
        moment += timedelta(days=1)
    return moment


def filter_args(where: reads.DeliveryFilter) -> dict[str, Any]:
    """The filters that are set, as query arguments for links and exports."""
    args: dict[str, Any] = {
        name: value for name, value in (("outcome", where.outcome), ("event", where.event)) if value
    }
    if where.q:
        args["q"] = where.q
    if where.replays:
        args["replays"] = "1"
    if where.received_from is not None:
        args["from"] = where.received_from.strftime(_TIME_FORMAT)
    if where.received_until is not None:
        args["until"] = where.received_until.strftime(_TIME_FORMAT)
    return args


def _int_arg(name: str) -> int | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    number = parse_id(value)
    if number is None:
        abort(400, f"{name} must be a whole number")
    return number


def _delivery_id(text: str) -> int:
    # The URL's id as a string, parsed here: Werkzeug's int converter takes any
    # script's digits, and /deliveries/٣ would be delivery 3.
    number = parse_id(text)
    if number is None:
        abort(404, f"No delivery {text[:40]}.")
    return number


class _Views:
    """The inspector's views, bound to one app's state."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def deliveries(self) -> str:
        """Newest first, filtered, a page at a time; the first page polls for new ones."""
        where = filter_from_request()
        before, after = _int_arg("before"), _int_arg("after")
        per_page = _int_arg("per_page")
        per_page = PAGE_SIZE if per_page is None else per_page
        if not 1 <= per_page <= MAX_PAGE_SIZE:
            abort(400, f"per_page must be between 1 and {MAX_PAGE_SIZE}")
        store = self.state.store
        rows = reads.list_deliveries(store, where, limit=per_page, before=before, after=after)
        live = before is None and after is None
        older = newer = None
        if rows and reads.has_deliveries(store, where, before=rows[-1].id):
            older = url_for(".deliveries", before=rows[-1].id, **self._page_args(where, per_page))
        if not live and rows and reads.has_deliveries(store, where, after=rows[0].id):
            newer = url_for(".deliveries", after=rows[0].id, **self._page_args(where, per_page))
        return render_template(
            "nachocode/deliveries.html",
            rows=rows,
            filters=where,
            filter_args=filter_args(where),
            outcomes=OUTCOMES,
            events=EVENT_NAMES,
            live=live,
            latest=rows[0].id if rows else 0,
            poll_url=url_for(".poll", **filter_args(where)),
            newest_url=url_for(".deliveries", **self._page_args(where, per_page)),
            older_url=older,
            newer_url=newer,
        )

    @staticmethod
    def _page_args(where: reads.DeliveryFilter, per_page: int) -> dict[str, Any]:
        return {**filter_args(where), **({"per_page": per_page} if per_page != PAGE_SIZE else {})}

    def poll(self) -> Response:
        """Rows newer than ``?after=``, rendered by the same template as the page."""
        after = _int_arg("after") or 0
        rows = reads.list_deliveries(
            self.state.store, filter_from_request(), limit=POLL_BATCH, after=after
        )
        html = render_template("nachocode/_rows.html", rows=rows) if rows else ""
        return jsonify(latest=rows[0].id if rows else after, count=len(rows), html=html)

    def delivery(self, delivery_id: str) -> str:
        store = self.state.store
        number = _delivery_id(delivery_id)
        row = reads.get_delivery(store, number)
        if row is None:
            abort(404, f"No delivery {delivery_id}.")
        body, payload = pretty_json(row.body) if row.body is not None else (None, NOT_JSON)
        event_type, event_fields, event_errors = parse_stored_event(row.event, payload)
        return render_template(
            "nachocode/delivery.html",
            d=row,
            body=body,
            event_type=event_type,
            event_fields=event_fields,
            event_errors=event_errors,
            replays=reads.replays_of(store, number),
            attempts=reads.attempts_of(store, number),
            replayable=row.outcome in REPLAYABLE and row.body is not None,
            replayable_outcomes=REPLAYABLE,
        )

    def replay(self, delivery_id: str) -> BaseResponse:
        """Run the handlers again (:func:`flask_nachocode.delivery.replay`), then
        show the original delivery with its new outcome and replay history."""
        check_csrf()
        number = _delivery_id(delivery_id)
        try:
            result = replay(self.state, number)
        except LookupError:
            abort(404, f"No delivery {delivery_id}.")
        except ValueError as error:
            flash(f"Not replayed: {error}", _FLASH_ERROR)
        except WebhookError as error:
            flash(f"Not replayed: {error.message}", _FLASH_ERROR)
        else:
            detail = f": {result.error.message}" if result.error is not None else ""
            flash(
                f"Replayed as delivery {result.delivery_id}: "
                f"{result.outcome} ({result.status}){detail}",
                _FLASH_OK if result.ok else _FLASH_ERROR,
            )
        return redirect(url_for(".delivery", delivery_id=number), 303)

    def export(self, fmt: str) -> Response:
        """The current filter's deliveries as CSV or JSON lines, oldest first, with
        :data:`~flask_nachocode.reads.EXPORT_COLUMNS`: streamed a batch at a time,
        so memory stays bounded however many match."""
        where = filter_from_request()
        rows = reads.iter_deliveries(self.state.store, where)
        # The first batch is read here, so that a store that cannot be reached is
        # the 503 page rather than a download cut off after its headers.
        first = next(rows, None)

        def everything() -> Iterator[Any]:
            if first is not None:
                yield first
                yield from rows

        lines = _csv_lines(everything()) if fmt == "csv" else _json_lines(everything())
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        mimetype = "text/csv" if fmt == "csv" else "application/x-ndjson"
        return Response(
            stream_with_context(lines),
            mimetype=mimetype,
            headers={"Content-Disposition": f'attachment; filename="deliveries-{stamp}.{fmt}"'},
        )

    def bulk_replay(self) -> BaseResponse | str:
        """GET: how many of the current filter's deliveries a replay would run
        (originals whose latest outcome is replayable), and a form to confirm.
        POST (with the CSRF token): replay them, oldest first, at most
        :data:`BULK_REPLAY_LIMIT`, and none that arrived after the confirmation."""
        where = dataclasses.replace(filter_from_request(), replayable=True)
        store = self.state.store
        if request.method == "GET":
            newest = reads.list_deliveries(store, where, limit=1)
            count = reads.count_deliveries(store, where)
            return render_template(
                "nachocode/bulk_replay.html",
                filters=where,
                filter_args=filter_args(where),
                count=count,
                will_replay=min(count, BULK_REPLAY_LIMIT),
                limit=BULK_REPLAY_LIMIT,
                upto=newest[0].id if newest else 0,
            )
        check_csrf()
        upto = parse_id(request.form.get("upto", ""))
        if upto is None:
            abort(400, "upto must be a whole number")
        outcomes: dict[str, int] = {}
        skipped = 0
        for row in reads.iter_deliveries(store, where, columns=("id",)):
            if row.id > upto or sum(outcomes.values()) >= BULK_REPLAY_LIMIT:
                break
            try:
                result = replay(self.state, row.id)
            except (LookupError, ValueError, WebhookError):
                # Pruned or handled since the confirmation, or never replayable (no
                # stored body): cheap, so not counted against the limit, which is
                # there for the handlers' time.
                skipped += 1
            else:
                outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
        done = sum(outcomes.values())
        summary = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
        message = f"Replayed {done} {'delivery' if done == 1 else 'deliveries'}"
        message += f": {summary}" if summary else ""
        if skipped:
            message += f"; {skipped} could not be replayed (see each one's page)"
        still_failing = skipped or any(o in REPLAYABLE for o in outcomes)
        flash(message + ".", _FLASH_ERROR if still_failing else _FLASH_OK)
        return redirect(url_for(".deliveries", **filter_args(where)), 303)

    def overview(self) -> str:
        """Deliveries per hour over the last 24 hours and per day over 7 days."""
        if request.args:
            abort(400, "the overview takes no query arguments")
        charts = overview_charts.overview(self.state.store, datetime.now(timezone.utc))
        return render_template("nachocode/overview.html", charts=charts)

    def store_error(self, error: sa.exc.SQLAlchemyError) -> tuple[str, int]:
        self.state.store.rollback_quietly()
        logger.error(
            "nachocode inspector: the delivery store is unavailable: %s", type(error).__name__
        )
        return render_template("nachocode/unavailable.html"), 503


def _csv_cell(value: Any) -> Any:
    # A user id such as "=HYPERLINK(...)" would run as a formula in the spreadsheet
    # an operator opens the export with; a leading quote keeps it text (OWASP's advice).
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _csv_lines(rows: Iterator[Any]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(cells: Any) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(cells)
        return buffer.getvalue()

    yield line(reads.EXPORT_COLUMNS)
    for row in rows:
        record = reads.delivery_record(row)
        yield line(_csv_cell(record[name]) for name in reads.EXPORT_COLUMNS)


def _json_lines(rows: Iterator[Any]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(reads.delivery_record(row), ensure_ascii=False) + "\n"

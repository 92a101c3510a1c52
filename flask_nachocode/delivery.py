"""The delivery lifecycle: claim -> ledger -> handlers -> record, in one transaction.

Used by the webhook view for new deliveries and by ``replay`` for stored ones,
so both follow the same exactly-once rule. On the happy path the claim, the
ledger, the handlers' own writes (with ``db=``) and the delivery record are
committed together, once. When a handler fails, all of that rolls back and the
delivery is recorded as failed in a transaction of its own, so nothing that
arrived is lost and nothing half-done stays.

With ``NACHOCODE_DEFERRED`` the view's dispatch stops after the claim: the delivery
is committed as ``queued`` with it, its task is sent, and the answer is 202. A
duplicate of a delivery still queued sends its task again when none is under way,
for the copy whose answer was lost after its commit. The worker's side, from the
ledger to the handlers, is :mod:`flask_nachocode.worker`.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from werkzeug.datastructures import Headers

from . import signals
from .deferred import BrokerUnavailable
from .display import escape_surrogates
from .errors import HandlerFailed, NoHandler, Refuse, StoreUnavailable, WebhookError
from .events import ROUTES_BY_NAME, Event, utcnow
from .reads import get_delivery
from .schemas import MAX_ID_LENGTH, load_event
from .state import AppState
from .store import Store, describe_database_error, is_lock_timeout, is_worth_retrying
from .tables import LOCK_TIMEOUT_SECONDS, REPLAYABLE

logger = logging.getLogger("flask_nachocode")

#: Nachocode counts an answer slower than this as failed (and never retries).
DELIVERY_BUDGET_SECONDS = 10.0
#: A delivery slower than this logs a warning: half the budget is the margin left
#: before the network and a slow moment push the answer past it.
SLOW_DELIVERY_SECONDS = DELIVERY_BUDGET_SECONDS / 2

_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
#: What a stored header value that held a webhook key is replaced with.
REDACTED = "[redacted: held the webhook key]"


def storable_headers(headers: Headers, keys: tuple[bytes, ...]) -> dict[str, str]:
    """Request headers as they may be stored: the key must never reach the database.

    The credential headers are left out, and any other header whose value holds one
    of ``keys`` is kept with its value redacted: a proxy or API gateway may copy
    the key into a header of its own (``X-Forwarded-Authorization``), and the
    redacted header tells whoever reads the delivery that it does.
    """
    stored: dict[str, str] = {}
    # Werkzeug's headers iterate as (name, value) pairs: ``.items()`` would only wrap
    # that in one more generator, on every delivery.
    for name, value in headers:
        if name.lower() in _SECRET_HEADERS:
            continue
        # WSGI hands header values over as latin-1 text: encoding back gives the bytes
        # sent, which hold a key's UTF-8 bytes however the key is spelled.
        raw = value.encode("latin-1", "replace")
        # A loop, not any() over a generator: one generator per header was about
        # half of what this function costs per delivery.
        for key in keys:
            if key in raw:
                value = REDACTED
                break
        stored[name] = value
    return stored


@dataclass
class Delivery:
    """One request as it arrived, before and while it is handled."""

    route: str
    received_at: datetime
    started: float
    body: bytes | None = None
    headers: Mapping[str, str] | None = None
    remote_addr: str | None = None
    payload: Any = None
    replay_of: int | None = None
    #: When the claim returned (``time.perf_counter()``), if it wrote the record.
    claimed: float = 0.0


@dataclass
class Result:
    """What happened to a delivery; the view turns it into the answer."""

    outcome: str
    status: int
    event_name: str | None
    delivery_id: int | None
    error: WebhookError | None = None

    @property
    def duplicate(self) -> bool:
        return self.outcome == "duplicate"

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def deferred(self) -> bool:
        """Answered 202: kept as ``queued`` for a worker to handle."""
        return self.outcome == "queued"


def dispatch(state: AppState, delivery: Delivery, event: Event, *, defer: bool = False) -> Result:
    """Handle a valid event exactly once and record the delivery; with ``defer``,
    claim it, keep it ``queued`` and send its task instead of running the handlers."""
    store = state.store
    session = store.session
    handlers = state.handlers(event.name)
    identity = event.identity
    try:
        store.ensure_ready()
        if not handlers:
            return record(
                state, delivery, NoHandler(f"no handler is registered for {event.name}"), event
            )
        claimed, delivery_id = _claim(state, session, event, delivery, defer=defer)
        if not claimed:
            if delivery_id is not None:
                return _finish(state, delivery, event, "duplicate", 200, delivery_id, early=True)
            if defer:
                return _defer_duplicate(state, delivery, event)
            return _commit(state, delivery, event, "duplicate", 200)
        if defer:
            return _defer(state, delivery, event)
    except Refuse as refusal:
        session.rollback()
        return record(state, delivery, refusal, event)
    except sa.exc.SQLAlchemyError as error:
        raise _store_unavailable(state, error) from error

    try:
        for handler in handlers:
            handler(event)
        # The handlers' pending ORM writes (with ``db=``) are sent now, so that a
        # constraint they break counts as their failure (500, recorded), not as
        # the store being unavailable when the delivery commits.
        session.flush()
    except Refuse as refusal:
        store.rollback_quietly()
        return record(state, delivery, refusal, event)
    except sa.exc.OperationalError as error:
        # The database went away under a handler's own writes (connection killed,
        # server restarting, SQLite locked too long): the store failed, not the
        # handler, and a re-send will work, so 503 as for the claim, not 500.
        raise _store_unavailable(state, error) from error
    except Exception as error:  # a handler bug must not lose the delivery
        store.rollback_quietly()
        logger.exception("nachocode %s handler failed (identity %s)", event.name, identity)
        failure = HandlerFailed(
            "a handler raised an exception; the delivery was recorded as failed"
        )
        return record(state, delivery, failure, event, cause=error)
    if delivery_id is not None:
        return _finish(state, delivery, event, "handled", 200, delivery_id, early=True)
    return _commit(state, delivery, event, "handled", 200)


def _defer(state: AppState, delivery: Delivery, event: Event) -> Result:
    # The task is sent only after the commit: a worker that took it earlier would
    # find no queued delivery.
    result = _commit(state, delivery, event, "queued", 202)
    assert result.delivery_id is not None
    send_task(state, result.delivery_id, 1)
    return result


def _defer_duplicate(state: AppState, delivery: Delivery, event: Event) -> Result:
    # A copy whose COMMIT reached the database but whose answer was lost (a 503, and
    # the dashboard's re-send) left its delivery queued without a task: this copy
    # sends it. A task that was on its way after all finds the attempt made.
    assert event.identity is not None  # only claimed events are duplicates
    store = state.store
    stranded = store.stranded_queued(store.connection(), event.identity)
    result = _commit(state, delivery, event, "duplicate", 200)
    if stranded is not None:
        send_task(state, *stranded)
    return result


def send_task(state: AppState, delivery_id: int, attempt: int, *, delay: float = 0.0) -> bool:
    """Send the task of attempt ``attempt`` of queued delivery ``delivery_id``, to run
    in ``delay`` seconds. False when it could not be sent (logged): the delivery stays
    queued, and ``flask nachocode requeue`` (or its beat entry) sends it later; also
    when deferral was switched off meanwhile, and requeue runs the attempt itself."""
    if state.task_queue is None:
        return False
    try:
        state.task_queue.send(delivery_id, attempt, delay=delay)
    except Exception as error:
        # An outage of the broker is said in a line; anything else with its traceback.
        logger.error(
            "nachocode delivery %s is queued but its task (attempt %s) could not be sent "
            "(%s: %s); `flask nachocode requeue` (or its beat entry) will send it",
            delivery_id,
            attempt,
            type(error.__cause__ or error).__name__,
            error,
            exc_info=not isinstance(error, BrokerUnavailable),
        )
        return False
    return True


#: How often the claim is tried when the database asks for it (see :func:`_claim`).
CLAIM_ATTEMPTS = 3


def _claim(
    state: AppState, session: Any, event: Event, delivery: Delivery, *, defer: bool = False
) -> tuple[bool, int | None]:
    """Claim the event and write the ledger (:meth:`Store.claim`): whether it
    claimed (False for a duplicate), and the delivery record's id when the claim
    also wrote the record.

    A pooled connection the database dropped while idle, or a deadlock or lock
    wait the database broke (:func:`~flask_nachocode.store.is_worth_retrying`),
    fails right here, before any handler ran and with nothing committed, so trying
    again after a rollback is safe. That is what lets the first delivery after an
    outage succeed on an app engine without ``pool_pre_ping``, and a delivery that
    InnoDB chose as a deadlock's victim be handled instead of answered 503.
    """
    for attempt in range(1, CLAIM_ATTEMPTS + 1):
        now = utcnow()
        # A replay also updates its original, and a deferred delivery is recorded as
        # queued: both keep the record apart.
        early = (
            _record_values(state, delivery, event, "", 200, now)
            if not defer and delivery.replay_of is None and state.store.records_with_claim(event)
            else None
        )
        try:
            claimed, delivery_id = state.store.claim(
                state.store.connection(), event, now, early, with_ledger=not defer
            )
            delivery.claimed = time.perf_counter()
            return claimed, delivery_id
        except sa.exc.DBAPIError as error:
            if attempt == CLAIM_ATTEMPTS or not is_worth_retrying(error):
                raise
            logger.info("nachocode claim tried again after %s", describe_database_error(error))
            session.rollback()
    raise AssertionError("unreachable")  # the last attempt returned or raised


def record(
    state: AppState,
    delivery: Delivery,
    error: WebhookError,
    event: Event | None = None,
    *,
    cause: BaseException | None = None,
) -> Result:
    """Store a delivery that was not handled (invalid, unhandled, refused, failed)."""
    # The answer only says that a handler failed; the store keeps what it raised.
    message, trace = failure_text(cause) if cause is not None else (None, None)
    try:
        state.store.ensure_ready()
        result = _commit(
            state,
            delivery,
            event,
            error.outcome,
            error.status,
            error=error,
            message=message,
            trace=trace,
        )
    except sa.exc.SQLAlchemyError as db_error:
        raise _store_unavailable(state, db_error) from db_error
    return result


#: A record written with the claim, before the handlers ran, keeps the claim's time
#: as its end unless the handlers took longer than this: then one UPDATE sets the
#: real end, a cost that is small beside such handlers (see Store.claim).
EXACT_DURATION_AFTER_SECONDS = 0.010


def _record_values(
    state: AppState,
    delivery: Delivery,
    event: Event | None,
    outcome: str,
    status: int,
    finished: datetime,
    *,
    error: WebhookError | None = None,
    message: str | None = None,
    trace: str | None = None,
) -> dict[str, Any]:
    """The delivery record's columns (all but ``id``), as it ends now."""
    elapsed = time.perf_counter() - delivery.started
    event_name = event.name if event is not None else _guess_event_name(delivery)
    payload = delivery.payload if isinstance(delivery.payload, dict) else {}
    user_id = getattr(event, "user_id", None) or payload.get("userId")
    iap_log_id = getattr(event, "iap_log_id", None) or payload.get("iapLogId")
    values = {
        "event": event_name,
        "route": delivery.route,
        "status": status,
        "identity": getattr(event, "identity", None),
        "user_id": _storable_user_id(user_id),
        "iap_log_id": iap_log_id if _is_storable_id(iap_log_id) else None,
        # A queued delivery keeps its body until the worker is done with it.
        "body": delivery.body if state.keep_bodies or outcome == "queued" else None,
        "headers": dict(delivery.headers) if delivery.headers is not None else None,
        "remote_addr": delivery.remote_addr,
        "received_at": delivery.received_at,
        "finished_at": finished,
        "duration_ms": elapsed * 1000.0,
        "error": storable_text(message or error.message) if error is not None else None,
        "traceback": storable_text(trace) if trace is not None else None,
        "replay_of": delivery.replay_of,
        "replay_count": 0,
    }
    if outcome:
        values["outcome"] = outcome
    return values


def _commit(
    state: AppState,
    delivery: Delivery,
    event: Event | None,
    outcome: str,
    status: int,
    *,
    error: WebhookError | None = None,
    message: str | None = None,
    trace: str | None = None,
) -> Result:
    """Insert the delivery record and commit."""
    store = state.store
    values = _record_values(
        state, delivery, event, outcome, status, utcnow(), error=error, message=message, trace=trace
    )
    try:
        delivery_id = store.record_delivery(store.connection(), values)
    except sa.exc.SQLAlchemyError as db_error:
        raise _store_unavailable(state, db_error) from db_error
    return _finish(state, delivery, event, outcome, status, delivery_id, error=error)


def _finish(
    state: AppState,
    delivery: Delivery,
    event: Event | None,
    outcome: str,
    status: int,
    delivery_id: int,
    *,
    error: WebhookError | None = None,
    early: bool = False,
) -> Result:
    """Commit the delivery whose record is written (``early``: by the claim, before
    the handlers ran), then warn if it was slow and send the signal."""
    store = state.store
    session = store.session
    elapsed = time.perf_counter() - delivery.started
    try:
        if early and time.perf_counter() - delivery.claimed > EXACT_DURATION_AFTER_SECONDS:
            store.set_finished(store.connection(), delivery_id, utcnow(), elapsed * 1000.0)
        session.commit()
    except sa.exc.SQLAlchemyError as db_error:
        raise _store_unavailable(state, db_error) from db_error

    event_name = event.name if event is not None else _guess_event_name(delivery)
    if elapsed > SLOW_DELIVERY_SECONDS:
        logger.warning(
            "nachocode delivery %s (%s) took %.1f s of Nachocode's %.0f s budget; an answer "
            "after the budget shows as failed in the dashboard even though it was %s",
            delivery_id,
            event_name,
            elapsed,
            DELIVERY_BUDGET_SECONDS,
            outcome,
        )
    result = Result(outcome, status, event_name, delivery_id, error)
    announce(result, event, error)
    return result


def announce(result: Result, event: Event | None, error: WebhookError | None) -> None:
    """Send the signal that says how a committed delivery (or a worker's last
    attempt) ended. Sent after the commit: the answer is what was stored, whatever
    a receiver does."""
    if result.deferred:
        signals.send_after_commit(signals.delivery_queued, event=event, result=result)
    elif result.ok:
        signals.send_after_commit(signals.delivery_handled, event=event, result=result)
    else:
        signals.send_after_commit(signals.delivery_failed, event=event, result=result, error=error)


def failure_text(cause: BaseException) -> tuple[str, str]:
    """What the store keeps of an exception a handler raised, storable: its type
    and message, and its traceback (for `flask nachocode show` and replay)."""
    return (
        storable_text(f"{type(cause).__name__}: {cause}"),
        storable_text("".join(traceback.format_exception(cause))),
    )


def _store_unavailable(state: AppState, error: sa.exc.SQLAlchemyError) -> StoreUnavailable:
    state.store.rollback_quietly()
    if is_lock_timeout(error):
        logger.warning(
            "nachocode delivery gave up after waiting %.0f s for a lock another transaction "
            "holds (a copy of it being handled, a transaction left open, or a table locked "
            "by a migration), not recorded: %s",
            LOCK_TIMEOUT_SECONDS,
            describe_database_error(error),
        )
        return StoreUnavailable(
            "another transaction holds a lock this delivery needs (its claim, a table, or "
            "the database's write lock); "
            "nothing was handled, re-send this delivery later"
        )
    logger.error(
        "nachocode store unavailable, delivery not recorded: %s", describe_database_error(error)
    )
    return StoreUnavailable(
        "the delivery store is unavailable; nothing was handled, re-send this delivery later"
    )


def _guess_event_name(delivery: Delivery) -> str | None:
    route = ROUTES_BY_NAME.get(delivery.route)
    return route.event if route is not None else None


def storable_text(text: str) -> str:
    # PostgreSQL text cannot hold NUL, and no database can encode a lone surrogate
    # (JSON's "\\ud800" escape); an invalid body's userId or an exception message
    # may hold either. Escaped, the delivery is still recorded instead of a 503 or 500.
    return escape_surrogates(text.replace("\x00", "\\x00"))


def _storable_user_id(value: Any) -> str | None:
    # An invalid body's userId can be anything: one longer than a valid one would
    # not fit the column's index on PostgreSQL (a 503 no re-send can cure). The
    # stored body still holds it.
    if not isinstance(value, str):
        return None
    text = storable_text(value)
    return text if len(text) <= MAX_ID_LENGTH else None


def _is_storable_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def replay_target(store: Store, delivery_id: int) -> sa.Row[Any]:
    """The stored delivery that :func:`replay` of ``delivery_id`` runs again (its
    original, for a replay), read and checked without replaying: ``flask nachocode
    replay --dry-run``. Raises as :func:`replay` does."""
    row = get_delivery(store, delivery_id)
    if row is None:
        raise LookupError(f"no delivery {delivery_id}")
    if row.replay_of is not None:
        original = get_delivery(store, row.replay_of)
        if original is None:
            raise LookupError(
                f"delivery {delivery_id} replays delivery {row.replay_of}, which was pruned"
            )
        row = original
    if row.outcome not in REPLAYABLE and (
        row.outcome not in ("handled", "duplicate") or row.identity is None
    ):
        raise ValueError(
            f"delivery {row.id} was {row.outcome}; only failed, refused or unhandled deliveries "
            "and handled purchases or refunds (which come back as duplicates) are replayed"
        )
    if row.body is None:
        raise ValueError(f"delivery {row.id} has no stored body (NACHOCODE_KEEP_BODIES is off)")
    return row


def replay(state: AppState, delivery_id: int) -> Result:
    """Run the handlers again on a stored delivery, under the same exactly-once
    rule as a new delivery, and return what happened.

    The replay is recorded as a new delivery (route ``replay``) whose
    ``replay_of`` is the original; the original's ``replay_count`` goes up and
    its outcome and status become the replay's, so ``deliveries --status failed``
    lists what still needs attention. Replaying a replay replays its original.

    A purchase or refund that was handled meanwhile (by a re-send, or an earlier
    replay) comes back as a duplicate, without running handlers. Raises
    ``LookupError`` for an unknown id and ``ValueError`` for a delivery that
    cannot be replayed: an invalid body, no stored body, or an
    ``unavailable_users`` delivery that was handled already (those are never
    deduplicated, so a replay would run its handlers twice).
    """
    row = replay_target(state.store, delivery_id)
    payload = json.loads(bytes(row.body))
    event = load_event(row.event, payload)
    delivery = Delivery(
        route="replay",
        received_at=utcnow(),
        started=time.perf_counter(),
        body=bytes(row.body),
        headers=row.headers,
        payload=payload,
        replay_of=row.id,
    )
    result = dispatch(state, delivery, event)
    if state.metrics is not None:
        state.metrics.attempt(result, "replay")
    return result

"""The worker's side of a deferred delivery (``NACHOCODE_DEFERRED``): one attempt,
and the re-queue of attempts whose task went missing.

An attempt is one transaction: it first locks the queued delivery
(:meth:`~flask_nachocode.store.Store.take_queued`), then writes the ledger and runs
the handlers inside a savepoint, and commits their writes together with the
delivery's move to ``handled``. A task the broker delivers twice, or a re-queued
one, finds the delivery handled, or its attempt recorded, and does nothing; a
second worker on the same delivery waits for the first one's lock. A worker that
dies mid-handler commits nothing, and the task's next delivery starts over.

When a handler raises, the savepoint is rolled back, the attempt is recorded with
its error and traceback, and the next attempt is sent for ``NACHOCODE_RETRY_DELAYS``
later. After the last one the delivery is ``failed``, its claim is released (so a
replay or a re-send is handled, as after a synchronous failure) and
``delivery_failed`` is sent. :class:`~flask_nachocode.errors.Refuse` ends it at once
as ``refused``: a decision, not a fault.

Anything else that stops an attempt (the database, or flask-nachocode's own code
raising) records nothing and raises :class:`AttemptNotMade`: the task queue runs the
task again after :func:`not_made_delay`, for as long as it takes, so that no queued
delivery is left without a task.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from . import signals
from .delivery import Result, announce, failure_text, send_task, storable_text
from .errors import HandlerFailed, NoHandler, WebhookError
from .events import Event, utcnow
from .reads import get_delivery
from .schemas import MAX_COUNT, MAX_ID, load_event
from .state import AppState
from .store import describe_database_error

logger = logging.getLogger("flask_nachocode")

#: How long a task whose attempt was not made (:class:`AttemptNotMade`) waits before
#: it runs again, doubled on each try up to :data:`NOT_MADE_MAX_DELAY`; no attempt is
#: counted for it. Celery's ``task_annotations`` can change both (``retry_backoff``
#: and ``retry_backoff_max`` of ``flask_nachocode.handle``).
NOT_MADE_FIRST_DELAY = 10.0
#: A database back from an outage is found within this many seconds.
NOT_MADE_MAX_DELAY = 300.0


class AttemptNotMade(Exception):
    """An attempt stopped before it was recorded, by the database or by
    flask-nachocode's own code (not a handler): nothing of it was kept, and its task
    is to run again later (:func:`not_made_delay`)."""


def not_made_delay(
    tries: int, first: float = NOT_MADE_FIRST_DELAY, most: float = NOT_MADE_MAX_DELAY
) -> float:
    """Seconds before a task whose attempt was not made ``tries`` times already runs again."""
    return float(min(first * 2 ** min(tries, 32), most))


def run_attempt(state: AppState, delivery_id: int, attempt: int) -> Result | None:
    """Run attempt number ``attempt`` (from 1) of queued delivery ``delivery_id`` and
    return what happened; None when it is not this task's to run (handled already,
    that attempt was made, or no such delivery). Raises :class:`AttemptNotMade` when
    the database or the extension's own code fails, having recorded nothing: the
    task is to run again later."""
    if not (_is_number(delivery_id, MAX_ID) and _is_number(attempt, MAX_COUNT)):
        # Retrying could never help: not an id any delivery can have.
        logger.warning(
            "nachocode: dropped a task for delivery %r (attempt %r): no delivery has that id",
            delivery_id,
            attempt,
        )
        return None
    store = state.store
    session = store.session
    started_at = utcnow()
    try:
        store.ensure_ready()
        connection = store.connection()
        row = store.take_queued(connection, delivery_id, attempt)
        if row is None:
            session.rollback()
            if get_delivery(store, delivery_id) is None:
                logger.warning(
                    "nachocode: dropped the task of delivery %s (attempt %s): there is no such "
                    "delivery (pruned, or the task came from an app on another database)",
                    delivery_id,
                    attempt,
                )
            return None
        event: Event | None = None
        savepoint = session.begin_nested()
        # Fetched again: the SAVEPOINT is only emitted when the session hands out its
        # connection inside the nested transaction.
        connection = session.connection()
        try:
            event = load_event(row.event, json.loads(bytes(row.body)))
            handlers = state.handlers(event.name)
            if not handlers:
                raise NoHandler(f"no handler is registered for {event.name}")
            store.apply_ledger(connection, event, utcnow())
            for handler in handlers:
                handler(event)
            # As in the request: a constraint the handlers' writes break is their failure.
            session.flush()
        except WebhookError as decision:  # Refuse, or a delivery no worker can handle
            savepoint.rollback()
            return _finish(state, row, event, attempt, started_at, decision)
        except sa.exc.OperationalError:
            raise  # the database failed, not the handler
        except Exception as error:  # a handler bug must not lose the delivery
            savepoint.rollback()
            logger.exception(
                "nachocode %s handler failed (delivery %s, attempt %s)",
                row.event,
                delivery_id,
                attempt,
            )
            return _attempt_failed(state, row, event, attempt, started_at, error)
        savepoint.commit()
        return _finish(state, row, event, attempt, started_at, None)
    except sa.exc.SQLAlchemyError as error:
        store.rollback_quietly()
        logger.error(
            "nachocode delivery %s: the store is unavailable, attempt %s not made: %s",
            delivery_id,
            attempt,
            describe_database_error(error),
        )
        raise AttemptNotMade("the delivery store is unavailable") from error
    except Exception as error:  # a bug of ours must not strand the delivery either
        store.rollback_quietly()
        logger.exception(
            "nachocode delivery %s: attempt %s not made: flask-nachocode itself raised "
            "(not a handler); the task runs again later",
            delivery_id,
            attempt,
        )
        raise AttemptNotMade(f"{type(error).__name__}: {error}") from error


def _is_number(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most


def _attempt_values(
    row: Any, attempt: int, outcome: str, started_at: datetime, **values: Any
) -> dict[str, Any]:
    return {
        "delivery_id": row.id,
        "attempt": attempt,
        "outcome": outcome,
        "started_at": started_at,
        "finished_at": utcnow(),
        "error": None,
        "traceback": None,
        "next_attempt_at": None,
        **values,
    }


def _attempt_failed(
    state: AppState,
    row: Any,
    event: Event | None,
    attempt: int,
    started_at: datetime,
    cause: BaseException,
) -> Result:
    if attempt > len(state.retry_delays):
        failure = HandlerFailed("a handler raised an exception on every attempt")
        return _finish(state, row, event, attempt, started_at, failure, cause=cause)
    delay = state.retry_delays[attempt - 1]
    next_attempt_at = utcnow() + timedelta(seconds=delay)
    message, trace = failure_text(cause)
    store = state.store
    store.record_attempt(
        store.connection(),
        _attempt_values(
            row,
            attempt,
            "failed",
            started_at,
            error=message,
            traceback=trace,
            next_attempt_at=next_attempt_at,
        ),
    )
    store.session.commit()
    result = Result("queued", 202, row.event, row.id)
    if state.metrics is not None:
        state.metrics.attempt(result, "worker", retry=True)
    signals.send_after_commit(
        signals.delivery_retry,
        event=event,
        result=result,
        error=cause,
        attempt=attempt,
        next_attempt_at=next_attempt_at,
    )
    send_task(state, row.id, attempt + 1, delay=delay)
    return result


def _finish(
    state: AppState,
    row: Any,
    event: Event | None,
    attempt: int,
    started_at: datetime,
    error: WebhookError | None,
    *,
    cause: BaseException | None = None,
) -> Result:
    """The delivery's last attempt: handled (``error`` None), refused, unhandled,
    invalid, or failed for good (with ``cause``, what the handler raised)."""
    store = state.store
    connection = store.connection()
    outcome, status = ("handled", 200) if error is None else (error.outcome, error.status)
    message = trace = None
    if cause is not None:
        message, trace = failure_text(cause)
    elif error is not None:
        message = storable_text(error.message)
    store.record_attempt(
        connection,
        _attempt_values(row, attempt, outcome, started_at, error=message, traceback=trace),
    )
    if outcome != "handled":
        store.release_claim(connection, row.identity)
    # The status stays the 202 that Nachocode was answered: the outcome says the rest.
    values: dict[str, Any] = {
        "outcome": outcome,
        "finished_at": utcnow(),
        "error": message,
        "traceback": trace,
    }
    if not state.keep_bodies:
        values["body"] = None
    store.finish_deferred(connection, row.id, **values)
    store.session.commit()
    result = Result(outcome, status, row.event, row.id, error)
    if state.metrics is not None:
        state.metrics.attempt(result, "worker")
    announce(result, event, error)
    return result


def requeue(state: AppState, older_than: timedelta) -> tuple[list[tuple[int, int]], int]:
    """Send again the task of every queued delivery whose next attempt has been due
    for longer than ``older_than`` (a broker that lost its queue, a task that could
    not be sent); returns their ``(delivery id, attempt)``, and how many were left
    because the broker failed a send (logged): the next ones would only wait for it
    too, and the next requeue sends them. A task still in the broker meanwhile is
    harmless: whichever runs second does nothing.

    With ``NACHOCODE_DEFERRED`` off (deliveries left queued when it was switched
    off), the attempts run here instead, one after the other, until one cannot be made.
    """
    overdue = state.store.overdue_queued(older_than)
    for done, (delivery_id, attempt) in enumerate(overdue):
        if not _requeue_one(state, delivery_id, attempt):
            return overdue[:done], len(overdue) - done
    return overdue, 0


def _requeue_one(state: AppState, delivery_id: int, attempt: int) -> bool:
    if state.task_queue is not None:
        return send_task(state, delivery_id, attempt)
    try:
        run_attempt(state, delivery_id, attempt)
    except AttemptNotMade:
        return False  # logged by run_attempt
    return True

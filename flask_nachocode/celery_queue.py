"""The Celery task queue of ``NACHOCODE_DEFERRED`` (the ``celery`` extra).

``init_app`` registers two tasks on the app's own Celery instance, the one
Flask's "Background Tasks with Celery" pattern keeps in ``app.extensions["celery"]``,
so the app's worker (``celery -A yourapp worker``) runs them with nothing else to
write:

- ``flask_nachocode.handle(delivery_id, attempt)``: one attempt of a queued
  delivery (:func:`flask_nachocode.worker.run_attempt`), inside the app context;
- ``flask_nachocode.requeue(older_than=600)``: :func:`flask_nachocode.worker.requeue`,
  for a beat entry.

``handle`` is acknowledged late and rejected when its worker process is lost, so a
worker killed mid-handler leaves the task in the broker for the next one. An attempt
that was not made runs again after a growing delay, for as long as it takes.

A task is sent from inside a webhook request, which Nachocode gives 10 seconds, so a
send is bounded whatever the broker does (:func:`bound_broker_waits`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.app.defaults import DEFAULTS
from flask import Flask
from kombu.exceptions import OperationalError as KombuOperationalError

from .deferred import BrokerUnavailable
from .delivery import SLOW_DELIVERY_SECONDS
from .state import current_state
from .worker import (
    NOT_MADE_FIRST_DELAY,
    NOT_MADE_MAX_DELAY,
    AttemptNotMade,
    not_made_delay,
    requeue,
    run_attempt,
)

logger = logging.getLogger("flask_nachocode")

#: The tasks' names, for routes (``task_routes``) and beat entries.
HANDLE_TASK = "flask_nachocode.handle"
REQUEUE_TASK = "flask_nachocode.requeue"

#: How long one try to reach the broker may take (connecting, or one Redis command)
#: where the app's Celery config sets no limit: kombu's Redis transport has none, so
#: a Redis that accepts connections and never answers would hold the request for ever.
BROKER_TIMEOUT_SECONDS = 1.0
#: One retry, at once: it replaces a connection the broker dropped (RabbitMQ
#: restarted) instead of failing the send. With it a send tries the broker at most
#: three times (a pooled connection, then a new one), so a broker that does not
#: answer costs an answer at most :data:`SEND_TRIES` times the limit above.
SEND_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0}
SEND_TRIES = 3
#: The Redis transport options that limit a try.
_REDIS_TIMEOUTS = ("socket_connect_timeout", "socket_timeout")


class CeleryQueue:
    """Sends ``flask_nachocode.handle`` tasks through ``celery``, for ``app``."""

    def __init__(self, app: Flask, celery: Celery) -> None:
        self.celery = celery
        bound_broker_waits(celery)

        # Each task pushes the app context itself, so it needs no FlaskTask base class;
        # with one, the contexts nest harmlessly.
        def handle(task: Any, delivery_id: int, attempt: int) -> None:
            with app.app_context():
                try:
                    run_attempt(current_state(), delivery_id, attempt)
                except AttemptNotMade as error:
                    delay = not_made_delay(
                        task.request.retries, task.retry_backoff, task.retry_backoff_max
                    )
                    raise task.retry(countdown=delay, exc=error) from error

        def requeue_overdue(older_than: float = 600.0) -> int:
            with app.app_context():
                sent, left = requeue(current_state(), timedelta(seconds=older_than))
                if left:
                    logger.warning(
                        "nachocode requeue stopped: a task could not be sent; %s queued "
                        "deliveries are left for the next run",
                        left,
                    )
                return len(sent)

        self.handle = celery.task(
            name=HANDLE_TASK,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
            # An attempt that was not made (the store down, a bug of ours) runs again
            # until it is; handler failures are counted by run_attempt against
            # NACHOCODE_RETRY_DELAYS instead. The delays' names are Celery's own, so
            # that task_annotations can change them.
            max_retries=None,
            retry_backoff=NOT_MADE_FIRST_DELAY,
            retry_backoff_max=NOT_MADE_MAX_DELAY,
        )(handle)
        self.requeue = celery.task(name=REQUEUE_TASK, ignore_result=True)(requeue_overdue)

    def send(self, delivery_id: int, attempt: int, *, delay: float = 0.0) -> None:
        try:
            self.handle.apply_async(
                (delivery_id, attempt),
                countdown=delay or None,
                retry=True,
                retry_policy=SEND_RETRY_POLICY,
            )
        except KombuOperationalError as error:  # what kombu makes of every broker failure
            raise BrokerUnavailable(str(error)) from error

    def check(self, timeout: float) -> None:
        # A connection of its own, with every wait bounded: kombu's Redis transport
        # waits without limit by default, and a silent broker would hang the probe.
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        with self.celery.connection_for_write(
            connect_timeout=timeout, transport_options=options
        ) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=timeout
            )


def bound_broker_waits(celery: Celery) -> None:
    """Limit each try to reach the broker to :data:`BROKER_TIMEOUT_SECONDS`, where the
    app's Celery config sets no limit of its own: on Redis the transport's
    ``socket_connect_timeout`` and ``socket_timeout`` (unset, they wait for ever), on
    RabbitMQ ``broker_connection_timeout`` (unless changed from Celery's 4 s). Warn
    when the app's own limits let a send hold an answer past half of Nachocode's budget.

    The app's worker gets the same limits, which it survives: it waits for tasks with
    a BRPOP that the server answers within a second, and reads the reply only once it
    has come, so no socket timeout cuts that wait short; a broker that stops answering
    it now fails a command and reconnects instead of hanging.
    """
    conf = celery.conf
    driver = celery.connection_for_write().transport.driver_type
    if driver == "redis":
        options = dict(conf.broker_transport_options or {})
        for name in _REDIS_TIMEOUTS:
            options.setdefault(name, BROKER_TIMEOUT_SECONDS)
        conf.broker_transport_options = options
        limits = [options[name] for name in _REDIS_TIMEOUTS]
    elif driver == "amqp":
        if conf.broker_connection_timeout == DEFAULTS["broker_connection_timeout"]:
            conf.broker_connection_timeout = BROKER_TIMEOUT_SECONDS
        limits = [conf.broker_connection_timeout]
    else:
        return  # a transport whose limits are its own (the memory one of tests, SQS...)
    if any(limit is None for limit in limits) or SEND_TRIES * max(limits) > SLOW_DELIVERY_SECONDS:
        logger.warning(
            "nachocode: the Celery config lets one try to reach the broker take %s s, so a "
            "broker that does not answer holds a webhook answer that long %s times over; "
            "Nachocode counts an answer after 10 s as failed. Lower %s.",
            "unlimited" if None in limits else max(limits),
            SEND_TRIES,
            "broker_transport_options' socket_timeout and socket_connect_timeout"
            if driver == "redis"
            else "broker_connection_timeout",
        )

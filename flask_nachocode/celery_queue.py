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
worker killed mid-handler leaves the task in the broker for the next one.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery
from flask import Flask

from .errors import StoreUnavailable
from .state import current_state
from .worker import STORE_RETRY_SECONDS, requeue, run_attempt

#: The tasks' names, for routes (``task_routes``) and beat entries.
HANDLE_TASK = "flask_nachocode.handle"
REQUEUE_TASK = "flask_nachocode.requeue"


class CeleryQueue:
    """Sends ``flask_nachocode.handle`` tasks through ``celery``, for ``app``."""

    def __init__(self, app: Flask, celery: Celery) -> None:
        self.celery = celery

        # Each task pushes the app context itself, so it needs no FlaskTask base class;
        # with one, the contexts nest harmlessly.
        def handle(task: Any, delivery_id: int, attempt: int) -> None:
            with app.app_context():
                try:
                    run_attempt(current_state(), delivery_id, attempt)
                except StoreUnavailable as error:
                    raise task.retry(countdown=STORE_RETRY_SECONDS, exc=error) from error

        def requeue_overdue(older_than: float = 600.0) -> int:
            with app.app_context():
                return len(requeue(current_state(), timedelta(seconds=older_than)))

        self.handle = celery.task(
            name=HANDLE_TASK,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
            # The store being down is retried until it is back; handler failures are
            # counted by run_attempt against NACHOCODE_RETRY_DELAYS instead.
            max_retries=None,
        )(handle)
        self.requeue = celery.task(name=REQUEUE_TASK, ignore_result=True)(requeue_overdue)

    def send(self, delivery_id: int, attempt: int, *, delay: float = 0.0) -> None:
        self.handle.apply_async((delivery_id, attempt), countdown=delay or None)

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

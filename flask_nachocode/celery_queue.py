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
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery
from flask import Flask

from .state import current_state
from .worker import (
    NOT_MADE_FIRST_DELAY,
    NOT_MADE_MAX_DELAY,
    AttemptNotMade,
    not_made_delay,
    requeue,
    run_attempt,
)

#: The tasks' names, for routes (``task_routes``) and beat entries.
HANDLE_TASK = "flask_nachocode.handle"
REQUEUE_TASK = "flask_nachocode.requeue"


class CeleryQueue:
    """Sends ``flask_nachocode.handle`` tasks through ``celery``, for ``app``."""

    def __init__(self, app: Flask, celery: Celery) -> None:
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
                return len(requeue(current_state(), timedelta(seconds=older_than)))

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
        self.handle.apply_async((delivery_id, attempt), countdown=delay or None)

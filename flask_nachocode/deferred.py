"""The task queue behind ``NACHOCODE_DEFERRED``, as the rest of the package sees it.

The request path and the worker only ever call :meth:`TaskQueue.send`, and the health
check :meth:`TaskQueue.check`; which queue carries the task (Celery today, see
:mod:`flask_nachocode.celery_queue`) is chosen once, in ``init_app``. Adding another one
(RQ, Dramatiq) means a class with these two methods, whose task calls
:func:`flask_nachocode.worker.run_attempt` inside the app context, and nothing in the
delivery lifecycle.
"""

from __future__ import annotations

from typing import Protocol


class BrokerUnavailable(Exception):
    """The broker could not be reached, or did not answer, within the send's bound."""


class TaskQueue(Protocol):
    """Sends the task that runs one attempt of a queued delivery."""

    def send(self, delivery_id: int, attempt: int, *, delay: float = 0.0) -> None:
        """Queue attempt number ``attempt`` of delivery ``delivery_id``, to run in
        ``delay`` seconds, or raise :class:`BrokerUnavailable` within a few seconds
        (it runs inside the webhook request): the caller keeps the delivery queued, and
        ``flask nachocode requeue`` sends it later. The task calls
        :func:`~flask_nachocode.worker.run_attempt` and runs again later when that
        raises :class:`~flask_nachocode.worker.AttemptNotMade`."""

    def check(self, timeout: float) -> None:
        """Reach the broker and hear back within ``timeout`` seconds, or raise: the
        health check's question, which must be answered in a bounded time whatever
        the broker does (refuse, or accept the connection and never answer)."""

"""Prometheus metrics (``NACHOCODE_METRICS``, the ``metrics`` extra): what happened to
every delivery, counted where it ends, and the store's queue, read when scraped.

prometheus_client is imported only when an app switches metrics on, so an app
without them neither needs the package nor pays for it. Counting hooks in at three
places, each where an outcome is final, and nowhere else:

- the webhook view (:meth:`Metrics.observed` wraps what it calls): every answer
  Nachocode gets, including the refusals before the key check (401, 405) and the
  503s of an unavailable store, which no signal reports, with how long it took;
- the worker's end of each attempt of a deferred delivery;
- a replay.

The signals were not the place: a 401 and a 503 send none, and with deferral
``delivery_handled`` comes from the request and from the worker alike, so a
receiver could not tell an answer from a worker's ending.

Under several processes (gunicorn workers, Celery's prefork pool) prometheus_client's
multiprocess mode sums the counters of every process (``PROMETHEUS_MULTIPROC_DIR``).
The store's gauges are not kept per process: :class:`StoreCollector` reads them
from the database when scraped, once, in whichever process serves the scrape.
Labels hold only bounded values: event names, outcomes, statuses, error codes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from werkzeug.exceptions import HTTPException
from werkzeug.utils import import_string

from .errors import (
    BadBody,
    InvalidEvent,
    NoHandler,
    PayloadTooLarge,
    Refuse,
    StoreUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    WebhookError,
    WrongMethod,
)
from .events import ROUTES_BY_NAME, utcnow
from .reads import queued_summary
from .store import describe_database_error

if TYPE_CHECKING:
    from flask import Flask
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from .delivery import Result

logger = logging.getLogger("flask_nachocode")

#: Every metric's name starts with this; the ``{prefix}/metrics`` route shows no other.
PREFIX = "nachocode_"
#: Seconds. Nachocode counts an answer after 10 s as failed; the buckets go past it
#: so that answers too late still show, and are fine near it for the alert.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10, 15, 30)
#: The label of a delivery whose event is not known (an unreadable body on ``/webhooks``).
UNKNOWN_EVENT = "unknown"
EVENTS = ("purchase", "refund", "unavailable_users")
#: A refusal's ``reason`` label: its error code. An app's own :class:`Refuse` counts
#: as ``refused`` whatever its code, which the app chooses and could be unbounded.
REFUSAL_REASONS = {
    error.code: error.status
    for error in (
        Unauthorized,
        WrongMethod,
        BadBody,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidEvent,
        NoHandler,
    )
}
#: How a handler attempt ended: ``retry`` when a deferred delivery's handler raised
#: and another attempt is due, ``failed`` when none is (or it ran in the request).
ATTEMPT_OUTCOMES = ("handled", "retry", "failed", "refused", "unhandled", "invalid")
#: Where an attempt ran.
ATTEMPT_MODES = ("request", "worker", "replay")


def _label(event_name: str | None) -> str:
    return event_name or UNKNOWN_EVENT


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The counters and the latency histogram, made once per process (and registry)
    by :meth:`start` and shared by every app in the process that switches them on."""

    _started: dict[Any, tuple[Any, Metrics]] = {}

    @classmethod
    def start(cls, registry: Any = None) -> Metrics:
        """The process's metrics, registered in ``registry`` (a ``CollectorRegistry``,
        a ``"module:name"`` string naming one, or None for prometheus_client's default
        registry) the first time. Raises ``RuntimeError`` for a setting that cannot work."""
        try:
            import prometheus_client
            from prometheus_client import values
        except ImportError:
            raise RuntimeError(
                "NACHOCODE_METRICS needs prometheus_client: pip install 'flask-nachocode[metrics]'"
            ) from None
        multiprocess = getattr(values.ValueClass, "_multiprocess", False)
        if _multiprocess_dir() and not multiprocess:
            raise RuntimeError(
                "PROMETHEUS_MULTIPROC_DIR is set, but prometheus_client was imported before "
                "it was: set it in the environment the server starts with (gunicorn's "
                "--env or its config file), before the app is imported"
            )
        if isinstance(registry, str):
            try:
                registry = import_string(registry)
            except ImportError as error:
                raise RuntimeError(
                    f"NACHOCODE_METRICS_REGISTRY: cannot import {registry!r}: {error}"
                ) from None
        if registry is None:
            registry = prometheus_client.REGISTRY
        if not isinstance(registry, prometheus_client.CollectorRegistry):
            raise RuntimeError(
                "NACHOCODE_METRICS_REGISTRY must be a prometheus_client CollectorRegistry "
                f"(or its 'module:name'), not {type(registry).__name__}"
            )
        # In multiprocess mode every set of counters in a process writes the same file:
        # there can be only one, whichever registry it was first registered in.
        key = "multiprocess" if multiprocess else id(registry)
        if key not in cls._started:
            # The registry is kept with them: an id is only unique while its object lives.
            cls._started[key] = (registry, cls(registry))
        return cls._started[key][1]

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        #: Only these metrics, for the ``{prefix}/metrics`` route.
        self.registry = CollectorRegistry()
        own = self.registry
        self.deliveries = Counter(
            "nachocode_deliveries",
            "Deliveries stored after the key check, by event, outcome and the HTTP status "
            "answered (a deferred delivery counts once, as queued).",
            ("event", "outcome", "status"),
            registry=own,
        )
        self.refusals = Counter(
            "nachocode_refusals",
            "Webhook requests refused, by reason (the error code) and HTTP status: "
            "before the key check (unauthorized, method_not_allowed) and after it.",
            ("reason", "status"),
            registry=own,
        )
        self.attempts = Counter(
            "nachocode_handler_attempts",
            "Runs of a delivery's handlers, by event, outcome and where they ran "
            "(request, worker, replay).",
            ("event", "outcome", "mode"),
            registry=own,
        )
        self.store_unavailable = Counter(
            "nachocode_store_unavailable",
            "Deliveries answered 503 because the store could not be reached or a lock "
            "wait gave up; nothing was handled.",
            registry=own,
        )
        self.internal_errors = Counter(
            "nachocode_internal_errors",
            "Deliveries answered 500 by an error outside the handlers (a bug, or a "
            "delivery_received receiver that raised); not stored.",
            registry=own,
        )
        self.duration = Histogram(
            "nachocode_delivery_duration_seconds",
            "Seconds from a delivery's arrival to its answer, by event "
            "(Nachocode gives up after 10).",
            ("event",),
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        collectors = (
            self.deliveries,
            self.refusals,
            self.attempts,
            self.store_unavailable,
            self.internal_errors,
            self.duration,
        )
        for collector in collectors:
            registry.register(collector)
        # Label lookups take a lock and check the values: done once per combination.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._answers: dict[tuple[str | None, str, int], tuple[Any, Any, Any]] = {}
        self._prepare()

    def _prepare(self) -> None:
        """Create the series an alert watches at 0, so that the first failure after a
        start shows as an increase instead of as a series that appears."""
        for event in EVENTS:
            for outcome, status in (("handled", 200), ("duplicate", 200), ("failed", 500)):
                self._child(self.deliveries, event, outcome, str(status))
            for outcome in ("handled", "retry", "failed", "refused"):
                for mode in ("request", "worker"):
                    self._attempt_child(event, outcome, mode)  # a retry: only in the worker
            self._child(self.duration, event)
        for reason, status in REFUSAL_REASONS.items():
            self._child(self.refusals, reason, str(status))

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observed(self, receive: Callable[[str], Result]) -> Callable[[str], Result]:
        """``receive`` (route name -> result, or a raised refusal) counted: the one
        place the webhook routes are counted, around the whole of each request."""

        def counted(route: str) -> Result:
            started = time.perf_counter()
            try:
                result = receive(route)
            except WebhookError as error:
                self._refused(error, route, time.perf_counter() - started)
                raise
            except HTTPException:
                raise  # Werkzeug's own answers (a client that went away mid-body)
            except Exception:
                self.internal_errors.inc()
                raise
            self._answered(result, time.perf_counter() - started)
            return result

        return counted

    def _answered(self, result: Result, seconds: float) -> None:
        # What an answer counts depends only on these three: found once, then reused.
        key = (result.event_name, result.outcome, result.status)
        counters = self._answers.get(key)
        if counters is None:
            event = _label(result.event_name)
            counters = self._answers[key] = (
                self._child(self.deliveries, event, result.outcome, str(result.status)),
                self._child(self.duration, event),
                self._attempt_child(result.event_name, result.outcome, "request"),
            )
        delivered, duration, attempted = counters
        delivered.inc()
        duration.observe(seconds)
        if attempted is not None:
            attempted.inc()
        if result.error is not None and result.outcome != "failed":
            self._count_refusal(result.error)

    def _refused(self, error: WebhookError, route: str, seconds: float) -> None:
        if isinstance(error, StoreUnavailable):
            self.store_unavailable.inc()
            routed = ROUTES_BY_NAME.get(route)
            self._child(self.duration, _label(routed.event if routed else None)).observe(seconds)
        else:  # refused before the key check: no delivery, no duration worth keeping
            self._count_refusal(error)

    def _count_refusal(self, error: WebhookError) -> None:
        if isinstance(error, Refuse):
            reason = "refused"
        elif error.code in REFUSAL_REASONS:
            reason = error.code
        else:
            return  # an error, not a refusal (a handler's failure, the store's)
        self._child(self.refusals, reason, str(error.status)).inc()

    def attempt(self, result: Result, mode: str, *, retry: bool = False) -> None:
        """Count a run of ``result``'s handlers in ``mode`` (request, worker, replay);
        a result whose handlers did not run (a duplicate, queued, an invalid body)
        counts none, except in the worker, whose every attempt is one (as in the
        attempts table). ``retry``: a worker's attempt that failed with another one due."""
        child = self._attempt_child(result.event_name, "retry" if retry else result.outcome, mode)
        if child is not None:
            child.inc()

    def _attempt_child(self, event_name: str | None, outcome: str, mode: str) -> Any:
        if outcome not in ATTEMPT_OUTCOMES:
            return None
        if mode != "worker" and outcome not in ("handled", "failed", "refused"):
            return None  # invalid or unhandled: ended before any handler could run
        return self._child(self.attempts, _label(event_name), outcome, mode)


class StoreCollector:
    """The store's gauges for ``app``, read from its database when scraped, so that
    they are one value however many processes serve the app: how many deliveries are
    ``queued``, how old the oldest one is, and whether the store could be read.

    The ``{prefix}/metrics`` route adds it to every scrape. An app that exposes its
    own registry adds it there: ``registry.register(StoreCollector(app))``.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app

    def describe(self) -> Iterator[Metric]:
        # Without describe, registering would read the store once to learn the names.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        up, queued, oldest = self._families()
        try:
            with self.app.app_context():
                count, oldest_at = queued_summary(self.app.extensions["nachocode"].store)
        except sa.exc.SQLAlchemyError as error:
            logger.warning(
                "nachocode metrics: the store could not be read: %s",
                describe_database_error(error),
            )
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        queued.add_metric([], count)
        age = (utcnow() - oldest_at).total_seconds() if oldest_at is not None else 0.0
        oldest.add_metric([], max(age, 0.0))
        yield from (up, queued, oldest)

    @staticmethod
    def _families() -> tuple[Any, Any, Any]:
        from prometheus_client.core import GaugeMetricFamily

        return (
            GaugeMetricFamily(
                "nachocode_store_up",
                "1 if the scrape could read the delivery store, 0 if not.",
            ),
            GaugeMetricFamily(
                "nachocode_queued_deliveries",
                "Deliveries answered 202 and not yet handled, failed or refused by a worker.",
            ),
            GaugeMetricFamily(
                "nachocode_oldest_queued_delivery_age_seconds",
                "Seconds since the oldest queued delivery arrived (0 when none is queued).",
            ),
        )


class _Ours:
    """The nachocode families of another collector (the multiprocess files hold the
    app's own metrics too)."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        return (family for family in self.collector.collect() if family.name.startswith(PREFIX))


def exposition(app: Flask, metrics: Metrics, accept: str | None) -> tuple[bytes, str]:
    """The scrape of ``{prefix}/metrics``: the counters (summed over every process's
    files in multiprocess mode) and ``app``'s store gauges, in the format ``accept``
    asks for (Prometheus text, or OpenMetrics); returns the body and its content type."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    path = _multiprocess_dir()
    counters: Any = (
        _Ours(MultiProcessCollector(None, path))  # type: ignore[no-untyped-call]
        if path
        else metrics.registry
    )
    registry.register(counters)
    registry.register(StoreCollector(app))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type

"""The routes a monitoring system calls, each off unless the app switches it on:

``{prefix}/metrics`` (``NACHOCODE_METRICS_ROUTE``)
    The Prometheus scrape of :mod:`flask_nachocode.metrics`: the counters (summed over
    every process in multiprocess mode) and the store's gauges. Volumes and user
    counts are business data, so it is protected as the inspector is: a bearer token
    (``NACHOCODE_METRICS_TOKEN``, the form a scraper sends), the app's own decorators
    (``NACHOCODE_METRICS_DECORATORS``), or both; with neither it answers only in
    debug mode, and 404 otherwise.
``{prefix}/health`` (``NACHOCODE_HEALTH_ROUTE``)
    For load balancers and Kubernetes probes: 200 with JSON when the store answers
    and its tables exist (and, with deferral, the broker answers within
    :data:`BROKER_TIMEOUT_SECONDS`), otherwise 503 naming what is wrong. It reveals
    no URL, key or error text (those go to the log), so it needs no protection.

Neither takes a query argument: any is answered 400.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response, abort, current_app, jsonify, request

from .metrics import exposition
from .state import AppState, Protection, current_state, decorate
from .store import describe_database_error

logger = logging.getLogger("flask_nachocode")

#: How long the health check waits for the broker (with ``NACHOCODE_DEFERRED``); a
#: probe's own timeout must be longer (Kubernetes' default is 1 s).
BROKER_TIMEOUT_SECONDS = 2.0

_NO_STORE = {"Cache-Control": "no-store"}


def add_monitoring_routes(blueprint: Blueprint, state: AppState) -> None:
    """Mount the routes ``state`` switches on (see the module docstring)."""
    if state.metrics_route is not None:
        blueprint.add_url_rule(
            "/metrics", "metrics", _metrics_view(state.metrics_route), methods=["GET"]
        )
    if state.health_route:
        blueprint.add_url_rule("/health", "health", health, methods=["GET"])


def _refuse_arguments() -> None:
    if request.args:
        names = ", ".join(sorted(request.args))[:200]
        abort(Response(f"this page takes no query arguments (got: {names})\n", 400, _NO_STORE))


def _metrics_view(protection: Protection) -> Callable[[], Any]:
    def scrape() -> Response:
        _refuse_arguments()
        state = current_state()
        assert state.metrics is not None
        body, content_type = exposition(
            current_app._get_current_object(),  # type: ignore[attr-defined]
            state.metrics,
            request.headers.get("Accept"),
        )
        return Response(body, content_type=content_type, headers=_NO_STORE)

    protected = decorate(scrape, protection.decorators)

    def metrics() -> Any:
        _check_token(protection)
        return protected()

    return metrics


def _check_token(protection: Protection) -> None:
    """Refuse a scrape without the token (constant-time), or, with no protection at
    all, outside debug mode (404, as the inspector)."""
    if protection.token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        presented = given.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented, protection.token.encode()
        ):
            abort(
                Response(
                    "send Authorization: Bearer <NACHOCODE_METRICS_TOKEN>\n",
                    401,
                    {"WWW-Authenticate": 'Bearer realm="nachocode-metrics"', **_NO_STORE},
                )
            )
    elif not protection.decorators and not current_app.debug:
        abort(404)


def health() -> Response:
    """200 when every check passes, else 503; the body names each check's result."""
    _refuse_arguments()
    state = current_state()
    checks = {"store": _store_check(state)}
    if state.deferred and state.task_queue is not None:
        checks["broker"] = _broker_check(state)
    healthy = all(result == "ok" for result in checks.values())
    response = jsonify(status="ok" if healthy else "unavailable", checks=checks)
    response.status_code = 200 if healthy else 503
    response.headers.update(_NO_STORE)
    return response


def _store_check(state: AppState) -> str:
    store = state.store
    try:
        store.ensure_ready()
        missing = store.missing_tables(attempts=state.deferred)
    except sa.exc.SQLAlchemyError as error:
        logger.warning(
            "nachocode health: the store is unreachable: %s", describe_database_error(error)
        )
        return "unreachable"
    return f"tables missing: {', '.join(missing)}" if missing else "ok"


def _broker_check(state: AppState) -> str:
    assert state.task_queue is not None
    try:
        state.task_queue.check(BROKER_TIMEOUT_SECONDS)
    except Exception as error:  # every transport has errors of its own
        logger.warning(
            "nachocode health: the broker did not answer within %.0f s: %s: %s",
            BROKER_TIMEOUT_SECONDS,
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
        )
        return "unreachable"
    return "ok"

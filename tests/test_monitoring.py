"""The routes a monitoring system calls: ``{prefix}/metrics`` protected as the
inspector is (a bearer token, the app's decorators, both, or debug mode only), and
``{prefix}/health`` for load balancers: 200 when the store and (with deferral) the
broker answer, 503 naming what is wrong, never a secret. Neither takes arguments."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import pytest
from flask import abort, request

from support.deferred_in_process import make_deferred_app
from support.scrape import METRICS_CONFIG, METRICS_TOKEN, parse

BEARER = {"Authorization": f"Bearer {METRICS_TOKEN}"}
TOKEN = {"NACHOCODE_METRICS_TOKEN": METRICS_TOKEN}
REDIS_URL = os.environ.get("NACHOCODE_TEST_REDIS_URL")
RABBITMQ_URL = os.environ.get("NACHOCODE_TEST_RABBITMQ_URL")


def admins_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """An app's own login decorator, as NACHOCODE_METRICS_DECORATORS takes it."""

    @wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if request.headers.get("X-Admin") != "yes":
            abort(403)
        return view(*args, **kwargs)

    return checked


def test_both_routes_are_off_unless_switched_on(make_app: Callable[..., Any]) -> None:
    client = make_app(NACHOCODE_METRICS=True).client
    assert client.get("/nachocode/metrics", headers=BEARER).status_code == 404
    assert client.get("/nachocode/health").status_code == 404


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": f"Bearer {METRICS_TOKEN}x"}, 401),
        ({"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"}, 401),
        ({"Authorization": f"Basic {METRICS_TOKEN}"}, 401),
        ({"Authorization": f"Bearer {METRICS_TOKEN}"}, 200),
        ({"Authorization": f"bearer {METRICS_TOKEN}"}, 200),
    ],
)
def test_the_token_is_a_bearer_token(
    make_app: Callable[..., Any], headers: dict[str, str], status: int
) -> None:
    answer = make_app(**METRICS_CONFIG).client.get("/nachocode/metrics", headers=headers)
    assert answer.status_code == status
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="nachocode-metrics"'
        assert b"nachocode_" not in answer.get_data()
    else:
        assert answer.content_type.startswith("text/plain; version=0.0.4")
        assert answer.headers["Cache-Control"] == "no-store"


def test_the_token_in_the_query_string_is_not_taken(make_app: Callable[..., Any]) -> None:
    client = make_app(**METRICS_CONFIG).client
    assert client.get(f"/nachocode/metrics?token={METRICS_TOKEN}").status_code == 401


@pytest.mark.parametrize(
    ("config", "headers", "status"),
    [
        ({"NACHOCODE_METRICS_DECORATORS": [admins_only]}, {}, 403),
        ({"NACHOCODE_METRICS_DECORATORS": [admins_only]}, {"X-Admin": "yes"}, 200),
        (
            {
                "NACHOCODE_METRICS_DECORATORS": [admins_only],
                "NACHOCODE_METRICS_TOKEN": METRICS_TOKEN,
            },  # fmt: skip
            {"X-Admin": "yes"},
            401,
        ),
        (
            {
                "NACHOCODE_METRICS_DECORATORS": [admins_only],
                "NACHOCODE_METRICS_TOKEN": METRICS_TOKEN,
            },  # fmt: skip
            {"X-Admin": "yes", **BEARER},
            200,
        ),
        ({}, {}, 404),
        ({"DEBUG": True}, {}, 200),
    ],
)
def test_decorators_a_token_or_both_and_without_either_debug_mode_only(
    make_app: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    config: dict[str, Any],
    headers: dict[str, str],
    status: int,
) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        client = make_app(NACHOCODE_METRICS=True, NACHOCODE_METRICS_ROUTE=True, **config).client
    assert client.get("/nachocode/metrics", headers=headers).status_code == status
    unprotected = "NACHOCODE_METRICS_DECORATORS" not in config and "TOKEN" not in str(config)
    assert ("/nachocode/metrics is on without protection" in caplog.text) == unprotected


@pytest.mark.parametrize("query", ["?name[]=nachocode_store_up", "?x=1", "?token=a&b="])
@pytest.mark.parametrize("path", ["/nachocode/metrics", "/nachocode/health"])
def test_query_arguments_are_answered_400(
    make_app: Callable[..., Any], path: str, query: str
) -> None:
    client = make_app(NACHOCODE_HEALTH_ROUTE=True, **METRICS_CONFIG).client
    answer = client.get(path + query, headers=BEARER)
    assert answer.status_code == 400
    assert "takes no query arguments" in answer.get_data(as_text=True)


def test_the_scrape_speaks_openmetrics_when_asked(make_app: Callable[..., Any]) -> None:
    client = make_app(**METRICS_CONFIG).client
    answer = client.get(
        "/nachocode/metrics",
        headers={**BEARER, "Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert answer.content_type.startswith("application/openmetrics-text")
    assert answer.get_data(as_text=True).endswith("# EOF\n")


def test_only_the_extensions_metrics_are_shown(make_app: Callable[..., Any]) -> None:
    from prometheus_client import REGISTRY, Counter

    # A metric of the app's own, in the default registry that nachocode's counters use.
    orders = Counter("shop_orders", "An app's own counter.")
    orders.inc()
    try:
        client = make_app(**METRICS_CONFIG).client
        samples = parse(client.get("/nachocode/metrics", headers=BEARER).get_data(as_text=True))
    finally:
        REGISTRY.unregister(orders)
    assert {name for name, _ in samples} >= {"nachocode_deliveries_total", "nachocode_store_up"}
    assert all(name.startswith("nachocode_") for name, _ in samples)


# --- {prefix}/health ---


@pytest.mark.every_store
def test_healthy_is_200_and_says_what_was_checked(make_app: Callable[..., Any]) -> None:
    answer = make_app(NACHOCODE_HEALTH_ROUTE=True).client.get("/nachocode/health")
    assert (answer.status_code, answer.get_json()) == (
        200,
        {"status": "ok", "checks": {"store": "ok"}},
    )
    assert answer.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "store_variant", [("sqlite", "shared_db"), ("mysql", "shared_db")], indirect=True
)
def test_missing_tables_are_named(make_app: Callable[..., Any]) -> None:
    built = make_app(NACHOCODE_HEALTH_ROUTE=True, create_tables=False)
    answer = built.client.get("/nachocode/health")
    assert (answer.status_code, answer.get_json()) == (
        503,
        {
            "status": "unavailable",
            "checks": {
                "store": "tables missing: nachocode_deliveries, nachocode_claims, "
                "nachocode_purchases"
            },
        },
    )
    with built.app.app_context():
        built.db.create_all()
    assert built.client.get("/nachocode/health").status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://nachocode:pw-5ecret-77@127.0.0.1:{port}/shop",
        "mysql+pymysql://nachocode:pw-5ecret-77@127.0.0.1:{port}/shop",
        "sqlite:///{missing}/nachocode.db",
    ],
)
def test_an_unreachable_store_is_a_503_that_gives_nothing_away(
    make_app: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    closed_port: int,
    url: str,
) -> None:
    url = url.format(port=closed_port, missing=tmp_path / "unmounted")
    client = make_app(url=url, NACHOCODE_HEALTH_ROUTE=True).client
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        answer = client.get("/nachocode/health")
    assert (answer.status_code, answer.get_json()) == (
        503,
        {"status": "unavailable", "checks": {"store": "unreachable"}},
    )
    assert "nachocode health: the store is unreachable: OperationalError" in caplog.text
    shown = answer.get_data(as_text=True) + str(answer.headers)
    for secret in ("pw-5ecret-77", str(closed_port), str(tmp_path)):
        assert secret not in shown


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def _broker_health(tmp_path: Path, broker: str) -> tuple[int, dict[str, Any]]:
    app = make_deferred_app(
        tmp_path,
        f"sqlite:///{tmp_path / 'n.db'}",
        lambda event: None,
        eager=False,
        broker=broker,
        NACHOCODE_HEALTH_ROUTE=True,
    )
    answers: list[Any] = []
    client = app.test_client()
    asking = threading.Thread(target=lambda: answers.append(client.get("/nachocode/health")))
    asking.start()
    # Far longer than the check's own bound: a probe that hung would never return.
    asking.join(timeout=60)
    assert not asking.is_alive(), "the health check did not return"
    [answer] = answers
    return answer.status_code, answer.get_json()


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_with_deferral_the_broker_is_asked_too(tmp_path: Path, kind: str) -> None:
    broker = REDIS_URL if kind == "redis" else RABBITMQ_URL
    if not broker:
        pytest.skip(f"NACHOCODE_TEST_{kind.upper()}_URL is not set")
    assert _broker_health(tmp_path, broker) == (
        200,
        {"status": "ok", "checks": {"store": "ok", "broker": "ok"}},
    )


@pytest.mark.parametrize(
    "scheme", ["redis://127.0.0.1:{port}/0", "amqp://guest:pw-5ecret-77@127.0.0.1:{port}//"]
)
@pytest.mark.parametrize("broker", ["closed", "silent"])
def test_a_broker_that_refuses_or_never_answers_is_a_503_in_bounded_time(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
    scheme: str,
    broker: str,
) -> None:
    port = request.getfixturevalue("closed_port" if broker == "closed" else "silent_broker")
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        status, body = _broker_health(tmp_path, scheme.format(port=port))
    assert (status, body) == (
        503,
        {"status": "unavailable", "checks": {"store": "ok", "broker": "unreachable"}},
    )
    assert "nachocode health: the broker did not answer within 2 s" in caplog.text
    assert "pw-5ecret-77" not in caplog.text + str(body)

"""Prometheus metrics (``NACHOCODE_METRICS``): every answer counted once, by what it
was; handler attempts in the request, the worker and a replay; the store's gauges read
when scraped; an app's own registry; and, against real servers, a gunicorn app with 4
workers in multiprocess mode scraped by a real Prometheus (marked ``integration`` and
``once``), and the shipped alert rules under ``promtool``.

Counters live as long as the test process, so each test compares two scrapes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest

from flask_nachocode import Refuse, delivery_received
from flask_nachocode.events import utcnow
from flask_nachocode.metrics import StoreCollector
from flask_nachocode.tables import define_tables
from flask_nachocode.testing import (
    post_delivery,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)

from support.common import WEBHOOK_KEY
from support.deferred_in_process import make_deferred_app
from support.effects_app import serve
from support.live import ROOT, free_port
from support.scrape import METRICS_CONFIG, METRICS_TOKEN, counted, parse, scrape, value

ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "docs" / "prometheus" / "alerts_test.yml"
GUNICORN_CONF = ROOT / "docs" / "prometheus" / "gunicorn_conf.py"
TEXT_PLAIN = {"Content-Type": "text/plain", "Authorization": f"Bearer {WEBHOOK_KEY}"}


def test_an_app_without_metrics_never_imports_prometheus_client(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from flask import Flask
        from flask_nachocode import NachocodeWebhook
        from flask_nachocode.testing import post_delivery, purchase_payload

        app = Flask("plain", instance_path={str(tmp_path)!r})
        app.config["NACHOCODE_WEBHOOK_KEY"] = "plain-key-1234"
        NachocodeWebhook(app).on_purchase(lambda event: None)
        answer = post_delivery(app.test_client(), "purchase", purchase_payload())
        assert answer.status_code == 200, answer.get_data()
        print(sorted(name for name in sys.modules if name.startswith("prometheus")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.every_database
def test_every_answer_is_counted_once_by_what_it_was(make_app: Callable[..., Any]) -> None:
    built = make_app(NACHOCODE_MAX_BODY_BYTES=2048, **METRICS_CONFIG)

    @built.ext.on_purchase
    def grant(event: Any) -> None:
        if event.user_id == "crash":
            raise RuntimeError("grant API down")

    @built.ext.on_refund
    def refuse(event: Any) -> None:
        raise Refuse("no such user", status=404, code="user-42-unknown")

    client = built.client
    purchase = purchase_payload()
    before = scrape(client)
    statuses = [
        post_delivery(client, "purchase", purchase).status_code,
        post_delivery(client, "purchase", purchase).status_code,
        post_delivery(client, "purchase", purchase_payload(userId="crash")).status_code,
        post_delivery(client, "refund", refund_payload()).status_code,
        post_delivery(client, "unavailable_users", unavailable_users_payload()).status_code,
        post_delivery(client, "purchase", {"userId": 1}).status_code,
        post_delivery(client, "purchase", b"not json").status_code,
        post_delivery(client, "purchase", b"x" * 3000).status_code,
        client.post("/nachocode/webhooks/purchase", data="{}", headers=TEXT_PLAIN).status_code,
        post_delivery(client, "any", {"no": "event"}).status_code,
        post_delivery(client, "purchase", purchase_payload(), key="wrong-key").status_code,
        client.post("/nachocode/webhooks/refund", json=refund_payload()).status_code,
        client.get("/nachocode/webhooks/purchase").status_code,
    ]
    assert statuses == [200, 200, 500, 404, 501, 422, 400, 413, 415, 422, 401, 401, 405]
    changes = counted(before, scrape(client))
    assert changes.pop("nachocode_deliveries_total") == {
        ("purchase", "handled", "200"): 1,
        ("purchase", "duplicate", "200"): 1,
        ("purchase", "failed", "500"): 1,
        ("refund", "refused", "404"): 1,
        ("unavailable_users", "unhandled", "501"): 1,
        ("purchase", "invalid", "422"): 1,
        ("purchase", "invalid", "400"): 1,
        ("purchase", "invalid", "413"): 1,
        ("purchase", "invalid", "415"): 1,
        ("unknown", "invalid", "422"): 1,
    }
    # The app's own refusal code ("user-42-unknown") is no label: it could be anything.
    assert changes.pop("nachocode_refusals_total") == {
        ("refused", "404"): 1,
        ("no_handler", "501"): 1,
        ("invalid_event", "422"): 2,
        ("bad_body", "400"): 1,
        ("payload_too_large", "413"): 1,
        ("unsupported_media_type", "415"): 1,
        ("unauthorized", "401"): 2,
        ("method_not_allowed", "405"): 1,
    }
    assert changes.pop("nachocode_handler_attempts_total") == {
        ("purchase", "request", "handled"): 1,
        ("purchase", "request", "failed"): 1,
        ("refund", "request", "refused"): 1,
    }
    # Every stored delivery's answer took a time; the 401s and the 405 stored nothing.
    assert changes.pop("nachocode_delivery_duration_seconds_count") == {
        ("purchase",): 7,
        ("refund",): 1,
        ("unavailable_users",): 1,
        ("unknown",): 1,
    }
    assert changes == {}


def test_store_outages_and_errors_outside_the_handlers_are_counted(
    tmp_path: Path, make_app: Callable[..., Any]
) -> None:
    # The database's directory is missing: the store cannot be opened.
    # Testing mode would re-raise the receiver's error into the test.
    url = f"sqlite:///{tmp_path / 'missing' / 'n.db'}"
    built = make_app(url=url, TESTING=False, **METRICS_CONFIG)
    built.ext.on_purchase(lambda event: None)
    before = scrape(built.client)
    assert post_delivery(built.client, "purchase", purchase_payload()).status_code == 503

    def broken_receiver(sender: Any, **extra: Any) -> None:
        raise RuntimeError("a receiver's bug")

    with delivery_received.connected_to(broken_receiver, built.app):
        assert post_delivery(built.client, "refund", refund_payload()).status_code == 500
    after = scrape(built.client)
    assert counted(before, after) == {
        "nachocode_store_unavailable_total": {(): 1},
        "nachocode_internal_errors_total": {(): 1},
        "nachocode_delivery_duration_seconds_count": {("purchase",): 1},
    }
    # The scrape itself could not read the store: it says so, and shows no queue.
    assert value(after, "nachocode_store_up") == 0
    assert not any(name == "nachocode_queued_deliveries" for name, _ in after)


@pytest.mark.every_database
def test_the_queue_is_read_from_the_store_when_scraped(tmp_path: Path, database_url: str) -> None:
    # A broker that no worker reads: the deliveries stay queued.
    app = make_deferred_app(
        tmp_path, database_url, lambda event: None, eager=False, **METRICS_CONFIG
    )
    client = app.test_client()
    empty = scrape(client)
    assert value(empty, "nachocode_store_up") == 1
    assert value(empty, "nachocode_queued_deliveries") == 0
    assert value(empty, "nachocode_oldest_queued_delivery_age_seconds") == 0
    started = utcnow()
    for _ in range(3):
        assert post_delivery(client, "purchase", purchase_payload()).status_code == 202
    samples = scrape(client)
    age = value(samples, "nachocode_oldest_queued_delivery_age_seconds")
    assert value(samples, "nachocode_queued_deliveries") == 3
    # The oldest arrived after `started`, and the scrape came after it: its age lies
    # between 0 and the time since `started`, whatever zone the database keeps.
    assert 0 < age <= (utcnow() - started).total_seconds()
    assert counted(empty, samples)["nachocode_deliveries_total"] == {
        ("purchase", "queued", "202"): 3
    }


def test_a_workers_attempts_are_counted_with_each_retry(
    tmp_path: Path, make_app: Callable[..., Any]
) -> None:
    runs: list[str] = []

    def flaky(event: Any) -> None:
        runs.append(event.user_id)
        if event.user_id == "always" or (event.user_id == "twice" and runs.count("twice") <= 2):
            raise RuntimeError("grant API down")
        if event.user_id == "refuse":
            raise Refuse("no such user", status=404)

    # Celery's eager mode runs each attempt, and its retries, in the request.
    app = make_deferred_app(
        tmp_path, f"sqlite:///{tmp_path / 'n.db'}", flaky, eager=True, **METRICS_CONFIG
    )
    client = app.test_client()
    before = scrape(client)
    for user in ("once", "twice", "always", "refuse"):
        assert post_delivery(client, "purchase", purchase_payload(userId=user)).status_code == 202
    assert (runs.count("twice"), runs.count("always")) == (3, 3)  # two retries each
    changes = counted(before, scrape(client))
    assert changes["nachocode_handler_attempts_total"] == {
        ("purchase", "worker", "handled"): 2,
        ("purchase", "worker", "retry"): 4,
        ("purchase", "worker", "failed"): 1,
        ("purchase", "worker", "refused"): 1,
    }
    assert changes["nachocode_deliveries_total"] == {("purchase", "queued", "202"): 4}


def test_a_replay_is_an_attempt_of_its_own(make_app: Callable[..., Any]) -> None:
    built = make_app(**METRICS_CONFIG)
    broken = [True]

    @built.ext.on_purchase
    def grant(event: Any) -> None:
        if broken[0]:
            raise RuntimeError("grant API down")

    assert post_delivery(built.client, "purchase", purchase_payload()).status_code == 500
    before = scrape(built.client)
    broken[0] = False
    output = built.app.test_cli_runner().invoke(args=["nachocode", "replay", "--failed"]).output
    assert "handled" in output
    assert counted(before, scrape(built.client)) == {
        "nachocode_handler_attempts_total": {("purchase", "replay", "handled"): 1}
    }


def test_an_apps_own_registry_gets_the_counters_and_the_store_gauges(
    make_app: Callable[..., Any],
) -> None:
    registry = CollectorRegistry()
    built = make_app(NACHOCODE_METRICS=True, NACHOCODE_METRICS_REGISTRY=registry)
    built.ext.on_purchase(lambda event: None)
    registry.register(StoreCollector(built.app))
    assert post_delivery(built.client, "purchase", purchase_payload()).status_code == 200
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "nachocode_deliveries_total", outcome="handled") == 1
    assert value(samples, "nachocode_store_up") == 1
    assert ("nachocode_queued_deliveries", ()) in samples
    # The route is off unless asked for.
    assert built.client.get("/nachocode/metrics").status_code == 404


def test_multiprocess_mode_switched_on_too_late_stops_init_app(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import os
        import prometheus_client
        from flask import Flask
        from flask_nachocode import NachocodeWebhook

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        app = Flask("late", instance_path={str(tmp_path)!r})
        app.config["NACHOCODE_METRICS"] = True
        try:
            NachocodeWebhook(app)
        except RuntimeError as error:
            print(error)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "PROMETHEUS_MULTIPROC_DIR is set, but prometheus_client was imported before" in (
        done.stdout
    )


# --- The alert rules, under promtool (Debian's `prometheus` package) ---


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return promtool


def test_the_alert_rules_are_valid_and_fire_as_documented() -> None:
    promtool = _promtool()
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        cwd=ALERT_TESTS.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# --- A real Prometheus scraping gunicorn's 4 workers in multiprocess mode ---


@contextmanager
def prometheus(target: str, folder: Path) -> Iterator[str]:
    """A Prometheus server scraping ``target``'s {prefix}/metrics every half second;
    yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""
            global:
              scrape_interval: 500ms
            scrape_configs:
              - job_name: nachocode
                metrics_path: /nachocode/metrics
                authorization:
                  credentials: {METRICS_TOKEN}
                static_configs:
                  - targets: ["{target}"]
            """
        )
    )
    log = folder / "prometheus.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/-/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"Prometheus did not start:\n{log.read_text()}"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(base: str, promql: str) -> dict[tuple[str, ...], float]:
    """An instant query's result, by its label values in label-name order."""
    answer = requests.get(f"{base}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return {
        tuple(value for _, value in sorted(item["metric"].items())): float(item["value"][1])
        for item in answer["data"]["result"]
    }


@pytest.mark.integration
@pytest.mark.once
def test_prometheus_reads_from_four_gunicorn_workers_exactly_what_was_sent(
    tmp_path: Path, postgres_url: str
) -> None:
    # PostgreSQL: four deliveries are held in their handlers at once, which SQLite's
    # one writer would not allow.
    folder = tmp_path / "multiproc"
    folder.mkdir()
    marker = tmp_path / "hold"
    marker.touch()
    started = tmp_path / "started"
    started.mkdir()
    uri = postgres_url
    with serve(
        uri, 4, tmp_path, key=WEBHOOK_KEY, mode="own_engine", log_level="INFO",
        gunicorn_config=GUNICORN_CONF, environment={"PROMETHEUS_MULTIPROC_DIR": str(folder)},
        METRICS_TOKEN=METRICS_TOKEN, MARKER=str(marker), STARTED_DIR=str(started),
    ) as (base_url, port, log):  # fmt: skip
        url = f"{base_url}/nachocode/webhooks/purchase"

        def post(body: Any, key: str = WEBHOOK_KEY) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return requests.post(url, json=body, headers=headers, timeout=60).status_code

        # Four purchases held in their handlers at once: each holds a worker of its
        # own, so every worker has counted something by the end.
        held = [purchase_payload() for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(post, body) for body in held]
            deadline = time.monotonic() + 60
            while len(list(started.iterdir())) < 4:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert len({path.name.split("-")[0] for path in started.iterdir()}) == 4
            marker.unlink()
            assert [answer.result() for answer in answers] == [200] * 4
        unique = [purchase_payload() for _ in range(26)]
        sends = (
            [(body, WEBHOOK_KEY) for body in unique]
            + [(body, WEBHOOK_KEY) for body in unique[:10] + held]  # re-sent: duplicates
            + [(purchase_payload(), "wrong-key-from-the-dashboard")] * 7
            + [({"userId": 1}, WEBHOOK_KEY)] * 5
        )
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda sent: post(*sent), sends))
        assert statuses == [200] * 40 + [401] * 7 + [422] * 5
        # Three deliveries left queued (by a worker long gone): one value in the
        # store, however many processes serve the scrape.
        queue_up(uri, 3)

        with prometheus(f"127.0.0.1:{port}", tmp_path) as prom:
            # Prometheus started after the last answer: its first scrape has it all.
            deadline = time.monotonic() + 60
            while not query(prom, "nachocode_store_up == 1"):
                assert time.monotonic() < deadline, "Prometheus never scraped the app"
                time.sleep(0.2)
            deliveries = query(prom, "sum by (outcome, status) (nachocode_deliveries_total) > 0")
            refusals = query(prom, "sum by (reason) (nachocode_refusals_total) > 0")
            attempts = query(prom, "sum by (outcome) (nachocode_handler_attempts_total) > 0")
            durations = query(prom, "sum(nachocode_delivery_duration_seconds_count)")
            queued = query(prom, "count(nachocode_queued_deliveries)")
            queued_sum = query(prom, "sum(nachocode_queued_deliveries)")
    assert deliveries == {("handled", "200"): 30, ("duplicate", "200"): 14, ("invalid", "422"): 5}
    assert refusals == {("unauthorized",): 7, ("invalid_event",): 5}
    assert attempts == {("handled",): 30}
    assert durations == {(): 49}
    assert (queued, queued_sum) == ({(): 1}, {(): 3})
    workers = {path.stem.split("_")[-1] for path in folder.glob("counter_*.db")}
    assert len(workers) >= 4, workers


def queue_up(uri: str, count: int) -> None:
    """Store ``count`` queued deliveries, as a deferred app leaves them."""
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    deliveries = define_tables(sa.MetaData())[0]
    now = utcnow()
    row = {
        "event": "purchase", "route": "purchase", "outcome": "queued", "status": 202,
        "received_at": now, "finished_at": now, "duration_ms": 1.0, "replay_count": 0,
    }  # fmt: skip
    with engine.begin() as connection:
        connection.execute(sa.insert(deliveries), [row] * count)
    engine.dispose()


def test_threads_counting_at_once_lose_nothing(make_app: Callable[..., Any]) -> None:
    built = make_app(**METRICS_CONFIG)
    built.ext.on_purchase(lambda event: None)
    before = scrape(built.client)

    def send(_: int) -> int:
        return int(post_delivery(built.app.test_client(), "purchase", b"[]").status_code)

    threads = [threading.Thread(target=lambda: [send(i) for i in range(25)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counted(before, scrape(built.client))["nachocode_deliveries_total"] == {
        ("purchase", "invalid", "400"): 100
    }

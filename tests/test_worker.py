"""Deferred handling (``NACHOCODE_DEFERRED``): the worker's lifecycle in-process,
on Celery's own in-process modes (eager, and the memory broker that no worker
reads), then against real processes: gunicorn answers, a real Celery worker
handles, on SQLite, PostgreSQL and MySQL/MariaDB, with Redis as the broker (and
RabbitMQ once, to show nothing depends on Redis); and gunicorn against a broker
that is closed or hangs (Redis and RabbitMQ behind a silenced TCP proxy).

The real-process tests carry the ``integration`` marker and need
NACHOCODE_TEST_REDIS_URL (a Redis database; each test uses a queue of its own
and deletes only its keys, e.g. redis://127.0.0.1:6379/7) and, for the RabbitMQ run,
NACHOCODE_TEST_RABBITMQ_URL; they are skipped without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
import sqlalchemy as sa
from celery import Celery
from flask import Flask

from flask_nachocode import NachocodeWebhook, Refuse, delivery_failed, delivery_retry
from flask_nachocode.celery_queue import HANDLE_TASK
from flask_nachocode.testing import post_delivery, purchase_payload

from support.common import WEBHOOK_KEY, drop_queue
from support.deferred_in_process import make_deferred_app
from support.live import BIN, ROOT, free_port, gunicorn_args, live_server
from support.scrape import METRICS_TOKEN, counted, scrape
from support.tcp_proxy import TcpProxy

#: Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.every_database

REDIS_URL = os.environ.get("NACHOCODE_TEST_REDIS_URL")
RABBITMQ_URL = os.environ.get("NACHOCODE_TEST_RABBITMQ_URL")
#: Run in a process of its own, with the app's environment, before any server starts:
#: importing the app creates its tables (at import, as the README does).
CREATE_TABLES = "import support.deferred_app"
#: Seconds a test waits for the worker before it fails.
PATIENCE = 60.0


def identity_of(payload: dict[str, Any]) -> str:
    data = payload["data"]
    return f"purchase:{payload['os']}:{data.get('orderId') or data['transactionId']}"


class DeferredRun:
    """One test's deferred set-up: a database, a broker, a queue of its own, and
    the directory that steers the handler (see tests/apps/deferred_app.py)."""

    def __init__(self, database_url: str, broker_url: str, directory: Path) -> None:
        self.database_url = database_url
        self.broker_url = broker_url
        self.directory = directory
        self.queue = f"h17-{uuid.uuid4().hex[:12]}"
        self.env = {
            "PYTHONPATH": str(ROOT / "tests"),
            "DEFERRED_APP_DATABASE_URL": database_url,
            "DEFERRED_APP_BROKER_URL": broker_url,
            "DEFERRED_APP_QUEUE": self.queue,
            "DEFERRED_APP_DIR": str(directory),
            "DEFERRED_APP_RETRY_DELAYS": "0.3,0.3",
            "NACHOCODE_WEBHOOK_KEY": WEBHOOK_KEY,
        }
        self.workers: list[subprocess.Popen[bytes]] = []
        self.base_url = ""
        self._worker_logs = 0

    def file(self, name: str) -> Path:
        return self.directory / name

    def python(self, code: str) -> None:
        subprocess.run(
            [str(BIN / "python"), "-c", code], cwd=ROOT, env={**os.environ, **self.env}, check=True
        )

    def flask(self, *args: str, timeout: float = PATIENCE) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flask"), "--app", "support.deferred_app", "nachocode", *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @contextmanager
    def server(self, workers: int = 2) -> Iterator[str]:
        port = free_port()
        with live_server(
            gunicorn_args("support.deferred_app:app", port, workers=workers),
            port=port,
            env=self.env,
            log_path=self.directory / "gunicorn.log",
            ready_path="/nachocode/openapi.json",
        ) as base_url:
            self.base_url = base_url
            yield base_url

    def start_worker(self) -> subprocess.Popen[bytes]:
        """A Celery worker (prefork, two processes) in a process group of its own, so
        that a test can kill it whole; returns once it is ready."""
        self._worker_logs += 1
        log_path = self.directory / f"worker-{self._worker_logs}.log"
        command = [
            str(BIN / "celery"), "-A", "support.deferred_app:celery_app", "worker",
            "--pool", "prefork", "--concurrency", "2", "--queues", self.queue,
            "--hostname", f"{self.queue}-{self._worker_logs}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(process)
        wait_for(
            lambda: b" ready." in log_path.read_bytes(),
            what="the worker to start",
            log=log_path,
            process=process,
        )
        return process

    def worker_log(self) -> str:
        """What the last worker started has logged so far."""
        return (self.directory / f"worker-{self._worker_logs}.log").read_text(errors="replace")

    def send_task(self, *args: Any) -> str:
        """Send a ``flask_nachocode.handle`` task with ``args`` as another app (or a
        broken one) might; its task id."""
        sender = Celery("another_app", broker=self.broker_url)
        try:
            return str(sender.send_task(HANDLE_TASK, args, queue=self.queue).id)
        finally:
            sender.close()

    def stop_workers(self, sig: int = signal.SIGTERM) -> None:
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self.workers.clear()

    def post(self, payload: dict[str, Any], *, timeout: float = 30) -> requests.Response:
        return requests.post(
            f"{self.base_url}/nachocode/webhooks/purchase",
            data=json.dumps(payload),
            headers={"Authorization": f"Bearer {WEBHOOK_KEY}", "Content-Type": "application/json"},
            timeout=timeout,
        )

    def purchase_status(self, payload: dict[str, Any]) -> str:
        answer = requests.get(
            f"{self.base_url}/nachocode/purchases/{payload['iapLogId']}",
            params={"userId": payload["userId"]},
            timeout=10,
        )
        return str(answer.json()["status"])

    def query(self, sql: str) -> list[Any]:
        engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                return list(connection.execute(sa.text(sql)))
        finally:
            engine.dispose()

    def effects(self) -> list[str]:
        return [row[0] for row in self.query("SELECT identity FROM test_effects ORDER BY id")]

    def outcomes(self) -> list[str]:
        return [
            row[0] for row in self.query("SELECT outcome FROM nachocode_deliveries ORDER BY id")
        ]

    def attempts(self, delivery_id: int) -> list[Any]:
        return self.query(
            "SELECT attempt, outcome, error, next_attempt_at FROM nachocode_attempts "
            f"WHERE delivery_id = {int(delivery_id)} ORDER BY attempt"
        )

    def runs(self) -> list[str]:
        path = self.file("runs")
        return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []

    def wait_outcomes(self, expected: list[str]) -> None:
        wait_for(
            lambda: self.outcomes() == expected, what=f"outcomes {expected}", describe=self.outcomes
        )

    def handle_one(self, outcome: str) -> tuple[dict[str, Any], int]:
        """Start a worker, post a new purchase and wait for its ``outcome``: the
        purchase and its delivery id."""
        self.start_worker()
        purchase = purchase_payload()
        with self.server():
            delivery = int(self.post(purchase).json()["delivery"])
            self.wait_outcomes([outcome])
        return purchase, delivery


def wait_for(
    condition: Callable[[], bool],
    *,
    what: str,
    log: Path | None = None,
    process: subprocess.Popen[bytes] | None = None,
    describe: Callable[[], Any] | None = None,
) -> float:
    """Poll ``condition`` until it holds; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"exited while waiting for {what}:\n{log.read_text() if log else ''}"
            )
        if time.monotonic() - started > PATIENCE:
            seen = f" (now {describe()!r})" if describe else ""
            raise AssertionError(f"waited {PATIENCE} s for {what}{seen}")
        time.sleep(0.05)
    return time.monotonic() - started


# --- In-process: Celery eager (tasks run at once, retries without waiting) or a
# memory broker that no worker reads (deliveries stay queued) ---


def post_noting_signals(app: Flask) -> tuple[Any, list[Any], list[Any]]:
    """Post one purchase to a deferred app: the answer, and the keyword arguments of
    each ``delivery_failed`` and each ``delivery_retry`` sent meanwhile."""
    failed: list[Any] = []
    retried: list[Any] = []
    with delivery_failed.connected_to(lambda s, **kw: failed.append(kw), app), \
            delivery_retry.connected_to(lambda s, **kw: retried.append(kw), app):  # fmt: skip
        answer = post_delivery(app.test_client(), "purchase", purchase_payload())
    return answer, failed, retried


def rows_of(url: str, sql: str) -> list[Any]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.text(sql)))
    finally:
        engine.dispose()


def test_refuse_ends_a_deferred_delivery_as_refused_without_retries(
    tmp_path: Path, database_url: str
) -> None:
    def refuse(event: Any) -> None:
        raise Refuse("no such user", status=404, code="unknown_user")

    app = make_deferred_app(tmp_path, database_url, refuse, eager=True)
    answer, failed, retried = post_noting_signals(app)
    assert answer.status_code == 202
    [row] = rows_of(database_url, "SELECT id, outcome, status, error FROM nachocode_deliveries")
    # The status is what Nachocode was answered; the outcome, what the worker did.
    assert (row.outcome, row.status, row.error) == ("refused", 202, "no such user")
    shown = app.test_cli_runner().invoke(args=["nachocode", "show", str(row.id)]).output
    assert shown.startswith(
        f"delivery {row.id}: purchase on purchase, answered 202 (queued), then refused "
        "by the worker\n"
    )
    attempts = rows_of(database_url, "SELECT attempt, outcome FROM nachocode_attempts")
    assert [tuple(a) for a in attempts] == [(1, "refused")]
    assert rows_of(database_url, "SELECT identity FROM nachocode_claims") == []
    assert [kw["result"].outcome for kw in failed] == ["refused"]
    assert retried == []


def test_every_failed_attempt_is_signalled_and_the_last_fails_the_delivery(
    tmp_path: Path, database_url: str
) -> None:
    def broken(event: Any) -> None:
        raise RuntimeError("grant API down")

    app = make_deferred_app(tmp_path, database_url, broken, eager=True)
    answer, failed, retried = post_noting_signals(app)
    assert (answer.status_code, answer.get_json()["deferred"]) == (202, True)
    assert [(kw["attempt"], str(kw["error"])) for kw in retried] == [
        (1, "grant API down"),
        (2, "grant API down"),
    ]
    assert all(kw["next_attempt_at"] is not None for kw in retried)
    [failure] = failed
    assert (failure["result"].outcome, failure["result"].status) == ("failed", 500)
    [row] = rows_of(database_url, "SELECT outcome, error, traceback FROM nachocode_deliveries")
    assert row.outcome == "failed"
    assert row.error == "RuntimeError: grant API down"
    assert "raise RuntimeError" in row.traceback


def test_an_attempt_keeps_a_long_exception_whole(tmp_path: Path, database_url: str) -> None:
    # As the deliveries do: MySQL's TEXT stops at 64 KB, and an attempt that cannot be
    # recorded is never counted, so its delivery would be retried as "store
    # unavailable" for ever. About 130 KB of UTF-8, Korean included.
    message = "결제 서버 응답 없음 " * 5_000

    def broken(event: Any) -> None:
        raise RuntimeError(message)

    app = make_deferred_app(tmp_path, database_url, broken, eager=True)
    answer, failed, retried = post_noting_signals(app)
    assert answer.status_code == 202
    assert len(retried) == 2
    assert len(failed) == 1
    attempts = rows_of(database_url, "SELECT error FROM nachocode_attempts ORDER BY attempt")
    assert [row.error for row in attempts] == [f"RuntimeError: {message}"] * 3


def test_without_kept_bodies_the_body_is_kept_only_while_queued(
    tmp_path: Path, database_url: str
) -> None:
    app = make_deferred_app(
        tmp_path, database_url, lambda event: None, eager=False, NACHOCODE_KEEP_BODIES=False
    )
    post_delivery(app.test_client(), "purchase", purchase_payload())
    [queued] = rows_of(database_url, "SELECT outcome, body FROM nachocode_deliveries")
    assert queued.outcome == "queued"
    assert queued.body is not None
    result = app.test_cli_runner().invoke(args=["nachocode", "requeue", "--older-than", "0"])
    assert result.output.startswith("sent the tasks of 1 queued deliveries")
    # Sent to a broker no worker reads: run the attempt as the worker would.
    from flask_nachocode.state import current_state
    from flask_nachocode.worker import run_attempt

    with app.app_context():
        assert run_attempt(current_state(), 1, 1) is not None
        assert run_attempt(current_state(), 1, 1) is None  # the same task again: nothing
    [handled] = rows_of(database_url, "SELECT outcome, body FROM nachocode_deliveries")
    assert (handled.outcome, handled.body) == ("handled", None)


def test_queued_deliveries_are_never_pruned_and_run_by_requeue_once_deferral_is_off(
    tmp_path: Path, database_url: str
) -> None:
    effects: list[str] = []
    app = make_deferred_app(tmp_path, database_url, lambda e: effects.append("x"), eager=False)
    for _ in range(2):
        post_delivery(app.test_client(), "purchase", purchase_payload())
    cli = app.test_cli_runner()
    assert cli.invoke(args=["nachocode", "prune", "--older-than", "0"]).output.startswith(
        "deleted 0 deliveries"
    )
    listed = cli.invoke(args=["nachocode", "deliveries", "--status", "queued"]).output
    assert listed.count("queued") == 2

    synchronous = Flask("synchronous_again", instance_path=str(tmp_path / "instance"))
    synchronous.config.update(
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY, NACHOCODE_DATABASE_URI=database_url
    )
    NachocodeWebhook(synchronous).on_purchase(lambda e: effects.append("y"))
    runner = synchronous.test_cli_runner()
    too_old = runner.invoke(args=["nachocode", "requeue", "--older-than", str(10**12)])
    assert too_old.exit_code == 2
    assert "before the calendar's first year" in too_old.output
    waiting = runner.invoke(args=["nachocode", "requeue", "--older-than", "60"])
    assert waiting.output.startswith("ran 0 queued deliveries")
    ran = runner.invoke(args=["nachocode", "requeue"] + ["--older-than", "0"])
    assert ran.output.startswith("ran 2 queued deliveries")
    assert effects == ["y", "y"]
    outcomes = rows_of(database_url, "SELECT outcome FROM nachocode_deliveries ORDER BY id")
    assert [row.outcome for row in outcomes] == ["handled", "handled"]


@pytest.fixture(params=["redis"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _broker(request.param)


def _broker(kind: str) -> Iterator[str]:
    if kind == "redis":
        if not REDIS_URL:
            pytest.skip("NACHOCODE_TEST_REDIS_URL is not set; Celery worker tests skipped")
        yield REDIS_URL
    else:
        if not RABBITMQ_URL:
            pytest.skip("NACHOCODE_TEST_RABBITMQ_URL is not set; RabbitMQ test skipped")
        yield RABBITMQ_URL


@pytest.fixture
def deferred(database_url: str, broker_url: str, tmp_path: Path) -> Iterator[DeferredRun]:
    run = DeferredRun(database_url, broker_url, tmp_path)
    run.python(CREATE_TABLES)
    yield run
    run.stop_workers()
    drop_queue(broker_url, run.queue)


@pytest.mark.integration
def test_answered_202_at_once_then_handled_exactly_once(deferred: DeferredRun) -> None:
    deferred.start_worker()
    purchase = purchase_payload()
    with deferred.server():
        answer = deferred.post(purchase)
        assert answer.status_code == 202
        body = answer.json()
        assert body == {
            "success": True,
            "deferred": True,
            "event": "purchase",
            "delivery": body["delivery"],
            "duplicate": False,
        }
        deferred.wait_outcomes(["handled"])
        assert deferred.purchase_status(purchase) == "granted"
    assert deferred.effects() == [identity_of(purchase)]
    assert deferred.runs() == [identity_of(purchase)]
    [attempt] = deferred.attempts(body["delivery"])
    assert (attempt.attempt, attempt.outcome, attempt.next_attempt_at) == (1, "handled", None)


@pytest.mark.integration
def test_nothing_depends_on_redis(postgres_url: str, tmp_path: Path) -> None:
    """The same run on RabbitMQ, with a worker killed mid-handler: the broker gives
    the unacknowledged task back the moment the worker's connection drops."""
    for broker in _broker("rabbitmq"):
        run = DeferredRun(postgres_url, broker, tmp_path)
        run.python(CREATE_TABLES)
        try:
            _kill_mid_handler(run)
        finally:
            run.stop_workers()
            drop_queue(broker, run.queue)


@pytest.mark.integration
def test_ten_identical_deliveries_at_once_one_202_nine_duplicates_one_effect(
    deferred: DeferredRun,
) -> None:
    deferred.start_worker()
    purchase = purchase_payload()
    answers: list[requests.Response] = []
    with deferred.server():
        barrier = threading.Barrier(10)

        def send() -> None:
            barrier.wait()
            answers.append(deferred.post(purchase))

        threads = [threading.Thread(target=send) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted((a.status_code, a.json()["duplicate"]) for a in answers) == [
            (200, True)
        ] * 9 + [(202, False)]
        wait_for(lambda: "handled" in deferred.outcomes(), what="the purchase to be handled")
    assert sorted(deferred.outcomes()) == ["duplicate"] * 9 + ["handled"]
    assert deferred.effects() == [identity_of(purchase)]


@pytest.mark.integration
def test_a_handler_failing_twice_is_handled_on_the_third_attempt(deferred: DeferredRun) -> None:
    deferred.file("fail_times").write_text("2")
    purchase, delivery = deferred.handle_one("handled")
    attempts = deferred.attempts(delivery)
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "handled"),
    ]
    assert all("flaky grant API" in a.error for a in attempts[:2])
    assert all(a.next_attempt_at is not None for a in attempts[:2])
    assert deferred.runs() == [identity_of(purchase)] * 3
    assert deferred.effects() == [identity_of(purchase)]


@pytest.mark.integration
def test_the_prefork_workers_attempts_show_in_the_web_apps_scrape(
    deferred: DeferredRun, tmp_path: Path
) -> None:
    # The documented same-host set-up: the Celery worker writes its counters where
    # gunicorn's workers do, and any web worker's scrape adds up every process's.
    folder = tmp_path / "multiproc"
    folder.mkdir()
    deferred.env.update(
        PROMETHEUS_MULTIPROC_DIR=str(folder), DEFERRED_APP_METRICS_TOKEN=METRICS_TOKEN
    )
    deferred.file("fail_times").write_text("1")
    deferred.start_worker()
    with deferred.server() as base_url:
        before = scrape(base_url)
        for _ in range(4):
            assert deferred.post(purchase_payload()).status_code == 202
        deferred.wait_outcomes(["handled"] * 4)
        changes = counted(before, scrape(base_url))
    assert changes["nachocode_handler_attempts_total"] == {
        ("purchase", "worker", "retry"): 4,
        ("purchase", "worker", "handled"): 4,
    }
    assert changes["nachocode_deliveries_total"] == {("purchase", "queued", "202"): 4}


@pytest.mark.integration
def test_a_handler_that_always_fails_ends_failed_then_replays_once_fixed(
    deferred: DeferredRun,
) -> None:
    deferred.file("fail").touch()
    deferred.start_worker()
    purchase = purchase_payload()
    with deferred.server():
        delivery = deferred.post(purchase).json()["delivery"]
        deferred.wait_outcomes(["failed"])
        assert deferred.purchase_status(purchase) == "pending"
    attempts = deferred.attempts(delivery)
    # NACHOCODE_RETRY_DELAYS has two delays: the first attempt and two retries.
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
    ]
    assert attempts[-1].next_attempt_at is None
    assert deferred.effects() == []
    assert deferred.query("SELECT count(*) FROM nachocode_claims")[0][0] == 0
    shown = deferred.flask("show", str(delivery))
    assert "3. failed" in shown.stdout
    assert "the grant API is down" in shown.stdout

    deferred.file("fail").unlink()
    replayed = deferred.flask("replay", "--failed")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"delivery {delivery}: handled (200)" in replayed.stdout
    assert deferred.flask("replay", "--failed").stdout.strip() == "nothing to replay"
    assert deferred.effects() == [identity_of(purchase)]
    assert deferred.runs() == [identity_of(purchase)] * 4


def _kill_mid_handler(run: DeferredRun) -> dict[str, float]:
    run.file("block").touch()
    worker = run.start_worker()
    purchase = purchase_payload()
    with run.server():
        assert run.post(purchase).status_code == 202
        wait_for(run.file("started").exists, what="the handler to start")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        killed = time.monotonic()
        run.file("block").unlink()
        assert run.outcomes() == ["queued"]
        run.start_worker()
        redelivered = wait_for(
            lambda: run.outcomes() == ["handled"],
            what="the redelivered task",
            describe=run.outcomes,
        )
    figures = {
        "seconds from kill to handled": round(time.monotonic() - killed, 2),
        "seconds waiting after restart": round(redelivered, 2),
    }
    print(f"kill ({run.broker_url.split(':')[0]}): {figures}")
    assert run.runs() == [identity_of(purchase)] * 2
    assert run.effects() == [identity_of(purchase)]
    return figures


@pytest.mark.integration
def test_a_worker_killed_mid_handler_then_restarted_has_one_effect(deferred: DeferredRun) -> None:
    _kill_mid_handler(deferred)


@pytest.mark.integration
def test_without_a_worker_deliveries_stay_queued_until_one_starts(deferred: DeferredRun) -> None:
    # The worker starts with five deliveries waiting, its parent process having used
    # the database at import (deferred_app creates its tables there): each child of
    # the prefork pool must take them on connections of its own.
    purchases = [purchase_payload() for _ in range(5)]
    with deferred.server():
        answers = [deferred.post(purchase) for purchase in purchases]
        assert [answer.status_code for answer in answers] == [202] * 5
        assert deferred.outcomes() == ["queued"] * 5
        assert deferred.purchase_status(purchases[0]) == "pending"
        listed = deferred.flask("deliveries", "--status", "queued").stdout
        assert all(f"{answer.json()['delivery']:>6}  " in listed for answer in answers)
        deferred.start_worker()
        deferred.wait_outcomes(["handled"] * 5)
        assert deferred.purchase_status(purchases[0]) == "granted"
    assert sorted(deferred.effects()) == sorted(identity_of(p) for p in purchases)
    assert "Traceback" not in deferred.worker_log()


@pytest.mark.integration
def test_a_flushed_broker_loses_the_tasks_and_requeue_recovers_them(deferred: DeferredRun) -> None:
    import redis

    purchases = [purchase_payload() for _ in range(5)]
    with deferred.server():
        assert [deferred.post(p).status_code for p in purchases] == [202] * 5
        client = redis.Redis.from_url(deferred.broker_url)
        assert client.llen(deferred.queue) == 5
        client.close()
        drop_queue(deferred.broker_url, deferred.queue)  # Redis restarted without persistence
        deferred.start_worker()
        time.sleep(2)
        assert deferred.outcomes() == ["queued"] * 5  # the tasks are gone
        started = time.monotonic()
        requeued = deferred.flask("requeue", "--older-than", "0")
        assert requeued.returncode == 0, requeued.stderr
        assert requeued.stdout.startswith("sent the tasks of 5 queued deliveries")
        deferred.wait_outcomes(["handled"] * 5)
        print(f"flush: 5 lost tasks handled {time.monotonic() - started:.2f} s after requeue")
        # A second requeue finds nothing left to send.
        assert deferred.flask("requeue", "--older-than", "0").stdout.startswith(
            "sent the tasks of 0 queued deliveries"
        )
    assert sorted(deferred.effects()) == sorted(identity_of(p) for p in purchases)


# --- No stranded delivery (issue 21): a deferred delivery is handled, failed, or has a
# task on its way, whatever the broker, the database or the extension's own code does ---


@pytest.mark.integration
def test_an_error_in_the_extension_itself_is_retried_with_a_backoff(deferred: DeferredRun) -> None:
    """Not a handler's error, which counts an attempt, but flask-nachocode's own code
    raising before the attempt was made (as a connection shared across a fork made it):
    the task runs again after a growing delay, with the delivery's id in the log."""
    deferred.file("store_faults").write_text("2")
    purchase, delivery = deferred.handle_one("handled")
    log = deferred.worker_log()
    assert log.count(f"nachocode delivery {delivery}: attempt 1 not made") == 2
    assert "AttributeError: Could not locate column" in log
    # Celery's own log line for each retry: 0.2 s (the test app's first delay), doubled.
    assert re.findall(r"\] retry: Retry in ([\d.]+)s", log) == ["0.2", "0.4"]
    [attempt] = deferred.attempts(delivery)
    assert (attempt.attempt, attempt.outcome) == (1, "handled")
    assert deferred.runs() == [identity_of(purchase)]
    assert deferred.effects() == [identity_of(purchase)]


@pytest.mark.integration
def test_a_task_for_no_delivery_is_logged_once_and_dropped(deferred: DeferredRun) -> None:
    """A task whose delivery does not exist (pruned, or sent by an app on another
    database sharing the broker) or whose id no delivery can have: one log line,
    then the task ends instead of being retried for ever."""
    deferred.start_worker()
    ids: list[Any] = [10**6, 2**63, "12"]
    tasks = {deferred.send_task(delivery_id, 1): delivery_id for delivery_id in ids}

    def ended(log: str, task: str) -> bool:
        return any(f"[{task}] {end}" in log for end in ("succeeded", "retry:", "raised"))

    wait_for(
        lambda: all(ended(deferred.worker_log(), task) for task in tasks),
        what="every task to end",
        describe=deferred.worker_log,
    )
    log = deferred.worker_log()
    assert [f"[{task}] succeeded" in log for task in tasks] == [True] * len(ids)
    assert "retry:" not in log
    assert log.count("nachocode: dropped the task of delivery 1000000 (attempt 1)") == 1
    for wrong in ids[1:]:
        assert log.count(f"nachocode: dropped a task for delivery {wrong!r}") == 1
    assert deferred.outcomes() == []


def test_a_resent_copy_of_a_queued_delivery_whose_answer_was_lost_sends_its_task(
    tmp_path: Path, database_url: str
) -> None:
    """The request's COMMIT reached the database but its answer did not: the request
    is answered 503 before it sends the task. Nachocode's re-send from the dashboard
    is a duplicate, and it sends the task that the first request never sent."""
    effects: list[str] = []
    app = make_deferred_app(
        tmp_path, database_url, lambda event: effects.append(event.identity), eager=True
    )
    with app.app_context():
        store = app.extensions["nachocode"].store
        store.ensure_ready()  # its tables created (and committed) before the fault
        engine = store.engine
    lost: list[bool] = []

    def commit_then_lose_the_answer(connection: sa.Connection) -> None:
        if not lost:
            lost.append(True)
            connection.connection.dbapi_connection.commit()  # type: ignore[union-attr]
            raise sa.exc.OperationalError("COMMIT", {}, ConnectionResetError("answer lost"))

    purchase = purchase_payload()
    client = app.test_client()
    sa.event.listen(engine, "commit", commit_then_lose_the_answer)
    try:
        first = post_delivery(client, "purchase", purchase)
    finally:
        sa.event.remove(engine, "commit", commit_then_lose_the_answer)
    assert first.status_code == 503
    assert [row.outcome for row in rows_of(database_url, DELIVERIES)] == ["queued"]
    assert effects == []

    resent = post_delivery(client, "purchase", purchase)
    assert (resent.status_code, resent.get_json()["duplicate"]) == (200, True)
    assert [row.outcome for row in rows_of(database_url, DELIVERIES)] == ["handled", "duplicate"]
    assert effects == [identity_of(purchase)]
    # Once it is handled, a copy sends nothing: the handler ran once.
    post_delivery(client, "purchase", purchase)
    assert effects == [identity_of(purchase)]


def test_a_database_made_before_the_queued_index_keeps_working(
    tmp_path: Path, database_url: str
) -> None:
    """The index only makes the queued reads cheap: without it (a database made by an
    older version, not migrated yet) a deferred delivery, its duplicate and requeue
    work as before."""
    effects: list[str] = []
    app = make_deferred_app(
        tmp_path, database_url, lambda event: effects.append(event.identity), eager=False
    )
    client = app.test_client()
    first = purchase_payload()
    assert post_delivery(client, "purchase", first).status_code == 202
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        on_table = " ON nachocode_deliveries" if engine.dialect.name == "mysql" else ""
        connection.exec_driver_sql(f"DROP INDEX ix_nachocode_deliveries_queued{on_table}")
    engine.dispose()
    assert post_delivery(client, "purchase", first).get_json()["duplicate"] is True
    assert post_delivery(client, "purchase", purchase_payload()).status_code == 202
    requeued = app.test_cli_runner().invoke(args=["nachocode", "requeue", "--older-than", "0"])
    assert requeued.output.startswith("sent the tasks of 2 queued deliveries"), requeued.output
    assert [row.outcome for row in rows_of(database_url, DELIVERIES)] == [
        "queued",
        "duplicate",
        "queued",
    ]
    # And init-db gives it the index, as the deferral page says.
    upgraded = app.test_cli_runner().invoke(args=["nachocode", "init-db"])
    assert "created index ix_nachocode_deliveries_queued" in upgraded.output, upgraded.output
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    indexes = {index["name"] for index in sa.inspect(engine).get_indexes("nachocode_deliveries")}
    engine.dispose()
    assert "ix_nachocode_deliveries_queued" in indexes


#: Each delivery's outcome, oldest first.
DELIVERIES = "SELECT outcome FROM nachocode_deliveries ORDER BY id"


@pytest.mark.parametrize(
    ("broker", "config", "limits", "warned"),
    [
        (
            "redis://127.0.0.1:1/0",
            {},
            {"socket_connect_timeout": 1.0, "socket_timeout": 1.0},
            False,
        ),
        (
            "redis://127.0.0.1:1/0",
            {"broker_transport_options": {"socket_timeout": 30, "visibility_timeout": 9}},
            {"socket_connect_timeout": 1.0, "socket_timeout": 30, "visibility_timeout": 9},
            True,
        ),
        ("amqp://127.0.0.1:1//", {}, {"broker_connection_timeout": 1.0}, False),
        (
            "amqp://127.0.0.1:1//",
            {"broker_connection_timeout": 2.5},
            {"broker_connection_timeout": 2.5},
            True,
        ),
    ],
    ids=["redis", "redis-own-timeout", "rabbitmq", "rabbitmq-own-timeout"],
)
def test_the_broker_limits_are_set_only_where_the_app_set_none(
    tmp_path: Path,
    broker: str,
    config: dict[str, Any],
    limits: dict[str, Any],
    warned: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where the app's Celery config sets none, one try to reach the broker is limited
    to 1 s; what it set is kept, with a warning when it lets a send pass 5 s."""
    app = Flask("broker_limits", instance_path=str(tmp_path))
    app.config.update(
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
        NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / 'nachocode.db'}",
        NACHOCODE_DEFERRED=True,
    )
    celery = Celery("broker_limits")
    celery.config_from_object({"broker_url": broker, **config})  # as Flask's pattern does
    app.extensions["celery"] = celery
    with caplog.at_level("WARNING", logger="flask_nachocode"):
        NachocodeWebhook(app)
    if broker.startswith("redis"):
        assert celery.conf.broker_transport_options == limits
    else:
        assert {"broker_connection_timeout": celery.conf.broker_connection_timeout} == limits
    assert ("lets one try to reach the broker take" in caplog.text) is warned


#: Longer than any answer may take: Nachocode counts an answer after 10 s as failed.
ANSWER_TIMEOUT = 7.0
BROKEN_BROKERS = [
    f"{broker}-{case}"
    for broker in ("redis", "rabbitmq")
    for case in ("closed", "silent", "silent-after-connecting")
]


@pytest.mark.integration
@pytest.mark.parametrize("broken", BROKEN_BROKERS)
def test_a_broken_broker_never_holds_the_answer_or_requeue(broken: str, tmp_path: Path) -> None:
    """Closed: nothing listens. Silent: a listener that accepts and never answers.
    Silent after connecting: the broker took the app's first task, then answers
    nothing more. Every answer is still a 202 well inside Nachocode's 10 s, the
    delivery stays queued with a log line saying so, and ``requeue`` gives up as
    quickly, with a one-line error."""
    broker, _, case = broken.partition("-")
    for real_url in _broker(broker):
        real = urlsplit(real_url)
        with contextlib.ExitStack() as stack:
            if case == "closed":
                proxy, port = None, free_port()
            else:
                proxy = stack.enter_context(TcpProxy(real.hostname or "", real.port or 0))
                port = proxy.port
                if case == "silent":
                    proxy.silence()
            credentials = real.netloc.rpartition("@")[0]
            broken_url = urlunsplit(real._replace(netloc=f"{credentials}@127.0.0.1:{port}"))
            run = DeferredRun(f"sqlite:///{tmp_path / 'app.db'}", broken_url, tmp_path)
            run.python(CREATE_TABLES)
            stack.callback(drop_queue, real_url, run.queue)
            before: list[str] = []
            with run.server(workers=1):
                if proxy is not None and case == "silent-after-connecting":
                    assert run.post(purchase_payload()).status_code == 202  # connected, sent
                    proxy.silence()
                    before = ["queued"]
                answer = run.post(purchase_payload(), timeout=ANSWER_TIMEOUT)
            assert answer.status_code == 202
            assert run.outcomes() == [*before, "queued"]
            if (broker, case) != ("rabbitmq", "silent-after-connecting"):
                # RabbitMQ does not confirm a publish: one written into a connection
                # that answers no more cannot be told from one that arrived.
                delivery = answer.json()["delivery"]
                log = run.file("gunicorn.log").read_text()
                assert f"nachocode delivery {delivery} is queued but its task" in log
            requeued = run.flask("requeue", "--older-than", "0", timeout=ANSWER_TIMEOUT * 2)
            assert requeued.returncode == 1, requeued.stdout + requeued.stderr
            assert "Traceback" not in requeued.stderr
            assert "could not be sent" in requeued.stderr
            assert run.outcomes() == [*before, "queued"]

"""Deferred handling (``NACHOCODE_DEFERRED``): the worker's lifecycle in-process,
on Celery's own in-process modes (eager, and the memory broker that no worker
reads), then against real processes: gunicorn answers, a real Celery worker
handles, on SQLite and PostgreSQL, with Redis as the broker (and RabbitMQ once,
to show nothing depends on Redis).

The real-process tests carry the ``integration`` marker and need
NACHOCODE_TEST_REDIS_URL (a Redis database; each test uses a queue of its own
and deletes only its keys, e.g. redis://127.0.0.1:6379/7) and, for the RabbitMQ run,
NACHOCODE_TEST_RABBITMQ_URL; they are skipped without them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from celery import Celery
from flask import Flask

from flask_nachocode import NachocodeWebhook, Refuse, delivery_failed, delivery_retry
from flask_nachocode.testing import post_delivery, purchase_payload

from support.common import WEBHOOK_KEY, drop_queue
from support.live import BIN, ROOT, free_port, gunicorn_args, live_server

#: Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.every_database

REDIS_URL = os.environ.get("NACHOCODE_TEST_REDIS_URL")
RABBITMQ_URL = os.environ.get("NACHOCODE_TEST_RABBITMQ_URL")
#: Run in a process of its own, with the app's environment.
CREATE_TABLES = "from support.deferred_app import app, db\nwith app.app_context(): db.create_all()"
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

    def flask(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flask"), "--app", "support.deferred_app", "nachocode", *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=PATIENCE,
        )

    @contextmanager
    def server(self) -> Iterator[str]:
        port = free_port()
        with live_server(
            gunicorn_args("support.deferred_app:app", port, workers=2),
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

    def post(self, payload: dict[str, Any]) -> requests.Response:
        return requests.post(
            f"{self.base_url}/nachocode/webhooks/purchase",
            data=json.dumps(payload),
            headers={"Authorization": f"Bearer {WEBHOOK_KEY}", "Content-Type": "application/json"},
            timeout=30,
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


def make_deferred_app(
    tmp_path: Path, url: str, handler: Callable[[Any], None], *, eager: bool, **config: Any
) -> Flask:
    app = Flask("deferred_in_process", instance_path=str(tmp_path / "instance"))
    app.config.update(
        TESTING=True,
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
        NACHOCODE_DATABASE_URI=url,
        NACHOCODE_DEFERRED=True,
        NACHOCODE_RETRY_DELAYS=[0, 0],
        **config,
    )
    app.extensions["celery"] = Celery(
        "deferred_in_process", broker="memory://", task_always_eager=eager
    )
    NachocodeWebhook(app).on_purchase(handler)
    return app


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
    assert (row.outcome, row.status, row.error) == ("refused", 404, "no such user")
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
    deferred.start_worker()
    purchase = purchase_payload()
    with deferred.server():
        delivery = deferred.post(purchase).json()["delivery"]
        deferred.wait_outcomes(["handled"])
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
    purchases = [purchase_payload() for _ in range(3)]
    with deferred.server():
        answers = [deferred.post(purchase) for purchase in purchases]
        assert [answer.status_code for answer in answers] == [202] * 3
        assert deferred.outcomes() == ["queued"] * 3
        assert deferred.purchase_status(purchases[0]) == "pending"
        listed = deferred.flask("deliveries", "--status", "queued").stdout
        assert all(f"{answer.json()['delivery']:>6}  " in listed for answer in answers)
        deferred.start_worker()
        deferred.wait_outcomes(["handled"] * 3)
        assert deferred.purchase_status(purchases[0]) == "granted"
    assert sorted(deferred.effects()) == sorted(identity_of(p) for p in purchases)


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

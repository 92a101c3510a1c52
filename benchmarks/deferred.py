"""Answer latency with deferral (``NACHOCODE_DEFERRED``) against without, on PostgreSQL.

    NACHOCODE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/throwaway \\
    NACHOCODE_TEST_REDIS_URL=redis://127.0.0.1:6379/15 \\
        .venv/bin/python benchmarks/deferred.py [--rounds 3] [--requests 100]

Two gunicorn servers of the same app (2 sync workers, ``db=`` on PostgreSQL, a purchase
handler that writes one row through ``db.session`` after sleeping ``--handler-ms``):
one synchronous, one deferred with a real Celery worker (prefork, 2 processes) on Redis.
Nachocode sends one delivery at a time, so each round posts ``--requests`` new purchases
one after the other on one connection, to each server in turn (the baseline in the same
run), for a handler of 0 ms and one of ``--slow-ms`` (a slow grant API), and once more to the
deferred server with its worker stopped (SIGSTOP), which isolates the request's own cost
from the worker competing for the CPUs. It prints the
answer's p50 and p99, and for the deferred server the time from receiving a delivery to
the worker's commit (``finished_at - received_at`` of the stored delivery).

The database's tables are dropped and the Redis database is flushed: use throwaway ones.
Not part of the test run; timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import sqlalchemy as sa  # noqa: E402
from flask import Flask  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402

from flask_nachocode import NachocodeWebhook  # noqa: E402
from flask_nachocode.testing import purchase_payload  # noqa: E402

KEY = "bench-key-5b1e"
PATH = "/nachocode/webhooks/purchase"


def create_app() -> Flask:
    """The benchmarked app; ``BENCH_DEFERRED=1`` switches deferral on."""
    from celery import Celery

    db = SQLAlchemy()
    effects = sa.Table(
        "bench_effects",
        db.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("identity", sa.String(512), nullable=False),
    )
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ["BENCH_DATABASE_URL"],
        NACHOCODE_WEBHOOK_KEY=KEY,
        NACHOCODE_DEFERRED=os.environ.get("BENCH_DEFERRED") == "1",
    )
    db.init_app(app)
    if app.config["NACHOCODE_DEFERRED"]:
        app.extensions["celery"] = Celery(
            "bench",
            broker=os.environ["BENCH_BROKER_URL"],
            task_default_queue=os.environ["BENCH_QUEUE"],
            task_ignore_result=True,
            worker_prefetch_multiplier=1,
        )
    nachocode = NachocodeWebhook(app, db=db)
    pause = float(os.environ.get("BENCH_HANDLER_MS", "0")) / 1000

    @nachocode.on_purchase
    def grant(event: Any) -> None:
        if pause:
            time.sleep(pause)
        db.session.execute(sa.insert(effects).values(identity=event.identity))

    app.extensions["bench_db"] = db
    return app


if os.environ.get("BENCH_CELERY_WORKER") == "1":
    celery_app = create_app().extensions["celery"]


def post_sequentially(port: int, count: int, ids: list[int] | None = None) -> list[float]:
    """Post ``count`` new purchases one after the other on one connection; seconds each.
    The stored deliveries' ids are appended to ``ids``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    seconds = []
    for _ in range(count):
        body = json.dumps(purchase_payload())
        started = time.perf_counter()
        connection.request("POST", PATH, body=body, headers=headers)
        answer = connection.getresponse()
        content = answer.read()
        seconds.append(time.perf_counter() - started)
        if ids is not None:
            ids.append(int(json.loads(content)["delivery"]))
        if answer.status not in (200, 202):
            raise RuntimeError(f"answered {answer.status}")
    connection.close()
    return seconds


def wait_until_handled(engine: sa.Engine, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            queued = connection.exec_driver_sql(
                "SELECT count(*) FROM nachocode_deliveries WHERE outcome = 'queued'"
            ).scalar_one()
        if not queued:
            return
        time.sleep(0.2)
    raise RuntimeError("the worker did not handle every delivery in time")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default=os.environ.get("NACHOCODE_TEST_POSTGRES_URL"))
    parser.add_argument("--redis", default=os.environ.get("NACHOCODE_TEST_REDIS_URL"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--slow-ms", type=float, default=200.0)
    args = parser.parse_args()
    if not args.postgres or not args.redis:
        sys.exit("needs a PostgreSQL URL and a Redis URL (see the docstring)")

    from redis import Redis

    from support.live import BIN, free_port, gunicorn_args, live_server

    Redis.from_url(args.redis).flushdb()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="nachocode-deferred-bench-"))
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    for handler_ms in (0.0, args.slow_ms):
        env = {
            "BENCH_DATABASE_URL": args.postgres,
            "BENCH_BROKER_URL": args.redis,
            "BENCH_QUEUE": queue,
            "BENCH_HANDLER_MS": str(handler_ms),
            "PYTHONPATH": str(ROOT),
        }
        os.environ.update(env)
        engine = sa.create_engine(args.postgres)
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
        app = create_app()
        with app.app_context():
            app.extensions["bench_db"].create_all()
        count = args.requests if handler_ms == 0 else max(10, args.requests // 4)
        answers: dict[str, list[float]] = {"synchronous": [], "deferred": [], "paused": []}
        deferred_ids: list[int] = []
        worker_log = open(workdir / f"worker-{handler_ms:g}.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [str(BIN / "celery"), "-A", "benchmarks.deferred:celery_app", "worker",
             "--pool", "prefork", "--concurrency", "2", "--queues", queue, "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env={**os.environ, **env, "BENCH_DEFERRED": "1", "BENCH_CELERY_WORKER": "1"},
            stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        ports = {"synchronous": free_port(), "deferred": free_port()}
        try:
            with (
                live_server(
                    gunicorn_args("benchmarks.deferred:create_app()", ports["synchronous"], 2),
                    port=ports["synchronous"],
                    env={**env, "BENCH_DEFERRED": "0"},
                    log_path=workdir / "sync.log",
                ),
                live_server(
                    gunicorn_args("benchmarks.deferred:create_app()", ports["deferred"], 2),
                    port=ports["deferred"],
                    env={**env, "BENCH_DEFERRED": "1"},
                    log_path=workdir / "deferred.log",
                ),
            ):
                for port in ports.values():  # warm up
                    post_sequentially(port, 5)
                for _ in range(args.rounds):
                    for name, port in ports.items():
                        answers[name] += post_sequentially(
                            port, count, deferred_ids if name == "deferred" else None
                        )
                    # The request's own cost, without the worker competing for the CPUs.
                    os.killpg(worker.pid, signal.SIGSTOP)
                    try:
                        answers["paused"] += post_sequentially(ports["deferred"], count)
                    finally:
                        os.killpg(worker.pid, signal.SIGCONT)
                    # The next round's deliveries must not queue behind this backlog.
                    wait_until_handled(engine)
                with engine.connect() as connection:
                    # Those of the rounds with the worker running (not paused).
                    handled_after = [
                        float(row[0])
                        for row in connection.execute(
                            sa.text(
                                "SELECT EXTRACT(EPOCH FROM finished_at - received_at) "
                                "FROM nachocode_deliveries WHERE id = ANY(:ids)"
                            ),
                            {"ids": deferred_ids},
                        )
                    ]
                    effects = connection.exec_driver_sql(
                        "SELECT count(*), count(DISTINCT identity) FROM bench_effects"
                    ).one()
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
            worker_log.close()
            engine.dispose()
        print(f"\nhandler {handler_ms:g} ms, {args.rounds} rounds of {count} sequential purchases")
        print(
            f"{'':12} {'answer p50':>11} {'answer p99':>11} {'handled p50':>12} {'handled p99':>12}"
        )
        print("(paused: deferred with its worker stopped, so that only the request runs)")
        for name, seconds in answers.items():
            ms = [value * 1000 for value in seconds]
            handled = (
                f"{statistics.median(handled_after) * 1000:>9.1f} ms "
                f"{percentile([float(v) for v in handled_after], 0.99) * 1000:>9.1f} ms"
                if name == "deferred" and handled_after
                else f"{'(= answer)' if name == 'synchronous' else '':>12} {'':>12}"
            )
            print(
                f"{name:12} {statistics.median(ms):>8.1f} ms {percentile(ms, 0.99):>8.1f} ms "
                f"{handled}"
            )
        print(f"effects: {effects[0]} rows for {effects[1]} purchases (each exactly once)")
    Redis.from_url(args.redis).flushdb()
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

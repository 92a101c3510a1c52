"""How long a deferred delivery's answer, and ``flask nachocode requeue``, take when the
broker is broken: Redis and RabbitMQ, closed (nothing listening), silent (a listener
that accepts and never answers) and silent after connecting (a broker that stops
answering once the app holds a connection to it).

    NACHOCODE_TEST_REDIS_URL=redis://127.0.0.1:6379/15 \\
    NACHOCODE_TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672// \\
        .venv/bin/python benchmarks/broker_outage.py [--deliveries 3] [--only redis-silent]

Each case serves ``tests/support/deferred_app.py`` (``db=`` on a fresh SQLite file) with
gunicorn, one sync worker and gunicorn's default ``--timeout 30``, and reaches the broker
through a TCP proxy (``tests/support/tcp_proxy.py``) that the case silences, or through a
port nothing listens on. It posts purchases one after the other and prints each answer's
status and seconds, and how many log lines say that a task could not be sent; then it runs
``flask nachocode requeue --older-than 0`` against the same broker, and once more with the
broker working (what starting the app costs), and prints what each said and its seconds.
Nachocode counts an answer slower than 10 s as failed.

Tasks that reach the broker go to a queue of their own, deleted afterwards. Not part of
the test run; the figures depend on the library versions more than on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402

from flask_nachocode.testing import purchase_payload  # noqa: E402

from support.common import WEBHOOK_KEY  # noqa: E402
from support.live import BIN, free_port, live_server  # noqa: E402
from support.tcp_proxy import TcpProxy  # noqa: E402

CASES = ("closed", "silent", "silent-after-connecting")
#: What the request path logs when a task cannot be sent.
NOT_SENT = "could not be sent"
CREATE_TABLES = "from support.deferred_app import app, db\nwith app.app_context(): db.create_all()"


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port``."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def post(base_url: str) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        answer = requests.post(
            f"{base_url}/nachocode/webhooks/purchase",
            data=json.dumps(purchase_payload()),
            headers={"Authorization": f"Bearer {WEBHOOK_KEY}", "Content-Type": "application/json"},
            timeout=45,
        )
        kind = (
            "json"
            if answer.headers.get("Content-Type", "").startswith("application/json")
            else "html"
        )
        outcome = f"{answer.status_code} {kind}"
    except requests.RequestException as error:
        outcome = type(error).__name__
    return outcome, time.perf_counter() - started


def run_case(broker: str, real_url: str, case: str, deliveries: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"nachocode-broker-{broker}-{case}-"))
    queue = f"bench-outage-{uuid.uuid4().hex[:8]}"
    real = urlsplit(real_url)
    with ExitStack() as stack:
        if case == "closed":
            broker_url = through(real_url, free_port())
            proxy = None
        else:
            proxy = stack.enter_context(TcpProxy(real.hostname or "127.0.0.1", real.port or 0))
            broker_url = through(real_url, proxy.port)
            if case == "silent":
                proxy.silence()
        env = {
            # This checkout's package, whichever one is installed.
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            "DEFERRED_APP_DATABASE_URL": f"sqlite:///{workdir / 'app.db'}",
            "DEFERRED_APP_BROKER_URL": broker_url,
            "DEFERRED_APP_QUEUE": queue,
            "DEFERRED_APP_DIR": str(workdir),
            "NACHOCODE_WEBHOOK_KEY": WEBHOOK_KEY,
        }
        full_env = {**os.environ, **env}
        real_env = {"DEFERRED_APP_BROKER_URL": real_url}
        subprocess.run([str(BIN / "python"), "-c", CREATE_TABLES], env=full_env, check=True)
        port = free_port()
        log_path = workdir / "gunicorn.log"
        gunicorn = [
            str(BIN / "gunicorn"), "--workers", "1", "--bind", f"127.0.0.1:{port}",
            "--timeout", "30", "support.deferred_app:app",
        ]  # fmt: skip
        answers = []
        with live_server(
            gunicorn, port=port, env=env, log_path=log_path, ready_path="/nachocode/openapi.json"
        ) as base_url:
            if case == "silent-after-connecting":
                assert proxy is not None
                first, seconds = post(base_url)  # the worker connects and sends
                print(f"  before silence: {first} in {seconds:.2f} s")
                proxy.silence()
            for _ in range(deliveries):
                answers.append(post(base_url))
        logged = log_path.read_text(errors="replace").count(NOT_SENT)
        for outcome, seconds in answers:
            print(f"  answer: {outcome} in {seconds:.2f} s")
        print(f"  log lines saying a task could not be sent: {logged}")
        queued = deliveries + (case == "silent-after-connecting")
        print(f"  requeue of {queued}, broken broker: {requeue(full_env)}")
        # The same command with the broker working: what starting the app costs.
        print(f"  requeue of {queued}, broker working: {requeue({**full_env, **real_env})}")
    _delete_queue(real_url, queue)


def requeue(env: dict[str, str]) -> str:
    """Run ``flask nachocode requeue --older-than 0``: what it said, and its seconds."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [str(BIN / "flask"), "--app", "support.deferred_app", "nachocode", "requeue",
             "--older-than", "0"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "killed after 120 s"
    said = (done.stderr.strip().splitlines() or done.stdout.splitlines() or [""])[-1]
    return f"exit {done.returncode} in {time.perf_counter() - started:.2f} s: {said[:150]}"


def _delete_queue(url: str, queue: str) -> None:
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        for key in client.scan_iter(f"*{queue}*"):  # the queue and kombu's bindings of it
            client.delete(key)
        client.close()
    else:
        from kombu import Connection

        with Connection(url, connect_timeout=5) as connection:
            try:
                connection.default_channel.queue_delete(queue)
            except Exception:  # never declared: nothing reached the broker
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default=os.environ.get("NACHOCODE_TEST_REDIS_URL"))
    parser.add_argument("--rabbitmq", default=os.environ.get("NACHOCODE_TEST_RABBITMQ_URL"))
    parser.add_argument("--deliveries", type=int, default=2, help="posts per case")
    parser.add_argument("--only", action="append", help="e.g. redis-silent (repeatable)")
    args = parser.parse_args()
    brokers = {"redis": args.redis, "rabbitmq": args.rabbitmq}
    print(f"load average: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    for broker, url in brokers.items():
        if not url:
            print(f"{broker}: no URL, skipped")
            continue
        for case in CASES:
            if args.only and f"{broker}-{case}" not in args.only:
                continue
            print(f"{broker}, {case}:")
            run_case(broker, url, case, args.deliveries)


if __name__ == "__main__":
    main()

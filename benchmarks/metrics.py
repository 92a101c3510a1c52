"""What NACHOCODE_METRICS costs a delivery, three ways:

1. the counting alone: the view's wrapper and its counters around a receive that
   does nothing, against the bare receive, in µs of CPU per delivery;
2. the whole request path (Flask's test client, the real store on SQLite or
   PostgreSQL, a no-op handler) for two apps in one process, one counting and one not,
   alternating round by round so that noise from other work hits both alike;
3. with ``--deliveries N --app on|off``, N deliveries of one app and nothing else, for
   ``valgrind --tool=callgrind``, whose instruction counts do not depend on the load:
   run it for N and for 0 deliveries, on and off, with ``PYTHONHASHSEED=0``, and
   compare the differences (``benchmarks/README.md`` has the commands).

    .venv/bin/python benchmarks/metrics.py                      # SQLite files
    .venv/bin/python benchmarks/metrics.py --postgres URL       # a throwaway database
    .venv/bin/python benchmarks/metrics.py --multiprocess       # counters in files, as under gunicorn

Given B's and C's CPU per delivery from a run.py table (``--b-cpu``, ``--c-cpu``), it
also says how far counting moves C/B. Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="deliveries per round and app")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--postgres", help="PostgreSQL URL of a throwaway database")
    parser.add_argument("--multiprocess", action="store_true",
                        help="prometheus_client's multiprocess mode (a temporary directory)")
    parser.add_argument("--deliveries", type=int, help="only post this many (for callgrind)")
    parser.add_argument("--app", choices=["on", "off"], default="on", help="with --deliveries")
    parser.add_argument("--b-cpu", type=float, help="B's CPU µs per delivery, from run.py")
    parser.add_argument("--c-cpu", type=float, help="C's CPU µs per delivery, from run.py")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="nachocode-metrics-bench-"))
    if args.multiprocess:
        # Before prometheus_client is imported: it chooses its mode then.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(workdir)

    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from flask_nachocode import NachocodeWebhook
    from flask_nachocode.testing import post_delivery, purchase_payload

    def build(metrics: bool) -> Any:
        name = "on" if metrics else "off"
        app = Flask(f"bench_metrics_{name}")
        url = args.postgres or f"sqlite:///{workdir / f'{name}.db'}"
        app.config.update(
            SQLALCHEMY_DATABASE_URI=url,
            NACHOCODE_WEBHOOK_KEY="bench-key-5b1e",
            NACHOCODE_METRICS=metrics,
        )
        db = SQLAlchemy(app)
        NachocodeWebhook(app, db=db).on_purchase(lambda event: None)
        with app.app_context():
            # On PostgreSQL both apps share the tables (made fresh once): every
            # purchase is unique, so neither is in the other's way.
            if not metrics:
                db.drop_all()
            db.create_all()
        return app.test_client()

    if args.deliveries is not None:
        import random

        from flask_nachocode import testing

        # The same bodies every run (with PYTHONHASHSEED=0, the same dicts too), so that
        # instruction counts compare exactly.
        testing._random = random.Random(1)  # type: ignore[assignment]
        client = build(args.app == "on")
        for _ in range(args.deliveries):
            assert post_delivery(client, "purchase", purchase_payload()).status_code == 200
        return 0
    alone = counting_alone()
    print(f"the counting alone: {alone:.1f} µs per delivery")
    clients = {"off": build(False), "on": build(True)}
    for client in clients.values():  # warm up: imports, connections, statement caches
        for _ in range(50):
            assert post_delivery(client, "purchase", purchase_payload()).status_code == 200
    timings: dict[str, list[float]] = {"off": [], "on": []}
    for round_number in range(args.rounds):
        order = ("off", "on") if round_number % 2 == 0 else ("on", "off")
        for name in order:
            bodies = [purchase_payload() for _ in range(args.count)]
            client = clients[name]
            started = time.process_time()
            for body in bodies:
                post_delivery(client, "purchase", body)
            timings[name].append((time.process_time() - started) / args.count * 1e6)
        print(
            f"round {round_number + 1}: off {timings['off'][-1]:.0f} µs, "
            f"on {timings['on'][-1]:.0f} µs",
            flush=True,
        )
    off, on = (statistics.median(timings[name]) for name in ("off", "on"))
    mode = "multiprocess" if args.multiprocess else "single process"
    print(
        f"CPU per delivery ({mode}, {'PostgreSQL' if args.postgres else 'SQLite'}): "
        f"off {off:.0f} µs, on {on:.0f} µs, metrics cost {on - off:+.0f} µs "
        f"({(on - off) / off:+.1%})"
    )
    # Medians of each round's own difference, which the alternation keeps fair.
    deltas = [b - a for a, b in zip(timings["off"], timings["on"])]
    print(f"median of the rounds' differences: {statistics.median(deltas):+.0f} µs")
    if args.b_cpu and args.c_cpu:
        # A CPU-bound server's requests per second go as 1 / CPU per request, so C/B
        # by CPU is B's CPU over C's; the counting alone is the steadier figure.
        before = args.b_cpu / args.c_cpu
        after = args.b_cpu / (args.c_cpu + alone)
        print(f"C/B by CPU: {before:.3f} off, {after:.3f} on, moved by {after - before:+.3f}")
    return 0


def counting_alone(calls: int = 100_000, repeats: int = 7) -> float:
    """µs of CPU that Metrics.observed adds to one handled delivery (median of repeats)."""
    from flask_nachocode.delivery import Result
    from flask_nachocode.metrics import Metrics

    result = Result("handled", 200, "purchase", 1)

    def receive(route: str) -> Result:
        return result

    counted = Metrics.start().observed(receive)
    costs = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            receive("purchase")
        bare = time.process_time() - started
        started = time.process_time()
        for _ in range(calls):
            counted("purchase")
        costs.append((time.process_time() - started - bare) / calls * 1e6)
    return statistics.median(costs)


if __name__ == "__main__":
    raise SystemExit(main())

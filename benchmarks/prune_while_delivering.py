"""What a delivery arriving during ``prune`` gets on SQLite: its answer and seconds.
Before prune worked in batches (issue 21), 400,000 rows took one 7.6 s transaction and a
delivery arriving then got a 503 after 5 s.

    .venv/bin/python benchmarks/prune_while_delivering.py [--rows 400000] [--batch 1000]

A fresh SQLite file gets ``--rows`` deliveries received 40 days ago (inserted directly,
as a year of traffic would leave them); ``prune --older-than 30`` then runs in a thread
while the test client posts purchases one after the other until it ends. It prints
prune's seconds, and each purchase's status and seconds: 503 means it gave up after
waiting 5 s for the write lock. Not part of the test run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import sqlalchemy as sa  # noqa: E402
from flask import Flask  # noqa: E402

from flask_nachocode import NachocodeWebhook  # noqa: E402
from flask_nachocode.events import utcnow  # noqa: E402
from flask_nachocode.testing import post_delivery, purchase_payload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=None, help="deliveries per transaction")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        app = Flask(__name__)
        app.config.update(
            NACHOCODE_WEBHOOK_KEY="prune-key",
            NACHOCODE_DATABASE_URI=f"sqlite:///{directory}/nachocode.db",
        )
        NachocodeWebhook(app).handler("purchase")(lambda event: None)
        client = app.test_client()
        assert (
            post_delivery(client, "purchase", purchase_payload(), key="prune-key").status_code
            == 200
        )
        store = app.extensions["nachocode"].store
        old = utcnow() - timedelta(days=40)
        with app.app_context(), store.engine.begin() as connection:
            connection.execute(
                sa.insert(store.deliveries),
                [
                    {"received_at": old, "finished_at": old, "duration_ms": 1.0,
                     "event": "purchase", "route": "purchase", "outcome": "handled",
                     "status": 200}
                    for _ in range(options.rows)
                ],
            )  # fmt: skip
        batch = {} if options.batch is None else {"batch": options.batch}
        took: list[float] = []

        def prune() -> None:
            started = time.perf_counter()
            with app.app_context():
                store.prune(timedelta(days=30), **batch)
            took.append(time.perf_counter() - started)

        pruning = threading.Thread(target=prune)
        pruning.start()
        time.sleep(0.2)
        answers = []
        while pruning.is_alive():
            started = time.perf_counter()
            status = post_delivery(
                client, "purchase", purchase_payload(), key="prune-key"
            ).status_code
            answers.append((status, round(time.perf_counter() - started, 3)))
        pruning.join()
        print(f"prune of {options.rows} rows: {took[0]:.2f} s")
        slowest = max(seconds for _, seconds in answers)
        print(f"purchases during it: {len(answers)}, statuses {sorted({s for s, _ in answers})}, "
              f"slowest {slowest:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()

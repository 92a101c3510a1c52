"""What one poll of the purchase-status route costs, against a trivial JSON route
in the same app and run (Flask test client, no network).

    python benchmarks/purchase_status.py [DATABASE_URL ...]

Without arguments it measures a temporary SQLite file; pass PostgreSQL URLs too
(their tables are created and left behind: use a throwaway database).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from flask import Flask, jsonify

from flask_nachocode import NachocodeWebhook
from flask_nachocode.testing import post_delivery, purchase_payload

PURCHASES = 300
POLLS = 1500


def per_request_us(client, urls: list[str]) -> float:
    """Median over 5 rounds of the mean time of one GET, in microseconds."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for url in urls:
            client.get(url)
        rounds.append((time.perf_counter() - started) / len(urls) * 1e6)
    return statistics.median(rounds)


def measure(database_url: str) -> None:
    app = Flask(__name__)
    app.config.update(
        NACHOCODE_DATABASE_URI=database_url, NACHOCODE_WEBHOOK_KEY="k", NACHOCODE_PURCHASE_STATUS_ROUTE=True
    )
    nachocode = NachocodeWebhook(app)
    nachocode.on_purchase(lambda event: None)
    app.get("/ping")(lambda: jsonify(success=True))
    client = app.test_client()
    bought = [purchase_payload(userId=f"user-{i}") for i in range(PURCHASES)]
    for payload in bought:
        post_delivery(client, "purchase", payload)
    granted = [f"/nachocode/purchases/{p['iapLogId']}?userId={p['userId']}" for p in bought]
    pending = [f"/nachocode/purchases/{p['iapLogId'] + 7}?userId={p['userId']}" for p in bought]
    polls = (granted + pending) * (POLLS // (2 * PURCHASES))
    assert client.get(granted[0]).status_code == 200 and client.get(pending[0]).status_code == 404

    baseline = per_request_us(client, ["/ping"] * len(polls))
    status = per_request_us(client, polls)
    dialect = database_url.split(":", 1)[0]
    print(f"{dialect:24} baseline /ping {baseline:7.0f} us   status route {status:7.0f} us   "
          f"(+{status - baseline:.0f} us, x{status / baseline:.1f}) per request, {len(polls)} polls")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        for url in sys.argv[1:] or [f"sqlite:///{folder}/bench.db"]:
            measure(url)

"""Where C's CPU goes beyond B's: a deterministic profile (cProfile) of unique
purchases through the benchmark apps (``apps.py``), in process through Flask's test
client, on a fresh database of the given URL (an SQLite file by default).

    .venv/bin/python benchmarks/cpu_profile.py [--url URL] [--deliveries 2000] [--top 25]

It prints, for B and C, the function calls per delivery (``isinstance`` among them),
then C's functions by their own time. Calls are counted, not timed, so the call
counts do not depend on the machine's load; the times do. Not part of the test run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from flask_nachocode.testing import purchase_payload  # noqa: E402

from benchmarks.apps import KEY, PATH, create_app, prepare_database  # noqa: E402


def profile(variant: str, url: str, deliveries: int) -> pstats.Stats:
    prepare_database(url)
    client = create_app(variant, url).test_client()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [
        json.dumps(purchase_payload(orderId=uuid.uuid4().hex)) for _ in range(deliveries + 50)
    ]
    for body in bodies[:50]:  # warm up: imports, connections, statement caches
        client.post(PATH, data=body, headers=headers)
    profiler = cProfile.Profile()
    profiler.enable()
    for body in bodies[50:]:
        client.post(PATH, data=body, headers=headers)
    profiler.disable()
    return pstats.Stats(profiler)


def calls_of(stats: pstats.Stats, name: str) -> int:
    return sum(row[1] for key, row in stats.stats.items() if key[2] == name)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        url = options.url or f"sqlite:///{directory}/profile.db"
        results = {variant: profile(variant, url, options.deliveries) for variant in ("B", "C")}
    for variant, stats in results.items():
        total = stats.total_calls  # type: ignore[attr-defined]
        print(f"{variant}: {total / options.deliveries:.0f} function calls per delivery, "
              f"isinstance {calls_of(stats, '<built-in method builtins.isinstance>') / options.deliveries:.0f}, "
              f"{stats.total_tt / options.deliveries * 1e6:.0f} µs under the profiler")  # type: ignore[attr-defined]  # fmt: skip
    print(f"\nC by own time ({options.deliveries} deliveries):")
    results["C"].sort_stats("tottime").print_stats(options.top)


if __name__ == "__main__":
    main()

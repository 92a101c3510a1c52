"""Where a served delivery's time goes: a sampling profile (py-spy) of one gunicorn
worker while wrk loads it with unique purchases, the same set-up as ``run.py``.

    .venv/bin/pip install py-spy      # and apt-get install wrk
    .venv/bin/python benchmarks/served_profile.py [--variant C] [--url URL] [--seconds 12]

It prints the functions that take the most samples on their own, then the share of
samples under each of flask-nachocode's functions and a few landmarks (the commit,
the driver's waits, marshmallow). py-spy samples wall time, waits included, which
is what a sync worker's throughput is made of: a round trip to the database shows as
the driver's wait. Unlike ``cpu_profile.py`` (cProfile, in process) it sees the
served path as gunicorn runs it and slows it little. Not part of the test run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.live import free_port, gunicorn_args, live_server, worker_pids  # noqa: E402

from benchmarks.apps import KEY, PATH, prepare_database  # noqa: E402
from benchmarks.run import CONNECTIONS, LUA  # noqa: E402

#: Besides flask-nachocode's own functions, what the inclusive table shows.
LANDMARKS = ("do_commit", "(commit", "Connection.wait", "_read_packet", "Schema.load", "jsonify")


def record(variant: str, url: str, seconds: float, out: Path) -> None:
    """Serve ``variant`` on ``url`` with one sync worker, load it with wrk and write
    py-spy's raw (collapsed) stacks of the worker to ``out``."""
    prepare_database(url)
    port = free_port()
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_DATABASE_URL": url}
    base = f"http://127.0.0.1:{port}"
    wrk = ["wrk", "-t1", f"-c{CONNECTIONS}", "--timeout", "10s", "-s", str(LUA), base + PATH]
    with live_server(
        gunicorn_args("benchmarks.apps:create_app()", port, 1), port=port, env=env, ready_path="/ping"
    ):
        (worker,) = worker_pids(port)
        subprocess.run([*wrk[:3], "-d2s", *wrk[3:], "--", KEY, "warm", "unique"], check=True,
                       capture_output=True)
        load = subprocess.Popen([*wrk[:3], f"-d{seconds + 2:g}s", *wrk[3:], "--", KEY, "run", "unique"],
                                stdout=subprocess.PIPE, text=True)
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        subprocess.run([spy, "record", "--pid", str(worker), "--duration", f"{seconds:g}",
                        "--rate", "500", "--format", "raw", "--output", str(out)],
                       check=True, capture_output=True)
        output, _ = load.communicate()
    rate = next((line for line in output.splitlines() if "Requests/sec" in line), "")
    print(f"{variant} on {url.split('://')[0]}: {rate.strip()}")


def summarize(stacks: Path, top: int) -> None:
    total = 0
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    for line in stacks.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        samples = int(count)
        total += samples
        # "function (file:line)" without the line, so that a function is one entry.
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            under[frame] += samples
    print(f"{total} samples. By own samples:")
    for frame, samples in own.most_common(top):
        print(f"  {100 * samples / total:5.1f}%  {frame}")
    print("Under each of flask-nachocode's functions, and landmarks:")
    for frame, samples in under.most_common():
        if "flask_nachocode/" in frame or any(mark in frame for mark in LANDMARKS):
            if samples / total >= 0.005:
                print(f"  {100 * samples / total:5.1f}%  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="C", choices=["A", "B", "C"])
    parser.add_argument("--url", help="database URL (default: a new SQLite file); "
                        "PostgreSQL and MariaDB tables are dropped and created again")
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nachocode-profile-") as tmp:
        url = args.url or f"sqlite:///{tmp}/profile.db"
        stacks = Path(tmp) / "stacks.txt"
        record(args.variant, url, args.seconds, stacks)
        summarize(stacks, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

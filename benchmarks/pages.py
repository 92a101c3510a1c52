"""What a durable SQLite commit costs for each B-tree it writes, with nothing but
the sqlite3 module: no SQLAlchemy, no Flask, no extension.

    .venv/bin/python benchmarks/pages.py

Every table and every index is a B-tree, and a commit writes at least one page
of each B-tree its transaction changed to the write-ahead log (later copied to
the database file by a checkpoint). B's delivery changes 2 B-trees (its table and
the index of its unique key); C's changes 8: the delivery record and its two
search indexes, the claim, the ledger row, its unique store id and its two lookup
indexes (``writes.py`` counts the pages exactly). This script measures what one
more B-tree per commit costs on this machine, with the connection set up as the
extension sets it up (WAL, the busy timeout, SQLite's default
``synchronous=FULL``, which syncs the log at every commit), so the floor of
keeping C's rows can be told apart from the cost of the code that writes them.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from flask_nachocode.store import _sqlite_pragmas  # noqa: E402

#: B-trees changed per commit: 2 is B's delivery, 8 is C's new purchase.
TREES = (1, 2, 4, 8)


def per_commit(trees: int, workdir: Path, warm: int, count: int) -> tuple[float, float]:
    """CPU and wall µs per commit of one transaction that inserts one row into
    each of ``trees`` tables, on a fresh database file."""
    path = Path(tempfile.mkstemp(dir=workdir, suffix=".db")[1])
    connection = sqlite3.connect(path, isolation_level=None)
    # The extension's own set-up (its pool listener, given a bare record), so the floor
    # follows it if it ever changes.
    _sqlite_pragmas(connection, SimpleNamespace(info={}))
    for tree in range(trees):
        # One B-tree each: a WITHOUT ROWID table is its primary key's tree.
        connection.execute(f"CREATE TABLE t{tree} (k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID")
    value = os.urandom(100)

    def commits(n: int) -> None:
        for _ in range(n):
            connection.execute("BEGIN")
            for tree in range(trees):
                # Random keys, as store purchase ids are: each lands on its own leaf.
                connection.execute(
                    f"INSERT INTO t{tree} VALUES (?, ?)", (os.urandom(12).hex(), value)
                )
            connection.execute("COMMIT")

    commits(warm)  # the trees reach their working depth
    cpu, wall = time.process_time(), time.perf_counter()
    commits(count)
    figures = (
        (time.process_time() - cpu) / count * 1e6,
        (time.perf_counter() - wall) / count * 1e6,
    )
    connection.close()
    return figures


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares µs per added B-tree."""
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", type=int, default=2000, help="commits before measuring")
    # Enough commits that every size sees several checkpoints (one per 1,000 pages of log):
    # a short run catches them unevenly and its slope means nothing (300 gave 4 µs).
    parser.add_argument("--count", type=int, default=3000, help="commits measured")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of each size; medians are shown"
    )
    args = parser.parse_args(argv)
    runs: dict[int, list[tuple[float, float]]] = {trees: [] for trees in TREES}
    with tempfile.TemporaryDirectory(prefix="nachocode-pages-") as tmp:
        for _ in range(args.repeats):
            for trees in TREES:  # sizes interleaved, so load on the machine hits them alike
                runs[trees].append(per_commit(trees, Path(tmp), args.warm, args.count))
    print("| B-trees per commit | CPU µs per commit | wall µs per commit |")
    print("|---|---|---|")
    medians = {}
    for trees in TREES:
        cpu = statistics.median(run[0] for run in runs[trees])
        wall = statistics.median(run[1] for run in runs[trees])
        medians[trees] = (cpu, wall)
        print(f"| {trees} | {cpu:.0f} | {wall:.0f} |")
    cpu_slope = slope([(trees, medians[trees][0]) for trees in TREES])
    wall_slope = slope([(trees, medians[trees][1]) for trees in TREES])
    print()
    print(f"each B-tree more per commit: {cpu_slope:.0f} µs CPU, {wall_slope:.0f} µs wall")
    print(
        f"C's 6 B-trees beyond B's 2: {6 * cpu_slope:.0f} µs CPU, {6 * wall_slope:.0f} µs wall "
        "per delivery, before any SQLAlchemy or extension code"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

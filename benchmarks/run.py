"""Benchmark flask-nachocode against the floor: a bare Flask receiver (A) and
the same plus one INSERT and one COMMIT of the raw body (B).

    .venv/bin/python benchmarks/run.py --quick        # a few minutes
    .venv/bin/python benchmarks/run.py                # full run
    .venv/bin/python benchmarks/run.py --against v0.1.0 --only sqlite --rounds 5

With ``--against REV`` a fourth variant, R, is C built from the git revision REV: its
tree is exported (``git archive``) and installed, with the dependency versions of this
environment, into a virtualenv of its own, cached in
``~/.cache/flask-nachocode-bench/<commit>-<versions>``, and served with this tree's benchmark app
(``benchmarks/apps.py``) on a database of its own beside C's, created by REV's code.
It alternates with A, B and C in every round, so the same noise hits all four; the
table then gives C/R, this tree's speed over REV's, as the median of per-round ratios.

Each variant runs under gunicorn on loopback (sync workers, same settings) and
is loaded with wrk (8 connections), alternating A B C for several rounds so that
noise from other work on the machine hits all three alike; the ratios are the
medians of per-round ratios. Then a round of duplicates (the same delivery over
and over). Done for SQLite (WAL) and, when their URLs are given (``--postgres``
or ``NACHOCODE_TEST_POSTGRES_URL``, ``--mysql`` or ``NACHOCODE_TEST_MYSQL_URL``), for
PostgreSQL and MariaDB (or MySQL), each with 1 and 4 workers. The server
databases' benchmark and nachocode tables are dropped and created again: use throwaway
databases. An in-process figure (no HTTP, no database) comes first.

Not part of the test run; numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import sqlalchemy as sa  # noqa: E402

from support.live import free_port, gunicorn_args, live_server, worker_pids  # noqa: E402

from benchmarks.apps import KEY, PATH, prepare_database  # noqa: E402

LUA = Path(__file__).with_name("purchase.lua")
VARIANTS = ("A", "B", "C")
CONNECTIONS = 8


@dataclass
class Load:
    """One load run of one variant."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    #: CPU time per request of the gunicorn workers, and of the database server's
    #: processes (0 for SQLite, which runs inside the worker), in µs; see cpu_seconds.
    worker_cpu_us: float = 0.0
    database_cpu_us: float = 0.0

    @property
    def cpu_us(self) -> float:
        """The server side's CPU time per request: worker plus database."""
        return self.worker_cpu_us + self.database_cpu_us


@dataclass
class Revision:
    """C built from another git revision (``--against``): its virtualenv and the
    folder holding this tree's benchmark app, which imports that revision's library."""

    name: str
    commit: str
    python: Path
    app_dir: Path

    @property
    def gunicorn(self) -> Path:
        return self.python.with_name("gunicorn")


def build_revision(rev: str) -> Revision:
    """Export ``rev`` and install it into a cached virtualenv with what the benchmark
    app needs, at the versions this environment has: only the library differs between
    C and R. Reused while the commit and those versions stay the same."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.strip()
    pins = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                          check=True, capture_output=True, text=True).stdout
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    key = hashlib.sha256(pins.encode()).hexdigest()[:8]
    base = home / "flask-nachocode-bench" / f"{commit}-{key}"
    python = base / "venv" / "bin" / "python"
    if not (base / "installed").exists():
        shutil.rmtree(base, ignore_errors=True)
        (base / "src").mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base / "src")], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
        (base / "constraints.txt").write_text(pins)
        print(f"installing {rev} ({commit[:12]}) into {base / 'venv'}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(base / "constraints.txt"),
                        str(base / "src"), "gunicorn", "psycopg[binary]", "pymysql",
                        "prometheus-client"], check=True)
        (base / "installed").touch()
    app_dir = base / "app"
    app_dir.mkdir(exist_ok=True)
    # A module of its own name, outside this tree: nothing on its path is this tree's library.
    shutil.copy(Path(__file__).with_name("apps.py"), app_dir / "bench_apps.py")
    return Revision(rev, commit, python, app_dir)


def sibling_database(url: str) -> str:
    """A database beside ``url`` for R, so that each revision works on tables its own
    code created: an SQLite file next to it, or a database of the same server."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return str(parsed.set(database=f"{parsed.database}-against.db").render_as_string(hide_password=False))
    name = f"{parsed.database}_against"
    server = sa.create_engine(parsed, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with server.connect() as connection:
        if parsed.get_backend_name() == "postgresql":
            if not connection.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        else:
            connection.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{name}`")
    server.dispose()
    return parsed.set(database=name).render_as_string(hide_password=False)


@dataclass
class Scenario:
    title: str
    database_url: str
    workers: int
    unique: list[dict[str, Load]] = field(default_factory=list)
    duplicate: list[dict[str, Load]] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# --- load generators -------------------------------------------------------------------


def wrk_load(url: str, seconds: float, prefix: str, mode: str) -> Load:
    command = [
        "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--timeout", "10s",
        "-s", str(LUA), url, "--", KEY, prefix, mode,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    figures = json.loads(line[len("BENCH "):])
    errors = sum(figures[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts", "non_2xx"))
    return Load(
        rps=figures["requests"] / (figures["duration_us"] / 1e6),
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        errors=errors,
        requests=figures["requests"],
    )


def _python_body(prefix: str, connection: int, n: int) -> bytes:
    from flask_nachocode.testing import purchase_payload

    ident = f"{prefix}-{connection}-{n}"
    return json.dumps(
        purchase_payload(os="ios", iapLogId=connection * 100_000_000 + n,
                         data={"transactionId": ident, "originalTransactionId": ident})
    ).encode()


def python_load(url: str, seconds: float, prefix: str, mode: str) -> Load:
    """The fallback when wrk is missing: 8 threads posting in a loop. It costs
    more CPU than wrk, so its figures are lower and only comparable to each other."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    latencies: list[float] = []
    errors = [0]
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}

    def client(connection: int) -> None:
        n = 0
        fixed = _python_body(prefix, 0, 0) if mode == "duplicate" else None
        while time.perf_counter() < deadline:
            n += 1
            body = fixed or _python_body(prefix, connection, n)
            started = time.perf_counter()
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                conn.request("POST", PATH, body=body, headers=headers)
                if conn.getresponse().status != 200:
                    errors[0] += 1
            except OSError:
                errors[0] += 1
            finally:
                conn.close()
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CONNECTIONS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Load(
        rps=len(latencies) / elapsed,
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
        errors=errors[0],
        requests=len(latencies),
    )


# --- CPU per request ----------------------------------------------------------------------
#
# Requests/s say how fast, not where the time went. CPU time per request, split into the
# gunicorn workers and the database server (PostgreSQL, MariaDB), says that, and C - B in µs is the figure a
# change to the code moves. It leaves out waiting (disk, network) but not a CPU slowed by
# other jobs on a shared machine, so between rounds it varies about as much as requests/s.
# Read from /proc (Linux); elsewhere the CPU columns are left out.

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` so far (processes that exited count 0)."""
    total = 0
    for pid in pids:
        try:
            # Fields after the command name, which may hold spaces: utime and stime
            # are the 14th and 15th fields of the whole line.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def server_pids(*names: str) -> list[int]:
    """The processes whose command is one of ``names``: PostgreSQL's (postmaster,
    backends, background workers), or MariaDB's or MySQL's single server process."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() in names:
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def database_pids(database_url: str) -> Callable[[], list[int]]:
    """What lists the database server's processes; SQLite runs inside the worker."""
    backend = database_url.split(":", 1)[0].split("+", 1)[0]
    if backend == "postgresql":
        return lambda: server_pids("postgres")
    if backend in ("mysql", "mariadb"):
        return lambda: server_pids("mariadbd", "mysqld")
    return lambda: []


def measured(generate: Callable[[str, float, str, str], Load], workers: list[int],
             database: Callable[[], list[int]]) -> Callable[[str, float, str, str], Load]:
    """``generate`` that also records the server side's CPU time per request."""
    if not Path("/proc/self/stat").exists():
        return generate

    def run(url: str, seconds: float, prefix: str, mode: str) -> Load:
        database_pids = database()  # backends come and go with the pool: list them each time
        worker_before, database_before = cpu_seconds(workers), cpu_seconds(database_pids)
        load = generate(url, seconds, prefix, mode)
        if load.requests:
            load.worker_cpu_us = (cpu_seconds(workers) - worker_before) / load.requests * 1e6
            load.database_cpu_us = (cpu_seconds(database_pids) - database_before) / load.requests * 1e6
        return load

    return run


# --- the HTTP benchmark ----------------------------------------------------------------


def run_scenario(scenario: Scenario, rounds: int, seconds: float, dup_rounds: int,
                 generate: Callable[[str, float, str, str], Load], logs: Path, ledger: str,
                 metrics: str = "off", against: Revision | None = None) -> None:
    prepare_database(scenario.database_url)
    variants = VARIANTS + (("R",) if against else ())
    ports = {variant: free_port() for variant in variants}
    scenario.load_before = load_average()
    run_id = f"{int(time.time())}{scenario.workers}"
    from contextlib import ExitStack

    with ExitStack() as servers:
        urls = {}
        databases = {}
        for variant in variants:
            args = gunicorn_args("benchmarks.apps:create_app()", ports[variant], scenario.workers)
            env = {"BENCH_VARIANT": variant, "BENCH_DATABASE_URL": scenario.database_url,
                   "BENCH_LEDGER": ledger, "BENCH_METRICS": metrics}
            if variant == "R":
                assert against is not None
                env.update(BENCH_VARIANT="C", BENCH_DATABASE_URL=sibling_database(scenario.database_url))
                subprocess.run([str(against.python), "-c", "import sys, bench_apps; "
                                "bench_apps.prepare_database(sys.argv[1])", env["BENCH_DATABASE_URL"]],
                               cwd=against.app_dir, check=True)
                args = [str(against.gunicorn), *args[1:-1], "--chdir", str(against.app_dir),
                        "bench_apps:create_app()"]
            databases[variant] = env["BENCH_DATABASE_URL"]
            if metrics == "on" and variant in ("C", "R"):  # the workers' counters, as in production
                env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(dir=logs, prefix="metrics-")
            base = servers.enter_context(live_server(
                args, port=ports[variant], env=env, ready_path="/ping",
                log_path=logs / f"{scenario.workers}-{variant}.log",
            ))
            urls[variant] = base + PATH
        for variant in variants:  # warm up: imports, connections, statement caches
            generate(urls[variant], 1, f"w{run_id}{variant}", "unique")
        # Workers are listed after the warm-up: gunicorn has forked them all by then.
        database = database_pids(scenario.database_url)
        loaders = {variant: measured(generate, worker_pids(ports[variant]), database) for variant in variants}

        def one_round(number: int, mode: str) -> dict[str, Load]:
            # Each round starts with another variant, and on SQLite each load starts
            # from an empty write-ahead log: B and C share a file, and with a fixed
            # order the variant after B paid for checkpointing B's pages (C came out
            # 2 to 3% behind R, which has a file of its own, with the same code).
            shift = number % len(variants)
            loads = {}
            for variant in variants[shift:] + variants[:shift]:
                _checkpoint_sqlite(databases[variant])
                tag = f"{mode[0]}{run_id}{number}{variant}"
                loads[variant] = loaders[variant](urls[variant], seconds, tag, mode)
            return {variant: loads[variant] for variant in variants}

        for round_number in range(rounds):
            scenario.unique.append(one_round(round_number, "unique"))
            print(f"  round {round_number + 1}: " + _round_line(scenario.unique[-1]), flush=True)
        for round_number in range(dup_rounds):
            scenario.duplicate.append(one_round(round_number, "duplicate"))
            print(f"  duplicates {round_number + 1}: " + _round_line(scenario.duplicate[-1]), flush=True)
    scenario.load_after = load_average()


def _checkpoint_sqlite(url: str) -> None:
    """Move an SQLite database's write-ahead log into the file and empty it, so that
    the next load does not pay for the pages another variant wrote."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return
    with contextlib.closing(sqlite3.connect(parsed.database, timeout=30)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _round_line(loads: dict[str, Load]) -> str:
    parts = [
        f"{v} {loads[v].rps:7.0f}/s p99 {loads[v].p99_ms:6.1f} ms"
        f" cpu {loads[v].cpu_us:5.0f} µs"
        for v in loads
    ]
    errors = sum(load.errors for load in loads.values())
    return "  ".join(parts) + (f"  ERRORS {errors}" if errors else "")


def _median_ratio(rounds: list[dict[str, Load]], top: str, bottom: str, attr: str = "rps") -> float:
    return statistics.median(getattr(r[top], attr) / getattr(r[bottom], attr) for r in rounds)


def _measured_rounds(scenarios: list[Scenario]) -> Iterator[tuple[str, str, list[dict[str, Load]]]]:
    """(title, "unique" or "duplicates", rounds) for every kind of load that ran."""
    for scenario in scenarios:
        for kind, rounds in (("unique", scenario.unique), ("duplicates", scenario.duplicate)):
            if rounds:
                yield scenario.title, kind, rounds


def table(scenarios: list[Scenario]) -> str:
    header = (
        "| database, workers | deliveries | A req/s | B req/s | C req/s "
        "| A p50/p99 ms | B p50/p99 ms | C p50/p99 ms | C/A | C/B | C p99 / B p99 |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for title, kind, rounds in _measured_rounds(scenarios):

        def med(variant: str, attr: str) -> float:
            return statistics.median(getattr(r[variant], attr) for r in rounds)

        cells = [title, kind]
        cells += [f"{med(v, 'rps'):.0f}" for v in VARIANTS]
        cells += [f"{med(v, 'p50_ms'):.1f} / {med(v, 'p99_ms'):.1f}" for v in VARIANTS]
        cells += [
            f"{_median_ratio(rounds, 'C', 'A'):.2f}",
            f"{_median_ratio(rounds, 'C', 'B'):.2f}",
            f"{_median_ratio(rounds, 'C', 'B', 'p99_ms'):.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def against_table(scenarios: list[Scenario], against: Revision) -> str:
    """This tree's C against REV's (R), both against B, medians of per-round ratios."""
    header = (f"| database, workers | deliveries | C req/s | R ({against.name}) req/s "
              "| C p50/p99 ms | R p50/p99 ms | C/B | R/B | C/R |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for title, kind, rounds in _measured_rounds(scenarios):
        def med(variant: str, attr: str) -> float:
            return statistics.median(getattr(r[variant], attr) for r in rounds)

        lines.append("| " + " | ".join([
            title, kind, f"{med('C', 'rps'):.0f}", f"{med('R', 'rps'):.0f}",
            f"{med('C', 'p50_ms'):.1f} / {med('C', 'p99_ms'):.1f}",
            f"{med('R', 'p50_ms'):.1f} / {med('R', 'p99_ms'):.1f}",
            f"{_median_ratio(rounds, 'C', 'B'):.3f}", f"{_median_ratio(rounds, 'R', 'B'):.3f}",
            f"{_median_ratio(rounds, 'C', 'R'):.3f}",
        ]) + " |")
    return "\n".join(lines)


def cpu_table(scenarios: list[Scenario]) -> str:
    """Server CPU per delivery (worker + database server), medians over rounds, and
    what C costs beyond B; empty where the CPU could not be read (no /proc)."""
    header = (
        "| database, workers | deliveries | A CPU µs | B CPU µs | C CPU µs "
        "| C − B µs | B/C by CPU | C worker / database µs |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for title, kind, rounds in _measured_rounds(scenarios):
        if not any(r["C"].cpu_us for r in rounds):
            continue
        cpu = {v: statistics.median(r[v].cpu_us for r in rounds) for v in VARIANTS}
        c_worker = statistics.median(r["C"].worker_cpu_us for r in rounds)
        c_database = statistics.median(r["C"].database_cpu_us for r in rounds)
        lines.append("| " + " | ".join([
            title, kind, *(f"{cpu[v]:.0f}" for v in VARIANTS),
            f"{cpu['C'] - cpu['B']:.0f}", f"{cpu['B'] / cpu['C']:.2f}",
            f"{c_worker:.0f} / {c_database:.0f}",
        ]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


# --- in process --------------------------------------------------------------------------


def inprocess(count: int, repeats: int) -> dict[str, float]:
    """Microseconds of CPU per delivery for the request path without HTTP and
    without the database: key check, JSON parse, validation into the typed event,
    and the handler loop with a no-op handler. Also the schema load alone, and
    marshmallow's own floor: a schema of the same shape whose fields do nothing
    (``fields.Raw``), i.e. what any marshmallow schema for this body costs.

    CPU time (``time.process_time``), not wall time: on a shared machine the
    wall clock also counts the time other processes held the CPU."""
    from flask import Flask
    from marshmallow import EXCLUDE, Schema, fields

    from flask_nachocode import NachocodeWebhook
    from flask_nachocode.auth import check_bearer
    from flask_nachocode.schemas import load_event
    from flask_nachocode.testing import purchase_payload
    from flask_nachocode import views

    app = Flask("bench_inprocess")
    app.config.update(NACHOCODE_WEBHOOK_KEY=KEY, NACHOCODE_DATABASE_URI="sqlite://")
    extension = NachocodeWebhook(app)

    @extension.on_purchase
    def noop(event: Any) -> None:
        pass

    state = app.extensions["nachocode"]
    # The view's own JSON decoding (read_json_object needs a request).
    decoder = getattr(views, "_JSON_DECODER", None)
    decode = decoder.decode if decoder else lambda text: json.loads(text, parse_constant=views._reject_constant)
    authorization = f"Bearer {KEY}"
    bodies = [json.dumps(purchase_payload(os=("ios", "android")[i % 2])).encode() for i in range(count)]
    payloads = [json.loads(body) for body in bodies]
    store_fields = ("originalTransactionId", "transactionId", "purchaseToken", "orderId")
    raw_data = Schema.from_dict({name: fields.Raw() for name in store_fields})
    raw_fields: dict[str, fields.Field] = {name: fields.Raw() for name in payloads[0]}
    raw_fields["data"] = fields.Nested(raw_data(unknown=EXCLUDE))
    floor = Schema.from_dict(raw_fields)(unknown=EXCLUDE)

    def path() -> None:
        for body in bodies:
            check_bearer(authorization, state.keys)
            payload = decode(body.decode("utf-8"))
            event = load_event("purchase", payload)
            event.identity  # noqa: B018 - the claim key is computed on every delivery
            for handler in state.handlers(event.name):
                handler(event)

    def schema_only() -> None:
        for payload in payloads:
            load_event("purchase", payload)  # validation and the typed event it builds

    def marshmallow_floor() -> None:
        for payload in payloads:
            floor.load(payload)

    figures = {}
    for name, function in (("path", path), ("schema load", schema_only), ("marshmallow floor", marshmallow_floor)):
        timings = []
        for _ in range(repeats):
            started = time.process_time()
            function()
            timings.append((time.process_time() - started) / count * 1e6)
        figures[name] = statistics.median(timings)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds (a few minutes)")
    parser.add_argument("--rounds", type=int, help="A B C rounds of unique deliveries")
    parser.add_argument("--seconds", type=float, help="seconds per load run")
    parser.add_argument("--postgres", default=os.environ.get("NACHOCODE_TEST_POSTGRES_URL"),
                        help="PostgreSQL URL of a throwaway database (default: $NACHOCODE_TEST_POSTGRES_URL)")
    parser.add_argument("--mysql", default=os.environ.get("NACHOCODE_TEST_MYSQL_URL"),
                        help="MySQL/MariaDB URL of a throwaway database (default: $NACHOCODE_TEST_MYSQL_URL)")
    parser.add_argument("--only", choices=["inprocess", "sqlite", "postgresql", "mysql"], action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--ledger", choices=["on", "off"], default="on",
                        help="C with the ledger (default) or with NACHOCODE_LEDGER = False")
    parser.add_argument("--metrics", choices=["on", "off"], default="off",
                        help="C with NACHOCODE_METRICS (multiprocess mode) or without (default)")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even if wrk exists")
    parser.add_argument("--workers", type=int, action="append", choices=[1, 4],
                        help="gunicorn workers per scenario (repeatable; default 1 and 4)")
    parser.add_argument("--against", metavar="REV",
                        help="also run C built from git revision REV (R) in every round, and print C/R")
    args = parser.parse_args(argv)

    rounds = args.rounds or (3 if args.quick else 6)
    seconds = args.seconds or (4 if args.quick else 10)
    dup_rounds = 1 if args.quick else 2
    parts = set(args.only or ["inprocess", "sqlite", "postgresql", "mysql"])
    generate = wrk_load
    if args.python_load or shutil.which("wrk") is None:
        print("wrk not found (apt-get install wrk): using the Python load generator", file=sys.stderr)
        generate = python_load

    against = build_revision(args.against) if args.against else None
    print(f"load average at start: {load_average()}  ({os.cpu_count()} CPUs)")
    print(f"C's ledger: {args.ledger}, C's metrics: {args.metrics}")
    if "inprocess" in parts:
        figures = inprocess(count=2000 if args.quick else 5000, repeats=7)
        print("in-process, CPU per delivery: " + ", ".join(f"{k} {v:.0f} µs" for k, v in figures.items()))

    scenarios = []
    workdir = Path(tempfile.mkdtemp(prefix="nachocode-bench-"))
    worker_counts = args.workers or [1, 4]
    if "sqlite" in parts:
        for workers in worker_counts:
            path = workdir / f"bench-{workers}.db"
            scenarios.append(Scenario(f"SQLite (WAL), {workers}", f"sqlite:///{path}", workers))
    for part, url, name in (("postgresql", args.postgres, "PostgreSQL"), ("mysql", args.mysql, "MariaDB")):
        if part not in parts:
            continue
        if not url:
            print(f"no {name} URL (--{part.replace('postgresql', 'postgres')}): {name} skipped", file=sys.stderr)
            continue
        for workers in worker_counts:
            scenarios.append(Scenario(f"{name}, {workers}", url, workers))
    for scenario in scenarios:
        print(f"{scenario.title} worker(s): {rounds} rounds of {seconds:g} s, {CONNECTIONS} connections", flush=True)
        run_scenario(scenario, rounds, seconds, dup_rounds, generate, workdir, args.ledger, args.metrics,
                     against)
    if scenarios:
        print()
        print(table(scenarios))
        print()
        if against:
            print(f"against {against.name} ({against.commit[:12]}):")
            print(against_table(scenarios, against))
            print()
        cpu = cpu_table(scenarios)
        if cpu:
            print(cpu)
            print()
        for scenario in scenarios:
            print(f"load average ({scenario.title}): before {scenario.load_before}, after {scenario.load_after}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What SQLAlchemy's execution costs on C's write path: CPU per purchase for the
statements C sends (claim, ledger row, delivery record; on PostgreSQL the first
two are one ``WITH``), run through ``Connection.execute`` as the extension does,
against the very same compiled SQL and processed parameters handed straight to
the driver's cursor. B's one INSERT is measured the same way for reference.

    .venv/bin/python benchmarks/statements.py [--postgres URL]

The difference is the most that bypassing SQLAlchemy's execution layer could
save. The extension does not bypass it: that layer is also what wraps driver
errors into SQLAlchemy's (the store's 503 and its retry on a dropped connection
depend on it), invalidates dropped connections, and fires the cursor events that
query recorders and tracing use. This measures what keeping it costs.

Each variant runs ``--count`` purchases in one transaction that is rolled back,
so the disk and the commit are left out; variants alternate for several rounds
and the medians are printed. CPU time, so other load on the machine matters less.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from benchmarks.apps import create_app, prepare_database  # noqa: E402
from flask_nachocode import ledger  # noqa: E402
from flask_nachocode.schemas import load_event  # noqa: E402
from flask_nachocode.store import utcnow  # noqa: E402
from flask_nachocode.testing import purchase_payload  # noqa: E402


class OnCursor:
    """A statement compiled once and run on the DBAPI cursor, its parameters put
    through the same bind processors SQLAlchemy would apply."""

    def __init__(self, statement: Any, dialect: sa.Dialect, keys: list[str]) -> None:
        self.compiled = statement.compile(dialect=dialect, column_keys=keys)
        self.sql = str(self.compiled)
        self.positions = self.compiled.positiontup  # None for named parameter styles
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for bind, name in self.compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor

    def run(self, cursor: Any, values: dict[str, Any]) -> None:
        parameters = self.compiled.construct_params(values)
        for name, processor in self.processors.items():
            if name in parameters:
                parameters[name] = processor(parameters[name])
        if self.positions is not None:
            cursor.execute(self.sql, [parameters[name] for name in self.positions])
        else:
            cursor.execute(self.sql, parameters)
        if cursor.description is not None:
            cursor.fetchall()


def measure(url: str, count: int, rounds: int) -> dict[str, float]:
    prepare_database(url)
    app = create_app("C", url)
    with app.app_context():
        store = app.extensions["nachocode"].store
        store.ensure_ready()
        raw = app.extensions["bench_raw"]
        engine = store.engine
        dialect = engine.dialect
        events = [
            load_event("purchase", purchase_payload(os=("ios", "android")[i % 2]))
            for i in range(count)
        ]
        headers = {"Host": "127.0.0.1", "Content-Type": "application/json", "User-Agent": "wrk"}
        body = b'{"userId": "bench-user"}' * 30

        def record(event: Any, now: Any) -> dict[str, Any]:
            return {
                "event": "purchase",
                "route": "purchase",
                "outcome": "handled",
                "status": 200,
                "identity": event.identity,
                "user_id": event.user_id,
                "iap_log_id": event.iap_log_id,
                "body": body,
                "headers": headers,
                "remote_addr": "127.0.0.1",
                "received_at": now,
                "finished_at": now,
                "duration_ms": 1.0,
                "error": None,
                "traceback": None,
                "replay_of": None,
                "replay_count": 0,
            }

        def claim(event: Any, now: Any) -> dict[str, Any]:
            return {"identity": event.identity, "event": "purchase", "claimed_at": now}

        def both(event: Any, now: Any) -> dict[str, Any]:
            return {**ledger._purchase_values(event, now), **claim(event, now)}

        now = utcnow()
        if dialect.name == "postgresql":
            # What C sends on PostgreSQL: claim and ledger row in one WITH, then the record.
            c_statements = [
                (ledger._claimed_purchase_upsert(store.claims, store.purchases), both),
                (sa.insert(store.deliveries), record),
            ]
        else:
            c_statements = [
                (store._claim_statement, claim),
                (ledger._purchase_upsert(store.purchases, dialect.name), ledger._purchase_values),
                (sa.insert(store.deliveries), record),
            ]
        b_statements = [
            (sa.insert(raw), lambda event, now: {"key": uuid.uuid4().hex, "body": body})
        ]

        def through_sqlalchemy(statements: list[Any]) -> Callable[[sa.Connection, Any], None]:
            def run(connection: sa.Connection, event: Any) -> None:
                moment = utcnow()
                for statement, values in statements:
                    result = connection.execute(statement, values(event, moment))
                    if result.returns_rows:
                        result.all()

            return run

        def on_cursor(statements: list[Any]) -> Callable[[sa.Connection, Any], None]:
            prepared = [
                (OnCursor(statement, dialect, list(values(events[0], now))), values)
                for statement, values in statements
            ]

            def run(connection: sa.Connection, event: Any) -> None:
                moment = utcnow()
                cursor = connection.connection.cursor()
                for statement, values in prepared:
                    statement.run(cursor, values(event, moment))
                cursor.close()

            return run

        variants = {
            "C via SQLAlchemy": through_sqlalchemy(c_statements),
            "C on the cursor": on_cursor(c_statements),
            "B via SQLAlchemy": through_sqlalchemy(b_statements),
            "B on the cursor": on_cursor(b_statements),
        }
        written = (store.claims, store.purchases, store.deliveries)
        timings: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, run in variants.items():
                with engine.connect() as connection:
                    transaction = connection.begin()
                    started = time.process_time()
                    for event in events:
                        run(connection, event)
                    timings[name].append((time.process_time() - started) / count * 1e6)
                    # Both ways must have written the same rows, or the comparison is void.
                    tables = (raw,) if name.startswith("B") else written
                    for table in tables:
                        rows = connection.execute(sa.select(sa.func.count()).select_from(table))
                        assert rows.scalar_one() == count, f"{name}: {table.name} is short"
                    transaction.rollback()
        engine.dispose()
    return {name: statistics.median(values) for name, values in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", help="PostgreSQL URL of a throwaway database")
    parser.add_argument("--count", type=int, default=1000, help="purchases per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    databases = {"SQLite": f"sqlite:///{Path(tempfile.mkdtemp()) / 'statements.db'}"}
    if args.postgres:
        databases["PostgreSQL"] = args.postgres
    print(
        "| database | C via SQLAlchemy | C on the cursor | saved | B via SQLAlchemy | B on the cursor |"
    )
    print("|---|---|---|---|---|---|")
    for title, url in databases.items():
        f = measure(url, args.count, args.rounds)
        c_sa, c_raw, b_sa, b_raw = (
            f[k]
            for k in ("C via SQLAlchemy", "C on the cursor", "B via SQLAlchemy", "B on the cursor")
        )
        print(
            f"| {title} | {c_sa:.0f} µs | {c_raw:.0f} µs | {c_sa - c_raw:.0f} µs "
            f"| {b_sa:.0f} µs | {b_raw:.0f} µs |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

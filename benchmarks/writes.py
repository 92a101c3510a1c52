"""What one delivery writes, counted rather than timed: statements sent per
delivery (SQLite and, with a URL, PostgreSQL) and SQLite pages written per
commit, for B (one INSERT of the raw body) and C (flask-nachocode), the same
variants as ``run.py``, and C again with ``NACHOCODE_LEDGER = False``.

    .venv/bin/python benchmarks/writes.py [--postgres URL]

Unlike requests per second these figures do not depend on the machine or its
load, so a change to the write path shows here exactly. Pages are read off the
size of SQLite's write-ahead log with automatic checkpoints off, after enough
deliveries that the trees have their working depth.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from benchmarks.apps import KEY, PATH, create_app, prepare_database  # noqa: E402
from flask_nachocode.testing import purchase_payload  # noqa: E402

HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
#: SQLite's WAL: a 32-byte header, then a 24-byte header before each page.
WAL_HEADER, FRAME_HEADER = 32, 24


def _post(client: Any, payload: dict[str, Any]) -> None:
    answer = client.post(PATH, data=json.dumps(payload), headers=HEADERS)
    assert answer.status_code == 200, answer.get_data(as_text=True)


def _engine(app: Any) -> sa.Engine:
    with app.app_context():
        engine: sa.Engine = app.extensions["sqlalchemy"].engine
    return engine


#: (label, variant, ledger on) of each app counted.
APPS = (("B", "B", True), ("C", "C", True), ("C, ledger off", "C", False))


def statements_per_delivery(
    variant: str, url: str, ledger: bool, count: int = 50
) -> dict[str, float]:
    """Statements by first keyword, and COMMITs, per unique purchase and per duplicate;
    on PostgreSQL also the round trips, from libpq's trace of the connection."""
    prepare_database(url)
    app = create_app(variant, url, ledger)
    client = app.test_client()
    _post(client, purchase_payload())  # connects, and on first use sets the store up
    sent: collections.Counter[str] = collections.Counter()
    engine = _engine(app)
    trace = _trace_round_trips(engine, sent)
    sa.event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *args: sent.update([statement.split()[0].upper()]),
    )
    sa.event.listen(engine, "commit", lambda conn: sent.update(["COMMIT"]))
    for _ in range(count):
        _post(client, purchase_payload())
    trace()
    figures = {f"unique {kind}": n / count for kind, n in sorted(sent.items())}
    again = purchase_payload()
    _post(client, again)
    trace()
    sent.clear()
    for _ in range(count):
        _post(client, again)
    trace()
    figures.update({f"duplicate {kind}": n / count for kind, n in sorted(sent.items())})
    engine.dispose()
    return figures


def _trace_round_trips(engine: sa.Engine, sent: collections.Counter[str]) -> Any:
    """On PostgreSQL with psycopg 3, trace the protocol of every new connection; the
    function returned adds the round trips traced since its last call to ``sent``:
    one per ReadyForQuery, which ends each of the server's answers. Cursor events do
    not see what is sent through libpq directly (the store's BEGIN)."""
    if engine.dialect.name != "postgresql":
        return lambda: None
    log = tempfile.TemporaryFile("w+")
    engine.dispose()  # the next connection is a new one, traced from its start
    sa.event.listen(
        engine, "connect", lambda dbapi_connection, record: dbapi_connection.pgconn.trace(log.fileno())
    )

    def count() -> None:
        log.flush()
        log.seek(0)
        sent.update({"round trips": sum("\tB\t" in line and "ReadyForQuery" in line for line in log)})
        log.seek(0)
        log.truncate()

    return count


def sqlite_pages_per_delivery(
    variant: str, ledger: bool, workdir: Path, warm: int, count: int
) -> float:
    path = workdir / f"pages-{variant}-{'ledger' if ledger else 'no-ledger'}.db"
    url = f"sqlite:///{path}"
    prepare_database(url)
    app = create_app(variant, url, ledger)
    engine = _engine(app)
    # Checkpoints would move pages from the log into the database file mid-count.
    sa.event.listen(
        engine,
        "connect",
        lambda dbapi_connection, record: dbapi_connection.execute("PRAGMA wal_autocheckpoint=0"),
    )
    engine.dispose()
    client = app.test_client()
    for _ in range(warm):
        _post(client, purchase_payload(os="android"))
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = Path(f"{path}-wal")
    before = wal.stat().st_size if wal.exists() else 0
    for _ in range(count):
        _post(client, purchase_payload(os="android"))
    written = wal.stat().st_size - max(before, WAL_HEADER)
    engine.dispose()
    return written / (4096 + FRAME_HEADER) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default=os.environ.get("NACHOCODE_TEST_POSTGRES_URL"),
                        help="PostgreSQL URL of a throwaway database (its tables are dropped and created again)")
    parser.add_argument("--warm", type=int, default=2000, help="deliveries before counting pages")
    parser.add_argument("--count", type=int, default=500, help="deliveries counted")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nachocode-writes-") as tmp:
        workdir = Path(tmp)
        urls = {"SQLite": f"sqlite:///{workdir / 'statements.db'}"}
        if args.postgres:
            urls["PostgreSQL"] = args.postgres
        for name, url in urls.items():
            for label, variant, ledger in APPS:
                figures = statements_per_delivery(variant, url, ledger)
                text = ", ".join(f"{kind} {n:g}" for kind, n in figures.items())
                print(f"{name} {label}: statements per delivery: {text}")
        for label, variant, ledger in APPS:
            pages = sqlite_pages_per_delivery(variant, ledger, workdir, args.warm, args.count)
            print(f"SQLite {label}: pages written per unique purchase: {pages:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

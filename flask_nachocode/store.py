"""The delivery store: where one app's deliveries, claims and ledger live, and the
statements every other part runs on them.

Exactly once rests on one thing only: the primary key of ``nachocode_claims``.
A delivery inserts its identity there *before* any handler runs, with
``ON CONFLICT DO NOTHING``; whoever inserts the row (and later commits) owns the
event, and every other process, host or re-send finds the row and answers
"duplicate". On PostgreSQL a concurrent insert of the same key waits for the
first transaction: if that one rolls back (a handler crashed), the waiting one
takes over, so a failure never blocks the next attempt.

What the CLI, the inspector, the metrics and the ledger read lives in
:mod:`.reads`, through :meth:`Store.reading`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import Flask, current_app
from flask.globals import app_ctx
from sqlalchemy.engine import Engine
from sqlalchemy.orm import scoped_session, sessionmaker

from . import ledger
from .events import Event, PurchaseEvent, RefundEvent, utcnow
from .tables import (
    LOCK_TIMEOUT_SECONDS,
    MYSQL_DEADLOCK,
    MYSQL_DIALECTS,
    MYSQL_LOCK_WAIT_TIMEOUT,
    MYSQL_NO_SUCH_TABLE,
    QUEUED_INLINE,
    SUPPORTED_DIALECTS,
    define_tables,
    insert_if_new,
    mysql_error_code,
    pg_claim,
)

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

logger = logging.getLogger("flask_nachocode")

#: SQLite's busy timeout: the same limit, also for the app's own engine with ``db=``
#: (Python's sqlite3 module waits 5 s by default too).
SQLITE_BUSY_TIMEOUT_MS = int(LOCK_TIMEOUT_SECONDS * 1000)
#: PostgreSQL's lock limit, the first statement of each delivery's transaction
#: (:meth:`Store.connection`). It must come before any statement that names a table:
#: PostgreSQL takes a statement's table locks before running any of it, so a limit set
#: inside the claim (as 0.1 did) never bounded a ``LOCK TABLE`` or a migration's
#: ``ALTER TABLE``. ``SET LOCAL`` ends with the transaction, so the app's own use of a
#: shared ``db`` keeps its settings, and PgBouncer's transaction pooling is safe.
_PG_LOCK_TIMEOUT = f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT_SECONDS * 1000)}ms'"
#: The transaction's start and its lock limit in one round trip (:func:`_pg_begin_limited`).
_PG_BEGIN_LIMITED = f"BEGIN; {_PG_LOCK_TIMEOUT}".encode()

#: How many deliveries :meth:`Store.prune` deletes per transaction: on SQLite about
#: 30 ms of holding the write lock, far inside the 5 s a delivery waits for it.
PRUNE_BATCH = 1000

#: What to run when the tables are missing, for the log and the CLI.
CREATE_TABLES_HINT = (
    "run `flask nachocode init-db`, or create them with your app's tables "
    "(db.create_all() or a migration)"
)

#: pg_advisory_xact_lock key that serialises creating the tables ("nachocod").
_CREATE_TABLES_LOCK = 0x6E6163686F636F64


def describe_database_error(error: BaseException) -> str:
    """``"OperationalError: <the database's first line>"``, for logs and the CLI.

    Not the statement or its parameters, which hold the body: only enough to
    tell "unreachable" from "no such table".
    """
    cause = getattr(error, "orig", None) or error
    reason = (str(cause).splitlines() or [""])[0][:200]
    described = f"{type(cause).__name__}: {reason}"
    if is_missing_table(error):
        return f"{described}; the nachocode tables are missing: {CREATE_TABLES_HINT}"
    return described


def _sqlstate(error: BaseException) -> str | None:
    # psycopg 3 names it sqlstate, psycopg2 pgcode.
    cause = getattr(error, "orig", None)
    return getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)


def is_missing_table(error: BaseException) -> bool:
    """Whether a database error says that a table does not exist."""
    if _sqlstate(error) == "42P01" or mysql_error_code(error) == MYSQL_NO_SUCH_TABLE:
        return True
    return "no such table" in str(getattr(error, "orig", error))


def is_lock_timeout(error: BaseException) -> bool:
    """Whether a database error is a wait for another transaction's lock that gave up
    (:data:`LOCK_TIMEOUT_SECONDS`): PostgreSQL's ``lock_not_available``, SQLite's
    "database is locked", MySQL's lock wait timeout."""
    if _sqlstate(error) == "55P03" or mysql_error_code(error) == MYSQL_LOCK_WAIT_TIMEOUT:
        return True
    return "database is locked" in str(getattr(error, "orig", error))


def check_supported(uri: str, setting: str) -> None:
    """Refuse, at ``init_app``, a database the store does not run on, and a MySQL
    connection character set that cannot hold every character (Korean text and
    emoji need ``utf8mb4``). ``setting`` names the config key the URI came from."""
    url = sa.engine.make_url(uri)
    backend = url.get_backend_name()
    if backend not in SUPPORTED_DIALECTS:
        raise RuntimeError(
            f"{setting} points at a {backend} database; flask-nachocode's delivery store runs "
            "on SQLite, PostgreSQL, and MySQL or MariaDB only"
        )
    charset = url.query.get("charset")
    if backend in MYSQL_DIALECTS and charset is not None and charset != "utf8mb4":
        raise RuntimeError(
            f"{setting} connects to MySQL with charset={charset}, which cannot hold every "
            "character a delivery may carry; use charset=utf8mb4"
        )


def _check_mysql_charset(connection: sa.Connection) -> None:
    # A server can override what the client asked for (skip-character-set-client-handshake,
    # an init_command): check what the session really uses, once per engine.
    names = connection.exec_driver_sql(
        "SELECT @@character_set_client, @@character_set_connection, @@character_set_results"
    ).one()
    if any(name != "utf8mb4" for name in names):
        raise RuntimeError(
            "the MySQL connection's character set is "
            f"{'/'.join(str(name) for name in names)} (client/connection/results), which cannot "
            "hold every character a delivery may carry; connect with charset=utf8mb4"
        )


def is_worth_retrying(error: sa.exc.DBAPIError) -> bool:
    """Whether a statement that failed before any handler ran may just be run again
    after a rollback: its connection was dropped and replaced, or the database broke
    a deadlock (MySQL's InnoDB deadlocks on concurrent inserts of one key when the
    first inserter rolls back). Not a lock timeout (:func:`is_lock_timeout`): that
    has waited its time already."""
    if error.connection_invalidated:
        return True
    if mysql_error_code(error) == MYSQL_DEADLOCK:
        return True
    # PostgreSQL's deadlock_detected and serialization_failure.
    return getattr(error.orig, "sqlstate", None) in ("40P01", "40001")


def _mysql_lock_wait(dbapi_connection: Any, connection_record: Any, *args: Any) -> None:
    """Make a MySQL connection give up waiting for a lock after
    :data:`LOCK_TIMEOUT_SECONDS`, as PostgreSQL's lock_timeout and SQLite's busy
    timeout do, once per connection: InnoDB's default of 50 s is past Nachocode's budget."""
    if connection_record.info.get("nachocode_mysql_ready"):
        return
    seconds = max(1, int(LOCK_TIMEOUT_SECONDS))
    cursor = dbapi_connection.cursor()
    # innodb_lock_wait_timeout bounds row locks; lock_wait_timeout bounds metadata
    # locks: a LOCK TABLES, or an ALTER TABLE queued behind an open reader, which
    # every later statement on the table waits behind (the server's default: a day).
    cursor.execute(
        f"SET SESSION innodb_lock_wait_timeout = {seconds}, SESSION lock_wait_timeout = {seconds}"
    )
    cursor.close()
    connection_record.info["nachocode_mysql_ready"] = True


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any, *args: Any) -> None:
    """Set up an SQLite connection for several processes on one file, once.

    Listens to "checkout" rather than "connect" so that it also reaches the
    connections an app's own engine opened before the extension first ran.
    """
    if connection_record.info.get("nachocode_sqlite_ready"):
        return
    cursor = dbapi_connection.cursor()
    # With the busy timeout a second gunicorn worker waits for the write lock
    # instead of failing with "database is locked"; WAL lets readers and that one
    # writer work at once.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Switching a new file to WAL takes an exclusive lock, and SQLite does not wait
    # for it when another connection is switching at the same moment (workers
    # starting together on a fresh file): it answers "database is locked" at once,
    # busy timeout or not. The switch is kept in the file, so trying again shortly
    # finds it done.
    deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    cursor.close()
    connection_record.info["nachocode_sqlite_ready"] = True


#: The per-connection set-up each database needs, by dialect name.
_CONNECTION_SET_UP = {"sqlite": _sqlite_pragmas} | dict.fromkeys(MYSQL_DIALECTS, _mysql_lock_wait)


def _set_up_connections(engine: Engine) -> None:
    """Run the database's per-connection set-up (SQLite's busy timeout and WAL,
    MySQL's lock wait limit) on each connection ``engine`` hands out: the
    extension's own engine, or the app's with ``db=``. Safe to call twice."""
    set_up = _CONNECTION_SET_UP.get(engine.dialect.name)
    if set_up is not None and not sa.event.contains(engine, "checkout", set_up):
        sa.event.listen(engine, "checkout", set_up)


#: Every engine the deliveries or the app's handlers run on: the extension's own, and
#: each of the app's with ``db=`` (:func:`_renew_pools_after_fork`).
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
#: The pools a forked process inherited, kept and never used. Dropping them would let
#: the garbage collector close their connections, and closing one can speak on the
#: socket the parent still uses (mysqlclient sends COM_QUIT on close).
_INHERITED_POOLS: list[sa.pool.Pool] = []


def _pg_begin_limited(connection: sa.Connection) -> bool:
    """Start the transaction of ``connection`` with its lock limit in one round trip,
    on psycopg 3 when nothing has run in it yet; False when it did not (another
    driver, a transaction the app began already, an engine with its own isolation
    level, read-only or autocommit setting, or an error, which the plain ``SET
    LOCAL`` that follows then raises the usual way).

    psycopg sends its ``BEGIN`` on its own before the first statement, so ``SET
    LOCAL`` through SQLAlchemy costs two round trips, a quarter of a delivery's on
    PostgreSQL: under load each one is a wait for the server process to be
    scheduled. Sent as one simple query through libpq, both take one. psycopg reads
    the transaction's state from libpq, so it sends no ``BEGIN`` of its own after
    this and commits and rolls back as usual.
    """
    driver = connection.connection.driver_connection
    pgconn = getattr(driver, "pgconn", None)
    if driver is None or pgconn is None:
        return False
    import psycopg  # present: pgconn is psycopg 3's

    if pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return False
    # psycopg's own BEGIN carries these (BEGIN ISOLATION LEVEL ..., READ ONLY), and in
    # autocommit mode it sends none: a plain BEGIN would not be what the app set up.
    if driver.autocommit or any(
        getattr(driver, name) is not None for name in ("isolation_level", "read_only", "deferrable")
    ):
        return False
    # On failure (the connection killed, say) nothing is cleaned up here: the plain
    # SET LOCAL then fails through SQLAlchemy, which tells a lost connection (the
    # claim tries again on a new one) from a database error (503).
    try:
        result = pgconn.exec_(_PG_BEGIN_LIMITED)
    except psycopg.Error:
        return False
    return bool(result.status == psycopg.pq.ExecStatus.COMMAND_OK)


def _renew_pools_after_fork() -> None:
    """In a forked child (gunicorn ``--preload``, Celery's prefork pool,
    ``multiprocessing``), give every tracked engine a new, empty pool, as SQLAlchemy
    documents ("Using Connection Pools with Multiprocessing or os.fork()"). A connection
    opened before the fork, when the app touched the database at import, is shared with
    the parent and every sibling: answers read by the wrong process, "Command Out of
    Sync", lost connections. ``close=False`` leaves the parent's connections alone."""
    for engine in list(_ENGINES):
        if isinstance(engine.pool, sa.pool.StaticPool):
            # An in-memory SQLite database lives in its one connection: the child's
            # copy of it is the only database it has.
            continue
        _INHERITED_POOLS.append(engine.pool)
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_renew_pools_after_fork)


def _engines_of(app: Flask, db: SQLAlchemy) -> list[Engine]:
    """The app's engines, every bind, once ``db.init_app(app)`` has made them."""
    if app.extensions.get("sqlalchemy") is not db:
        return []  # db.init_app comes later: ensure_ready tracks db.engine then
    with app.app_context():
        return list(db.engines.values())


def resolve_database_uri(app: Flask) -> str:
    """``NACHOCODE_DATABASE_URI``, falling back to the app's database, then to
    ``sqlite:///nachocode.db``; relative SQLite paths live in the instance folder,
    as in Flask-SQLAlchemy."""
    uri = (
        app.config.get("NACHOCODE_DATABASE_URI")
        or app.config.get("SQLALCHEMY_DATABASE_URI")
        or "sqlite:///nachocode.db"
    )
    url = sa.engine.make_url(uri)
    if (
        url.get_backend_name() == "sqlite"
        and url.database
        and url.database != ":memory:"
        and not url.database.startswith("file:")
        and not os.path.isabs(url.database)
    ):
        os.makedirs(app.instance_path, exist_ok=True)
        url = url.set(database=os.path.join(app.instance_path, url.database))
    return url.render_as_string(hide_password=False)


@dataclass
class SchemaGaps:
    """What a database lacks of the tables this version defines (:meth:`Store.schema_gaps`)."""

    tables: list[sa.Table] = field(default_factory=list)
    indexes: list[sa.Index] = field(default_factory=list)
    columns: list[sa.Column[Any]] = field(default_factory=list)

    def addable_indexes(self) -> list[sa.Index]:
        """The missing indexes :meth:`Store.upgrade_schema` creates: those of tables
        that lack no column (an index may be on the missing one)."""
        lacking = {column.table.name for column in self.columns}
        return [index for index in self.indexes if getattr(index.table, "name", "") not in lacking]

    def describe(self) -> str:
        """``"index ix_a, column t.c"``: the indexes and columns missing, for a log line."""
        named = [f"index {index.name}" for index in self.indexes]
        named += [f"column {column.table.name}.{column.name}" for column in self.columns]
        return ", ".join(named)


def add_column_statement(column: sa.Column[Any], dialect: sa.Dialect) -> str:
    """The ``ALTER TABLE ... ADD COLUMN`` that adds ``column`` to its existing table."""
    preparer = dialect.identifier_preparer
    definition = sa.schema.CreateColumn(column).compile(dialect=dialect)
    return f"ALTER TABLE {preparer.format_table(column.table)} ADD COLUMN {definition}"


class Store:
    """Where one app's deliveries, claims and ledger live, and how to reach them.

    ``session`` is a scoped session tied to the app context, like
    Flask-SQLAlchemy's ``db.session``; with ``db=`` it *is* ``db.session``.
    The per-delivery statements run on the session's connection (:meth:`connection`):
    the same transaction as the handlers' ORM writes, without the ORM's per-statement work.
    """

    def __init__(self, app: Flask, db: SQLAlchemy | None, *, ledger_enabled: bool = True) -> None:
        self.db = db
        self.ledger_enabled = ledger_enabled
        self.metadata: sa.MetaData = db.metadata if db is not None else sa.MetaData()
        # All of them always, so that ``create_all`` and the shared metadata hold the complete set.
        self.deliveries, self.claims, self.purchases, self.attempts = define_tables(self.metadata)
        self._lock = threading.Lock()
        self._ready = False
        self._dialect_name = ""
        self._attempts_table_exists = False
        self._engine: Engine | None = None
        self.session: Any
        if db is not None:
            self.session = db.session
            self._uri = None
            # Flask-SQLAlchemy may also take its engines from elsewhere
            # (SQLALCHEMY_ENGINES); ensure_ready checks the engine it made.
            if app.config.get("SQLALCHEMY_DATABASE_URI"):
                check_supported(app.config["SQLALCHEMY_DATABASE_URI"], "SQLALCHEMY_DATABASE_URI")
            # Tracked now, not at the first delivery: the app may open connections at
            # import (db.create_all()) and then fork its workers.
            _ENGINES.update(_engines_of(app, db))
        else:
            self._uri = resolve_database_uri(app)
            check_supported(
                self._uri,
                "NACHOCODE_DATABASE_URI"
                if app.config.get("NACHOCODE_DATABASE_URI")
                else "SQLALCHEMY_DATABASE_URI",
            )
            self._sessionmaker = sessionmaker(expire_on_commit=False)
            self.session = scoped_session(self._sessionmaker, scopefunc=_app_context_id)
            app.teardown_appcontext(self._remove_session)
        # Built once and run with parameters: building a statement (and its cache
        # key) costs more CPU than running it.
        self._insert_delivery_statement = sa.insert(self.deliveries)
        deliveries = self.deliveries
        self._set_finished_statement = (
            sa.update(deliveries)
            .where(deliveries.c.id == sa.bindparam("delivery_id"))
            .values(
                finished_at=sa.bindparam("new_finished_at", type_=deliveries.c.finished_at.type),
                duration_ms=sa.bindparam("new_duration_ms", type_=deliveries.c.duration_ms.type),
            )
        )

    def connection(self) -> sa.Connection:
        """The session's connection, for a delivery's statements. On PostgreSQL the
        first call in a transaction sets its ``lock_timeout`` (:data:`_PG_LOCK_TIMEOUT`),
        so that no statement of the delivery, nor of its handlers, waits on a lock for
        longer than :data:`LOCK_TIMEOUT_SECONDS`; the other databases have it per
        connection (:func:`_set_up_connections`)."""
        session = self.session()  # the scoped session's current Session
        connection: sa.Connection = session.connection()
        if self._dialect_name == "postgresql":
            transaction = session.get_transaction()
            if session.info.get("nachocode_lock_limit") is not transaction:
                if not _pg_begin_limited(connection):
                    connection.exec_driver_sql(_PG_LOCK_TIMEOUT)
                session.info["nachocode_lock_limit"] = transaction
        return connection

    def _remove_session(self, exc: BaseException | None) -> None:
        self.session.remove()

    @property
    def engine(self) -> Engine:
        if self.db is not None:
            return self.db.engine
        if self._engine is None:
            self._engine = self._create_engine()
        return self._engine

    def _create_engine(self) -> Engine:
        assert self._uri is not None
        url = sa.engine.make_url(self._uri)
        options: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            # As Flask-SQLAlchemy does: one in-memory database for every thread,
            # instead of an empty one per thread.
            options = {
                "poolclass": sa.pool.StaticPool,
                "connect_args": {"check_same_thread": False},
            }
        else:
            # A pooled connection the database dropped (restart, failover, a cut
            # network) is replaced before use instead of failing one delivery.
            options = {"pool_pre_ping": True}
        engine = sa.create_engine(url, **options)
        _set_up_connections(engine)
        _ENGINES.add(engine)
        self._sessionmaker.configure(bind=engine)
        return engine

    def ensure_ready(self) -> None:
        """Connect lazily, and with its own engine create the tables on first use
        so that an app needs no set-up step. Cheap after the first call; raises
        ``SQLAlchemyError`` (and tries again next time) while the database is
        unreachable."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            engine = self.engine
            if self.db is None:
                gaps = self.create_tables()
                if gaps.indexes or gaps.columns:
                    # Not added here: building an index or a column on a large table
                    # would hold the deliveries of every worker starting up.
                    logger.warning(
                        "nachocode: the tables lack %s of this version; deliveries work, "
                        "but run `flask nachocode init-db` to add them",
                        gaps.describe(),
                    )
                if engine.dialect.name == "sqlite":
                    _warn_if_flask_sqlalchemy_shares_the_file(engine)
            else:
                check_supported(engine.url.render_as_string(), "The app's database")
                # The app's own engine: its connections must survive several workers too.
                _set_up_connections(engine)
                _ENGINES.add(engine)
                # The tables are the app's to create (create_all or migrations): say
                # so once, now, rather than only in every failed delivery's log line.
                self._warn_if_tables_missing()
            if engine.dialect.name in MYSQL_DIALECTS:
                with engine.connect() as connection:
                    _check_mysql_charset(connection)
            self._dialect_name = engine.dialect.name
            self._ready = True

    def missing_tables(self, *, attempts: bool = False) -> list[str]:
        """The names of the tables a delivery needs that do not exist (with
        ``attempts``, also the deferred deliveries' ``nachocode_attempts``); raises
        ``SQLAlchemyError`` while the database cannot be reached."""
        tables = [self.deliveries, self.claims, self.purchases]
        if attempts:
            tables.append(self.attempts)
        with self.engine.connect() as connection:
            inspector = sa.inspect(connection)
            return [table.name for table in tables if not inspector.has_table(table.name)]

    def _warn_if_tables_missing(self) -> None:
        missing = self.missing_tables()
        if missing:
            logger.warning(
                "nachocode: the tables %s are missing, so every delivery will be answered "
                "503 until they exist: %s",
                ", ".join(missing),
                CREATE_TABLES_HINT,
            )

    def create_tables(self) -> SchemaGaps:
        """Create the ``nachocode_*`` tables that do not exist yet, and return what
        the database lacked before (:meth:`schema_gaps`); safe when several workers
        start at once."""
        return self._changing_schema(self._create_missing_tables)

    def upgrade_schema(self) -> SchemaGaps:
        """``init-db``: create the missing tables and the missing indexes of existing
        ones, and return what the database lacked before. Missing columns are left
        to the operator (:func:`add_column_statement`): adding one can rewrite a
        large table while every delivery waits."""

        def upgrade(connection: sa.Connection) -> SchemaGaps:
            gaps = self._create_missing_tables(connection)
            for index in gaps.addable_indexes():
                index.create(connection)
            return gaps

        return self._changing_schema(upgrade)

    def schema_gaps(self, connection: sa.Connection) -> SchemaGaps:
        """What the database lacks of this version's tables: whole tables, and the
        indexes and columns of tables that exist (a database made by an earlier version)."""
        inspector = sa.inspect(connection)
        existing = set(inspector.get_table_names())
        gaps = SchemaGaps()
        for table in (self.deliveries, self.claims, self.purchases, self.attempts):
            if table.name not in existing:
                gaps.tables.append(table)
                continue
            columns = {column["name"] for column in inspector.get_columns(table.name)}
            gaps.columns.extend(column for column in table.columns if column.name not in columns)
            indexes = {index["name"] for index in inspector.get_indexes(table.name)}
            gaps.indexes.extend(index for index in table.indexes if index.name not in indexes)
        return gaps

    def _create_missing_tables(self, connection: sa.Connection) -> SchemaGaps:
        gaps = self.schema_gaps(connection)
        self.metadata.create_all(connection, tables=gaps.tables)
        return gaps

    def _changing_schema(self, change: Callable[[sa.Connection], SchemaGaps]) -> SchemaGaps:
        engine = self.engine
        if engine.dialect.name == "postgresql":
            # Concurrent CREATE TABLEs of one name fail on PostgreSQL even with
            # checkfirst; a transaction-scoped advisory lock lines the workers up,
            # and each one after the first finds the tables there.
            with engine.begin() as connection:
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_CREATE_TABLES_LOCK)))
                return change(connection)
        for _ in range(4):
            try:
                with engine.begin() as connection:
                    return change(connection)
            except sa.exc.OperationalError:
                # Another worker created a table between our check and our CREATE
                # ("table ... already exists"); the next checked pass skips it.
                pass
        with engine.begin() as connection:
            return change(connection)

    def claim(
        self,
        connection: sa.Connection,
        event: Event,
        now: datetime,
        record: dict[str, Any] | None = None,
        *,
        with_ledger: bool = True,
    ) -> tuple[bool, int | None]:
        """Claim ``event`` and write its ledger row: the start of the delivery's
        transaction, before any handler runs, on its connection (:meth:`connection`).
        Returns whether it claimed (False for a duplicate, which wrote nothing to the
        claims or the ledger; an event without an identity, ``unavailable_users``, is
        never a duplicate) and, when it also inserted ``record`` as the delivery's
        record, its id. ``connection`` comes from :meth:`connection`, which bounds every
        lock wait of the transaction.

        ``record`` is the record as it would be inserted after a handled delivery
        (every column but ``id`` and ``outcome``); it is inserted here when
        :meth:`records_with_claim` says the claim's own statement can carry it, as
        "handled" or "duplicate". ``with_ledger=False`` claims only: a deferred
        delivery's ledger row is written by the worker, with its handlers
        (:meth:`apply_ledger`).
        """
        if event.identity is None:
            return True, None
        if (
            not with_ledger
            or not self.ledger_enabled
            or not isinstance(event, (PurchaseEvent, RefundEvent))
        ):
            return self._claim_identity(connection, event.identity, event.name, now), None
        if record is not None and self.records_with_claim(event):
            assert isinstance(event, PurchaseEvent)
            return ledger.claim_and_apply_purchase(
                connection, self.claims, self.purchases, self.deliveries, event, now, record
            )
        if not self._claim_identity(connection, event.identity, event.name, now):
            return False, None
        self.apply_ledger(connection, event, now)
        return True, None

    def records_with_claim(self, event: Event) -> bool:
        """Whether :meth:`claim` writes ``event``'s delivery record in the claim's own
        statement: a purchase, with the ledger on, on PostgreSQL (after :meth:`ensure_ready`)."""
        return (
            self.ledger_enabled
            and self._dialect_name == "postgresql"
            and isinstance(event, PurchaseEvent)
        )

    def apply_ledger(self, connection: sa.Connection, event: Event, now: datetime) -> None:
        """Write the ledger row of a claimed purchase or refund (a deferred delivery's
        worker, before its handlers); :class:`~flask_nachocode.errors.Refuse` as the claim."""
        if not self.ledger_enabled:
            return
        if isinstance(event, PurchaseEvent):
            ledger.apply_purchase(connection, self.purchases, event, now)
        elif isinstance(event, RefundEvent):
            ledger.apply_refund(connection, self.purchases, event, now)

    def release_claim(self, connection: sa.Connection, identity: str | None) -> None:
        """Give up a claim whose delivery ended without being handled, so that a re-send
        or a replay is handled instead of answered as a duplicate, as when a
        synchronous delivery's transaction rolls back."""
        if identity is not None:
            connection.execute(sa.delete(self.claims).where(self.claims.c.identity == identity))

    def take_queued(
        self, connection: sa.Connection, delivery_id: int, attempt: int
    ) -> sa.Row[Any] | None:
        """Lock queued delivery ``delivery_id`` for attempt number ``attempt`` until the
        transaction ends, and return it; None when it is not queued, or when that
        attempt was made already (a task the broker delivered twice, a re-queue).

        The lock is taken by an UPDATE, which every database supports: a second worker
        on the same delivery waits for the first one's commit, then finds it no longer
        queued, or its attempt recorded, and leaves it alone.
        """
        table = self.deliveries
        taken = connection.execute(
            sa.update(table)
            .where(table.c.id == delivery_id, table.c.outcome == "queued")
            .values(outcome="queued")
        )
        if taken.rowcount != 1:
            return None
        attempts = self.attempts
        made = connection.execute(
            sa.select(sa.func.coalesce(sa.func.max(attempts.c.attempt), 0)).where(
                attempts.c.delivery_id == delivery_id
            )
        ).scalar_one()
        if made != attempt - 1:
            return None
        row: sa.Row[Any] = connection.execute(
            sa.select(table).where(table.c.id == delivery_id)
        ).one()
        return row

    def record_attempt(self, connection: sa.Connection, values: dict[str, Any]) -> None:
        """Insert one attempt of a deferred delivery (the values of every column)."""
        connection.execute(sa.insert(self.attempts), values)

    def finish_deferred(self, connection: sa.Connection, delivery_id: int, **values: Any) -> None:
        """Give a deferred delivery its final outcome, error and traceback (its status
        stays the 202 Nachocode was answered)."""
        table = self.deliveries
        connection.execute(sa.update(table).where(table.c.id == delivery_id).values(**values))

    def has_attempts_table(self) -> bool:
        """Whether ``nachocode_attempts`` exists: a database made before deferral, whose
        migration has not added it yet, must keep working for ``show``, the inspector
        and ``prune``. Asked again until it is there."""
        if not self._attempts_table_exists:
            self.ensure_ready()
            self._attempts_table_exists = sa.inspect(self.engine).has_table(self.attempts.name)
        return self._attempts_table_exists

    def _queued(self, *conditions: sa.ColumnElement[bool]) -> sa.Select[Any]:
        """The queued deliveries (matching ``conditions``), oldest first, with when
        each was queued, its attempts made and when the next one is due: read through
        the index ``ix_nachocode_deliveries_queued``, and the attempts' primary key for
        each, so it costs what the queue holds, not what the store does."""
        table, attempts = self.deliveries, self.attempts
        of_delivery = attempts.c.delivery_id == table.c.id
        made = sa.select(sa.func.max(attempts.c.attempt)).where(of_delivery)
        due_at = sa.select(sa.func.max(attempts.c.next_attempt_at)).where(of_delivery)
        return (
            sa.select(
                table.c.id,
                table.c.finished_at,
                made.scalar_subquery().label("made"),
                due_at.scalar_subquery().label("due_at"),
            )
            .where(table.c.outcome == QUEUED_INLINE, *conditions)
            .order_by(table.c.id)
        )

    def overdue_queued(self, older_than: timedelta) -> list[tuple[int, int]]:
        """``(delivery id, next attempt number)`` of every queued delivery whose next
        attempt has been due for longer than ``older_than``, oldest first: the ones
        whose task a broker may have lost."""
        with self.reading() as session:
            rows = session.execute(self._queued()).all()
        return _due(rows, utcnow() - older_than)

    def stranded_queued(self, connection: sa.Connection, identity: str) -> tuple[int, int] | None:
        """``(delivery id, next attempt number)`` of the queued delivery of ``identity``
        when its next attempt is due and no worker is running one (its row is then
        locked until this transaction ends); None otherwise: nothing queued, a retry
        waiting for its time, or an attempt under way."""
        due = _due(
            connection.execute(self._queued(self.deliveries.c.identity == identity)), utcnow()
        )
        if not due:
            return None
        table = self.deliveries
        # A running attempt holds the row's lock (take_queued): pass it by, never wait.
        free = connection.execute(
            sa.select(table.c.id)
            .where(table.c.id == due[0][0], table.c.outcome == "queued")
            .with_for_update(skip_locked=True)
        ).first()
        return due[0] if free is not None else None

    def _claim_identity(
        self, connection: sa.Connection, identity: str, event_name: str, now: datetime
    ) -> bool:
        values = {"identity": identity, "event": event_name, "claimed_at": now}
        if connection.dialect.name == "postgresql":
            return connection.execute(pg_claim(self.claims), values).first() is not None
        return insert_if_new(connection, self.claims, ("identity",), values)

    def set_finished(
        self, connection: sa.Connection, delivery_id: int, finished_at: datetime, duration_ms: float
    ) -> None:
        """Correct the end time of a record that :meth:`claim` inserted before the handlers ran."""
        connection.execute(
            self._set_finished_statement,
            {
                "delivery_id": delivery_id,
                "new_finished_at": finished_at,
                "new_duration_ms": duration_ms,
            },
        )

    def record_delivery(self, connection: sa.Connection, values: dict[str, Any]) -> int:
        """Insert the delivery record (the values of every column); a replay also
        updates its original. Returns the new delivery's id."""
        result = connection.execute(self._insert_delivery_statement, values)
        key = result.inserted_primary_key
        assert key is not None  # a single-row INSERT always has one
        original = values["replay_of"]
        if original is not None:
            table = self.deliveries
            outcome = values["outcome"]
            # The original shows its latest outcome, except that a duplicate does
            # not hide that an earlier replay of it was the one that handled it.
            latest = (
                outcome
                if outcome != "duplicate"
                else sa.case((table.c.outcome == "handled", "handled"), else_="duplicate")
            )
            connection.execute(
                sa.update(table)
                .where(table.c.id == original)
                .values(
                    replay_count=table.c.replay_count + 1, outcome=latest, status=values["status"]
                )
            )
        return int(key[0])

    def rollback_quietly(self) -> None:
        """Roll the session back, ignoring a connection that is already gone (the
        pool replaces it on the next checkout): for paths that are failing anyway."""
        try:
            self.session.rollback()
        except sa.exc.SQLAlchemyError:
            pass

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """The session, for reads (:mod:`.reads`, and the worker's look for overdue
        deliveries); the read transaction ends on the way out, so that SQLite
        writers never wait on it."""
        self.ensure_ready()
        try:
            yield self.session
        finally:
            self.rollback_quietly()

    def prune(self, older_than: timedelta, *, batch: int = PRUNE_BATCH) -> int:
        """Delete the deliveries received longer ago than ``older_than``, except queued
        ones, with their attempts; returns how many.

        It works in transactions of ``batch`` deliveries: one transaction for all of them
        held SQLite's write lock for 7.6 s over 400,000 rows, and a delivery arriving
        meanwhile gave up after 5 s. Claims are kept (they hold only store ids), so a
        very old purchase re-sent from the dashboard is still recognised as a duplicate.
        """
        self.ensure_ready()
        table, attempts = self.deliveries, self.attempts
        with_attempts = self.has_attempts_table()
        # A queued delivery is work still to do, however old: never pruned.
        old = sa.and_(table.c.received_at < utcnow() - older_than, table.c.outcome != "queued")
        # Ids first, then DELETE ... IN: MySQL refuses a LIMIT inside an IN subquery.
        oldest = sa.select(table.c.id).where(old).order_by(table.c.id).limit(batch)
        deleted = 0
        while True:
            ids = self.session.execute(oldest).scalars().all()
            if not ids:
                self.session.rollback()
                return deleted
            if with_attempts:
                self.session.execute(sa.delete(attempts).where(attempts.c.delivery_id.in_(ids)))
            self.session.execute(sa.delete(table).where(table.c.id.in_(ids)))
            self.session.commit()
            deleted += len(ids)


def _due(rows: Any, cutoff: datetime) -> list[tuple[int, int]]:
    """``(delivery id, next attempt number)`` of the rows of :meth:`Store._queued`
    whose next attempt was due by ``cutoff``."""
    due = []
    for delivery_id, queued_at, made, due_at in rows:
        # Compared here rather than in SQL: SQLite keeps naive UTC text, and a max()
        # of a column loses the type that gives its zone back.
        when = due_at if due_at is not None else queued_at
        if isinstance(when, str):
            when = datetime.fromisoformat(when)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        if when <= cutoff:
            due.append((int(delivery_id), int(made or 0) + 1))
    return due


def _warn_if_flask_sqlalchemy_shares_the_file(engine: Engine) -> None:
    # SQLite locks the whole file for a writer: while the delivery's transaction
    # holds the claim, a handler committing through the app's own engine to the
    # same file waits for it, and fails with "database is locked" every time.
    sqlalchemy_ext = current_app.extensions.get("sqlalchemy")
    ours = engine.url.database
    if sqlalchemy_ext is None or not ours or ours == ":memory:":
        return
    for app_engine in sqlalchemy_ext.engines.values():
        theirs = app_engine.url.database
        if (
            app_engine.dialect.name == "sqlite"
            and theirs
            and os.path.abspath(theirs) == os.path.abspath(ours)
        ):
            logger.warning(
                "flask-nachocode and Flask-SQLAlchemy use the same SQLite file %s through two "
                "engines: a handler that writes through db.session will wait for the delivery's "
                "lock and fail with 'database is locked'. "
                "Pass your db: NachocodeWebhook(app, db=db).",
                ours,
            )
            return


def _app_context_id() -> int:
    # Same scope as Flask-SQLAlchemy's session: one session per app context.
    return id(app_ctx._get_current_object())  # type: ignore[attr-defined]

"""The delivery store: every delivery that passed the key check, and the claims
that make handling exactly-once.

Tables are SQLAlchemy Core tables on a ``MetaData``: the app's own
``db.metadata`` when the extension is given ``db=`` (so Flask-Migrate and
Alembic autogenerate see them and the claim commits together with the
handlers' writes), otherwise a private one on the extension's own engine.

Exactly once rests on one thing only: the primary key of ``nachocode_claims``.
A delivery inserts its identity there *before* any handler runs, with
``ON CONFLICT DO NOTHING``; whoever inserts the row (and later commits) owns the
event, and every other process, host or re-send finds the row and answers
"duplicate". On PostgreSQL a concurrent insert of the same key waits for the
first transaction: if that one rolls back (a handler crashed), the waiting one
takes over, so a failure never blocks the next attempt.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import Flask, current_app
from flask.globals import app_ctx
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import scoped_session, sessionmaker

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

logger = logging.getLogger("flask_nachocode")

#: Outcomes a stored delivery can have.
OUTCOMES = ("handled", "duplicate", "failed", "refused", "invalid", "unhandled")
#: Outcomes whose handlers can be run again by ``replay``.
REPLAYABLE = ("failed", "refused", "unhandled")

#: How long an SQLite connection waits for another process's write to finish
#: before giving up with "database is locked"; longer than Nachocode's 10 s.
SQLITE_BUSY_TIMEOUT_MS = 30_000

#: pg_advisory_xact_lock key that serialises creating the tables ("nachocod").
_CREATE_TABLES_LOCK = 0x6E6163686F636F64


def describe_database_error(error: BaseException) -> str:
    """``"OperationalError: <the database's first line>"``, for logs and the CLI.

    Not the statement or its parameters, which hold the body: only enough to
    tell "unreachable" from "no such table".
    """
    cause = getattr(error, "orig", None) or error
    reason = (str(cause).splitlines() or [""])[0][:200]
    return f"{type(cause).__name__}: {reason}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every database.

    SQLite keeps no zone, so values are stored as naive UTC there and given
    their zone back when read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _table(metadata: sa.MetaData, name: str, *columns: Any, **options: Any) -> sa.Table:
    # One extension object serving several apps that share one ``db`` must not
    # define the table twice on the same metadata.
    existing = metadata.tables.get(name)
    return existing if existing is not None else sa.Table(name, metadata, *columns, **options)


def define_deliveries(metadata: sa.MetaData) -> sa.Table:
    return _table(
        metadata,
        "nachocode_deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("event", sa.String(32), nullable=True),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        # Every index is one more page written by every delivery's commit (a fifth of
        # the database time of a purchase on SQLite, measured): only the inspector's
        # searches have one. ``identity`` is looked up in the claims, ``received_at``
        # only by ``prune``, which may scan.
        sa.Column("identity", sa.String(512), nullable=True),
        sa.Column("user_id", sa.Text, nullable=True, index=True),
        sa.Column("iap_log_id", sa.BigInteger, nullable=True, index=True),
        sa.Column("body", sa.LargeBinary, nullable=True),
        sa.Column("headers", sa.JSON, nullable=True),
        sa.Column("remote_addr", sa.String(64), nullable=True),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("replay_of", sa.BigInteger, nullable=True),
        sa.Column("replay_count", sa.Integer, nullable=False, server_default="0"),
        # Partial: a new delivery (not a replay) writes nothing to it.
        sa.Index(
            "ix_nachocode_deliveries_replay_of",
            "replay_of",
            postgresql_where=sa.text("replay_of IS NOT NULL"),
            sqlite_where=sa.text("replay_of IS NOT NULL"),
        ),
    )


def define_claims(metadata: sa.MetaData) -> sa.Table:
    # Kept when old deliveries are pruned: forgetting a claim would let an old
    # purchase, re-sent from the dashboard, be granted a second time.
    return _table(
        metadata,
        "nachocode_claims",
        sa.Column("identity", sa.String(512), primary_key=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("claimed_at", UTCDateTime, nullable=False),
        # On SQLite, one B-tree keyed by the identity instead of a rowid table plus
        # an index on it: one page fewer written per claim.
        sqlite_with_rowid=False,
    )


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any, *args: Any) -> None:
    """Set up an SQLite connection for several processes on one file, once.

    Listens to "checkout" rather than "connect" so that it also reaches the
    connections an app's own engine opened before the extension first ran.
    """
    if connection_record.info.get("nachocode_sqlite_ready"):
        return
    cursor = dbapi_connection.cursor()
    # The busy timeout first: switching to WAL itself needs a lock that another
    # worker starting at the same moment may hold. With it a second gunicorn
    # worker waits for the write lock instead of failing with "database is
    # locked"; WAL lets readers and that one writer work at once.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
    connection_record.info["nachocode_sqlite_ready"] = True


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


class Store:
    """Where one app's deliveries, claims and ledger live, and how to reach them.

    ``session`` is a scoped session tied to the app context, like
    Flask-SQLAlchemy's ``db.session``; with ``db=`` it *is* ``db.session``.
    The per-delivery statements run on ``session.connection()``, fetched once: the
    same transaction as the handlers' ORM writes, without the ORM's per-statement
    work (``Session.execute`` cost 10-35 µs more per statement, three per delivery).
    """

    def __init__(self, app: Flask, db: SQLAlchemy | None) -> None:
        self.db = db
        self.metadata: sa.MetaData = db.metadata if db is not None else sa.MetaData()
        self.deliveries = define_deliveries(self.metadata)
        self.claims = define_claims(self.metadata)
        # The ledger table is defined here too so that ``create_all`` and the
        # shared metadata always hold the complete set.
        from .ledger import define_purchases

        self.purchases = define_purchases(self.metadata)
        self._lock = threading.Lock()
        self._ready = False
        self._engine: Engine | None = None
        self.session: Any
        if db is not None:
            self.session = db.session
            self._uri = None
        else:
            self._uri = resolve_database_uri(app)
            self._sessionmaker = sessionmaker(expire_on_commit=False)
            self.session = scoped_session(self._sessionmaker, scopefunc=_app_context_id)
            app.teardown_appcontext(self._remove_session)
        self._insert_ignoring_conflict: Callable[..., Any] | None = None
        # Statements are built once and run with parameters: building them (and
        # their cache keys) per delivery cost more CPU than running them.
        self._claim_statement: Any = None
        self._insert_delivery_statement = sa.insert(self.deliveries)

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
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "checkout", _sqlite_pragmas)
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
                self.create_tables()
                if engine.dialect.name == "sqlite":
                    _warn_if_flask_sqlalchemy_shares_the_file(engine)
            elif engine.dialect.name == "sqlite":
                # The app's SQLite database: the tables are the app's (create_all or
                # migrations), but its connections must survive several workers.
                if not sa.event.contains(engine, "checkout", _sqlite_pragmas):
                    sa.event.listen(engine, "checkout", _sqlite_pragmas)
                with engine.connect() as connection:
                    connection.exec_driver_sql("SELECT 1")  # reachable now, and set up
            self._insert_ignoring_conflict = _conflict_free_insert(engine.dialect.name)
            if self._insert_ignoring_conflict is not _savepoint_insert:
                statement = self._insert_ignoring_conflict(self.claims)
                statement = statement.on_conflict_do_nothing(index_elements=["identity"])
                # The returned row says who inserted: an INSERT's rowcount cannot be
                # relied on (SQLAlchemy 2.1 with psycopg reports -1 unless told to keep it).
                self._claim_statement = statement.returning(self.claims.c.identity)
            self._ready = True

    def create_tables(self) -> None:
        """Create the ``nachocode_*`` tables that do not exist yet; safe when several
        workers start at once."""
        tables = [self.deliveries, self.claims, self.purchases]
        engine = self.engine
        if engine.dialect.name == "postgresql":
            # Concurrent CREATE TABLEs of one name fail on PostgreSQL even with
            # checkfirst; a transaction-scoped advisory lock lines the workers up,
            # and each one after the first finds the tables there.
            with engine.begin() as connection:
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_CREATE_TABLES_LOCK)))
                self.metadata.create_all(connection, tables=tables)
            return
        for attempt in range(5):
            try:
                self.metadata.create_all(engine, tables=tables)
                return
            except sa.exc.OperationalError:
                # Another worker created a table between our check and our CREATE
                # ("table ... already exists"); the next checked pass skips it.
                if attempt == 4:
                    raise

    def claim(
        self, connection: sa.Connection, identity: str, event_name: str, now: datetime
    ) -> bool:
        """Insert the claim row for ``identity``; False when someone already holds it.

        This must run before any handler, on the connection of the delivery's
        transaction (``session.connection()``).
        """
        assert self._insert_ignoring_conflict is not None
        values = {"identity": identity, "event": event_name, "claimed_at": now}
        if self._insert_ignoring_conflict is _savepoint_insert:
            return _savepoint_insert(connection, self.claims, values)
        return connection.execute(self._claim_statement, values).first() is not None

    def insert_delivery(self, connection: sa.Connection, values: dict[str, Any]) -> int:
        result = connection.execute(self._insert_delivery_statement, values)
        key = result.inserted_primary_key
        assert key is not None  # a single-row INSERT always has one
        return int(key[0])

    def get_delivery(self, delivery_id: int) -> sa.Row[Any] | None:
        self.ensure_ready()
        row: sa.Row[Any] | None = self.session.execute(
            sa.select(self.deliveries).where(self.deliveries.c.id == delivery_id)
        ).first()
        self.session.rollback()  # end the read transaction: SQLite writers must not wait on it
        return row


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


def _conflict_free_insert(dialect_name: str) -> Callable[..., Any]:
    if dialect_name == "postgresql":
        return postgresql.insert
    if dialect_name == "sqlite":
        return sqlite.insert
    return _savepoint_insert


def _savepoint_insert(connection: sa.Connection, table: sa.Table, values: dict[str, Any]) -> bool:
    """Portable claim for databases without ``ON CONFLICT``: the unique key
    still decides, a savepoint keeps the outer transaction usable."""
    try:
        with connection.begin_nested():
            connection.execute(sa.insert(table).values(values))
    except sa.exc.IntegrityError:
        return False
    return True

"""The tables: every delivery that passed the key check, the claims that make
handling exactly-once, the purchase ledger, and the attempts of deferred deliveries.

They are SQLAlchemy Core tables on a ``MetaData``: the app's own ``db.metadata``
when the extension is given ``db=`` (so Flask-Migrate and Alembic autogenerate see
them and the claim commits together with the handlers' writes), otherwise a private
one on the extension's own engine. Names and columns are part of the public
contract: an existing database must keep working without a migration, which is
why what deferral added is a table of its own (created by ``create_all`` and
``init-db``) and not columns on the deliveries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect

#: Outcomes a stored delivery can have; ``queued`` only with ``NACHOCODE_DEFERRED``:
#: answered 202 and waiting for (or between attempts of) a worker.
OUTCOMES = ("handled", "duplicate", "queued", "failed", "refused", "invalid", "unhandled")
#: Outcomes whose handlers can be run again by ``replay``.
REPLAYABLE = ("failed", "refused", "unhandled")

#: ``'queued'`` written into a statement rather than bound, for the reads of the
#: queued deliveries: a database uses the partial index ``ix_nachocode_deliveries_queued``
#: only when the query's WHERE visibly implies the index's, and PostgreSQL's generic
#: plan of a prepared statement cannot see into a parameter.
QUEUED_INLINE: sa.ColumnClause[str] = sa.literal_column("'queued'", sa.String())

#: A ledger row's ``state``.
ACTIVE, PARTIALLY_REFUNDED, REFUNDED = "active", "partially_refunded", "refunded"

#: SQLAlchemy's names for the MySQL family: a ``mariadb://`` URL gets its own dialect
#: name, a ``mysql://`` URL pointing at a MariaDB server does not.
MYSQL_DIALECTS = ("mysql", "mariadb")
#: The databases the store runs on, by SQLAlchemy dialect name.
SUPPORTED_DIALECTS = ("sqlite", "postgresql", *MYSQL_DIALECTS)
#: MySQL's error codes for "duplicate key", for the two lock failures after which
#: the statement (lock wait timeout) or the transaction (deadlock) can be run again,
#: and for a missing table.
MYSQL_DUPLICATE_KEY, MYSQL_LOCK_WAIT_TIMEOUT, MYSQL_DEADLOCK = 1062, 1205, 1213
MYSQL_NO_SUCH_TABLE = 1146

#: How long a delivery waits for a lock another transaction holds before it gives
#: up and is answered 503: on PostgreSQL a claim row that a copy of the same event
#: being handled (or a transaction left open) holds, on SQLite the database's write
#: lock. Half of Nachocode's 10 s, so that the answer still arrives in time and a
#: few stuck deliveries cannot keep every worker waiting until it is killed.
LOCK_TIMEOUT_SECONDS = 5.0

#: The INSERT with ``ON CONFLICT`` of each database that has one. MySQL has none:
#: there a duplicate key fails the statement alone, never the transaction (unlike
#: PostgreSQL), so a plain INSERT whose duplicate-key error is caught does the same job
#: (:func:`insert_if_new`). ``INSERT IGNORE`` would also turn a too-long value into a
#: silently truncated one, and ``ON DUPLICATE KEY UPDATE`` counts an unchanged row
#: as one affected row, like an inserted one, under SQLAlchemy's ``FOUND_ROWS``.
_CONFLICT_INSERTS: dict[str, Callable[[sa.Table], Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


def conflict_insert(dialect_name: str) -> Callable[[sa.Table], Any] | None:
    """The dialect's ``INSERT ... ON CONFLICT`` constructor, or None (MySQL and
    MariaDB), where :func:`insert_if_new` catches the duplicate key instead."""
    return _CONFLICT_INSERTS.get(dialect_name)


def mysql_error_code(error: BaseException) -> int | None:
    """The MySQL server's error number behind an SQLAlchemy error, for PyMySQL and
    mysqlclient alike (both put it first in the driver exception's ``args``)."""
    args = getattr(getattr(error, "orig", None), "args", ())
    return args[0] if args and isinstance(args[0], int) else None


@functools.lru_cache(maxsize=64)
def _insert_if_new_statement(table: sa.Table, dialect_name: str, key: tuple[str, ...]) -> Any:
    # Built once per table and run with parameters: building a statement (and its
    # cache key) costs more CPU than running it.
    insert = conflict_insert(dialect_name)
    if insert is None:
        return sa.insert(table)
    # The returned row says who inserted: an INSERT's rowcount cannot be relied on
    # (SQLAlchemy 2.1 with psycopg reports -1 unless told to keep it).
    return insert(table).on_conflict_do_nothing(index_elements=list(key)).returning(table.c[key[0]])


def insert_if_new(
    connection: sa.Connection, table: sa.Table, key: tuple[str, ...], values: dict[str, Any]
) -> bool:
    """Insert a row unless one with the same unique ``key`` exists: True when this
    call inserted it. A row another transaction inserted and has not committed yet
    is waited for; if that transaction rolls back, this one inserts."""
    dialect_name = connection.dialect.name
    statement = _insert_if_new_statement(table, dialect_name, key)
    if dialect_name not in MYSQL_DIALECTS:
        return connection.execute(statement, values).first() is not None
    try:
        connection.execute(statement, values)
    except sa.exc.IntegrityError as error:
        if mysql_error_code(error) != MYSQL_DUPLICATE_KEY:
            raise
        return False
    return True


@functools.lru_cache(maxsize=16)
def _row_lock_insert(table: sa.Table, key: tuple[str, ...]) -> Any:
    return (
        mysql.insert(table).on_duplicate_key_update({key[0]: table.c[key[0]]})  # changes nothing
    )


def insert_or_keep(
    connection: sa.Connection, table: sa.Table, key: tuple[str, ...], values: dict[str, Any]
) -> None:
    """Insert a row unless one with the same unique ``key`` exists, for a caller
    that then updates that row in the same transaction.

    On MySQL this is ``INSERT ... ON DUPLICATE KEY UPDATE`` that changes nothing,
    which locks an existing row exclusively. :func:`insert_if_new` catches the
    duplicate-key error instead, and InnoDB takes the row's lock *shared* for that
    check: two transactions that both hold it and then both update the row each
    wait for the other, and InnoDB kills one as a deadlock. Elsewhere it is
    :func:`insert_if_new`, whose ``ON CONFLICT DO NOTHING`` takes no lock on the
    existing row (SQLite has one writer at a time anyway).
    """
    if connection.dialect.name in MYSQL_DIALECTS:
        connection.execute(_row_lock_insert(table, key), values)
    else:
        insert_if_new(connection, table, key, values)


@functools.lru_cache(maxsize=8)
def pg_claim(claims: sa.Table) -> Any:
    """PostgreSQL's claim: insert the claim row unless its identity is claimed
    already, returning the identity when this statement inserted it."""
    columns = list(claims.c)
    source = sa.select(*(sa.bindparam(c.key, type_=c.type) for c in columns))
    return (
        postgresql.insert(claims)
        .from_select([c.key for c in columns], source)
        .on_conflict_do_nothing(index_elements=["identity"])
        .returning(claims.c.identity)
    )


class ExactText(sa.types.TypeDecorator[str]):
    """A SQLAlchemy column type for text that must compare exactly on every
    database: the extension's identities, store ids, user ids and product ids, and
    your own tables' user ids::

        user_id: Mapped[str] = mapped_column(ExactText(255), primary_key=True)

    MySQL's default collations compare case- and accent-insensitively, and even its
    ``_bin`` collations ignore trailing spaces, so that ``testUser`` and ``TESTUSER``
    (or ``"x"`` and ``"x "``) would be one user. There the text is
    kept as UTF-8 bytes: ``VARBINARY(4 * length)``, or ``MEDIUMBLOB`` without a
    length. Bytes compare exactly whatever the server's defaults, and values read
    back are ``str``. On SQLite and PostgreSQL, which compare text exactly, it is
    ``VARCHAR(length)``, or ``TEXT`` without a length.

    Give it a length when the column is a key or indexed: MySQL indexes a
    ``MEDIUMBLOB`` only with a prefix length (``mysql_length`` on the ``Index``).
    Flask-Migrate writes it into migrations as those standard types (see
    :func:`alembic_render_item`).
    """

    impl = sa.Text
    cache_ok = True

    def __init__(self, length: int | None = None) -> None:
        # The impl carries the length too: repr(), and with it any rendering that
        # falls back on it, would drop it otherwise.
        super().__init__(length)
        self.length = length

    def portable_types(self) -> tuple[sa.types.TypeEngine[Any], sa.types.TypeEngine[Any]]:
        """The standard types with this type's DDL: everywhere but MySQL, and on MySQL."""
        if self.length:
            # Four bytes per character is UTF-8's longest.
            return sa.String(self.length), mysql.VARBINARY(self.length * 4)
        return sa.Text(), mysql.MEDIUMBLOB()

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        return _for_dialect(self.portable_types(), dialect)

    def bind_processor(self, dialect: Dialect) -> Any:
        # Elsewhere the text is bound as it is: no per-value Python call, which was
        # eight per purchase (a sixth of what main added over 0.1.0 per delivery on
        # SQLite, counted with callgrind).
        if dialect.name not in MYSQL_DIALECTS:
            return self.impl_instance.bind_processor(dialect)
        return super().bind_processor(dialect)

    def process_bind_param(self, value: str | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name in MYSQL_DIALECTS:
            return value.encode("utf-8")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("utf-8")
        return value  # type: ignore[no-any-return]


def _for_dialect(
    types: tuple[sa.types.TypeEngine[Any], sa.types.TypeEngine[Any]], dialect: Dialect
) -> sa.types.TypeEngine[Any]:
    # Not passed through ``dialect.type_descriptor``: SQLAlchemy adapts it for binding
    # itself, and psycopg's adaptation of ``Text`` compiles to ``VARCHAR`` in DDL.
    return types[1] if dialect.name in MYSQL_DIALECTS else types[0]


def _long(type_: sa.types.TypeEngine[Any], mysql_type: sa.types.TypeEngine[Any]) -> Any:
    # MySQL's TEXT and BLOB stop at 64 KiB, less than a body NACHOCODE_MAX_BODY_BYTES
    # may allow or a traceback may take.
    return type_.with_variant(mysql_type, *MYSQL_DIALECTS)


_LONG_TEXT = _long(sa.Text(), mysql.MEDIUMTEXT())
_LONG_BINARY = _long(sa.LargeBinary(), mysql.LONGBLOB())
# MySQL's FLOAT is single precision; the other databases' is double.
_DOUBLE = _long(sa.Float(), sa.Double())

#: Every table is utf8mb4 with a binary collation on MySQL, whatever the server's
#: default: Korean and every other character round-trips, and the columns that are
#: not :class:`ExactText` (event names, outcomes, states) compare case-sensitively too.
_MYSQL_TABLE: dict[str, Any] = {
    f"{prefix}_{option}": value
    for prefix in MYSQL_DIALECTS
    for option, value in (("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}
#: Index prefix length for :class:`ExactText` without a length on MySQL, which
#: cannot index a whole BLOB; equal values still compare in full.
_MYSQL_PREFIX: dict[str, Any] = {f"{prefix}_length": 255 for prefix in MYSQL_DIALECTS}


class UTCTimestamp(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every database.

    SQLite and MySQL keep no zone, so values are stored as naive UTC there and
    given their zone back when read. MySQL's ``DATETIME`` drops fractions of a
    second unless told to keep them: ``DATETIME(6)`` keeps microseconds, as the
    other two do.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def portable_types(self) -> tuple[sa.types.TypeEngine[Any], sa.types.TypeEngine[Any]]:
        """The standard types with this type's DDL: everywhere but MySQL, and on MySQL."""
        return sa.DateTime(timezone=True), mysql.DATETIME(fsp=6)

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        return _for_dialect(self.portable_types(), dialect)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name != "postgresql" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def alembic_render_item(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Alembic's ``render_item`` hook: write :class:`ExactText` and :class:`UTCTimestamp`
    columns into a generated migration as the standard SQLAlchemy types they stand
    for, e.g. ``sa.String(length=256).with_variant(mysql.VARBINARY(length=1024),
    'mysql', 'mariadb')``, importing what that needs.

    Alembic writes any other type from outside SQLAlchemy as ``module.Class(...)``
    without importing the module, so the migration fails with ``NameError``. The
    extension passes this hook to Flask-Migrate by itself; name it in
    ``context.configure(render_item=...)`` only in an ``env.py`` of your own that
    does not take Flask-Migrate's ``configure_args``. The migration keeps the DDL of
    the day it was generated, as migrations should, and needs no import of this
    package to run.
    """
    if kind != "type" or not isinstance(obj, (ExactText, UTCTimestamp)):
        return False
    generic, on_mysql = obj.portable_types()
    if autogen_context.imports is not None:
        autogen_context.imports.add("from sqlalchemy.dialects import mysql")
    prefix = autogen_context.opts.get("sqlalchemy_module_prefix") or ""
    dialects = ", ".join(repr(name) for name in MYSQL_DIALECTS)
    return f"{prefix}{generic!r}.with_variant(mysql.{on_mysql!r}, {dialects})"


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
        # Every index is one more page written by every delivery's commit, so only the
        # inspector's searches have one: ``identity`` is looked up in the claims, and
        # ``received_at`` only by ``prune``, which may scan.
        sa.Column("identity", ExactText(512), nullable=True),
        sa.Column("user_id", ExactText(), nullable=True),
        sa.Column("iap_log_id", sa.BigInteger, nullable=True, index=True),
        sa.Column("body", _LONG_BINARY, nullable=True),
        sa.Column("headers", sa.JSON, nullable=True),
        sa.Column("remote_addr", sa.String(64), nullable=True),
        sa.Column("received_at", UTCTimestamp, nullable=False),
        sa.Column("finished_at", UTCTimestamp, nullable=False),
        sa.Column("duration_ms", _DOUBLE, nullable=False),
        sa.Column("error", _LONG_TEXT, nullable=True),
        sa.Column("traceback", _LONG_TEXT, nullable=True),
        sa.Column("replay_of", sa.BigInteger, nullable=True),
        sa.Column("replay_count", sa.Integer, nullable=False, server_default="0"),
        # The name ``index=True`` would give it; spelled out for MySQL's prefix length.
        sa.Index("ix_nachocode_deliveries_user_id", "user_id", **_MYSQL_PREFIX),
        # Partial: a new delivery (not a replay) writes nothing to it.
        sa.Index(
            "ix_nachocode_deliveries_replay_of",
            "replay_of",
            postgresql_where=sa.text("replay_of IS NOT NULL"),
            sqlite_where=sa.text("replay_of IS NOT NULL"),
        ),
        # The queued deliveries, oldest first: what requeue, a duplicate of a queued
        # delivery and a count of the queue read, at the cost of the queue's length.
        # Partial, so that a delivery handled in its request writes nothing to it;
        # MySQL has no partial indexes, and there it holds every delivery by outcome.
        sa.Index(
            "ix_nachocode_deliveries_queued",
            "outcome",
            "id",
            postgresql_where=sa.text("outcome = 'queued'"),
            sqlite_where=sa.text("outcome = 'queued'"),
        ),
        **_MYSQL_TABLE,
    )


def define_claims(metadata: sa.MetaData) -> sa.Table:
    # Kept when old deliveries are pruned: forgetting a claim would let an old
    # purchase, re-sent from the dashboard, be granted a second time.
    return _table(
        metadata,
        "nachocode_claims",
        sa.Column("identity", ExactText(512), primary_key=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("claimed_at", UTCTimestamp, nullable=False),
        # On SQLite, one B-tree keyed by the identity instead of a rowid table plus
        # an index on it: one page fewer written per claim.
        sqlite_with_rowid=False,
        **_MYSQL_TABLE,
    )


def define_purchases(metadata: sa.MetaData) -> sa.Table:
    return _table(
        metadata,
        "nachocode_purchases",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("platform", sa.String(16), nullable=False),
        # Play orderId / App Store transactionId: what a refund shares with its purchase.
        sa.Column("store_purchase_id", ExactText(256), nullable=False),
        # Play purchaseToken / App Store originalTransactionId.
        sa.Column("store_token", ExactText(), nullable=False),
        sa.Column("user_id", ExactText(), nullable=False),
        sa.Column("iap_log_id", sa.BigInteger, nullable=False, index=True),
        sa.Column("nacho_product_id", ExactText(), nullable=False),
        sa.Column("product_id", ExactText(), nullable=False),
        sa.Column("product_type", sa.String(16), nullable=False),
        sa.Column("environment", sa.String(16), nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        # Exact decimal text: SQLite has no exact decimal type.
        sa.Column("unit_price", sa.String(64), nullable=False),
        sa.Column("refunded_quantity", sa.Integer, nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        # False while only a refund has arrived; True once the purchase was handled.
        sa.Column("purchase_received", sa.Boolean, nullable=False),
        sa.Column("purchased_at", UTCTimestamp, nullable=True),
        sa.Column("verified_at", UTCTimestamp, nullable=True),
        sa.Column("refunded_at", UTCTimestamp, nullable=True),
        sa.Column("updated_at", UTCTimestamp, nullable=False),
        sa.UniqueConstraint(
            "platform", "store_purchase_id", name="uq_nachocode_purchases_store_id"
        ),
        sa.Index("ix_nachocode_purchases_user_id", "user_id", **_MYSQL_PREFIX),
        **_MYSQL_TABLE,
    )


def define_attempts(metadata: sa.MetaData) -> sa.Table:
    """One row per worker run of a deferred delivery that did not end it well (a
    handler raised), and one for the run that handled, refused or failed it for good."""
    return _table(
        metadata,
        "nachocode_attempts",
        # No foreign key: ``prune`` deletes deliveries, and their attempts with them,
        # without the order of the two DELETEs mattering to the database.
        sa.Column("delivery_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("started_at", UTCTimestamp, nullable=False),
        sa.Column("finished_at", UTCTimestamp, nullable=False),
        sa.Column("error", _LONG_TEXT, nullable=True),
        sa.Column("traceback", _LONG_TEXT, nullable=True),
        # When the next attempt is due; None once there is none (handled, refused, failed).
        sa.Column("next_attempt_at", UTCTimestamp, nullable=True),
        **_MYSQL_TABLE,
    )


def define_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table, sa.Table, sa.Table]:
    """The deliveries, claims, purchases and attempts tables on ``metadata`` (defined
    once per metadata)."""
    return (
        define_deliveries(metadata),
        define_claims(metadata),
        define_purchases(metadata),
        define_attempts(metadata),
    )

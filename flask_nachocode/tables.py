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

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

#: Outcomes a stored delivery can have; ``queued`` only with ``NACHOCODE_DEFERRED``:
#: answered 202 and waiting for (or between attempts of) a worker.
OUTCOMES = ("handled", "duplicate", "queued", "failed", "refused", "invalid", "unhandled")
#: Outcomes whose handlers can be run again by ``replay``.
REPLAYABLE = ("failed", "refused", "unhandled")

#: A ledger row's ``state``.
ACTIVE, PARTIALLY_REFUNDED, REFUNDED = "active", "partially_refunded", "refunded"

#: The INSERT with ``ON CONFLICT`` of each database that has one.
_CONFLICT_INSERTS: dict[str, Callable[[sa.Table], Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


def conflict_insert(dialect_name: str) -> Callable[[sa.Table], Any] | None:
    """The dialect's ``INSERT ... ON CONFLICT`` constructor, or None when it has none."""
    return _CONFLICT_INSERTS.get(dialect_name)


class UTCTimestamp(sa.types.TypeDecorator[datetime]):
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
        # Every index is one more page written by every delivery's commit, so only the
        # inspector's searches have one: ``identity`` is looked up in the claims, and
        # ``received_at`` only by ``prune``, which may scan.
        sa.Column("identity", sa.String(512), nullable=True),
        sa.Column("user_id", sa.Text, nullable=True, index=True),
        sa.Column("iap_log_id", sa.BigInteger, nullable=True, index=True),
        sa.Column("body", sa.LargeBinary, nullable=True),
        sa.Column("headers", sa.JSON, nullable=True),
        sa.Column("remote_addr", sa.String(64), nullable=True),
        sa.Column("received_at", UTCTimestamp, nullable=False),
        sa.Column("finished_at", UTCTimestamp, nullable=False),
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
        sa.Column("claimed_at", UTCTimestamp, nullable=False),
        # On SQLite, one B-tree keyed by the identity instead of a rowid table plus
        # an index on it: one page fewer written per claim.
        sqlite_with_rowid=False,
    )


def define_purchases(metadata: sa.MetaData) -> sa.Table:
    return _table(
        metadata,
        "nachocode_purchases",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("platform", sa.String(16), nullable=False),
        # Play orderId / App Store transactionId: what a refund shares with its purchase.
        sa.Column("store_purchase_id", sa.String(256), nullable=False),
        # Play purchaseToken / App Store originalTransactionId.
        sa.Column("store_token", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False, index=True),
        sa.Column("iap_log_id", sa.BigInteger, nullable=False, index=True),
        sa.Column("nacho_product_id", sa.Text, nullable=False),
        sa.Column("product_id", sa.Text, nullable=False),
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
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("traceback", sa.Text, nullable=True),
        # When the next attempt is due; None once there is none (handled, refused, failed).
        sa.Column("next_attempt_at", UTCTimestamp, nullable=True),
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

"""The purchase ledger: one row per store purchase, kept up to date from the
``purchase`` and ``refund`` deliveries.

The ledger is written inside the delivery's transaction, after the claim and
before the handlers, so a handler reading it sees the purchase it is handling,
and a duplicate (which never gets past the claim) never counts twice. A refund
that arrives before its purchase (re-sends from the dashboard come in any
order) creates the row from the refund's own copy of the purchase fields; the
purchase, when it comes, completes the row and its handlers see it refunded.

This module writes the ledger and defines its row, :class:`Purchase`; the
reader, :class:`~flask_nachocode.reads.Ledger`, is with the other reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from .errors import Refuse
from .events import PurchaseEvent, RefundEvent
from .tables import (
    ACTIVE,
    MYSQL_DIALECTS,
    PARTIALLY_REFUNDED,
    REFUNDED,
    conflict_insert,
    insert_if_new,
    insert_or_keep,
    pg_claim,
)


@dataclass(frozen=True)
class Purchase:
    """A row of the ledger, as the Python API returns it."""

    user_id: str
    iap_log_id: int
    nacho_product_id: str
    product_id: str
    product_type: str
    platform: str
    environment: str
    quantity: int
    unit_price: Decimal
    refunded_quantity: int
    state: str
    store_purchase_id: str
    store_token: str
    purchase_received: bool
    purchased_at: datetime | None
    verified_at: datetime | None
    refunded_at: datetime | None

    @property
    def net_quantity(self) -> int:
        """Units the buyer still has: bought minus refunded."""
        return self.quantity - self.refunded_quantity

    @property
    def status(self) -> str:
        """What the purchase-status endpoint answers: ``pending`` until the
        purchase was handled, then ``granted``, ``partially_refunded`` or ``refunded``."""
        if not self.purchase_received:
            return "pending"
        return "granted" if self.state == ACTIVE else self.state

    @classmethod
    def from_row(cls, row: Any) -> Purchase:
        return cls(
            user_id=row.user_id,
            iap_log_id=row.iap_log_id,
            nacho_product_id=row.nacho_product_id,
            product_id=row.product_id,
            product_type=row.product_type,
            platform=row.platform,
            environment=row.environment,
            quantity=row.quantity,
            unit_price=Decimal(row.unit_price),
            refunded_quantity=row.refunded_quantity,
            state=row.state,
            store_purchase_id=row.store_purchase_id,
            store_token=row.store_token,
            purchase_received=bool(row.purchase_received),
            purchased_at=row.purchased_at,
            verified_at=row.verified_at,
            refunded_at=row.refunded_at,
        )


#: The ledger's unique key: a refund shares its purchase's store id.
_STORE_ID = ("platform", "store_purchase_id")


def _store_token(event: PurchaseEvent | RefundEvent) -> str:
    data = event.data
    return data.purchase_token if event.os == "android" else data.original_transaction_id  # type: ignore[union-attr]


def _purchase_fields(event: PurchaseEvent | RefundEvent, now: datetime) -> dict[str, Any]:
    return {
        "platform": event.os,
        "store_purchase_id": event.store_purchase_id,
        "store_token": _store_token(event),
        "user_id": event.user_id,
        "iap_log_id": event.iap_log_id,
        "nacho_product_id": event.nacho_product_id,
        "product_id": event.product_id,
        "product_type": event.product_type,
        "environment": event.environment,
        "quantity": event.quantity,
        "unit_price": str(event.price),
        "updated_at": now,
    }


#: Columns a purchase writes over a row that an early refund created; the refund
#: bookkeeping (refunded_quantity, state, refunded_at) is kept.
_SET_BY_PURCHASE = (
    "platform",
    "store_purchase_id",
    "store_token",
    "user_id",
    "iap_log_id",
    "nacho_product_id",
    "product_id",
    "product_type",
    "environment",
    "quantity",
    "unit_price",
    "updated_at",
    "purchase_received",
    "purchased_at",
    "verified_at",
)


def _constant(value: str | int | bool | None, type_: Any) -> Any:
    """``value`` written into the statement's text rather than bound: a bound constant
    costs every execution a parameter to build, convert and send. Only for this
    module's own constants (states, counts), never for a delivery's values."""
    if value is None:
        # Typed: an untyped NULL in an INSERT's SELECT is text to PostgreSQL.
        return sa.cast(sa.null(), type_)
    if isinstance(value, bool):
        return sa.true() if value else sa.false()
    if isinstance(value, int):
        return sa.literal_column(str(value), type_)
    assert "'" not in value
    return sa.literal_column(f"'{value}'", type_)


def _state_for(quantity: Any, refunded: Any) -> Any:
    return sa.case(
        (refunded >= quantity, _constant(REFUNDED, sa.String())),
        (refunded > _constant(0, sa.Integer()), _constant(PARTIALLY_REFUNDED, sa.String())),
        else_=_constant(ACTIVE, sa.String()),
    )


@functools.lru_cache(maxsize=64)
def _purchase_upsert(table: sa.Table, dialect_name: str) -> Any:
    # Built once per table and run with parameters: building a statement costs more
    # CPU than running it.
    insert = conflict_insert(dialect_name)
    assert insert is not None  # MySQL takes _purchase_over_refund instead
    return _on_purchase_conflict(insert(table), table).execution_options(
        # psycopg 3 reports -1 for an INSERT's rowcount unless SQLAlchemy keeps it.
        preserve_rowcount=True
    )


@functools.lru_cache(maxsize=64)
def _purchase_over_refund(table: sa.Table) -> Any:
    # MySQL's ON DUPLICATE KEY UPDATE has no WHERE, and its affected-rows count cannot
    # tell an inserted row from one left alone: there a purchase whose row an early
    # refund created completes it with this UPDATE, under the same condition as
    # _on_purchase_conflict's. No SET expression reads a column another one assigns:
    # MySQL evaluates them left to right on the new values.
    quantity = sa.bindparam("quantity", type_=table.c.quantity.type)
    return (
        sa.update(table)
        .where(
            table.c.platform == sa.bindparam("key_platform", type_=table.c.platform.type),
            table.c.store_purchase_id
            == sa.bindparam("key_store_purchase_id", type_=table.c.store_purchase_id.type),
            table.c.refunded_quantity <= quantity,
        )
        .values(
            {
                **{name: sa.bindparam(name, type_=table.c[name].type) for name in _SET_BY_PURCHASE},
                "state": _state_for(quantity, table.c.refunded_quantity),
            }
        )
        .execution_options(preserve_rowcount=True)
    )


def _on_purchase_conflict(statement: Any, table: sa.Table) -> Any:
    refunded = table.c.refunded_quantity
    quantity = statement.excluded.quantity
    return statement.on_conflict_do_update(
        index_elements=["platform", "store_purchase_id"],
        set_={
            **{name: statement.excluded[name] for name in _SET_BY_PURCHASE},
            # The state is derived again from the purchase's own quantity, which is
            # the one that counts over the refund's copy of it.
            "state": _state_for(quantity, refunded),
        },
        # Early refunds counted against the refund's copy of the quantity; a purchase
        # that says fewer units were bought must not leave more refunded than bought.
        where=refunded <= quantity,
    )


#: Prefix of the delivery record's parameters in the one-statement claim: the
#: record and the ledger row share column names with different values.
RECORD_PREFIX = "record_"

#: The ledger columns that a purchase sets to the same values every time.
_PURCHASE_CONSTANTS: dict[str, Any] = {
    "purchase_received": True,
    "refunded_quantity": 0,
    "state": ACTIVE,
    "refunded_at": None,
}

#: The record's columns that the one-statement claim takes from the claim's and the
#: ledger row's parameters, which hold the same values: the record is written as
#: the claim is, of the valid purchase the ledger row is.
_RECORD_FROM_CLAIM = {
    "identity": "identity",
    "event": "event",
    "finished_at": "claimed_at",
    "user_id": "user_id",
    "iap_log_id": "iap_log_id",
}

#: The record's columns that are the same in every record the one-statement claim
#: writes: a new delivery (not a replay) answered 200, without an error.
_CLAIM_RECORD_CONSTANTS: dict[str, Any] = {
    "status": 200,
    "error": None,
    "traceback": None,
    "replay_of": None,
    "replay_count": 0,
}


@functools.lru_cache(maxsize=64)
def _claimed_purchase_upsert(claims: sa.Table, table: sa.Table, deliveries: sa.Table) -> Any:
    # PostgreSQL only: the claim, the purchase upsert and the delivery record in one
    # statement, as many network round trips as a bare INSERT of the body. The upsert
    # reads its row from a SELECT that yields nothing unless the claim inserted its
    # row, so a duplicate writes no ledger row, as with separate statements; the
    # record is written either way, as "handled" or "duplicate".
    #
    # Each value is bound once: what every such purchase and record hold alike is in
    # the text (_PURCHASE_CONSTANTS, _CLAIM_RECORD_CONSTANTS), and the ledger row's
    # update time and the record's copies of the claim's and the ledger row's values
    # take their parameters (_RECORD_FROM_CLAIM).
    claim = pg_claim(claims).cte("nachocode_claim")
    claimed = sa.exists(claim.select())

    def ledger_value(name: str) -> Any:
        if name == "updated_at":
            return sa.bindparam("claimed_at", type_=claims.c.claimed_at.type)
        if name in _PURCHASE_CONSTANTS:
            return _constant(_PURCHASE_CONSTANTS[name], table.c[name].type)
        return sa.bindparam(name, type_=table.c[name].type)

    def record_value(name: str) -> Any:
        type_ = deliveries.c[name].type  # the same as the shared parameter's
        if name in _RECORD_FROM_CLAIM:
            return sa.bindparam(_RECORD_FROM_CLAIM[name], type_=type_)
        if name in _CLAIM_RECORD_CONSTANTS:
            return _constant(_CLAIM_RECORD_CONSTANTS[name], type_)
        return sa.bindparam(RECORD_PREFIX + name, type_=type_)

    names = [*_SET_BY_PURCHASE, "refunded_quantity", "state", "refunded_at"]
    source = sa.select(*(ledger_value(name) for name in names)).where(claimed)
    upsert = postgresql.insert(table).from_select(names, source)
    recorded = _on_purchase_conflict(upsert, table).returning(table.c.id).cte("nachocode_ledger")
    record_names = [c.key for c in deliveries.c if c.key not in ("id", "outcome")]
    outcome_type = deliveries.c.outcome.type
    record = (
        postgresql.insert(deliveries)
        .from_select(
            [*record_names, "outcome"],
            sa.select(
                *(record_value(name) for name in record_names),
                sa.case(
                    (claimed, _constant("handled", outcome_type)),
                    else_=_constant("duplicate", outcome_type),
                ),
            ),
        )
        .returning(deliveries.c.id)
        .cte("nachocode_record")
    )
    return sa.select(
        claimed.label("claimed"),
        sa.exists(recorded.select()).label("recorded"),
        record.select().scalar_subquery().label("delivery_id"),
    )


def _purchase_values(event: PurchaseEvent, now: datetime) -> dict[str, Any]:
    return {
        **_purchase_fields(event, now),
        "purchased_at": event.purchased_at,
        "verified_at": event.verified_at,
        **_PURCHASE_CONSTANTS,
    }


def _refund_exceeds(event: PurchaseEvent) -> Refuse:
    return Refuse(
        f"purchase {event.store_purchase_id} has {event.quantity} units but earlier "
        "refunds of it already refunded more",
        status=422,
        code="refund_exceeds_quantity",
    )


def apply_purchase(
    connection: sa.Connection, table: sa.Table, event: PurchaseEvent, now: datetime
) -> None:
    """Record the purchase; :class:`Refuse` (422) when refunds of it that came
    first already refunded more units than it says were bought."""
    values = _purchase_values(event, now)
    dialect_name = connection.dialect.name
    if dialect_name in MYSQL_DIALECTS:
        if insert_if_new(connection, table, _STORE_ID, values):
            return
        over_refund = {name: values[name] for name in _SET_BY_PURCHASE}
        over_refund.update(key_platform=event.os, key_store_purchase_id=event.store_purchase_id)
        recorded = connection.execute(_purchase_over_refund(table), over_refund).rowcount == 1
    else:
        recorded = connection.execute(_purchase_upsert(table, dialect_name), values).rowcount == 1
    if not recorded:
        raise _refund_exceeds(event)


def claim_and_apply_purchase(
    connection: sa.Connection,
    claims: sa.Table,
    table: sa.Table,
    deliveries: sa.Table,
    event: PurchaseEvent,
    now: datetime,
    record: dict[str, Any],
) -> tuple[bool, int]:
    """On PostgreSQL, the claim (see :meth:`Store.claim`), :func:`apply_purchase`
    and the delivery record (``record``: every column but ``id`` and ``outcome`` of
    a new delivery of ``event`` answered 200, ending at ``now``) in one statement:
    whether it claimed, and the record's id. A duplicate writes only
    its record; :class:`Refuse` as from :func:`apply_purchase`."""
    assert event.identity is not None  # purchases always have one
    values = {
        **_purchase_values(event, now),
        "identity": event.identity,
        "event": event.name,
        "claimed_at": now,
        **{RECORD_PREFIX + name: value for name, value in record.items()},
    }
    # The statement does not bind these columns of the record: they must be what it
    # writes in their place.
    for name, shared in _RECORD_FROM_CLAIM.items():
        assert record[name] == values[shared], name
    for name, constant in _CLAIM_RECORD_CONSTANTS.items():
        assert record[name] == constant, name
    statement = _claimed_purchase_upsert(claims, table, deliveries)
    claimed, recorded, delivery_id = connection.execute(statement, values).one()
    if claimed and not recorded:
        raise _refund_exceeds(event)
    return bool(claimed), int(delivery_id)


def apply_refund(
    connection: sa.Connection, table: sa.Table, event: RefundEvent, now: datetime
) -> None:
    """Add the refund; :class:`Refuse` (422) when it would refund more than was bought."""
    placeholder = {
        **_purchase_fields(event, now),
        "purchase_received": False,
        "refunded_quantity": 0,
        "state": ACTIVE,
    }
    # The row this refund updates, locked on MySQL before the UPDATE: see insert_or_keep.
    insert_or_keep(connection, table, _STORE_ID, placeholder)
    refunded = table.c.refunded_quantity + event.refund_quantity
    # One conditional UPDATE: the bound and the sum are checked by the database,
    # so two partial refunds handled at once cannot both pass a stale check.
    # refunded_quantity is set last: MySQL evaluates SET expressions left to right
    # on the values already assigned, the other databases on the old row.
    result = connection.execute(
        sa.update(table)
        .where(
            table.c.platform == event.os,
            table.c.store_purchase_id == event.store_purchase_id,
            refunded <= table.c.quantity,
        )
        .ordered_values(
            (
                table.c.state,
                sa.case((refunded >= table.c.quantity, REFUNDED), else_=PARTIALLY_REFUNDED),
            ),
            # Refunds re-sent from the dashboard arrive in any order: keep the latest time.
            (
                table.c.refunded_at,
                sa.case(
                    (
                        sa.or_(
                            table.c.refunded_at.is_(None), table.c.refunded_at < event.refunded_at
                        ),
                        event.refunded_at,
                    ),
                    else_=table.c.refunded_at,
                ),
            ),
            (table.c.updated_at, now),
            (table.c.refunded_quantity, refunded),
        )
    )
    if result.rowcount != 1:
        raise Refuse(
            f"refunding {event.refund_quantity} more would refund more units than the "
            f"{event.quantity} bought in purchase {event.store_purchase_id}",
            status=422,
            code="refund_exceeds_quantity",
        )

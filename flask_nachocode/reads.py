"""The reads: what the CLI, the inspector, the metrics and the purchase ledger's
reader ask of the store, in one place beside the write path of :mod:`.store`.

A delivery read takes the app's :class:`~flask_nachocode.store.Store`, and ends
its transaction before it returns, so that an SQLite writer never waits on a reader.

The :class:`Ledger` reader is the exception: inside a webhook handler it must see
the delivery's own uncommitted writes, so it reads in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from .events import PurchaseEvent, RefundEvent
from .ledger import Purchase
from .schemas import MAX_ID, fits_id, parse_id
from .store import Store
from .tables import QUEUED_INLINE, REPLAYABLE

#: The columns of a delivery list (the CLI's table, the inspector's rows).
LIST_COLUMNS = (
    "id",
    "received_at",
    "event",
    "user_id",
    "outcome",
    "status",
    "duration_ms",
    "replay_of",
    "replay_count",
)


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries a list shows; every field left empty matches all."""

    #: The latest outcome (an original shows its last replay's).
    outcome: str = ""
    event: str = ""
    #: An exact user id, or an ``iapLogId``.
    q: str = ""
    #: Replays too; by default each delivery is listed once, as its original.
    replays: bool = False

    def conditions(self, table: sa.Table) -> list[sa.ColumnElement[bool]]:
        conditions: list[sa.ColumnElement[bool]] = []
        if not self.replays:
            conditions.append(table.c.replay_of.is_(None))
        if self.outcome:
            conditions.append(table.c.outcome == self.outcome)
        if self.event:
            conditions.append(table.c.event == self.event)
        if self.q:
            # Exact matches, so that both columns' indexes serve the search.
            match = table.c.user_id == self.q
            iap_log_id = parse_id(self.q)
            if iap_log_id is not None:
                match = match | (table.c.iap_log_id == iap_log_id)
            conditions.append(match)
        return conditions


def get_delivery(store: Store, delivery_id: int) -> sa.Row[Any] | None:
    """The stored delivery ``delivery_id``, or None (also for ids no column can hold)."""
    if not 0 <= delivery_id <= MAX_ID:
        return None
    table = store.deliveries
    with store.reading() as session:
        row: sa.Row[Any] | None = session.execute(
            sa.select(table).where(table.c.id == delivery_id)
        ).first()
    return row


def list_deliveries(
    store: Store,
    where: DeliveryFilter,
    *,
    limit: int,
    before: int | None = None,
    after: int | None = None,
) -> list[sa.Row[Any]]:
    """Up to ``limit`` deliveries matching ``where``, newest first, with the
    :data:`LIST_COLUMNS`. With ``before``, those older than that id; with ``after``,
    the ``limit`` oldest of those newer than that id (the next page up, or a poll)."""
    table = store.deliveries
    query = sa.select(*[table.c[name] for name in LIST_COLUMNS]).where(*where.conditions(table))
    if after is not None:
        query = query.where(table.c.id > after).order_by(table.c.id.asc())
    else:
        if before is not None:
            query = query.where(table.c.id < before)
        query = query.order_by(table.c.id.desc())
    with store.reading() as session:
        rows = list(session.execute(query.limit(limit)).all())
    if after is not None:
        rows.reverse()
    return rows


def has_deliveries(
    store: Store, where: DeliveryFilter, *, before: int | None = None, after: int | None = None
) -> bool:
    """Whether any delivery matching ``where`` is older than ``before`` or newer
    than ``after``: is there a next page?"""
    table = store.deliveries
    query = sa.select(table.c.id).where(*where.conditions(table))
    if before is not None:
        query = query.where(table.c.id < before)
    if after is not None:
        query = query.where(table.c.id > after)
    with store.reading() as session:
        return session.execute(query.limit(1)).first() is not None


def replays_of(store: Store, delivery_id: int) -> list[sa.Row[Any]]:
    """The replays of delivery ``delivery_id``, newest first, with the :data:`LIST_COLUMNS`."""
    table = store.deliveries
    query = (
        sa.select(*[table.c[name] for name in LIST_COLUMNS])
        .where(table.c.replay_of == delivery_id)
        .order_by(table.c.id.desc())
    )
    with store.reading() as session:
        return list(session.execute(query).all())


def replayable_ids(store: Store) -> list[int]:
    """Every original delivery whose latest outcome is replayable, oldest first."""
    table = store.deliveries
    query = (
        sa.select(table.c.id)
        .where(table.c.outcome.in_(REPLAYABLE), table.c.replay_of.is_(None))
        .order_by(table.c.id)
    )
    with store.reading() as session:
        return list(session.execute(query).scalars())


def attempts_of(store: Store, delivery_id: int) -> list[sa.Row[Any]]:
    """The attempts of deferred delivery ``delivery_id``, first attempt first."""
    if not store.has_attempts_table():
        return []
    attempts = store.attempts
    query = (
        sa.select(attempts)
        .where(attempts.c.delivery_id == delivery_id)
        .order_by(attempts.c.attempt)
    )
    with store.reading() as session:
        return list(session.execute(query).all())


def queued_summary(store: Store) -> tuple[int, datetime | None]:
    """How many deliveries are ``queued``, and when the oldest of them arrived
    (None when none is): one statement that the partial index of queued
    deliveries serves, for the metrics' gauges at every scrape."""
    table = store.deliveries
    query = sa.select(sa.func.count(), sa.func.min(table.c.received_at).label("oldest")).where(
        table.c.outcome == QUEUED_INLINE
    )
    with store.reading() as session:
        count, oldest = session.execute(query).one()
    if isinstance(oldest, str):  # SQLite's aggregate comes back as the stored text
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=timezone.utc)
    return int(count), oldest


class Ledger:
    """Read the ledger: ``nachocode.ledger`` on the extension.

    Every query finds purchases of both environments unless ``environment`` names
    one: ``"production"`` leaves out sandbox (test) purchases, ``"sandbox"`` keeps
    only them. Sandbox purchases count by default because your handlers received
    them too, and app review buys in sandbox against your live server.
    Inside a webhook handler, queries see the delivery's own uncommitted writes.
    A user or product id that no delivery can carry (longer than
    :data:`~flask_nachocode.schemas.MAX_ID_LENGTH` characters, or holding a NUL)
    finds nothing, without asking the database.
    """

    def __init__(self, store_for_app: Callable[[], Store]) -> None:
        self._store_for_app = store_for_app

    def _query(
        self, *conditions: Any, environment: str | None, newest_first: bool = False
    ) -> list[Purchase]:
        store = self._store_for_app()
        store.ensure_ready()
        table = store.purchases
        statement = sa.select(table).where(*conditions)
        if environment is not None:
            statement = statement.where(table.c.environment == environment)
        statement = statement.order_by(table.c.id.desc() if newest_first else table.c.id)
        return [Purchase.from_row(row) for row in store.session.execute(statement)]

    def get(
        self, iap_log_id: int, *, environment: str | None = None, user_id: str | None = None
    ) -> Purchase | None:
        """The purchase whose ``iapLogId`` (the SDK's ``purchaseId``) is given;
        with ``user_id``, only when that user made it. A row that only an early
        refund has created so far is returned too: check ``purchase_received``."""
        table = self._store_for_app().purchases
        conditions = [table.c.iap_log_id == iap_log_id]
        if user_id is not None:
            if not fits_id(user_id):
                return None
            conditions.append(table.c.user_id == user_id)
        found = self._query(*conditions, environment=environment)
        return found[0] if found else None

    def find(self, event: PurchaseEvent | RefundEvent) -> Purchase | None:
        """The ledger row of the purchase an event is about (the same store id)."""
        table = self._store_for_app().purchases
        found = self._query(
            table.c.platform == event.os,
            table.c.store_purchase_id == event.store_purchase_id,
            environment=None,
        )
        return found[0] if found else None

    def purchases_of(self, user_id: str, *, environment: str | None = None) -> list[Purchase]:
        """Every purchase of a user, newest first, refunded ones included."""
        if not fits_id(user_id):
            return []
        table = self._store_for_app().purchases
        return self._query(table.c.user_id == user_id, environment=environment, newest_first=True)

    def _of_product(self, user_id: str, product: str, environment: str | None) -> list[Purchase]:
        if not (fits_id(user_id) and fits_id(product)):
            return []
        table = self._store_for_app().purchases
        return self._query(
            table.c.user_id == user_id,
            table.c.purchase_received.is_(True),
            sa.or_(table.c.product_id == product, table.c.nacho_product_id == product),
            environment=environment,
        )

    def owns(self, user_id: str, product: str, *, environment: str | None = None) -> bool:
        """Whether the user holds a product now: a handled purchase of it that is
        not fully refunded. ``product`` is the store's productId or the nachoProductId."""
        return any(p.net_quantity > 0 for p in self._of_product(user_id, product, environment))

    def net_quantity(self, user_id: str, product: str, *, environment: str | None = None) -> int:
        """Units of a consumable the user bought, minus those refunded."""
        return sum(p.net_quantity for p in self._of_product(user_id, product, environment))

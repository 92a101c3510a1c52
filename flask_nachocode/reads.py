"""The reads: what the CLI, the inspector, the metrics and the purchase ledger's
reader ask of the store, in one place beside the write path of :mod:`.store`.

A delivery read takes the app's :class:`~flask_nachocode.store.Store` and, for
lists, streams and counts, one :class:`DeliveryFilter`: a command's options and a
page's query string become the same filter, so every list, export, bulk replay
and count means the same thing by it. Each read ends its transaction before it
returns (or, for :func:`iter_deliveries`, before each batch is yielded), so that
an SQLite writer never waits on a reader.

The :class:`Ledger` reader is the exception: inside a webhook handler it must see
the delivery's own uncommitted writes, so it reads in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal, get_args

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from .events import Platform, PurchaseEvent, RefundEvent, iso_ms
from .ledger import Purchase
from .schemas import MAX_ID, fits_id, parse_id
from .store import Store
from .tables import MYSQL_DIALECTS, QUEUED_INLINE, REPLAYABLE

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
#: The columns of an export (the CLI's ``--json``, the inspector's CSV and JSON
#: lines): the list's and what a support search needs. Never the body, headers or
#: traceback, which are large and hold store tokens: ``show`` and the delivery page have them.
EXPORT_COLUMNS = (*LIST_COLUMNS, "iap_log_id", "identity", "route", "finished_at", "error")

#: How many deliveries :func:`iter_deliveries` reads per transaction.
BATCH_SIZE = 500

_PLATFORMS: tuple[str, ...] = get_args(Platform)
#: The width of a refund identity's time (:func:`~flask_nachocode.events.iso_ms`).
_REFUND_TIME_WIDTH = len(iso_ms(datetime(2000, 1, 1, tzinfo=timezone.utc)))


def parse_moment(text: str) -> datetime:
    """A time-range bound as the CLI and the inspector take it: an ISO 8601 date (its
    midnight) or date and time, in UTC unless it names an offset; aware, in UTC.
    Raises ValueError (or OverflowError, when an offset moves it out of the calendar)."""
    # ASCII digits only: some Pythons' fromisoformat also takes other scripts' digits.
    if not (text.isascii() and text[:4].isdigit()):
        raise ValueError(f"{text!r} is not an ISO date")
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"  # Python 3.10's fromisoformat has no "Z"
    moment = datetime.fromisoformat(text)
    if moment.utcoffset() is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries a list, a stream or a count covers; every field left empty
    matches all. An id no delivery can carry (too long, a NUL) matches none,
    without asking the database. Times must be timezone-aware (``ValueError``)."""

    #: The latest outcome (an original shows its last replay's).
    outcome: str = ""
    event: str = ""
    #: The inspector's search box: an exact user id, or an ``iapLogId``.
    q: str = ""
    #: Replays too; by default each delivery is listed once, as its original.
    replays: bool = False
    #: An exact user id.
    user_id: str = ""
    #: An ``iapLogId`` (the SDK's ``purchaseId``); a refund carries its purchase's.
    iap_log_id: int | None = None
    #: A store id (Play ``orderId``, App Store ``transactionId``): the deliveries of
    #: that purchase and of its refunds, on either platform.
    store_id: str = ""
    #: Received at or after this time.
    received_from: datetime | None = None
    #: Received before this time.
    received_until: datetime | None = None
    #: Only originals whose latest outcome ``replay`` runs the handlers of again
    #: (:data:`~flask_nachocode.tables.REPLAYABLE`): what a bulk replay takes.
    replayable: bool = False

    def __post_init__(self) -> None:
        for name in ("received_from", "received_until"):
            moment = getattr(self, name)
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"{name} must be timezone-aware, e.g. in UTC")

    def conditions(self, table: sa.Table) -> list[sa.ColumnElement[bool]]:
        """The WHERE of this filter on the deliveries ``table``."""
        conditions: list[sa.ColumnElement[bool]] = []
        if not self.replays or self.replayable:
            conditions.append(table.c.replay_of.is_(None))
        if self.replayable:
            conditions.append(table.c.outcome.in_(REPLAYABLE))
        if self.outcome:
            conditions.append(table.c.outcome == self.outcome)
        if self.event:
            conditions.append(table.c.event == self.event)
        if self.q:
            # Exact matches, so that both columns' indexes serve the search.
            match = _user_is(table, self.q)
            iap_log_id = parse_id(self.q)
            if iap_log_id is not None:
                match = match | (table.c.iap_log_id == iap_log_id)
            conditions.append(match)
        if self.user_id:
            conditions.append(_user_is(table, self.user_id))
        if self.iap_log_id is not None:
            in_range = 0 <= self.iap_log_id <= MAX_ID
            conditions.append(table.c.iap_log_id == self.iap_log_id if in_range else sa.false())
        if self.store_id:
            conditions.append(_of_store_id(table, self.store_id))
        if self.received_from is not None:
            conditions.append(table.c.received_at >= self.received_from)
        if self.received_until is not None:
            conditions.append(table.c.received_at < self.received_until)
        return conditions


def _user_is(table: sa.Table, user_id: str) -> sa.ColumnElement[bool]:
    return table.c.user_id == user_id if fits_id(user_id) else sa.false()


def _of_store_id(table: sa.Table, store_id: str) -> sa.ColumnElement[bool]:
    """The deliveries whose identity (:mod:`~flask_nachocode.events`) names
    ``store_id``: ``purchase:{os}:{store id}`` exactly, or
    ``refund:{os}:{store id}:{refund time}`` with the time's fixed width, so that a
    store id holding ``:`` or ``%`` matches only itself. Not LIKE: SQLite's ignores
    case. The identity has no index (one more write per delivery): this scans the
    deliveries the other conditions leave."""
    if not fits_id(store_id):
        return sa.false()
    identity = table.c.identity
    matches: list[sa.ColumnElement[bool]] = [
        identity.in_([f"purchase:{platform}:{store_id}" for platform in _PLATFORMS])
    ]
    for platform in _PLATFORMS:
        # Bound with the column's type, so that length() and substr() count alike:
        # characters, or on MySQL the UTF-8 bytes that ExactText stores.
        prefix = sa.literal(f"refund:{platform}:{store_id}:", identity.type)
        matches.append(
            sa.and_(
                sa.func.substr(identity, 1, sa.func.length(prefix)) == prefix,
                sa.func.length(identity) == sa.func.length(prefix) + _REFUND_TIME_WIDTH,
            )
        )
    return sa.or_(*matches)


#: The replay_of index is partial elsewhere; on MySQL it holds every delivery, and
#: MariaDB reads "originals only" through it, row by row, over the user id's index.
_NOT_BY_REPLAY_OF = "IGNORE INDEX (ix_nachocode_deliveries_replay_of)"


def _matching(table: sa.Table, where: DeliveryFilter, *columns: Any) -> sa.Select[Any]:
    """``SELECT columns FROM deliveries WHERE`` the filter's conditions."""
    query = sa.select(*columns).select_from(table).where(*where.conditions(table))
    for dialect_name in MYSQL_DIALECTS:
        query = query.with_hint(table, _NOT_BY_REPLAY_OF, dialect_name)
    return query


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
    query = _matching(table, where, *[table.c[name] for name in LIST_COLUMNS])
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
    query = _matching(table, where, table.c.id)
    if before is not None:
        query = query.where(table.c.id < before)
    if after is not None:
        query = query.where(table.c.id > after)
    with store.reading() as session:
        return session.execute(query.limit(1)).first() is not None


def iter_deliveries(
    store: Store,
    where: DeliveryFilter,
    *,
    columns: Sequence[str] = EXPORT_COLUMNS,
    batch_size: int = BATCH_SIZE,
) -> Iterator[sa.Row[Any]]:
    """Every delivery matching ``where``, oldest first, with ``columns``: for an
    export or a bulk replay, in memory bounded by ``batch_size``.

    Only the deliveries stored when the iteration starts: replays made while
    iterating (a bulk replay's own) are not met again. Each batch is read in a
    transaction of its own, ended before its rows are yielded, so the caller may
    write between rows (a replay commits its own transaction).
    """
    table = store.deliveries
    with store.reading() as session:
        last = session.execute(sa.select(sa.func.max(table.c.id))).scalar()
    if last is None:
        return
    query = (
        _matching(table, where, *[table.c[name] for name in columns])
        .where(table.c.id <= last)
        .order_by(table.c.id)
        .limit(batch_size)
    )
    after = 0
    while True:
        with store.reading() as session:
            batch = session.execute(query.where(table.c.id > after)).all()
        yield from batch
        if len(batch) < batch_size:
            return
        after = batch[-1].id


def count_deliveries(store: Store, where: DeliveryFilter) -> int:
    """How many deliveries match ``where`` (what a bulk replay would take, for its
    confirmation)."""
    table = store.deliveries
    query = _matching(table, where, sa.func.count())
    with store.reading() as session:
        return int(session.execute(query).scalar_one())


@dataclass(frozen=True)
class PeriodCount:
    """How many deliveries of one event and outcome arrived in one hour or day."""

    #: The period's first instant, in UTC.
    start: datetime
    event: str | None
    outcome: str
    count: int


class _Period(sa.sql.functions.FunctionElement[str]):
    """The UTC hour or day a timestamp column falls in, as text that
    ``strptime(text, strftime_format)`` reads back: grouped by in SQL on each database."""

    type = sa.String()
    inherit_cache = True
    strftime_format: ClassVar[str]
    to_char_format: ClassVar[str]


class _Hour(_Period):
    inherit_cache = True
    strftime_format = "%Y-%m-%d %H"
    to_char_format = "YYYY-MM-DD HH24"


class _Day(_Period):
    inherit_cache = True
    strftime_format = "%Y-%m-%d"
    to_char_format = "YYYY-MM-DD"


_PERIODS: dict[str, type[_Period]] = {"hour": _Hour, "day": _Day}


def _compile_period(element: _Period, compiler: SQLCompiler, **kw: Any) -> str:
    # The formats are written into the statement rather than bound: PostgreSQL and
    # MySQL accept an expression in GROUP BY only when it is the SELECT's exactly,
    # and two bound parameters are two expressions to them.
    column = compiler.process(element.clauses, **kw)
    name = compiler.dialect.name

    def literal(text: str) -> str:
        return compiler.render_literal_value(text, sa.String())

    if name == "postgresql":
        # timestamptz: in UTC whatever the session's TimeZone.
        return f"to_char(({column}) AT TIME ZONE 'UTC', {literal(element.to_char_format)})"
    if name in MYSQL_DIALECTS:
        # DATETIME holds naive UTC, which DATE_FORMAT does not convert.
        return f"DATE_FORMAT({column}, {literal(element.strftime_format)})"
    # SQLite: the naive UTC text SQLAlchemy writes.
    return f"strftime({literal(element.strftime_format)}, {column})"


for _period in _PERIODS.values():
    compiles(_period)(_compile_period)


def count_by_period(
    store: Store, where: DeliveryFilter, *, period: Literal["hour", "day"]
) -> list[PeriodCount]:
    """How many deliveries matching ``where`` arrived in each UTC hour or day, by
    event and latest outcome: counted and grouped by the database, in time order
    (then event, then outcome). Periods with none are left out. Hours regroup
    exactly into the days of any time zone a whole number of hours from UTC (KST).

    ``received_at`` has no index (one more write per delivery): the database reads
    the deliveries the filter's other conditions leave, so give it a time range.
    """
    if period not in _PERIODS:
        raise ValueError(f"period must be one of {', '.join(_PERIODS)}, not {period!r}")
    table = store.deliveries
    start = _PERIODS[period](table.c.received_at)
    query = _matching(
        table, where, start, table.c.event, table.c.outcome, sa.func.count()
    ).group_by(start, table.c.event, table.c.outcome)
    with store.reading() as session:
        rows = session.execute(query).all()
    counts = [
        PeriodCount(
            datetime.strptime(text, start.strftime_format).replace(tzinfo=timezone.utc),
            event,
            outcome,
            int(count),
        )
        for text, event, outcome, count in rows
    ]
    return sorted(counts, key=lambda c: (c.start, c.event or "", c.outcome))


def delivery_record(row: sa.Row[Any]) -> dict[str, Any]:
    """A row of :func:`iter_deliveries` as a JSON-ready dict, the one shape of an
    exported delivery: times in ISO 8601 with their UTC offset."""
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in row._mapping.items()
    }


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

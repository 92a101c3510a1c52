"""The typed events handlers receive, one class per Nachocode webhook.

Events are immutable: a handler cannot change what the next handler sees. The
original JSON object, including fields Nachocode may add later, stays on
``event.raw``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, ClassVar, Literal

Platform = Literal["android", "ios"]
ProductType = Literal["consumable", "non-consumable"]
Environment = Literal["sandbox", "production"]

#: The event names handlers are registered under.
EVENT_NAMES = ("purchase", "refund", "unavailable_users")


@dataclass(frozen=True)
class Route:
    """One webhook URL: what it is called in a stored delivery, where it is mounted
    below the prefix, which event it receives, and where it goes in Nachocode's dashboard."""

    #: Stored in ``nachocode_deliveries.route``; also the endpoint's name.
    name: str
    #: Below ``NACHOCODE_URL_PREFIX``.
    path: str
    #: The event the URL receives; None for the all-events URL, which tells it by the body.
    event: str | None
    #: The field of the Nachocode dashboard the URL is pasted into.
    dashboard_field: str


#: The webhook routes: the one table of event <-> URL path, the all-events URL last.
ROUTES = (
    Route("purchase", "/webhooks/purchase", "purchase", "In-app purchase: purchase webhook URL"),
    Route("refund", "/webhooks/refund", "refund", "In-app purchase: refund webhook URL"),
    Route(
        "unavailable-users",
        "/webhooks/unavailable-users",
        "unavailable_users",
        "Push: unavailable users webhook URL",
    ),
    Route("any", "/webhooks", None, "All events on one URL (event told by the body)"),
)
#: Route name -> route.
ROUTES_BY_NAME = {route.name: route for route in ROUTES}
#: Event name (and ``"any"``) -> the route that receives it.
ROUTES_BY_EVENT = {route.event or "any": route for route in ROUTES}
#: Every spelling of an event a person may type -> its event name: the name, and
#: the route's name as the URL spells it (``unavailable-users``).
EVENT_SPELLINGS = {
    **{route.name: route.event for route in ROUTES if route.event is not None},
    **{name: name for name in EVENT_NAMES},
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso_ms(moment: datetime) -> str:
    """``2025-02-19T02:00:31.280Z``: a UTC time as Nachocode writes it (``moment``
    must be in UTC already: a refund's identity is built from it and must not move)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class PlayStorePurchaseData:
    """Play Store data of an Android purchase."""

    purchase_token: str
    order_id: str

    @property
    def store_purchase_id(self) -> str:
        # orderId is unique per purchase; the token is not for subscriptions.
        return self.order_id


@dataclass(frozen=True)
class AppStorePurchaseData:
    """App Store data of an iOS purchase."""

    original_transaction_id: str
    transaction_id: str

    @property
    def store_purchase_id(self) -> str:
        return self.transaction_id


StoreData = PlayStorePurchaseData | AppStorePurchaseData


@dataclass(frozen=True)
class _InAppEvent:
    user_id: str
    iap_log_id: int
    nacho_product_id: str
    os: Platform
    product_id: str
    product_type: ProductType
    quantity: int
    price: Decimal
    environment: Environment
    data: StoreData

    @property
    def store_purchase_id(self) -> str:
        """The store's unique id of the purchase (Play ``orderId``, App Store
        ``transactionId``); a refund carries the same one as its purchase."""
        return self.data.store_purchase_id

    @property
    def is_sandbox(self) -> bool:
        return self.environment == "sandbox"

    @property
    def is_consumable(self) -> bool:
        return self.product_type == "consumable"


@dataclass(frozen=True)
class PurchaseEvent(_InAppEvent):
    """A purchase that passed Nachocode's store verification."""

    name: ClassVar[str] = "purchase"

    requested_at: datetime
    purchased_at: datetime
    verified_at: datetime
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def total_amount(self) -> Decimal:
        """``price`` is per unit: what the buyer paid for all units."""
        return self.price * self.quantity

    @property
    def identity(self) -> str:
        """The key that makes a re-sent purchase a duplicate."""
        return f"purchase:{self.os}:{self.store_purchase_id}"


@dataclass(frozen=True)
class RefundEvent(_InAppEvent):
    """A (possibly partial) refund of an earlier purchase."""

    name: ClassVar[str] = "refund"

    refund_quantity: int
    refunded_at: datetime
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def is_partial(self) -> bool:
        return self.refund_quantity < self.quantity

    @property
    def refunded_amount(self) -> Decimal:
        return self.price * self.refund_quantity

    @property
    def identity(self) -> str:
        # Two partial refunds of one purchase are two events: the time tells them apart.
        return f"refund:{self.os}:{self.store_purchase_id}:{iso_ms(self.refunded_at)}"


@dataclass(frozen=True)
class UnavailableUsersEvent:
    """After a push send, the users it could not reach."""

    name: ClassVar[str] = "unavailable_users"

    token_not_found_user_ids: list[str]
    token_invalid_user_ids: list[str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def user_ids(self) -> list[str]:
        """Every unreachable user, without repeats, in the order received."""
        return list(dict.fromkeys(self.token_not_found_user_ids + self.token_invalid_user_ids))

    @property
    def identity(self) -> None:
        # Each push send is its own event and forgetting a token twice is harmless,
        # so these deliveries are never treated as duplicates.
        return None


Event = PurchaseEvent | RefundEvent | UnavailableUsersEvent

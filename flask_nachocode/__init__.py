"""Receive Nachocode webhooks (purchase, refund, unavailable users) in Flask,
validated, typed, stored and handled exactly once."""

from __future__ import annotations

from ._version import __version__
from .errors import Refuse
from .events import (
    AppStorePurchaseData,
    PlayStorePurchaseData,
    PurchaseEvent,
    RefundEvent,
    UnavailableUsersEvent,
)
from .extension import NachocodeWebhook
from .ledger import Purchase
from .reads import Ledger
from .signals import (
    delivery_failed,
    delivery_handled,
    delivery_queued,
    delivery_received,
    delivery_retry,
)
from .tables import ExactText, alembic_render_item

__all__ = [
    "AppStorePurchaseData",
    "ExactText",
    "Ledger",
    "NachocodeWebhook",
    "PlayStorePurchaseData",
    "Purchase",
    "PurchaseEvent",
    "RefundEvent",
    "Refuse",
    "UnavailableUsersEvent",
    "alembic_render_item",
    "delivery_failed",
    "delivery_handled",
    "delivery_queued",
    "delivery_received",
    "delivery_retry",
    "__version__",
]

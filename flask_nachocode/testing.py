"""Helpers for testing apps that use flask-nachocode, without Nachocode or a network.

Payload factories build bodies exactly as Nachocode sends them (camelCase JSON,
ISO timestamps with milliseconds), valid by construction and with fresh store
ids, so two calls never make duplicates unless you ask for one. Overrides are
keyword arguments named like the JSON fields, in camelCase or snake_case
(``user_id="u1"`` and ``userId="u1"`` are the same).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from typing import Any

from .events import ROUTES_BY_EVENT, iso_ms, utcnow

_counter = itertools.count(1)
_random = random.SystemRandom()


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


def _timestamp() -> str:
    return iso_ms(utcnow())


def _apply(payload: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for name, value in overrides.items():
        key = _camel(name)
        if key == "data" and isinstance(value, dict):
            payload["data"] = {**payload["data"], **{_camel(k): v for k, v in value.items()}}
        else:
            payload[key] = value
    return payload


def store_data(os: str = "ios") -> dict[str, str]:
    """Fresh store ids for one purchase on ``os`` (``android`` or ``ios``)."""
    if os == "android":
        digits = f"{_random.randrange(10**19):019d}"
        return {
            "purchaseToken": f"token-{_random.getrandbits(96):024x}.AO-J1O",
            "orderId": f"GPA.{digits[:4]}-{digits[4:8]}-{digits[8:12]}-{digits[12:17]}",
        }
    if os == "ios":
        transaction = str(2000000000000000 + _random.randrange(10**15))
        return {"originalTransactionId": transaction, "transactionId": transaction}
    raise ValueError(f"os must be 'android' or 'ios', not {os!r}")


def purchase_payload(*, os: str = "ios", **overrides: Any) -> dict[str, Any]:
    """A valid ``purchase`` body with fresh ids; ``overrides`` replace fields."""
    now = _timestamp()
    payload = {
        "userId": "test-user",
        "iapLogId": 1_000_000 + next(_counter) * 1000 + _random.randrange(1000),
        "nachoProductId": "NP-NXGLSTOEXK-0001",
        "os": os,
        "productId": "com.nachocode.example.consumable",
        "productType": "consumable",
        "quantity": 1,
        "price": 1000,
        "environment": "sandbox",
        "data": store_data(os),
        "requestedAt": now,
        "purchasedAt": now,
        "verifiedAt": now,
    }
    return _apply(payload, overrides)


def refund_payload(
    purchase: dict[str, Any] | None = None, *, os: str = "ios", **overrides: Any
) -> dict[str, Any]:
    """A valid ``refund`` body: of ``purchase`` (a purchase payload) when given,
    else of a fresh purchase. Refunds everything unless ``refundQuantity`` is given."""
    purchase = purchase if purchase is not None else purchase_payload(os=os)
    payload = {key: value for key, value in purchase.items() if not key.endswith("At")}
    payload["data"] = dict(purchase["data"])
    payload["refundQuantity"] = purchase["quantity"]
    payload["refundedAt"] = _timestamp()
    return _apply(payload, overrides)


def unavailable_users_payload(**overrides: Any) -> dict[str, Any]:
    """A valid ``unavailable_users`` body."""
    suffix = f"{next(_counter)}"
    payload: dict[str, Any] = {
        "tokenNotFoundUserIds": [f"user-no-token-{suffix}"],
        "tokenInvalidUserIds": [f"user-bad-token-{suffix}"],
    }
    return _apply(payload, overrides)


def payload_for(event: str, *, os: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid body for the event named ``event``, from the factory above that
    builds it; ``os`` (``android`` or ``ios``, default ``ios``) applies to
    ``purchase`` and ``refund`` only."""
    if event == "unavailable_users":
        if os is not None:
            raise ValueError("os applies to purchase and refund bodies, not unavailable_users")
        return unavailable_users_payload(**overrides)
    if event == "purchase":
        return purchase_payload(os=os or "ios", **overrides)
    if event == "refund":
        return refund_payload(os=os or "ios", **overrides)
    raise ValueError(f"unknown event {event!r}; expected purchase, refund or unavailable_users")


def webhook_path(event: str) -> str:
    """The path below the URL prefix that receives ``event`` (``"any"``: the all-events URL)."""
    return ROUTES_BY_EVENT[event].path


def post_delivery(
    client: Any,
    event: str,
    payload: dict[str, Any] | str | bytes,
    *,
    key: str | None = None,
    prefix: str | None = None,
) -> Any:
    """POST a delivery through Flask's test client as Nachocode does.

    ``event`` is an event name, or ``"any"`` for the all-events URL. ``key``
    defaults to the app's first ``NACHOCODE_WEBHOOK_KEY``; ``prefix`` to its
    ``NACHOCODE_URL_PREFIX``.
    """
    config = client.application.config
    if key is None:
        configured = config.get("NACHOCODE_WEBHOOK_KEY")
        key = configured if isinstance(configured, str) or configured is None else configured[0]
    prefix = prefix if prefix is not None else config.get("NACHOCODE_URL_PREFIX", "/nachocode")
    path = webhook_path(event)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
    return client.post(f"{prefix.rstrip('/')}{path}", data=data, headers=headers)

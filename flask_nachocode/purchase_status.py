"""``GET {prefix}/purchases/<iapLogId>?userId=...``: "did my purchase arrive?"

After ``Nachocode.iap.purchase(...)`` reports success, the app's front end asks
its backend whether the ``purchase`` webhook has arrived and was granted; the
SDK's ``purchaseId`` is the webhook's ``iapLogId``. Mounted only when
``NACHOCODE_PURCHASE_STATUS_ROUTE`` is true, wrapped in the app's
``NACHOCODE_PURCHASE_STATUS_DECORATORS``.

Answers, all with ``Cache-Control: no-store`` (a cached "pending" would hide
the grant, a cached grant would outlive a refund):

- 200 ``{"success": true, "status": "granted" | "partially_refunded" | "refunded", ...}``
  once the purchase was handled;
- 404 ``{"success": false, "status": "pending"}`` before that, and also when
  ``userId`` is missing or is not the buyer's (or could be nobody's: a NUL, or
  longer than any user id): a wrong user id looks exactly like a purchase that
  has not arrived, so the route tells nobody which purchases exist;
- 400 ``bad_iap_log_id`` when the id is not a non-negative integer (a bug in
  the caller, not a question about a purchase);
- 503 ``store_unavailable`` when the database cannot be read.

``userId`` is a check, not authentication: when user ids can be guessed, wrap
the route with the app's own login decorator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response, jsonify, request

from .errors import BadPurchaseId, StoreUnavailable
from .events import iso_ms
from .ledger import Purchase
from .schemas import parse_id
from .state import ViewDecorator, current_ledger, current_state, decorate

#: The route's endpoint name, for ``url_for("nachocode.purchase_status", ...)``.
ENDPOINT = "purchase_status"


def _parse_iap_log_id(text: str) -> int:
    value = parse_id(text)
    if value is None:
        raise BadPurchaseId(f"iapLogId must be a non-negative integer, not {text[:40]!r}")
    return value


def _moment(value: Any) -> str | None:
    return iso_ms(value) if value is not None else None


def status_body(purchase: Purchase) -> dict[str, Any]:
    """What the front end is told about a handled purchase: enough to show the
    result, nothing the buyer's device should not hold (no store tokens)."""
    return {
        "success": True,
        "status": purchase.status,
        "iapLogId": purchase.iap_log_id,
        "userId": purchase.user_id,
        "nachoProductId": purchase.nacho_product_id,
        "productId": purchase.product_id,
        "productType": purchase.product_type,
        "os": purchase.platform,
        "environment": purchase.environment,
        "quantity": purchase.quantity,
        "refundedQuantity": purchase.refunded_quantity,
        "netQuantity": purchase.net_quantity,
        "purchasedAt": _moment(purchase.purchased_at),
        "refundedAt": _moment(purchase.refunded_at),
    }


def purchase_status(iap_log_id: str) -> Response:
    """The status of purchase ``iap_log_id`` for ``?userId=``; see the module docstring."""
    log_id = _parse_iap_log_id(iap_log_id)
    user_id = request.args.get("userId", "")
    purchase = None
    if user_id:
        state = current_state()
        try:
            # Both ids in the query: another user's purchase is never even loaded.
            # Every environment: app review buys in sandbox against live servers.
            purchase = current_ledger.get(log_id, environment=None, user_id=user_id)
        except sa.exc.SQLAlchemyError:
            state.store.rollback_quietly()
            raise StoreUnavailable("the purchase ledger is unavailable; ask again later") from None
    if purchase is None or purchase.status == "pending":
        response = jsonify(success=False, status="pending")
        response.status_code = 404
        return response
    return jsonify(status_body(purchase))


def _no_store(response: Response) -> Response:
    # On the blueprint rather than in the view, so that answers made by the app's
    # decorators (a 401, a redirect to a login page) are not cached either.
    if request.endpoint == f"nachocode.{ENDPOINT}":
        response.headers["Cache-Control"] = "no-store"
    return response


def add_purchase_status_route(blueprint: Blueprint, decorators: Sequence[ViewDecorator]) -> None:
    """Mount the route on ``blueprint``, wrapped in ``decorators`` (the first one
    outermost, see :func:`~flask_nachocode.state.decorate`)."""
    view = decorate(purchase_status, decorators)
    blueprint.add_url_rule("/purchases/<iap_log_id>", ENDPOINT, view, methods=["GET"])
    blueprint.after_request(_no_store)

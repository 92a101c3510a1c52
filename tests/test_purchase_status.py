"""GET {prefix}/purchases/<iapLogId>?userId=...: the "did my purchase arrive?"
route the front end polls after Nachocode.iap.purchase succeeds."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, abort, request

from flask_nachocode import NachocodeWebhook, PurchaseEvent
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload

PENDING = {"success": False, "status": "pending"}


def require_session(view: Callable[..., Any]) -> Callable[..., Any]:
    """An app's own auth decorator: only a caller whose session is the user asked about."""

    @functools.wraps(view)
    def guarded(**kwargs: Any) -> Any:
        if request.headers.get("X-Session-User") != request.args.get("userId"):
            abort(401)
        return view(**kwargs)

    return guarded


@pytest.fixture
def make_status_app(
    make_app: Callable[..., tuple[Flask, NachocodeWebhook]],
) -> Callable[..., tuple[Flask, NachocodeWebhook]]:
    def make(**config: Any) -> tuple[Flask, NachocodeWebhook]:
        app, ext = make_app(**{"NACHOCODE_PURCHASE_STATUS_ROUTE": True, **config})
        ext.on_purchase(lambda event: None)
        ext.on_refund(lambda event: None)
        return app, ext

    return make


@pytest.fixture
def app(make_status_app: Callable[..., tuple[Flask, NachocodeWebhook]]) -> Flask:
    return make_status_app()[0]


def status(app: Flask, iap_log_id: Any, user_id: str | None = "test-user", **headers: str) -> Any:
    query = {} if user_id is None else {"userId": user_id}
    answer = app.test_client().get(
        f"/nachocode/purchases/{iap_log_id}", query_string=query, headers=headers
    )
    assert answer.headers["Cache-Control"] == "no-store"
    return answer


@pytest.mark.every_store
def test_pending_until_the_purchase_is_handled_then_granted(app: Flask) -> None:
    bought = purchase_payload(quantity=2)
    before = status(app, bought["iapLogId"])
    assert (before.status_code, before.get_json()) == (404, PENDING)

    post_delivery(app.test_client(), "purchase", bought)
    after = status(app, bought["iapLogId"])
    assert after.status_code == 200
    assert after.get_json() == {
        "success": True,
        "status": "granted",
        "iapLogId": bought["iapLogId"],
        "userId": "test-user",
        "nachoProductId": bought["nachoProductId"],
        "productId": bought["productId"],
        "productType": "consumable",
        "os": "ios",
        "environment": "sandbox",  # sandbox purchases are visible: app review uses them
        "quantity": 2,
        "refundedQuantity": 0,
        "netQuantity": 2,
        "purchasedAt": bought["purchasedAt"],
        "refundedAt": None,
    }
    assert "transactionId" not in after.get_data(as_text=True)  # no store ids to the device


@pytest.mark.every_store
def test_refunds_show_in_the_status(app: Flask) -> None:
    bought = purchase_payload(quantity=2, environment="production")
    client = app.test_client()
    post_delivery(client, "purchase", bought)

    partial = refund_payload(bought, refundQuantity=1)
    post_delivery(client, "refund", partial)
    body = status(app, bought["iapLogId"]).get_json()
    assert (body["status"], body["netQuantity"], body["refundedAt"]) == (
        "partially_refunded",
        1,
        partial["refundedAt"],
    )

    post_delivery(
        client,
        "refund",
        refund_payload(bought, refundQuantity=1, refundedAt="2099-01-01T00:00:00.000Z"),
    )
    body = status(app, bought["iapLogId"]).get_json()
    assert (body["status"], body["netQuantity"]) == ("refunded", 0)


@pytest.mark.every_store
@pytest.mark.parametrize("user_id", ["someone-else", "", None, "TEST-USER", "test-user "])
def test_another_user_cannot_tell_the_purchase_exists(app: Flask, user_id: str | None) -> None:
    bought = purchase_payload()
    post_delivery(app.test_client(), "purchase", bought)
    never_made = status(app, bought["iapLogId"] + 1)

    answer = status(app, bought["iapLogId"], user_id=user_id)
    assert answer.status_code == never_made.status_code == 404
    assert answer.get_data() == never_made.get_data()
    assert dict(answer.headers) == dict(never_made.headers)


@pytest.mark.every_store
def test_a_refund_alone_does_not_make_a_purchase_arrive(app: Flask) -> None:
    bought = purchase_payload()
    post_delivery(app.test_client(), "refund", refund_payload(bought, refundQuantity=1))
    answer = status(app, bought["iapLogId"])
    assert (answer.status_code, answer.get_json()) == (404, PENDING)


@pytest.mark.every_store
def test_a_purchase_whose_handler_failed_stays_pending(
    make_status_app: Callable[..., tuple[Flask, NachocodeWebhook]],
) -> None:
    app, ext = make_status_app()

    @ext.on_purchase
    def broken(event: PurchaseEvent) -> None:
        raise RuntimeError("grant failed")

    bought = purchase_payload()
    assert post_delivery(app.test_client(), "purchase", bought).status_code == 500
    assert status(app, bought["iapLogId"]).status_code == 404


@pytest.mark.every_store
@pytest.mark.parametrize("bad_id", ["abc", "-1", "1.5", "9" * 19, "9" * 40, "%C2%B2", "%D9%A3"])
def test_an_id_that_is_no_iap_log_id_is_a_bad_request(app: Flask, bad_id: str) -> None:
    answer = status(app, bad_id)
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "bad_iap_log_id"
    assert answer.get_json()["success"] is False


@pytest.mark.every_store
def test_the_route_is_off_by_default(
    make_app: Callable[..., tuple[Flask, NachocodeWebhook]],
) -> None:
    app, _ = make_app()
    assert "nachocode.purchase_status" not in app.view_functions
    assert app.test_client().get("/nachocode/purchases/1?userId=u").status_code == 404


@pytest.mark.every_store
def test_it_follows_the_url_prefix(
    make_status_app: Callable[..., tuple[Flask, NachocodeWebhook]],
) -> None:
    app, _ = make_status_app(NACHOCODE_URL_PREFIX="/hooks/nacho")
    bought = purchase_payload()
    post_delivery(app.test_client(), "purchase", bought)
    answer = app.test_client().get(f"/hooks/nacho/purchases/{bought['iapLogId']}?userId=test-user")
    assert answer.status_code == 200
    assert answer.headers["Cache-Control"] == "no-store"


@pytest.mark.every_store
@pytest.mark.parametrize("decorator", [require_session, f"{__name__}:require_session"])
def test_the_apps_decorator_guards_the_route(
    make_status_app: Callable[..., tuple[Flask, NachocodeWebhook]], decorator: Any
) -> None:
    app, _ = make_status_app(NACHOCODE_PURCHASE_STATUS_DECORATORS=[decorator])
    bought = purchase_payload()
    post_delivery(app.test_client(), "purchase", bought)

    refused = status(app, bought["iapLogId"])  # no session: the decorator's own 401, not cached
    assert refused.status_code == 401
    assert str(bought["iapLogId"]) not in refused.get_data(as_text=True)
    assert status(app, bought["iapLogId"], **{"X-Session-User": "intruder"}).status_code == 401

    allowed = status(app, bought["iapLogId"], **{"X-Session-User": "test-user"})
    assert allowed.status_code == 200
    assert allowed.get_json()["status"] == "granted"


@pytest.mark.every_store
def test_decorators_wrap_outermost_first(
    make_status_app: Callable[..., tuple[Flask, NachocodeWebhook]],
) -> None:
    calls: list[str] = []

    def tracing(name: str) -> Callable[..., Any]:
        def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(**kwargs: Any) -> Any:
                calls.append(name)
                return view(**kwargs)

            return wrapped

        return decorator

    app, _ = make_status_app(
        NACHOCODE_PURCHASE_STATUS_DECORATORS=[tracing("outer"), tracing("inner")]
    )
    status(app, 1)
    assert calls == ["outer", "inner"]


def test_the_route_needs_the_ledger(
    make_app: Callable[..., tuple[Flask, NachocodeWebhook]],
) -> None:
    with pytest.raises(RuntimeError, match="NACHOCODE_LEDGER"):
        make_app(NACHOCODE_PURCHASE_STATUS_ROUTE=True, NACHOCODE_LEDGER=False)


def test_an_unimportable_decorator_is_a_clear_start_up_error(
    make_app: Callable[..., tuple[Flask, NachocodeWebhook]],
) -> None:
    with pytest.raises(RuntimeError, match="NACHOCODE_PURCHASE_STATUS_DECORATORS"):
        make_app(
            NACHOCODE_PURCHASE_STATUS_ROUTE=True,
            NACHOCODE_PURCHASE_STATUS_DECORATORS=["nowhere:login"],
        )


def test_an_unreachable_database_answers_503_not_pending(
    make_app: Callable[..., tuple[Flask, NachocodeWebhook]], tmp_path: Any
) -> None:
    app, _ = make_app(
        NACHOCODE_PURCHASE_STATUS_ROUTE=True,
        NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / 'no-such-folder' / 'nachocode.db'}",
    )
    answer = status(app, 1)
    assert answer.status_code == 503
    assert answer.get_json()["error"] == "store_unavailable"


@pytest.mark.every_store
@pytest.mark.parametrize(
    "user_id", ["\x00", "test-user\x00", "u" * 257], ids=["nul", "nul-suffix", "too-long"]
)
def test_a_user_id_no_purchase_can_have_is_pending_not_an_error(
    app: Flask, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL refuses a NUL in a query parameter: the route answered 503, which the
    # front end takes as "ask again", and logged an ERROR. No purchase has such a user id.
    bought = purchase_payload()
    assert post_delivery(app.test_client(), "purchase", bought).status_code == 200
    with caplog.at_level(logging.WARNING):
        answer = status(app, bought["iapLogId"], user_id)
    assert (answer.status_code, answer.get_json()) == (404, {"success": False, "status": "pending"})
    assert caplog.records == []
    assert status(app, bought["iapLogId"]).get_json()["status"] == "granted"

"""The three bodies as Nachocode documents them: fields, enums, bounds, store data,
timestamps, extra fields, telling the event from the body's shape, and the 422
answers' messages and dotted paths (pinned). Property-based: any timestamp means
the same instant, and a body with one field broken is always refused."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given

from flask_nachocode import (
    AppStorePurchaseData,
    PlayStorePurchaseData,
    PurchaseEvent,
    RefundEvent,
    UnavailableUsersEvent,
)
from flask_nachocode.errors import InvalidEvent
from flask_nachocode.events import ROUTES_BY_EVENT
from flask_nachocode.schemas import MAX_COUNT, MAX_ID_LENGTH, infer_event_name, load_event
from flask_nachocode.testing import (
    post_delivery,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)

from support.common import load_fixture
from support.figures import count
from support.fuzz import FUZZ, Harness, auth, broken_bodies, dumps, timestamps

IN_APP_FIELDS = [
    "userId",
    "iapLogId",
    "nachoProductId",
    "os",
    "productId",
    "productType",
    "quantity",
    "price",
    "environment",
    "data",
]
PURCHASE_FIELDS = IN_APP_FIELDS + ["requestedAt", "purchasedAt", "verifiedAt"]
REFUND_FIELDS = IN_APP_FIELDS + ["refundQuantity", "refundedAt"]
PUSH_FIELDS = ["tokenNotFoundUserIds", "tokenInvalidUserIds"]
STORE_FIELDS = {
    "android": ["purchaseToken", "orderId"],
    "ios": ["originalTransactionId", "transactionId"],
}

#: Event name -> a factory for a valid body of it.
BODIES: dict[str, Callable[..., dict[str, Any]]] = {
    "purchase": purchase_payload,
    "refund": refund_payload,
    "unavailable_users": unavailable_users_payload,
}


def errors_of(name: str, body: dict[str, Any]) -> dict[str, list[str]]:
    """The 422's ``errors`` for ``body`` loaded as ``name``; fails if it loads."""
    with pytest.raises(InvalidEvent) as refused:
        load_event(name, body)
    assert refused.value.status == 422
    assert refused.value.errors
    return refused.value.errors


# -- the documented example bodies -------------------------------------------------


def test_purchase_ios_fixture() -> None:
    event = load_event("purchase", load_fixture("purchase-ios"))
    at = datetime(2025, 2, 19, 2, 0, 31, 280000, tzinfo=timezone.utc)
    assert event == PurchaseEvent(
        user_id="testUser",
        iap_log_id=1,
        nacho_product_id="NP-NXGLSTOEXK-0001",
        os="ios",
        product_id="com.nachocode.example.consumable",
        product_type="consumable",
        quantity=1,
        price=Decimal(1000),
        environment="sandbox",
        data=AppStorePurchaseData(
            original_transaction_id="2000000123456789", transaction_id="2000000123456789"
        ),
        requested_at=at,
        purchased_at=at,
        verified_at=at,
        raw=load_fixture("purchase-ios"),
    )
    assert (event.user_id, event.iap_log_id, event.nacho_product_id) == (
        "testUser",
        1,
        "NP-NXGLSTOEXK-0001",
    )
    assert (event.os, event.product_id, event.product_type) == (
        "ios",
        "com.nachocode.example.consumable",
        "consumable",
    )
    assert (event.quantity, event.price, event.environment) == (1, Decimal("1000"), "sandbox")
    assert event.data == AppStorePurchaseData(
        original_transaction_id="2000000123456789", transaction_id="2000000123456789"
    )
    assert event.requested_at == event.purchased_at == event.verified_at == at
    assert event.store_purchase_id == "2000000123456789"
    assert event.is_sandbox
    assert event.is_consumable
    assert event.total_amount == Decimal("1000")
    assert event.raw == load_fixture("purchase-ios")


def test_purchase_android_fixture() -> None:
    event = load_event("purchase", load_fixture("purchase-android"))
    assert isinstance(event, PurchaseEvent)
    assert (event.user_id, event.iap_log_id, event.os, event.quantity) == (
        "player-42",
        7781,
        "android",
        3,
    )
    assert event.data == PlayStorePurchaseData(
        purchase_token="opaque-token-abc.AO-J1Oz9x7Qe", order_id="GPA.3312-4581-2334-55012"
    )
    assert event.store_purchase_id == "GPA.3312-4581-2334-55012"
    assert not event.is_sandbox
    assert event.total_amount == Decimal("3600")
    assert event.requested_at == datetime(2025, 3, 2, 11, 15, 0, 120000, tzinfo=timezone.utc)
    assert event.purchased_at == datetime(2025, 3, 2, 11, 15, 4, 900000, tzinfo=timezone.utc)
    assert event.verified_at == datetime(2025, 3, 2, 11, 15, 5, 10000, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("refund", "purchase", "partial", "amount"),
    [
        ("refund-ios", "purchase-ios", False, "1000"),
        ("refund-android-partial", "purchase-android", True, "1200"),
    ],
)
def test_refund_fixtures_share_the_purchase_id(
    refund: str, purchase: str, partial: bool, amount: str
) -> None:
    event = load_event("refund", load_fixture(refund))
    assert isinstance(event, RefundEvent)
    assert event.is_partial is partial
    assert event.refunded_amount == Decimal(amount)
    assert event.refunded_at.tzinfo == timezone.utc
    assert (
        event.store_purchase_id == load_event("purchase", load_fixture(purchase)).store_purchase_id
    )


def test_unavailable_users_fixture() -> None:
    event = load_event("unavailable_users", load_fixture("unavailable-users"))
    assert isinstance(event, UnavailableUsersEvent)
    assert event.token_not_found_user_ids == ["userId1", "userId2"]
    assert event.token_invalid_user_ids == ["userId3", "userId4"]
    assert event.user_ids == ["userId1", "userId2", "userId3", "userId4"]


def test_user_ids_lists_each_user_once() -> None:
    event = load_event(
        "unavailable_users",
        unavailable_users_payload(
            token_not_found_user_ids=["a", "b"], token_invalid_user_ids=["b", "c"]
        ),
    )
    assert event.user_ids == ["a", "b", "c"]


# -- required fields ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "field"),
    [("purchase", f) for f in PURCHASE_FIELDS]
    + [("refund", f) for f in REFUND_FIELDS]
    + [("unavailable_users", f) for f in PUSH_FIELDS],
)
def test_every_documented_field_is_required(name: str, field: str) -> None:
    body = BODIES[name]()
    del body[field]
    assert list(errors_of(name, body)) == [field]


@pytest.mark.parametrize(
    ("name", "os", "field"),
    [
        (name, os, field)
        for name in ("purchase", "refund")
        for os, fields in STORE_FIELDS.items()
        for field in fields
    ],
)
def test_store_data_fields_are_required_with_dotted_paths(name: str, os: str, field: str) -> None:
    body = BODIES[name](os=os)
    del body["data"][field]
    assert list(errors_of(name, body)) == [f"data.{field}"]


@pytest.mark.parametrize(("os", "other"), [("android", "ios"), ("ios", "android")])
def test_data_is_checked_against_os(os: str, other: str) -> None:
    body = purchase_payload(os=os)
    body["data"] = purchase_payload(os=other)["data"]
    assert sorted(errors_of("purchase", body)) == sorted(
        f"data.{field}" for field in STORE_FIELDS[os]
    )


@pytest.mark.parametrize("data", [None, [], "token", 1])
def test_data_must_be_an_object(data: Any) -> None:
    assert list(errors_of("purchase", purchase_payload(data=data))) == ["data"]


# -- enums -------------------------------------------------------------------------

ENUMS = {
    "os": ["android", "ios"],
    "productType": ["consumable", "non-consumable"],
    "environment": ["sandbox", "production"],
}


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        (name, field, value)
        for name in ("purchase", "refund")
        for field, values in ENUMS.items()
        for value in values
    ],
)
def test_every_enum_value_is_accepted(name: str, field: str, value: str) -> None:
    event = load_event(name, BODIES[name](**{field: value}))
    attribute = {"os": "os", "productType": "product_type", "environment": "environment"}[field]
    assert getattr(event, attribute) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (field, value)
        for field in ENUMS
        for value in ["Android", "IOS", "Consumable", "live", "", None, 1, ["ios"]]
    ],
)
def test_values_outside_an_enum_are_refused(field: str, value: Any) -> None:
    body = purchase_payload()
    body[field] = value
    assert list(errors_of("purchase", body)) == [field]


# -- types and bounds --------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[
            (field, value)
            for field in ("iapLogId", "quantity")
            for value in ["1", True, False, 1.5, 1.0, None, [1]]
        ],
        *[
            (field, value)
            for field in ("userId", "nachoProductId", "productId")
            for value in [1, True, None, "", ["x"]]
        ],
        *[
            ("price", value)
            for value in [
                "1000",
                True,
                None,
                -1,
                -0.01,
                float("nan"),
                float("inf"),
                10**15 + 1,
                1e300,
                10**70,
            ]
        ],
        ("quantity", 0),
        ("quantity", -1),
        ("quantity", MAX_COUNT + 1),
        ("iapLogId", -1),
        ("iapLogId", 2**63),
    ],
)
def test_purchase_field_types_and_bounds(field: str, value: Any) -> None:
    assert list(errors_of("purchase", purchase_payload(**{field: value}))) == [field]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quantity", 1),
        ("quantity", MAX_COUNT),
        ("iapLogId", 0),
        ("iapLogId", 2**63 - 1),
    ],
)
def test_integer_bounds_are_inclusive(field: str, value: int) -> None:
    event = load_event("purchase", purchase_payload(**{field: value}))
    assert event.raw[field] == value


@pytest.mark.parametrize(
    ("price", "expected"),
    [
        (0, "0"),
        (1000, "1000"),
        (9.99, "9.99"),
        (0.1, "0.1"),
        (10**15, "1000000000000000"),
    ],
)
def test_price_is_an_exact_decimal(price: float, expected: str) -> None:
    event = load_event("purchase", purchase_payload(price=price))
    assert event.price == Decimal(expected)
    assert str(event.price) == expected


@pytest.mark.parametrize(("quantity", "refund_quantity"), [(1, 1), (3, 1), (3, 2), (3, 3)])
def test_refund_quantity_within_quantity(quantity: int, refund_quantity: int) -> None:
    event = load_event("refund", refund_payload(quantity=quantity, refund_quantity=refund_quantity))
    assert event.refund_quantity == refund_quantity
    assert event.is_partial is (refund_quantity < quantity)


@pytest.mark.parametrize(
    ("quantity", "refund_quantity"),
    [(3, 0), (3, 4), (1, 2), (3, -1), (3, "1"), (3, True), (3, 1.0)],
)
def test_refund_quantity_out_of_bounds(quantity: int, refund_quantity: Any) -> None:
    body = refund_payload(quantity=quantity, refund_quantity=refund_quantity)
    assert list(errors_of("refund", body)) == ["refundQuantity"]


@pytest.mark.parametrize("value", ["a", 1, None, {}, {"0": "a"}])
@pytest.mark.parametrize("field", PUSH_FIELDS)
def test_user_id_lists_must_be_lists(field: str, value: Any) -> None:
    assert list(errors_of("unavailable_users", unavailable_users_payload(**{field: value}))) == [
        field
    ]


@pytest.mark.parametrize("field", PUSH_FIELDS)
def test_user_id_lists_may_be_empty(field: str) -> None:
    event = load_event("unavailable_users", unavailable_users_payload(**{field: []}))
    assert event.raw[field] == []


@pytest.mark.parametrize("value", [7, None, True, ["x"], {}])
@pytest.mark.parametrize("field", PUSH_FIELDS)
def test_a_bad_user_id_is_named_by_its_index(field: str, value: Any) -> None:
    body = unavailable_users_payload(**{field: ["ok", value]})
    assert list(errors_of("unavailable_users", body)) == [f"{field}.1"]


# -- timestamps --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-02-19T02:00:31.280Z", datetime(2025, 2, 19, 2, 0, 31, 280000, tzinfo=timezone.utc)),
        ("2025-02-19T02:00:31Z", datetime(2025, 2, 19, 2, 0, 31, tzinfo=timezone.utc)),
        ("2025-02-19T02:00:31.2Z", datetime(2025, 2, 19, 2, 0, 31, 200000, tzinfo=timezone.utc)),
        (
            "2025-02-19T02:00:31.123456Z",
            datetime(2025, 2, 19, 2, 0, 31, 123456, tzinfo=timezone.utc),
        ),
        (
            "2025-02-19T11:00:31.280+09:00",
            datetime(2025, 2, 19, 2, 0, 31, 280000, tzinfo=timezone.utc),
        ),
        (
            "2025-02-19T02:00:31.280+00:00",
            datetime(2025, 2, 19, 2, 0, 31, 280000, tzinfo=timezone.utc),
        ),
    ],
)
@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("purchase", "requestedAt"),
        ("purchase", "purchasedAt"),
        ("purchase", "verifiedAt"),
        ("refund", "refundedAt"),
    ],
)
def test_timestamps_become_aware_utc(name: str, field: str, text: str, expected: datetime) -> None:
    event = load_event(name, BODIES[name](**{field: text}))
    moment = getattr(
        event,
        {
            "requestedAt": "requested_at",
            "purchasedAt": "purchased_at",
            "verifiedAt": "verified_at",
            "refundedAt": "refunded_at",
        }[field],
    )
    assert moment == expected
    assert moment.utcoffset() is not None
    assert moment.utcoffset().total_seconds() == 0


@pytest.mark.parametrize(
    "text",
    [
        "2025-02-19T02:00:31.280",  # no zone: guessing it could shift the time by hours
        "2025-02-19 02:00:31.280Z",
        "2025-02-19",
        "2025-13-19T02:00:31.280Z",
        "2025-02-19T25:00:31.280Z",
        "2025-02-19T02:00:31.1234567Z",
        "2025-02-29T02:00:31Z",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "yesterday",
        "",
        1739930431280,
        None,
    ],
)
@pytest.mark.parametrize(("name", "field"), [("purchase", "purchasedAt"), ("refund", "refundedAt")])
def test_bad_timestamps_are_refused(name: str, field: str, text: Any) -> None:
    assert list(errors_of(name, BODIES[name](**{field: text}))) == [field]


# -- fields Nachocode may add ------------------------------------------------------


@pytest.mark.parametrize("name", ["purchase", "refund", "unavailable_users"])
def test_unknown_fields_are_accepted_and_kept_on_raw(name: str) -> None:
    body = BODIES[name](futureField={"nested": [1, 2]}, anotherOne="x")
    if "data" in body:
        body["data"]["storeExtra"] = "kept"
    event = load_event(name, body)
    assert event.raw == body
    assert event.raw["futureField"] == {"nested": [1, 2]}


def test_several_errors_are_reported_together() -> None:
    body = purchase_payload(quantity=0, os="android", price="free")
    del body["data"]["orderId"]
    body["data"] = {"purchaseToken": "t"}
    assert sorted(errors_of("purchase", body)) == ["data.orderId", "price", "quantity"]


# -- inferring the event on the all-events URL -------------------------------------


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("purchase-ios", "purchase"),
        ("purchase-android", "purchase"),
        ("refund-ios", "refund"),
        ("refund-android-partial", "refund"),
        ("unavailable-users", "unavailable_users"),
    ],
)
def test_fixtures_are_inferred(fixture: str, expected: str) -> None:
    assert infer_event_name(load_fixture(fixture)) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"refundQuantity": 1}, "refund"),
        ({"refundedAt": "x", "purchasedAt": "y"}, "refund"),  # a refund repeats purchase fields
        ({"verifiedAt": "x"}, "purchase"),
        ({"tokenInvalidUserIds": []}, "unavailable_users"),
    ],
)
def test_one_marker_field_decides(body: dict[str, Any], expected: str) -> None:
    assert infer_event_name(body) == expected


@pytest.mark.parametrize("body", [{}, {"userId": "u", "quantity": 1}, {"event": "purchase"}])
def test_a_body_that_fits_no_event(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent, match="fits no event"):
        infer_event_name(body)


@pytest.mark.parametrize("in_app", ["refundQuantity", "purchasedAt"])
def test_a_body_that_fits_more_than_one_event(in_app: str) -> None:
    with pytest.raises(InvalidEvent, match="more than one event"):
        infer_event_name({in_app: 1, "tokenNotFoundUserIds": []})


# -- what the database could not store ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "field"),
    [
        *[("purchase", field) for field in ("userId", "nachoProductId", "productId")],
        ("refund", "userId"),
    ],
)
def test_nul_characters_are_refused_in_text(name: str, field: str) -> None:
    assert list(errors_of(name, BODIES[name](**{field: "user\x00id"}))) == [field]


@pytest.mark.parametrize(
    ("os", "field"), [(os, field) for os, fields in STORE_FIELDS.items() for field in fields]
)
def test_nul_characters_are_refused_in_store_data(os: str, field: str) -> None:
    assert list(errors_of("purchase", purchase_payload(os=os, data={field: "id\x00"}))) == [
        f"data.{field}"
    ]


@pytest.mark.parametrize("field", PUSH_FIELDS)
def test_nul_characters_are_refused_in_user_id_lists(field: str) -> None:
    assert list(
        errors_of("unavailable_users", unavailable_users_payload(**{field: ["a", "b\x00"]}))
    ) == [f"{field}.1"]


@pytest.mark.parametrize(("os", "field"), [("android", "orderId"), ("ios", "transactionId")])
def test_store_purchase_ids_are_at_most_256_characters(os: str, field: str) -> None:
    assert (
        load_event("purchase", purchase_payload(os=os, data={field: "9" * 256})).store_purchase_id
        == "9" * 256
    )
    assert list(errors_of("purchase", purchase_payload(os=os, data={field: "9" * 257}))) == [
        f"data.{field}"
    ]


# -- the 422 answers, pinned before the request path was optimised -----------------

_RANGE_ID = "Must be greater than or equal to 0 and less than or equal to 9223372036854775807."
_RANGE_COUNT = f"Must be greater than or equal to 1 and less than or equal to {MAX_COUNT}."
_TIMESTAMP = "Not an ISO 8601 timestamp with a zone, such as 2025-02-19T02:00:31.280Z."

#: (event, os, overrides, the 422 answer's ``errors``): pinned before the hot path
#: was optimised, so a faster schema cannot answer differently.
INVALID = [
    ("purchase", "ios", {"userId": None}, {"userId": ["Field may not be null."]}),
    (
        "purchase",
        "ios",
        {"userId": ""},
        {"userId": [f"Length must be between 1 and {MAX_ID_LENGTH}."]},
    ),
    ("purchase", "ios", {"userId": 5}, {"userId": ["Not a valid string."]}),
    ("purchase", "ios", {"iapLogId": "5"}, {"iapLogId": ["Not a valid integer."]}),
    ("purchase", "ios", {"iapLogId": True}, {"iapLogId": ["Not a valid integer."]}),
    ("purchase", "ios", {"iapLogId": 1.5}, {"iapLogId": ["Not a valid integer."]}),
    ("purchase", "ios", {"iapLogId": -1}, {"iapLogId": [_RANGE_ID]}),
    ("purchase", "ios", {"iapLogId": 2**63}, {"iapLogId": [_RANGE_ID]}),
    ("purchase", "ios", {"os": "web"}, {"os": ["Must be one of: android, ios."]}),
    (
        "purchase",
        "ios",
        {"productType": "subscription"},
        {"productType": ["Must be one of: consumable, non-consumable."]},
    ),
    ("purchase", "ios", {"quantity": 0}, {"quantity": [_RANGE_COUNT]}),
    ("purchase", "ios", {"quantity": MAX_COUNT + 1}, {"quantity": [_RANGE_COUNT]}),
    ("purchase", "ios", {"price": "9.99"}, {"price": ["Not a number."]}),
    ("purchase", "ios", {"price": -1}, {"price": ["Must be 0 or more."]}),
    ("purchase", "ios", {"price": True}, {"price": ["Not a number."]}),
    (
        "purchase",
        "ios",
        {"environment": "staging"},
        {"environment": ["Must be one of: sandbox, production."]},
    ),
    ("purchase", "ios", {"data": []}, {"data": ["Not a JSON object."]}),
    ("purchase", "ios", {"data": None}, {"data": ["Field may not be null."]}),
    ("purchase", "ios", {"os": "web", "data": {}}, {"os": ["Must be one of: android, ios."]}),
    (
        "purchase",
        "android",
        {"data": {"orderId": ""}},
        {"data.orderId": [f"Length must be between 1 and {MAX_ID_LENGTH}."]},
    ),
    (
        "purchase",
        "android",
        {"data": {"purchaseToken": None}},
        {"data.purchaseToken": ["Field may not be null."]},
    ),
    (
        "purchase",
        "ios",
        {"data": {"transactionId": 7}},
        {"data.transactionId": ["Not a valid string."]},
    ),
    ("purchase", "ios", {"purchasedAt": "2025-02-19T02:00:31"}, {"purchasedAt": [_TIMESTAMP]}),
    ("purchase", "ios", {"verifiedAt": "2025-13-19T02:00:31.280Z"}, {"verifiedAt": [_TIMESTAMP]}),
    ("purchase", "ios", {"requestedAt": 1739930431}, {"requestedAt": [_TIMESTAMP]}),
    (
        "purchase",
        "ios",
        {"userId": ..., "data": {"transactionId": ...}},
        {
            "userId": ["Missing data for required field."],
            "data.transactionId": ["Missing data for required field."],
        },
    ),
    ("refund", "ios", {"refundQuantity": 2}, {"refundQuantity": ["Must not exceed quantity."]}),
    (
        "refund",
        "android",
        {"refundQuantity": 0, "refundedAt": "yesterday"},
        {"refundQuantity": [_RANGE_COUNT], "refundedAt": [_TIMESTAMP]},
    ),
    (
        "unavailable_users",
        None,
        {"tokenNotFoundUserIds": ["a", 5], "tokenInvalidUserIds": "b"},
        {
            "tokenNotFoundUserIds.1": ["Not a valid string."],
            "tokenInvalidUserIds": ["Not a valid list."],
        },
    ),
]


def _body(event: str, os: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    if event == "purchase":
        body = purchase_payload(os=os or "ios")
    elif event == "refund":
        body = refund_payload(os=os or "ios")
    else:
        body = unavailable_users_payload()
    for key, value in overrides.items():
        target = body
        if key == "data" and isinstance(value, dict) and value:
            target, (key, value) = body["data"], next(iter(value.items()))
        if value is ...:
            del target[key]
        else:
            target[key] = value
    return body


@pytest.mark.parametrize(("event", "os", "overrides", "errors"), INVALID)
def test_invalid_bodies_answer_as_pinned(
    make_app: Any,
    event: str,
    os: str | None,
    overrides: dict[str, Any],
    errors: dict[str, list[str]],
) -> None:
    app, nachocode = make_app()
    called: list[Any] = []
    nachocode.handler(event)(called.append)
    answer = post_delivery(app.test_client(), event, _body(event, os, overrides))
    assert answer.status_code == 422
    assert answer.json["errors"] == errors
    assert called == []


# -- property-based: any timestamp, any one broken field ----------------------------


@pytest.mark.parametrize("refund", [False, True])
def test_timestamps_mean_the_same_instant(harness: Harness, refund: bool) -> None:
    @FUZZ
    @given(stamp=timestamps())
    def check(stamp: tuple[str, datetime]) -> None:
        count("fuzz: timestamps")
        field = "refundedAt" if refund else "purchasedAt"
        body = (
            refund_payload(**{field: stamp[0]}) if refund else purchase_payload(**{field: stamp[0]})
        )
        response, calls, _ = harness.post(
            ROUTES_BY_EVENT["refund" if refund else "purchase"].path, dumps(body), auth()
        )
        assert response.status_code == 200
        assert len(calls) == 1
        assert getattr(calls[0], "refunded_at" if refund else "purchased_at") == stamp[1]

    check()


@pytest.mark.every_database
@FUZZ
@given(case=broken_bodies())
def test_a_broken_field_is_refused_and_never_handled(
    harness: Harness, case: tuple[str, dict[str, Any]]
) -> None:
    event_name, body = case
    count("fuzz: broken fields")
    response, calls, rows = harness.post(ROUTES_BY_EVENT[event_name].path, dumps(body), auth())
    assert response.status_code == 422, response.get_json()
    assert calls == []
    assert rows == 1
    assert response.get_json()["errors"]

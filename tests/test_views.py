"""The webhook routes: every answer (see the README's answers table), what each
stores, that a refused delivery never reaches a handler, and refusals from
handlers. Then the same promise for any input (property-based): whatever
arrives, the answer is a JSON verdict, never a 500; and against a real gunicorn
server (marked ``integration``), bombs are refused early with memory bounded."""

from __future__ import annotations

import gzip
import io
import json
import logging
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from hypothesis import given
from hypothesis import strategies as st

from flask_nachocode import NachocodeWebhook, Refuse, delivery_received
from flask_nachocode.schemas import MAX_ID_LENGTH
from flask_nachocode.testing import (
    post_delivery,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)

from support.common import WEBHOOK_KEY, load_fixture, stored_deliveries
from support.effects_app import serve
from support.figures import count, count_max
from support.fuzz import (
    FUZZ,
    PREFIX,
    REFUSALS,
    ROUTES,
    Harness,
    auth,
    authorization_values,
    dumps,
    header_names,
    hosts,
    json_values,
    latin1_value,
)
from support.live import rss_kib, worker_pids

AppFactory = Callable[..., "tuple[Flask, NachocodeWebhook]"]
AUTH = {"Authorization": f"Bearer {WEBHOOK_KEY}"}
URLS = {
    "purchase": "/nachocode/webhooks/purchase",
    "refund": "/nachocode/webhooks/refund",
    "unavailable_users": "/nachocode/webhooks/unavailable-users",
    "any": "/nachocode/webhooks",
}
FIXTURES = [
    ("purchase-ios", "purchase"),
    ("purchase-android", "purchase"),
    ("refund-ios", "refund"),
    ("refund-android-partial", "refund"),
    ("unavailable-users", "unavailable_users"),
]


def check_answer(response: Any, status: int) -> dict[str, Any]:
    """Every answer is JSON with a boolean ``success`` that says whether it is 2xx."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    assert body["success"] is (200 <= status < 300)
    return body


def post_raw(
    app: Flask,
    url: str,
    data: bytes | str,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    headers = {**AUTH, "Content-Type": content_type, **(headers or {})}
    return app.test_client().post(url, data=data, headers=headers, **kwargs)


# -- handled ------------------------------------------------------------------------


@pytest.mark.every_database
@pytest.mark.parametrize("url", ["own", "any"])
@pytest.mark.parametrize(("fixture", "event"), FIXTURES)
def test_fixture_bodies_are_handled(
    make_app: AppFactory, fixture: str, event: str, url: str
) -> None:
    app, nachocode = make_app()
    calls: list[Any] = []
    nachocode.handler(event)(calls.append)
    response = post_delivery(
        app.test_client(), event if url == "own" else "any", load_fixture(fixture)
    )
    body = check_answer(response, 200)
    assert body == {
        "success": True,
        "event": event,
        "delivery": body["delivery"],
        "duplicate": False,
    }
    assert isinstance(body["delivery"], int)
    assert [event_.raw for event_ in calls] == [load_fixture(fixture)]
    [row] = stored_deliveries(app)
    assert (row.id, row.event, row.outcome, row.status) == (body["delivery"], event, "handled", 200)
    assert json.loads(row.body) == load_fixture(fixture)


# -- refused before any handler -------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"hello", "not valid JSON"),
        (b"{'userId': 'u'}", "not valid JSON"),
        (b'{"a": 1}{"b": 2}', "not valid JSON"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b'{"userId": "\xc3\x28"}', "not UTF-8"),
        (b"[]", "must be a JSON object"),
        (b'"purchase"', "must be a JSON object"),
        (b"1", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'{"price": NaN}', "NaN is not valid JSON"),
        (b'{"price": Infinity}', "Infinity is not valid JSON"),
        (b'{"price": -Infinity}', "-Infinity is not valid JSON"),
        (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
        # Pinned in full before the request path was optimised:
        (b'{"userId": NaN}', "the body is not valid JSON: NaN is not valid JSON"),
        (b'{"userId": Infinity}', "the body is not valid JSON: Infinity is not valid JSON"),
        (b'{"userId": ', "the body is not valid JSON: Expecting value: line 1 column 12 (char 11)"),
        (b"[1, 2]", "the body must be a JSON object"),
    ],
)
def test_400_for_a_body_that_is_not_a_json_object(
    app_and_calls: Any, data: bytes, message: str
) -> None:
    app, calls = app_and_calls
    body = check_answer(post_raw(app, URLS["purchase"], data), 400)
    assert body["error"] == "bad_body"
    if message.startswith("the body"):
        assert body["message"] == message
    else:
        assert message in body["message"]
    assert calls == []
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status, row.event, bytes(row.body)) == (
        "invalid",
        400,
        "purchase",
        data,
    )


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/json",
        "",
    ],
)
def test_415_for_a_body_that_is_not_declared_json(app_and_calls: Any, content_type: str) -> None:
    app, calls = app_and_calls
    data = json.dumps(purchase_payload())
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = app.test_client().post(URLS["purchase"], data=data, headers=headers)
    assert check_answer(response, 415)["error"] == "unsupported_media_type"
    assert calls == []
    assert [row.outcome for row in stored_deliveries(app)] == ["invalid"]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/vnd.nachocode+json",
    ],
)
def test_json_content_types_are_accepted(app_and_calls: Any, content_type: str) -> None:
    app, calls = app_and_calls
    check_answer(post_raw(app, URLS["purchase"], json.dumps(purchase_payload()), content_type), 200)
    assert len(calls) == 1


def test_413_by_content_length(make_app: AppFactory) -> None:
    app, nachocode = make_app(NACHOCODE_MAX_BODY_BYTES=500)
    calls: list[Any] = []
    nachocode.on_purchase(calls.append)
    data = json.dumps(purchase_payload())
    padded_to_limit = data[:-1] + " " * (500 - len(data)) + "}"
    assert len(padded_to_limit) == 500
    check_answer(post_raw(app, URLS["purchase"], padded_to_limit), 200)
    over = padded_to_limit[:-1] + " }"
    assert check_answer(post_raw(app, URLS["purchase"], over), 413)["error"] == "payload_too_large"
    assert len(calls) == 1
    assert [row.outcome for row in stored_deliveries(app)] == ["handled", "invalid"]
    assert stored_deliveries(app)[1].status == 413


class EndlessBody(io.RawIOBase):
    """A request body that never ends, counting what was read from it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        buffer[:] = b" " * len(buffer)
        self.read_bytes += len(buffer)
        return len(buffer)


def test_413_for_a_chunked_body_without_a_length_reads_only_past_the_limit(
    make_app: AppFactory,
) -> None:
    app, nachocode = make_app(NACHOCODE_MAX_BODY_BYTES=1000)
    calls: list[Any] = []
    nachocode.on_purchase(calls.append)
    stream = EndlessBody()
    response = app.test_client().post(
        URLS["purchase"],
        headers={**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        # What a WSGI server hands over for a chunked request: a stream that ends by itself.
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )
    check_answer(response, 413)
    assert 1000 < stream.read_bytes <= 1001 + 16384
    assert calls == []


def test_a_chunked_body_within_the_limit_is_handled(app_and_calls: Any) -> None:
    app, calls = app_and_calls
    data = json.dumps(load_fixture("purchase-ios")).encode()
    response = app.test_client().post(
        URLS["purchase"],
        headers={**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": io.BytesIO(data), "wsgi.input_terminated": True},
    )
    check_answer(response, 200)
    assert len(calls) == 1


@pytest.mark.parametrize("url", URLS.values())
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_405_json_for_other_methods(app_and_calls: Any, url: str, method: str) -> None:
    app, calls = app_and_calls
    response = app.test_client().open(url, method=method, headers=AUTH, json=purchase_payload())
    body = check_answer(response, 405)
    assert body["error"] == "method_not_allowed"
    assert method in body["message"]
    assert response.headers["Allow"] == "POST"
    assert calls == []
    assert stored_deliveries(app) == []


def test_405_for_head_has_no_body(app_and_calls: Any) -> None:
    app, _ = app_and_calls
    response = app.test_client().head(URLS["purchase"])
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


# -- 422 -------------------------------------------------------------------------------


def test_422_names_each_bad_field_with_dotted_paths(app_and_calls: Any) -> None:
    app, calls = app_and_calls
    body = purchase_payload(os="android", quantity=0, price=-1, environment="live")
    del body["data"]["orderId"]
    del body["userId"]
    answer = check_answer(post_delivery(app.test_client(), "purchase", body), 422)
    assert answer["error"] == "invalid_event"
    assert answer["event"] == "purchase"
    assert sorted(answer["errors"]) == [
        "data.orderId",
        "environment",
        "price",
        "quantity",
        "userId",
    ]
    assert all(isinstance(messages, list) and messages for messages in answer["errors"].values())
    assert calls == []
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status, row.id) == ("invalid", 422, answer["delivery"])


def test_422_for_a_body_on_the_wrong_events_url(app_and_calls: Any) -> None:
    app, calls = app_and_calls
    answer = check_answer(
        post_delivery(app.test_client(), "refund", load_fixture("purchase-ios")), 422
    )
    assert sorted(answer["errors"]) == ["refundQuantity", "refundedAt"]
    assert calls == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "fits no event"),
        ({"userId": "u", "iapLogId": 1}, "fits no event"),
        (
            {**load_fixture("purchase-ios"), **load_fixture("unavailable-users")},
            "fits more than one event",
        ),
        ({**load_fixture("refund-ios"), "tokenInvalidUserIds": []}, "fits more than one event"),
    ],
)
def test_422_when_the_all_events_url_cannot_tell_the_event(
    app_and_calls: Any, body: Any, reason: str
) -> None:
    app, calls = app_and_calls
    answer = check_answer(post_delivery(app.test_client(), "any", body), 422)
    assert reason in answer["message"]
    # Every 422 has `errors`; a reason about the whole body is under `_body`.
    assert answer["errors"] == {"_body": [answer["message"]]}
    assert answer["event"] is None
    assert calls == []
    assert [row.outcome for row in stored_deliveries(app)] == ["invalid"]


@pytest.mark.parametrize("marker", ["refundedAt", "refundQuantity", "tokenNotFoundUserIds"])
def test_a_null_marker_does_not_decide_the_event(app_and_calls: Any, marker: str) -> None:
    # /webhooks/purchase takes a purchase carrying "refundedAt": null; so must the all-events URL.
    app, calls = app_and_calls
    for route in ("purchase", "any"):
        body = {**purchase_payload(), marker: None}
        answer = check_answer(post_delivery(app.test_client(), route, body), 200)
        assert (answer["event"], answer["duplicate"]) == ("purchase", False)
    assert [call.name for call in calls] == ["purchase", "purchase"]
    nulls = {"refundedAt": None, "requestedAt": None}
    only_nulls = check_answer(post_delivery(app.test_client(), "any", nulls), 422)
    assert "fits no event" in only_nulls["errors"]["_body"][0]


#: 950 Hangul syllables: 2,850 bytes of UTF-8, past PostgreSQL's B-tree entry limit
#: (2,704 bytes), which made a purchase with it as userId a 503 for ever there.
HANGUL = "".join(chr(0xAC00 + (index * 7919) % 11172) for index in range(950))


@pytest.mark.every_database
def test_ids_are_bounded_so_that_every_database_can_index_them(make_app: AppFactory) -> None:
    app, nachocode = make_app()
    calls: list[Any] = []
    nachocode.on_purchase(calls.append)
    nachocode.on_unavailable_users(calls.append)
    client = app.test_client()

    too_long = check_answer(post_delivery(client, "purchase", purchase_payload(userId=HANGUL)), 422)
    assert too_long["errors"] == {"userId": [f"Length must be between 1 and {MAX_ID_LENGTH}."]}
    for field in ("nachoProductId", "productId"):
        body = purchase_payload(**{field: "p" * (MAX_ID_LENGTH + 1)})
        assert list(check_answer(post_delivery(client, "purchase", body), 422)["errors"]) == [field]
    push = unavailable_users_payload(tokenInvalidUserIds=["u" * (MAX_ID_LENGTH + 1)])
    assert list(check_answer(post_delivery(client, "unavailable_users", push), 422)["errors"]) == [
        "tokenInvalidUserIds.0"
    ]
    # An invalid body with such a userId is recorded too (its userId in the body only).
    invalid = check_answer(post_delivery(client, "any", {"userId": HANGUL, "fits": "no"}), 422)
    assert invalid["errors"]["_body"]
    # The longest ids accepted, in 3-byte characters, fit the indexes.
    longest = HANGUL[:MAX_ID_LENGTH]
    body = purchase_payload(userId=longest, nachoProductId=longest, productId=longest)
    check_answer(post_delivery(client, "purchase", body), 200)
    assert [call.user_id for call in calls] == [longest]

    rows = stored_deliveries(app)
    outcomes = [(row.outcome, row.status) for row in rows]
    assert outcomes == [("invalid", 422)] * 5 + [("handled", 200)]
    assert json.loads(rows[0].body)["userId"] == json.loads(rows[4].body)["userId"] == HANGUL
    assert (rows[0].user_id, rows[4].user_id, rows[5].user_id) == (None, None, longest)
    with app.app_context():
        found = nachocode.ledger.purchases_of(longest, environment=None)
        assert [purchase.user_id for purchase in found] == [longest]
        # Longer than any id: nothing to find, and nothing asked of the database.
        assert nachocode.ledger.purchases_of(HANGUL, environment=None) == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate, gzip", "br"])
def test_415_for_a_compressed_body(app_and_calls: Any, encoding: str) -> None:
    # RFC 9110 15.5.16: an unsupported content coding is a 415 naming what is accepted.
    app, calls = app_and_calls
    body = gzip.compress(json.dumps(purchase_payload()).encode())
    response = post_raw(app, URLS["purchase"], body, headers={"Content-Encoding": encoding})
    answer = check_answer(response, 415)
    assert answer["error"] == "unsupported_media_type"
    assert "Content-Encoding" in answer["message"]
    assert response.headers["Accept-Encoding"] == "identity"
    assert calls == []
    assert [(row.outcome, row.status) for row in stored_deliveries(app)] == [("invalid", 415)]
    plain = json.dumps(purchase_payload())
    identity = post_raw(app, URLS["purchase"], plain, headers={"Content-Encoding": "identity"})
    check_answer(identity, 200)


#: Bodies no database column can hold, and inputs that once got a 500 or a 503 (or
#: were handled) instead of a 422, found by fuzzing, by schemathesis and on
#: PostgreSQL: (route, body, the user id stored for the refused delivery).
UNSTORABLE: dict[str, tuple[str, Callable[[], Any], str | None]] = {
    "NUL in userId": ("purchase", lambda: purchase_payload(user_id="nul\x00user"), "nul\\x00user"),
    "NUL in purchaseToken": (
        "purchase",
        lambda: purchase_payload(os="android", data={"purchaseToken": "t\x00"}),
        None,
    ),
    "NUL in a body that fits no event": (
        "any",
        lambda: {"userId": "nul\x00user", "fits": "no event"},
        None,
    ),
    "NUL in a push user id": (
        "unavailable_users",
        lambda: {"tokenNotFoundUserIds": ["user\x00"], "tokenInvalidUserIds": []},
        None,
    ),
    "lone surrogate in userId": ("purchase", lambda: purchase_payload(userId="\ud800"), None),
    "lone surrogate in an invalid body": (
        "purchase",
        lambda: {"userId": "\udfff", "requestedAt": 1},
        None,
    ),
    "300-character orderId": (
        "purchase",
        lambda: purchase_payload(os="android", data={"orderId": "o" * 300}),
        None,
    ),
    "300-character orderId of a refund": (
        "refund",
        lambda: refund_payload(purchase_payload(os="android", data={"orderId": "9" * 300})),
        None,
    ),
    "70-digit price": ("purchase", lambda: purchase_payload(price=10**70), None),
    "950 Hangul syllables in userId": ("purchase", lambda: purchase_payload(userId=HANGUL), None),
    "950 Hangul syllables in a body that fits no event": (
        "any",
        lambda: {"userId": HANGUL, "fits": "no event"},
        None,
    ),
    "year 1 with a positive offset": (
        "purchase",
        lambda: purchase_payload(purchasedAt="0001-01-01T00:00:00+01:00"),
        None,
    ),
    "year 9999 with a negative offset": (
        "purchase",
        lambda: purchase_payload(verifiedAt="9999-12-31T23:59:59-01:00"),
        None,
    ),
}


@pytest.mark.every_store
@pytest.mark.parametrize("name", list(UNSTORABLE))
def test_values_the_database_cannot_hold_are_422_and_kept(app_and_calls: Any, name: str) -> None:
    app, calls = app_and_calls
    route, make_body, user_id = UNSTORABLE[name]
    body = make_body()
    check_answer(post_delivery(app.test_client(), route, body), 422)
    assert calls == []
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status, json.loads(row.body)) == ("invalid", 422, body)
    if user_id is not None:
        assert row.user_id == user_id  # kept, escaped, for the CLI and the inspector to show


# -- 501 and 500 ------------------------------------------------------------------------


@pytest.mark.every_database
@pytest.mark.parametrize(("fixture", "event"), FIXTURES)
def test_501_when_no_handler_is_registered(make_app: AppFactory, fixture: str, event: str) -> None:
    app, nachocode = make_app()
    calls: list[Any] = []
    for other in {"purchase", "refund", "unavailable_users"} - {event}:
        nachocode.handler(other)(calls.append)
    answer = check_answer(post_delivery(app.test_client(), "any", load_fixture(fixture)), 501)
    assert (answer["error"], answer["event"]) == ("no_handler", event)
    assert calls == []
    assert [(row.outcome, row.status) for row in stored_deliveries(app)] == [("unhandled", 501)]


@pytest.mark.every_database
def test_500_hides_the_exception_and_logs_its_traceback(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, nachocode = make_app()

    @nachocode.on_purchase
    def crash(event: Any) -> None:
        raise KeyError("internal-detail-7f3e in /srv/shop/secret.py")

    with caplog.at_level(logging.ERROR, logger="flask_nachocode"):
        response = post_delivery(app.test_client(), "purchase", purchase_payload())
    answer = check_answer(response, 500)
    assert answer["error"] == "handler_failed"
    text = response.get_data(as_text=True)
    for internal in ("internal-detail-7f3e", "KeyError", "Traceback", "secret.py", "crash"):
        assert internal not in text
    [logged] = [record for record in caplog.records if record.exc_info]
    assert logged.exc_info[0] is KeyError
    assert "internal-detail-7f3e" in caplog.text
    assert "Traceback" in caplog.text
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status) == ("failed", 500)
    assert "internal-detail-7f3e" in row.traceback
    assert "def crash" not in (row.error or "")
    shown = app.test_cli_runner().invoke(args=["nachocode", "show", str(row.id)])
    assert "KeyError" in shown.output


def test_an_unexpected_error_outside_the_handlers_is_still_a_json_500(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, nachocode = make_app(TESTING=False)  # testing mode would re-raise it into the test
    calls: list[Any] = []
    nachocode.on_purchase(calls.append)

    def broken_metrics(sender: Flask, **extra: Any) -> None:
        raise ZeroDivisionError("internal-detail-9b1c")

    with delivery_received.connected_to(broken_metrics, app), caplog.at_level(logging.ERROR):
        response = post_delivery(app.test_client(), "purchase", purchase_payload())
    answer = check_answer(response, 500)
    assert answer["error"] == "internal_error"
    assert "internal-detail-9b1c" not in response.get_data(as_text=True)
    assert "internal-detail-9b1c" in caplog.text  # Flask logged it with its traceback
    assert calls == []


# -- handlers that write, refuse or crash (with the app's own db) -----------------------


@pytest.fixture
def shop(
    database_url: str, tmp_path: Any
) -> Iterator[tuple[Flask, NachocodeWebhook, SQLAlchemy, sa.Table]]:
    """An app sharing its Flask-SQLAlchemy ``db`` with the extension, and a table
    its handlers write to."""
    db = SQLAlchemy()
    grants = sa.Table(
        "grants", db.metadata, sa.Column("user_id", sa.String(64)), sa.Column("coins", sa.Integer)
    )
    app = Flask("shop_under_test", instance_path=str(tmp_path / "instance"))
    app.config.update(
        TESTING=True, SQLALCHEMY_DATABASE_URI=database_url, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY
    )
    db.init_app(app)
    nachocode = NachocodeWebhook(app, db=db)
    with app.app_context():
        db.create_all()
    yield app, nachocode, db, grants
    with app.app_context():
        db.engine.dispose()


def grant_rows(app: Flask, db: SQLAlchemy, grants: sa.Table) -> list[tuple[str, int]]:
    with app.app_context():
        return [tuple(row) for row in db.session.execute(sa.select(grants))]


@pytest.mark.every_database
@pytest.mark.parametrize(
    ("refusal", "status", "code"),
    [
        (Refuse("no such user"), 422, "refused"),
        (Refuse("no such user", status=404, code="unknown_user"), 404, "unknown_user"),
        (Refuse("try again later", status=503, code="busy"), 503, "busy"),
    ],
)
def test_a_refusal_answers_its_status_and_message_and_rolls_back(
    shop: Any, refusal: Refuse, status: int, code: str
) -> None:
    app, nachocode, db, grants = shop
    ran: list[str] = []
    refusals = [refusal]

    @nachocode.on_purchase
    def grant(event: Any) -> None:
        db.session.execute(sa.insert(grants).values(user_id=event.user_id, coins=100))
        ran.append("grant")

    @nachocode.on_purchase
    def check_user(event: Any) -> None:
        ran.append("check")
        if refusals:
            raise refusals[0]

    @nachocode.on_purchase
    def never(event: Any) -> None:
        ran.append("never")

    body = purchase_payload()
    answer = check_answer(post_delivery(app.test_client(), "purchase", body), status)
    assert (answer["error"], answer["message"], answer["event"]) == (
        code,
        refusal.message,
        "purchase",
    )
    assert ran == ["grant", "check"]
    assert grant_rows(app, db, grants) == []  # the first handler's write was rolled back
    with app.app_context():
        assert nachocode.ledger.get(body["iapLogId"], environment=None) is None
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status, row.error, row.id) == (
        "refused",
        status,
        refusal.message,
        answer["delivery"],
    )
    # Refused is not done: the same delivery re-sent once the cause is gone is handled.
    refusals.clear()
    check_answer(post_delivery(app.test_client(), "purchase", body), 200)
    assert grant_rows(app, db, grants) == [(body["userId"], 100)]


@pytest.mark.parametrize("status", [200, 204, 302, 399, 600, 0])
def test_a_refusal_needs_an_error_status(status: int) -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Refuse("no", status=status)


# -- any input: any JSON, any bytes, any content type, any headers (property-based) --


@FUZZ
@given(route=st.sampled_from(ROUTES), value=json_values)
def test_any_json_value_gets_a_verdict(harness: Harness, route: str, value: Any) -> None:
    count("fuzz: any JSON value")
    response, calls, _ = harness.post(route, dumps(value), auth())
    if response.status_code == 200:
        # Random JSON is rarely a valid event; when it is, it is handled once (or was before).
        assert len(calls) == (0 if response.get_json()["duplicate"] else 1)
    else:
        assert response.status_code in REFUSALS
        assert calls == []


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    body=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=60).map(lambda tail: b'{"userId": "' + tail),
        st.builds(
            lambda a, b: a + b,
            st.sampled_from([b"{", b"[", b'"', b"\xef\xbb\xbf{", b"{}"]),
            st.binary(max_size=40),
        ),
    ),
)
def test_any_byte_string_gets_a_verdict(harness: Harness, route: str, body: bytes) -> None:
    count("fuzz: any byte string")
    response, calls, _ = harness.post(route, body, auth())
    assert response.status_code in REFUSALS
    assert calls == []


@FUZZ
@given(
    content_type=st.one_of(
        latin1_value,
        st.sampled_from(
            [
                "application/json",
                "APPLICATION/JSON; charset=utf-8",
                "application/vnd.api+json",
                "application/json; charset=utf-16",
                "text/json",
                "text/plain",
                "multipart/form-data",
                "application/x-www-form-urlencoded",
                "application/jsonp",
                "application/json;",
                ";",
            ]
        ),
    )
)
def test_any_content_type_gets_a_verdict(harness: Harness, content_type: str) -> None:
    count("fuzz: any content type")
    headers = {**auth(), "Content-Type": content_type}
    response, calls, _ = harness.post("/webhooks/purchase", dumps(purchase_payload()), headers)
    if response.status_code == 200:
        assert "json" in content_type.lower()
        assert len(calls) == 1
    else:
        assert response.status_code == 415
        assert calls == []


@FUZZ
@given(
    headers=st.dictionaries(header_names, latin1_value, max_size=6),
    host=st.none() | hosts,
    authorization=st.none() | authorization_values,
    body=st.sampled_from(["valid", "invalid", "empty"]),
)
def test_any_header_combination_gets_a_verdict(
    harness: Harness,
    headers: dict[str, str],
    host: str | None,
    authorization: str | None,
    body: str,
) -> None:
    count("fuzz: any header combination")
    sent = {"Content-Type": "application/json", **headers, **({"Host": host} if host else {})}
    sent.pop("Authorization", None)
    if authorization is not None:
        sent["Authorization"] = authorization
    payload = {"valid": dumps(purchase_payload()), "invalid": b'{"userId": 5}', "empty": b""}[body]
    response, calls, rows = harness.post("/webhooks/purchase", payload, sent)
    scheme, _, token = (authorization or "").partition(" ")
    accepted = scheme.lower() == "bearer" and token.strip(" \t") == WEBHOOK_KEY
    if response.status_code == 401:
        # Refused before anything is read or stored: no trace, no handler.
        assert not accepted
        assert calls == []
        assert rows == 0
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    else:
        assert accepted
        assert (response.status_code == 200) == (len(calls) == 1)


# -- bombs against a real gunicorn server (integration) ----------------------------------


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    folder = tmp_path_factory.mktemp("bombs")
    with serve(f"sqlite:///{folder / 'bombs.db'}", 1, folder, key=WEBHOOK_KEY) as (_, port, log):
        yield "127.0.0.1", port, log


def raw_request(
    host: str, port: int, head: str, body_chunks: Iterator[bytes], *, pause_after: int
) -> tuple[int, dict[str, Any], int]:
    """Send ``head`` then body chunks; return (status, JSON answer, body bytes sent).

    Once ``pause_after`` body bytes are out, wait (up to 10 s, once) for the
    answer before sending more: the kernel buffers megabytes on loopback, so
    counting what was sent only says what the server needed if we stop sending
    when it should have answered. An early refusal answers with the rest unsent.
    """
    sock = socket.create_connection((host, port), timeout=30)
    sent = 0
    paused = False
    try:
        sock.sendall(head.encode("latin-1"))
        for chunk in body_chunks:
            if sent >= pause_after and not paused:
                paused = True
                select.select([sock], [], [], 10)
            if select.select([sock], [], [], 0)[0]:
                break  # the answer (or the close) came before the body was finished
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        data = b""
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
            head_part, _, rest = data.partition(b"\r\n\r\n")
            lengths = [
                int(line.split(b":")[1])
                for line in head_part.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if lengths and len(rest) >= lengths[0]:
                break
    finally:
        sock.close()
    head_part, _, rest = data.partition(b"\r\n\r\n")
    return int(head_part.split(b" ")[1]), json.loads(rest), sent


TEN_MB = 10 * 1024 * 1024
LIMIT = 65536  # NACHOCODE_MAX_BODY_BYTES' default


def ten_mb_of(piece: bytes, chunked: bool) -> Iterator[bytes]:
    block = (piece * (65536 // len(piece) + 1))[:65536]
    for _ in range(TEN_MB // len(block)):
        yield f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
    if chunked:
        yield b"0\r\n\r\n"


def head(port: int, extra: str) -> str:
    return (
        f"POST {PREFIX}/webhooks/purchase HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {WEBHOOK_KEY}\r\nContent-Type: application/json\r\n{extra}\r\n"
    )


BOMBS = {
    # name: (headers after the standard ones, body chunks, expected status)
    "10 MB with Content-Length": (
        f"Content-Length: {TEN_MB}\r\n",
        lambda: ten_mb_of(b" ", False),
        413,
    ),
    "10 MB chunked, no length": (
        "Transfer-Encoding: chunked\r\n",
        lambda: ten_mb_of(b'{"a": 1, ', True),
        413,
    ),
    "10 MB of [ chunked": ("Transfer-Encoding: chunked\r\n", lambda: ten_mb_of(b"[", True), 413),
    "deep arrays within the limit": (
        "Content-Length: 60000\r\n",
        lambda: iter([b"[" * 30000 + b"]" * 30000]),
        400,
    ),
    "deep objects within the limit": (
        "Content-Length: 60000\r\n",
        lambda: iter([b'{"a":' * 9999 + b"1" + b"}" * 9999 + b" " * 5]),
        400,
    ),
    "deep array inside a field": (
        "Transfer-Encoding: chunked\r\n",
        lambda: iter(
            [
                f"{60000:x}\r\n".encode()
                + (b'{"data":' + b"[" * 29992 + b"]" * 29992 + b"}" + b" " * 7)
                + b"\r\n",
                b"0\r\n\r\n",
            ]
        ),
        400,
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_early_with_memory_bounded(
    gunicorn_server: tuple[str, int, Path], name: str
) -> None:
    host, port, log = gunicorn_server
    extra, chunks, expected = BOMBS[name]
    (worker,) = worker_pids(port)
    before = rss_kib(worker)
    # Content-Length over the limit: refused on the headers, before any body byte.
    pause_after = 0 if "Content-Length: 1" in extra else 2 * LIMIT
    status, answer, sent = raw_request(
        host, port, head(port, extra), chunks(), pause_after=pause_after
    )
    count("fuzz: bombs sent")
    assert status == expected, answer
    assert answer["success"] is False
    after = rss_kib(worker)
    count_max("fuzz: bombs, largest worker RSS growth (KiB)", after - before)
    # The limit is 64 KiB: the server never holds the 10 MB, so it grows by far less.
    assert after - before < 4096, (before, after)
    if expected == 413 and pause_after == 0:
        assert sent == 0, sent  # refused on the Content-Length header alone
    elif expected == 413:
        # Chunked framing adds a few bytes per 64 KiB block.
        assert sent <= pause_after + 1024, sent
    assert b"Traceback" not in log.read_bytes()
    assert WEBHOOK_KEY.encode() not in log.read_bytes()

"""Every answer of the webhook routes (see the README's answers table), what each
stores, that a refused delivery never reaches a handler, refusals from handlers,
signals and the slow-delivery warning."""

from __future__ import annotations

import gzip
import io
import json
import logging
import time
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
from conftest import WEBHOOK_KEY, load_fixture, stored_deliveries
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

import flask_nachocode.delivery
from flask_nachocode import (
    NachocodeWebhook,
    Refuse,
    delivery_failed,
    delivery_handled,
    delivery_received,
)
from flask_nachocode.schemas import MAX_COUNT, MAX_ID_LENGTH
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload, unavailable_users_payload

AppFactory = Callable[..., "tuple[Flask, NachocodeWebhook]"]
AUTH = {"Authorization": f"Bearer {WEBHOOK_KEY}"}
URLS = {
    "purchase": "/nachocode/webhooks/purchase",
    "refund": "/nachocode/webhooks/refund",
    "unavailable_users": "/nachocode/webhooks/unavailable-users",
    "any": "/nachocode/webhooks",
}
FIXTURES = [
    ("purchase-ios", "purchase"), ("purchase-android", "purchase"), ("refund-ios", "refund"),
    ("refund-android-partial", "refund"), ("unavailable-users", "unavailable_users"),
]


def check_answer(response: Any, status: int) -> dict[str, Any]:
    """Every answer is JSON with a boolean ``success`` that says whether it is 2xx."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    assert body["success"] is (200 <= status < 300)
    return body


@pytest.fixture
def app_and_calls(make_app: AppFactory) -> tuple[Flask, list[Any]]:
    """An app on the SQLite store with a recording handler for every event."""
    app, nachocode = make_app()
    calls: list[Any] = []
    for name in ("purchase", "refund", "unavailable_users"):
        nachocode.handler(name)(calls.append)
    return app, calls


def post_raw(app: Flask, url: str, data: bytes | str, content_type: str = "application/json", headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
    return app.test_client().post(url, data=data, headers={**AUTH, "Content-Type": content_type, **(headers or {})}, **kwargs)


# -- handled ------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["own", "any"])
@pytest.mark.parametrize(("fixture", "event"), FIXTURES)
def test_fixture_bodies_are_handled(make_app: AppFactory, database_url: str, fixture: str, event: str, url: str) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    calls: list[Any] = []
    nachocode.handler(event)(calls.append)
    response = post_delivery(app.test_client(), event if url == "own" else "any", load_fixture(fixture))
    body = check_answer(response, 200)
    assert body == {"success": True, "event": event, "delivery": body["delivery"], "duplicate": False}
    assert isinstance(body["delivery"], int)
    assert [event_.raw for event_ in calls] == [load_fixture(fixture)]
    [row] = stored_deliveries(app)
    assert (row.id, row.event, row.outcome, row.status) == (body["delivery"], event, "handled", 200)
    assert json.loads(row.body) == load_fixture(fixture)


def test_a_resent_purchase_is_answered_200_as_duplicate(make_app: AppFactory, database_url: str) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    calls: list[Any] = []
    nachocode.on_purchase(calls.append)
    body = purchase_payload()
    first = check_answer(post_delivery(app.test_client(), "purchase", body), 200)
    again = check_answer(post_delivery(app.test_client(), "any", body), 200)
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert len(calls) == 1
    assert [row.outcome for row in stored_deliveries(app)] == ["handled", "duplicate"]


# -- refused before any handler -------------------------------------------------------

@pytest.mark.parametrize(("data", "message"), [
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
])
def test_400_for_a_body_that_is_not_a_json_object(app_and_calls: Any, data: bytes, message: str) -> None:
    app, calls = app_and_calls
    body = check_answer(post_raw(app, URLS["purchase"], data), 400)
    assert body["error"] == "bad_body"
    assert message in body["message"]
    assert calls == []
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status, row.event, bytes(row.body)) == ("invalid", 400, "purchase", data)


@pytest.mark.parametrize("encoding", ["gzip", "deflate, gzip", "br"])
def test_415_for_a_compressed_body(app_and_calls: Any, encoding: str) -> None:
    # RFC 9110 15.5.16: an unsupported content coding is a 415 naming what is accepted.
    app, calls = app_and_calls
    response = post_raw(app, URLS["purchase"], gzip.compress(json.dumps(purchase_payload()).encode()), headers={"Content-Encoding": encoding})
    answer = check_answer(response, 415)
    assert answer["error"] == "unsupported_media_type" and "Content-Encoding" in answer["message"]
    assert response.headers["Accept-Encoding"] == "identity"
    assert calls == []
    assert [(row.outcome, row.status) for row in stored_deliveries(app)] == [("invalid", 415)]
    identity = post_raw(app, URLS["purchase"], json.dumps(purchase_payload()), headers={"Content-Encoding": "identity"})
    check_answer(identity, 200)


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json", "",
])
def test_415_for_a_body_that_is_not_declared_json(app_and_calls: Any, content_type: str) -> None:
    app, calls = app_and_calls
    data = json.dumps(purchase_payload())
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = app.test_client().post(URLS["purchase"], data=data, headers=headers)
    assert check_answer(response, 415)["error"] == "unsupported_media_type"
    assert calls == []
    assert [row.outcome for row in stored_deliveries(app)] == ["invalid"]


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.nachocode+json",
])
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


def test_413_for_a_chunked_body_without_a_length_reads_only_past_the_limit(make_app: AppFactory) -> None:
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
    assert body["error"] == "method_not_allowed" and method in body["message"]
    assert response.headers["Allow"] == "POST"
    assert calls == []
    assert stored_deliveries(app) == []


def test_405_for_head_has_no_body(app_and_calls: Any) -> None:
    app, _ = app_and_calls
    response = app.test_client().head(URLS["purchase"])
    assert response.status_code == 405 and response.headers["Allow"] == "POST"


# -- 422 -------------------------------------------------------------------------------

def test_422_names_each_bad_field_with_dotted_paths(app_and_calls: Any) -> None:
    app, calls = app_and_calls
    body = purchase_payload(os="android", quantity=0, price=-1, environment="live")
    del body["data"]["orderId"]
    del body["userId"]
    answer = check_answer(post_delivery(app.test_client(), "purchase", body), 422)
    assert answer["error"] == "invalid_event"
    assert answer["event"] == "purchase"
    assert sorted(answer["errors"]) == ["data.orderId", "environment", "price", "quantity", "userId"]
    assert all(isinstance(messages, list) and messages for messages in answer["errors"].values())
    assert calls == []
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status, row.id) == ("invalid", 422, answer["delivery"])


def test_422_for_a_body_on_the_wrong_events_url(app_and_calls: Any) -> None:
    app, calls = app_and_calls
    answer = check_answer(post_delivery(app.test_client(), "refund", load_fixture("purchase-ios")), 422)
    assert sorted(answer["errors"]) == ["refundQuantity", "refundedAt"]
    assert calls == []


@pytest.mark.parametrize(("body", "reason"), [
    ({}, "fits no event"),
    ({"userId": "u", "iapLogId": 1}, "fits no event"),
    ({**load_fixture("purchase-ios"), **load_fixture("unavailable-users")}, "fits more than one event"),
    ({**load_fixture("refund-ios"), "tokenInvalidUserIds": []}, "fits more than one event"),
])
def test_422_when_the_all_events_url_cannot_tell_the_event(app_and_calls: Any, body: Any, reason: str) -> None:
    app, calls = app_and_calls
    answer = check_answer(post_delivery(app.test_client(), "any", body), 422)
    assert reason in answer["message"]
    # Every 422 has `errors`; a reason about the whole body is under `_body`.
    assert answer["errors"] == {"_body": [answer["message"]]}
    assert answer["event"] is None
    assert calls == []
    assert [row.outcome for row in stored_deliveries(app)] == ["invalid"]


@pytest.mark.parametrize("body", [
    purchase_payload(user_id="nul\x00user"),
    refund_payload(purchase_payload(os="android", data={"orderId": "9" * 300})),
    {"userId": "nul\x00user", "fits": "no event"},
    purchase_payload(price=10**70),
], ids=["nul-in-user-id", "store-id-too-long", "nul-in-unknown-body", "price-too-large"])
def test_values_the_database_cannot_hold_are_422_and_kept(make_app: AppFactory, database_url: str, body: Any) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    calls: list[Any] = []
    nachocode.on_purchase(calls.append)
    nachocode.on_refund(calls.append)
    check_answer(post_delivery(app.test_client(), "any", body), 422)
    assert calls == []
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status, json.loads(row.body)) == ("invalid", 422, body)


def test_refunds_of_the_largest_quantity_cannot_overflow_the_ledger(make_app: AppFactory, database_url: str) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    nachocode.on_purchase(lambda event: None)
    nachocode.on_refund(lambda event: None)
    purchase = purchase_payload(quantity=MAX_COUNT)
    check_answer(post_delivery(app.test_client(), "purchase", purchase), 200)
    refund_all = refund_payload(purchase, refund_quantity=MAX_COUNT, refunded_at="2030-01-01T00:00:00Z")
    check_answer(post_delivery(app.test_client(), "refund", refund_all), 200)
    one_more = refund_payload(purchase, refund_quantity=MAX_COUNT, refunded_at="2030-01-02T00:00:00Z")
    refused = check_answer(post_delivery(app.test_client(), "refund", one_more), 422)
    assert refused["error"] == "refund_exceeds_quantity"
    assert refused["errors"] == {"_body": [refused["message"]]}
    too_many = check_answer(post_delivery(app.test_client(), "purchase", purchase_payload(quantity=MAX_COUNT + 1)), 422)
    assert list(too_many["errors"]) == ["quantity"]


@pytest.mark.parametrize("marker", ["refundedAt", "refundQuantity", "tokenNotFoundUserIds"])
def test_a_null_marker_does_not_decide_the_event(app_and_calls: Any, marker: str) -> None:
    # /webhooks/purchase takes a purchase carrying "refundedAt": null; so must the all-events URL.
    app, calls = app_and_calls
    for route in ("purchase", "any"):
        answer = check_answer(post_delivery(app.test_client(), route, {**purchase_payload(), marker: None}), 200)
        assert (answer["event"], answer["duplicate"]) == ("purchase", False)
    assert [call.name for call in calls] == ["purchase", "purchase"]
    only_nulls = check_answer(post_delivery(app.test_client(), "any", {"refundedAt": None, "requestedAt": None}), 422)
    assert "fits no event" in only_nulls["errors"]["_body"][0]


HANGUL = "".join(chr(0xAC00 + (index * 7919) % 11172) for index in range(950))


def test_ids_are_bounded_so_that_every_database_can_index_them(make_app: AppFactory, database_url: str) -> None:
    # 950 Hangul syllables are 2,850 bytes: past PostgreSQL's B-tree entry limit, which
    # made this purchase a 503 forever. Ids are bounded at 256 characters on every database.
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    calls: list[Any] = []
    nachocode.on_purchase(calls.append)
    nachocode.on_unavailable_users(calls.append)
    client = app.test_client()

    too_long = check_answer(post_delivery(client, "purchase", purchase_payload(userId=HANGUL)), 422)
    assert too_long["errors"] == {"userId": [f"Length must be between 1 and {MAX_ID_LENGTH}."]}
    for field in ("nachoProductId", "productId"):
        assert list(check_answer(post_delivery(client, "purchase", purchase_payload(**{field: "p" * 257})), 422)["errors"]) == [field]
    push = check_answer(post_delivery(client, "unavailable_users", unavailable_users_payload(tokenInvalidUserIds=["u" * 257])), 422)
    assert list(push["errors"]) == ["tokenInvalidUserIds.0"]
    # An invalid body with such a userId is recorded too (its userId is in the body only).
    invalid = check_answer(post_delivery(client, "any", {"userId": HANGUL, "fits": "no event"}), 422)
    assert invalid["errors"]["_body"]
    # The longest id accepted, in the widest characters, fits the indexes.
    longest = purchase_payload(userId=HANGUL[:MAX_ID_LENGTH], nachoProductId=HANGUL[:MAX_ID_LENGTH])
    check_answer(post_delivery(client, "purchase", longest), 200)
    assert [call.user_id for call in calls] == [HANGUL[:MAX_ID_LENGTH]]

    rows = stored_deliveries(app)
    assert [(row.outcome, row.status) for row in rows] == [("invalid", 422)] * 5 + [("handled", 200)]
    assert json.loads(rows[0].body)["userId"] == json.loads(rows[4].body)["userId"] == HANGUL
    assert rows[0].user_id is None and rows[4].user_id is None
    assert rows[5].user_id == HANGUL[:MAX_ID_LENGTH]
    with app.app_context():
        assert [p.user_id for p in nachocode.ledger.purchases_of(HANGUL[:MAX_ID_LENGTH], environment=None)] == [HANGUL[:MAX_ID_LENGTH]]
        # Longer than any id: nothing to find, and nothing asked of the database.
        assert nachocode.ledger.purchases_of(HANGUL, environment=None) == []


# -- 501 and 500 ------------------------------------------------------------------------

@pytest.mark.parametrize(("fixture", "event"), FIXTURES)
def test_501_when_no_handler_is_registered(make_app: AppFactory, database_url: str, fixture: str, event: str) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)
    calls: list[Any] = []
    for other in {"purchase", "refund", "unavailable_users"} - {event}:
        nachocode.handler(other)(calls.append)
    answer = check_answer(post_delivery(app.test_client(), "any", load_fixture(fixture)), 501)
    assert (answer["error"], answer["event"]) == ("no_handler", event)
    assert calls == []
    assert [(row.outcome, row.status) for row in stored_deliveries(app)] == [("unhandled", 501)]


def test_500_hides_the_exception_and_logs_its_traceback(
    make_app: AppFactory, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url)

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
    assert "internal-detail-7f3e" in caplog.text and "Traceback" in caplog.text
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status) == ("failed", 500)
    assert "internal-detail-7f3e" in row.traceback and "def crash" not in (row.error or "")
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
def shop(database_url: str, tmp_path: Any) -> Iterator[tuple[Flask, NachocodeWebhook, SQLAlchemy, sa.Table]]:
    """An app sharing its Flask-SQLAlchemy ``db`` with the extension, and a table
    its handlers write to."""
    db = SQLAlchemy()
    grants = sa.Table("grants", db.metadata, sa.Column("user_id", sa.String(64)), sa.Column("coins", sa.Integer))
    app = Flask("shop_under_test", instance_path=str(tmp_path / "instance"))
    app.config.update(TESTING=True, SQLALCHEMY_DATABASE_URI=database_url, NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY)
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


@pytest.mark.parametrize(("refusal", "status", "code"), [
    (Refuse("no such user"), 422, "refused"),
    (Refuse("no such user", status=404, code="unknown_user"), 404, "unknown_user"),
    (Refuse("try again later", status=503, code="busy"), 503, "busy"),
])
def test_a_refusal_answers_its_status_and_message_and_rolls_back(shop: Any, refusal: Refuse, status: int, code: str) -> None:
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
    assert (answer["error"], answer["message"], answer["event"]) == (code, refusal.message, "purchase")
    assert ran == ["grant", "check"]
    assert grant_rows(app, db, grants) == []  # the first handler's write was rolled back
    with app.app_context():
        assert nachocode.ledger.get(body["iapLogId"], environment=None) is None
    [row] = stored_deliveries(app)
    assert (row.outcome, row.status, row.error, row.id) == ("refused", status, refusal.message, answer["delivery"])
    # Refused is not done: the same delivery re-sent once the cause is gone is handled.
    refusals.clear()
    check_answer(post_delivery(app.test_client(), "purchase", body), 200)
    assert grant_rows(app, db, grants) == [(body["userId"], 100)]


def test_a_crash_rolls_back_every_handlers_writes(shop: Any) -> None:
    app, nachocode, db, grants = shop

    @nachocode.on_refund
    def revoke(event: Any) -> None:
        db.session.execute(sa.insert(grants).values(user_id=event.user_id, coins=-100))

    @nachocode.on_refund
    def crash(event: Any) -> None:
        raise RuntimeError("boom")

    check_answer(post_delivery(app.test_client(), "refund", refund_payload()), 500)
    assert grant_rows(app, db, grants) == []
    assert [row.outcome for row in stored_deliveries(app)] == ["failed"]


def test_handlers_writes_are_committed_with_the_delivery(shop: Any) -> None:
    app, nachocode, db, grants = shop

    @nachocode.on_purchase
    def grant(event: Any) -> None:
        db.session.execute(sa.insert(grants).values(user_id=event.user_id, coins=event.quantity))

    body = purchase_payload(quantity=3)
    check_answer(post_delivery(app.test_client(), "purchase", body), 200)
    check_answer(post_delivery(app.test_client(), "purchase", body), 200)  # duplicate
    assert grant_rows(app, db, grants) == [(body["userId"], 3)]


@pytest.mark.parametrize("status", [200, 204, 302, 399, 600, 0])
def test_a_refusal_needs_an_error_status(status: int) -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Refuse("no", status=status)


# -- signals -----------------------------------------------------------------------------

def test_signals_for_received_handled_and_failed(app_and_calls: Any) -> None:
    app, _ = app_and_calls
    seen: list[tuple[str, Any, dict[str, Any]]] = []

    def recorder(name: str) -> Callable[..., None]:
        return lambda sender, **extra: seen.append((name, sender, extra))

    client = app.test_client()
    with delivery_received.connected_to(recorder("received"), app), \
            delivery_handled.connected_to(recorder("handled"), app), \
            delivery_failed.connected_to(recorder("failed"), app):
        post_delivery(client, "purchase", load_fixture("purchase-ios"))
        post_delivery(client, "purchase", load_fixture("purchase-ios"))  # duplicate
        post_delivery(client, "purchase", {"userId": "u"})
        post_delivery(client, "purchase", purchase_payload(), key="wrong")  # never received
        client.get(URLS["purchase"])  # not a delivery
    assert [name for name, _, _ in seen] == ["received", "handled", "received", "handled", "received", "failed"]
    assert all(sender is app for _, sender, _ in seen)
    received, handled, _, duplicate, _, failed = (extra for _, _, extra in seen)
    assert received["delivery"].route == "purchase"
    assert handled["event"].user_id == "testUser"
    assert (handled["result"].outcome, handled["result"].duplicate) == ("handled", False)
    assert duplicate["result"].duplicate is True
    assert failed["event"] is None
    assert (failed["result"].status, failed["error"].status) == (422, 422)


@pytest.mark.parametrize("signal", [delivery_handled, delivery_failed], ids=["handled", "failed"])
def test_a_raising_receiver_is_logged_and_the_answer_is_what_was_stored(
    make_app: AppFactory, database_url: str, caplog: pytest.LogCaptureFixture, signal: Any
) -> None:
    # TESTING off: Flask would otherwise re-raise an escaped exception into the test.
    app, nachocode = make_app(NACHOCODE_DATABASE_URI=database_url, TESTING=False)
    nachocode.on_purchase(lambda event: None)
    later: list[str] = []

    def broken_metrics(sender: Flask, **extra: Any) -> None:
        raise ZeroDivisionError("metrics-bug-4e1a")

    purchase = purchase_payload()
    with signal.connected_to(broken_metrics, app), signal.connected_to(lambda sender, **extra: later.append(extra["result"].outcome), app), \
            caplog.at_level(logging.ERROR, logger="flask_nachocode"):
        handled = check_answer(post_delivery(app.test_client(), "purchase", purchase), 200)
        duplicate = check_answer(post_delivery(app.test_client(), "purchase", purchase), 200)
        invalid = check_answer(post_delivery(app.test_client(), "purchase", {"userId": "u"}), 422)
    assert (handled["duplicate"], duplicate["duplicate"], invalid["error"]) == (False, True, "invalid_event")
    rows = stored_deliveries(app)
    assert [(row.id, row.outcome, row.status) for row in rows] == [
        (handled["delivery"], "handled", 200), (duplicate["delivery"], "duplicate", 200), (invalid["delivery"], "invalid", 422)
    ]
    raised = [record for record in caplog.records if record.exc_info and record.exc_info[0] is ZeroDivisionError]
    expected = ["handled", "duplicate"] if signal is delivery_handled else ["invalid"]
    assert [record.getMessage().rsplit(" ", 1)[-1] for record in raised] == expected
    assert all(signal.name in record.getMessage() for record in raised)
    assert later == expected  # the receivers after the broken one still ran


def test_signals_are_sent_only_for_their_app(app_and_calls: Any) -> None:
    app, _ = app_and_calls
    seen: list[Any] = []
    with delivery_received.connected_to(lambda sender, **extra: seen.append(sender), Flask("other")):
        post_delivery(app.test_client(), "purchase", purchase_payload())
    assert seen == []


# -- the slow-delivery warning ---------------------------------------------------------------

@pytest.mark.parametrize(("threshold", "sleep", "warned"), [(0.05, 0.1, True), (None, 0, False)])
def test_a_slow_delivery_is_warned_about(
    app_and_calls: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    threshold: float | None, sleep: float, warned: bool,
) -> None:
    app, nachocode_calls = app_and_calls
    if threshold is not None:
        # The real threshold is half of Nachocode's 10 s budget; a lower one keeps the test short.
        monkeypatch.setattr(flask_nachocode.delivery, "SLOW_DELIVERY_SECONDS", threshold)
    assert flask_nachocode.delivery.SLOW_DELIVERY_SECONDS == (threshold or 5.0)
    app.extensions["nachocode"].decorated_handlers.add("unavailable_users", lambda event: time.sleep(sleep))
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        check_answer(post_delivery(app.test_client(), "unavailable_users", load_fixture("unavailable-users")), 200)
    slow = [record for record in caplog.records if "budget" in record.getMessage()]
    assert len(slow) == (1 if warned else 0)
    if warned:
        assert "unavailable_users" in slow[0].getMessage() and "handled" in slow[0].getMessage()

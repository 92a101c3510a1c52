"""Property-based and fuzz tests: whatever arrives, the answer is a JSON verdict,
never a 500, and a handler runs only for a valid delivery, exactly once.

Bounded by the ``nachocode-fuzz`` hypothesis profile (about a minute for the
file); ``NACHOCODE_FUZZ_EXAMPLES`` scales every test's example count up for a
longer hunt. Every request tried is counted in the reliability figures.
"""

from __future__ import annotations

import json
import os
import select
import socket
import string
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import WEBHOOK_KEY, delivery_rows
from figures import count, count_max
from flask_nachocode.schemas import MAX_COUNT, MAX_PRICE
from flask_nachocode.events import ROUTES_BY_EVENT
from flask_nachocode.testing import purchase_payload, refund_payload
from live import rss_kib, worker_pids
from reliability_app import serve

EVENT_PATHS = {event: route.path for event, route in ROUTES_BY_EVENT.items() if event != "any"}

EXAMPLES = int(os.environ.get("NACHOCODE_FUZZ_EXAMPLES", "100"))
settings.register_profile(
    "nachocode-fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    # Shrinking a failure on PostgreSQL can take many minutes; NACHOCODE_FUZZ_SHRINK=0 skips it.
    phases=[phase for phase in Phase if phase is not Phase.shrink or os.environ.get("NACHOCODE_FUZZ_SHRINK") != "0"],
    # One app (and database) per test, shared by its examples on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ = settings.get_profile("nachocode-fuzz")

PREFIX = "/nachocode"
ROUTES = [*EVENT_PATHS.values(), "/webhooks"]
#: Answers an invalid delivery may get.
REFUSALS = {400, 401, 413, 415, 422}

IN_APP_FIELDS = [
    "userId", "iapLogId", "nachoProductId", "os", "productId", "productType", "quantity",
    "price", "environment", "data", "requestedAt", "purchasedAt", "verifiedAt",
    "refundQuantity", "refundedAt", "purchaseToken", "orderId", "originalTransactionId",
    "transactionId", "tokenNotFoundUserIds", "tokenInvalidUserIds",
]


class Harness:
    """One app on an SQLite file (or PostgreSQL) whose handlers record their calls."""

    def __init__(self, make_app: Callable[..., Any], **config: Any) -> None:
        self.app, self.ext = make_app(**config)
        self.calls: list[Any] = []
        for name in ("purchase", "refund", "unavailable_users"):
            self.ext.handler(name)(self.calls.append)
        self.client = self.app.test_client()

    def post(self, route: str, body: bytes, headers: dict[str, str]) -> tuple[Any, list[Any], int]:
        """POST and return (response, handler calls it caused, delivery rows it added)."""
        calls_before, rows_before = len(self.calls), delivery_rows(self.app)
        response = self.client.post(PREFIX + route, data=body, headers=headers)
        count("fuzz: requests sent")
        assert_json_verdict(response)
        return response, self.calls[calls_before:], delivery_rows(self.app) - rows_before


def assert_json_verdict(response: Any) -> None:
    # Handlers here never raise and the store is up: any 5xx is an input that broke
    # something (a 503 meant an INSERT the database refused, e.g. NUL on PostgreSQL).
    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.mimetype == "application/json", response.get_data()
    body = json.loads(response.get_data())
    assert isinstance(body, dict) and isinstance(body["success"], bool), body
    assert body["success"] == (200 <= response.status_code < 300)


def auth(key: str = WEBHOOK_KEY) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


@pytest.fixture
def harness(make_app: Callable[..., Any]) -> Harness:
    return Harness(make_app)


# -- strategies --------------------------------------------------------------------------

#: Text that also holds what breaks databases and encoders: NUL, lone surrogates, controls.
nasty_text = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec="utf-8"), max_size=10),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "\udfff", "\u202e", "\x1b[31m", "null"]),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), nasty_text,
    st.integers(), st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**70]),
    st.floats(),  # NaN and infinities serialise as NaN/Infinity: not JSON, must be refused
)
json_keys = st.one_of(st.sampled_from(IN_APP_FIELDS), nasty_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=6),
    max_leaves=25,
)

#: What a valid body may carry in unknown fields: any JSON that is JSON (no NaN, no Infinity).
finite_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), nasty_text, st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=6),
    max_leaves=15,
)


def dumps(value: Any) -> bytes:
    # ensure_ascii keeps lone surrogates as \\ud800 escapes, as a sender's JSON library would.
    return json.dumps(value).encode("ascii")


# -- any JSON, any bytes, any content type, any headers ---------------------------------


@FUZZ
@given(route=st.sampled_from(ROUTES), value=json_values)
def test_any_json_value_gets_a_verdict(harness: Harness, route: str, value: Any) -> None:
    count("fuzz: any JSON value")
    response, calls, _ = harness.post(route, dumps(value), auth())
    if response.status_code == 200:
        # Random JSON is rarely a valid event; when it is, it is handled once (or was before).
        assert len(calls) == (0 if response.get_json()["duplicate"] else 1)
    else:
        assert response.status_code in REFUSALS and calls == []


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=60).map(lambda tail: b'{"userId": "' + tail),
    st.builds(lambda a, b: a + b, st.sampled_from([b"{", b"[", b'"', b"\xef\xbb\xbf{", b"{}"]), st.binary(max_size=40)),
))
def test_any_byte_string_gets_a_verdict(harness: Harness, route: str, body: bytes) -> None:
    count("fuzz: any byte string")
    response, calls, _ = harness.post(route, body, auth())
    assert response.status_code in REFUSALS and calls == []


latin1_value = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)


@FUZZ
@given(content_type=st.one_of(
    latin1_value,
    st.sampled_from([
        "application/json", "APPLICATION/JSON; charset=utf-8", "application/vnd.api+json",
        "application/json; charset=utf-16", "text/json", "text/plain", "multipart/form-data",
        "application/x-www-form-urlencoded", "application/jsonp", "application/json;", ";",
    ]),
))
def test_any_content_type_gets_a_verdict(harness: Harness, content_type: str) -> None:
    count("fuzz: any content type")
    headers = {**auth(), "Content-Type": content_type}
    response, calls, _ = harness.post("/webhooks/purchase", dumps(purchase_payload()), headers)
    if response.status_code == 200:
        assert "json" in content_type.lower() and len(calls) == 1
    else:
        assert response.status_code == 415 and calls == []


header_names = st.one_of(
    st.sampled_from([
        "Authorization", "Content-Type", "Content-Length", "Transfer-Encoding", "Content-Encoding",
        "Expect", "X-Forwarded-For", "X-Forwarded-Proto", "Proxy-Authorization", "Cookie",
        "Accept", "Connection", "Range",
    ]),
    st.text(string.ascii_letters + "-", min_size=1, max_size=12),
)
authorization_values = st.one_of(
    latin1_value,
    st.sampled_from([
        f"Bearer {WEBHOOK_KEY}", f"bearer {WEBHOOK_KEY}", f"BEARER  {WEBHOOK_KEY}\t", f"Bearer {WEBHOOK_KEY}x",
        f"Bearer {WEBHOOK_KEY[:-1]}", f"Basic {WEBHOOK_KEY}", f"Bearer{WEBHOOK_KEY}", "Bearer", "Bearer ",
        f"Bearer {WEBHOOK_KEY.upper()}", f"Token {WEBHOOK_KEY}", f"Bearer {WEBHOOK_KEY}, Bearer x",
    ]),
)


#: Host values a server passes on. An invalid one ("." or "a..b") is refused by
#: Werkzeug's routing with its HTML 400 before any extension code runs.
hosts = st.sampled_from(["localhost", "example.com", "127.0.0.1:8000", "[::1]:5000", "xn--bcher-kva.example", "EXAMPLE.COM."])


@FUZZ
@given(
    headers=st.dictionaries(header_names, latin1_value, max_size=6),
    host=st.none() | hosts,
    authorization=st.none() | authorization_values,
    body=st.sampled_from(["valid", "invalid", "empty"]),
)
def test_any_header_combination_gets_a_verdict(
    harness: Harness, headers: dict[str, str], host: str | None, authorization: str | None, body: str
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
        assert not accepted and calls == [] and rows == 0
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    else:
        assert accepted
        assert (response.status_code == 200) == (len(calls) == 1)


# -- valid bodies from the field tables --------------------------------------------------

_unique = iter(range(10**9))


def plain_text(max_size: int = 40) -> st.SearchStrategy[str]:
    # Any character a JSON string can carry and a database can store: no NUL, no lone surrogate.
    return st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=max_size)


@st.composite
def timestamps(draw: Any) -> tuple[str, datetime]:
    """An ISO 8601 text Nachocode could send, and the instant it means."""
    moment = draw(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)))
    offset_minutes = draw(st.sampled_from([0, 0, 60, -300, 330, 540, -720, 840]))
    zone = timezone(timedelta(minutes=offset_minutes))
    digits = draw(st.sampled_from([0, 3, 3, 1, 6]))
    moment = moment.replace(microsecond=moment.microsecond // 10 ** (6 - digits) * 10 ** (6 - digits) if digits else 0)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{moment.microsecond:06d}"[:digits]
    if offset_minutes == 0 and draw(st.booleans()):
        text += "Z"
    else:
        sign = "+" if offset_minutes >= 0 else "-"
        text += f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
    return text, moment.replace(tzinfo=zone).astimezone(timezone.utc)


prices = st.one_of(
    st.sampled_from([0, 0.0, 0.01, 1, 9.99, 1000, 2**31 - 1, int(MAX_PRICE)]),
    st.integers(0, int(MAX_PRICE)),
    st.floats(0, 1e12, allow_nan=False, allow_infinity=False),
)


@st.composite
def in_app_bodies(draw: Any, refund: bool) -> dict[str, Any]:
    os_name = draw(st.sampled_from(["android", "ios"]))
    unique = f"-{next(_unique)}"
    if os_name == "android":
        data = {"purchaseToken": draw(plain_text()) + unique, "orderId": draw(plain_text(200)) + unique}
    else:
        data = {"originalTransactionId": draw(plain_text()) + unique, "transactionId": draw(plain_text(200)) + unique}
    quantity = draw(st.one_of(st.sampled_from([1, MAX_COUNT]), st.integers(1, MAX_COUNT)))
    body: dict[str, Any] = {
        "userId": draw(plain_text()),
        "iapLogId": draw(st.one_of(st.sampled_from([0, 1, 2**31, 2**63 - 1]), st.integers(0, 2**63 - 1))),
        "nachoProductId": draw(plain_text()),
        "os": os_name,
        "productId": draw(plain_text()),
        "productType": draw(st.sampled_from(["consumable", "non-consumable"])),
        "quantity": quantity,
        "price": draw(prices),
        "environment": draw(st.sampled_from(["sandbox", "production"])),
        "data": data,
    }
    if refund:
        body["refundQuantity"] = draw(st.one_of(st.just(quantity), st.integers(1, quantity)))
        body["refundedAt"] = draw(timestamps())[0]
    else:
        for name in ("requestedAt", "purchasedAt", "verifiedAt"):
            body[name] = draw(timestamps())[0]
    known = set(body) | set(IN_APP_FIELDS)
    extra = draw(st.dictionaries(nasty_text.filter(lambda key: key not in known), finite_json_values, max_size=3))
    if draw(st.booleans()):
        data.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in data), finite_json_values, max_size=2)))
    return {**body, **extra}


unavailable_bodies = st.fixed_dictionaries({
    "tokenNotFoundUserIds": st.lists(plain_text(), max_size=5),
    "tokenInvalidUserIds": st.lists(plain_text(), max_size=5),
}).filter(lambda body: body["tokenNotFoundUserIds"] or body["tokenInvalidUserIds"])

valid_bodies = st.one_of(
    st.tuples(st.just("purchase"), in_app_bodies(refund=False)),
    st.tuples(st.just("refund"), in_app_bodies(refund=True)),
    st.tuples(st.just("unavailable_users"), unavailable_bodies),
)


@pytest.fixture
def db_harness(make_app: Callable[..., Any], database_url: str) -> Harness:
    return Harness(make_app, NACHOCODE_DATABASE_URI=database_url)


@FUZZ
@given(case=valid_bodies, any_route=st.booleans())
def test_valid_bodies_are_always_handled_once(db_harness: Harness, case: tuple[str, Any], any_route: bool) -> None:
    event_name, body = case
    count("fuzz: valid bodies")
    route = "/webhooks" if any_route else EVENT_PATHS[event_name]
    response, calls, _ = db_harness.post(route, dumps(body), auth())
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["event"] == event_name and response.get_json()["duplicate"] is False
    assert len(calls) == 1 and calls[0].raw == body
    event = calls[0]
    if event_name != "unavailable_users":
        assert (event.user_id, event.iap_log_id, event.quantity) == (body["userId"], body["iapLogId"], body["quantity"])
        assert event.price == Decimal(str(body["price"]))
        # The same delivery again is a duplicate: answered 200, never handled twice.
        again, calls_again, _ = db_harness.post(route, dumps(body), auth())
        assert again.status_code == 200 and again.get_json()["duplicate"] is True and calls_again == []
        count("fuzz: duplicates refused")


@pytest.mark.parametrize("refund", [False, True])
def test_timestamps_mean_the_same_instant(harness: Harness, refund: bool) -> None:
    @FUZZ
    @given(stamp=timestamps())
    def check(stamp: tuple[str, datetime]) -> None:
        count("fuzz: timestamps")
        field = "refundedAt" if refund else "purchasedAt"
        body = refund_payload(**{field: stamp[0]}) if refund else purchase_payload(**{field: stamp[0]})
        response, calls, _ = harness.post(EVENT_PATHS["refund" if refund else "purchase"], dumps(body), auth())
        assert response.status_code == 200 and len(calls) == 1
        assert getattr(calls[0], "refunded_at" if refund else "purchased_at") == stamp[1]

    check()


# -- near-valid bodies: one field broken, always 422, never handled -----------------------

WRONG = {
    "userId": st.one_of(st.sampled_from(["", None, 5, [], {}, "a\x00b", "\ud800"])),
    "iapLogId": st.sampled_from([-1, 2**63, 1.5, "1", True, None, 10**70]),
    "nachoProductId": st.sampled_from(["", 1, None, "\x00"]),
    "os": st.sampled_from(["", "Android", "IOS", "web", None, 1]),
    "productId": st.sampled_from(["", 1, None]),
    "productType": st.sampled_from(["", "subscription", None, "Consumable"]),
    "quantity": st.sampled_from([0, -1, MAX_COUNT + 1, 2**31, 1.0, "1", True, None]),
    "price": st.sampled_from([-1, -0.01, "9.99", True, None, [], int(MAX_PRICE) + 1, 10**70]),
    "environment": st.sampled_from(["", "live", None, "Production"]),
    "data": st.sampled_from([None, [], "x", {}, {"orderId": "x"}, {"transactionId": "x"}]),
    "requestedAt": st.sampled_from([
        "", "2025-02-19", "2025-02-19T02:00:31", "2025-02-19T02:00:31.280", "2025-13-19T02:00:31Z",
        "2025-02-19 02:00:31Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
        "2025-02-19T02:00:31+99:00", "2025-02-19T02:00:31.1234567Z", 1739930431, None,
    ]),
}
WRONG["purchasedAt"] = WRONG["verifiedAt"] = WRONG["refundedAt"] = WRONG["requestedAt"]


@st.composite
def broken_bodies(draw: Any) -> tuple[str, dict[str, Any]]:
    event_name = draw(st.sampled_from(["purchase", "refund"]))
    os_name = draw(st.sampled_from(["android", "ios"]))
    body = purchase_payload(os=os_name) if event_name == "purchase" else refund_payload(os=os_name)
    field = draw(st.sampled_from([name for name in body if name in WRONG or name == "refundQuantity"]))
    if field == "refundQuantity":
        body[field] = draw(st.sampled_from([0, body["quantity"] + 1, None, "1"]))
    elif draw(st.integers(0, 4)) == 0:
        del body[field]
    else:
        body[field] = draw(WRONG[field])
    if field == "data" and isinstance(body.get("data"), dict) and body["data"]:
        # The other platform's shape is wrong for this os.
        body["data"] = {"orderId": "x", "purchaseToken": "y"} if os_name == "ios" else {"transactionId": "x", "originalTransactionId": "y"}
    return event_name, body


@pytest.fixture
def broken_harness(make_app: Callable[..., Any], database_url: str) -> Harness:
    return Harness(make_app, NACHOCODE_DATABASE_URI=database_url)


@FUZZ
@given(case=broken_bodies())
def test_a_broken_field_is_refused_and_never_handled(broken_harness: Harness, case: tuple[str, dict[str, Any]]) -> None:
    event_name, body = case
    count("fuzz: broken fields")
    response, calls, rows = broken_harness.post(EVENT_PATHS[event_name], dumps(body), auth())
    assert response.status_code == 422, response.get_json()
    assert calls == [] and rows == 1
    assert response.get_json()["errors"]


#: Inputs the fuzzing found that once got a 500 or a 503 (or were handled) instead of a 422.
FOUND = {
    "lone surrogate in userId": lambda: purchase_payload(userId="\ud800"),
    "NUL in userId": lambda: purchase_payload(userId="a\x00b"),
    "NUL in purchaseToken": lambda: purchase_payload(os="android", data={"purchaseToken": "t\x00"}),
    "lone surrogate in userId of an invalid body": lambda: {"userId": "\udfff", "requestedAt": 1},
    "year 1 with a positive offset": lambda: purchase_payload(purchasedAt="0001-01-01T00:00:00+01:00"),
    "year 9999 with a negative offset": lambda: purchase_payload(verifiedAt="9999-12-31T23:59:59-01:00"),
    "300-character orderId": lambda: purchase_payload(os="android", data={"orderId": "o" * 300}),
    "70-digit price": lambda: purchase_payload(price=10**70),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_inputs_fuzzing_found_are_refused_on_every_database(db_harness: Harness, name: str) -> None:
    count("fuzz: found inputs replayed")
    response, calls, rows = db_harness.post("/webhooks/purchase", dumps(FOUND[name]()), auth())
    assert response.status_code == 422, response.get_json()
    assert calls == [] and rows == 1


# -- bombs against a real gunicorn server ------------------------------------------------


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
            lengths = [int(line.split(b":")[1]) for line in head_part.split(b"\r\n") if line.lower().startswith(b"content-length:")]
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
    "10 MB with Content-Length": (f"Content-Length: {TEN_MB}\r\n", lambda: ten_mb_of(b" ", False), 413),
    "10 MB chunked, no length": ("Transfer-Encoding: chunked\r\n", lambda: ten_mb_of(b'{"a": 1, ', True), 413),
    "10 MB of [ chunked": ("Transfer-Encoding: chunked\r\n", lambda: ten_mb_of(b"[", True), 413),
    "deep arrays within the limit": (
        "Content-Length: 60000\r\n", lambda: iter([b"[" * 30000 + b"]" * 30000]), 400),
    "deep objects within the limit": (
        "Content-Length: 60000\r\n", lambda: iter([b'{"a":' * 9999 + b"1" + b"}" * 9999 + b" " * 5]), 400),
    "deep array inside a field": (
        "Transfer-Encoding: chunked\r\n",
        lambda: iter([f"{60000:x}\r\n".encode() + (b'{"data":' + b"[" * 29992 + b"]" * 29992 + b"}" + b" " * 7) + b"\r\n", b"0\r\n\r\n"]),
        400),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_early_with_memory_bounded(gunicorn_server: tuple[str, int, Path], name: str) -> None:
    host, port, log = gunicorn_server
    extra, chunks, expected = BOMBS[name]
    (worker,) = worker_pids(port)
    before = rss_kib(worker)
    # Content-Length over the limit: refused on the headers, before any body byte.
    pause_after = 0 if "Content-Length: 1" in extra else 2 * LIMIT
    status, answer, sent = raw_request(host, port, head(port, extra), chunks(), pause_after=pause_after)
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
    assert b"Traceback" not in log.read_bytes() and WEBHOOK_KEY.encode() not in log.read_bytes()

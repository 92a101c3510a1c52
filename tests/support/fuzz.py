"""What the property-based (hypothesis) tests share: their bounded profile, the
strategies for hostile and for valid bodies, and a harness that posts and checks
that every answer is a JSON verdict.

The ``nachocode-fuzz`` profile keeps the fuzz tests to about a minute;
``NACHOCODE_FUZZ_EXAMPLES`` scales every test's example count up for a longer hunt.
Every request tried is counted in the reliability figures.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from flask_nachocode.events import ROUTES_BY_EVENT
from flask_nachocode.schemas import MAX_COUNT, MAX_PRICE
from flask_nachocode.testing import purchase_payload, refund_payload

from support.common import WEBHOOK_KEY, delivery_rows
from support.figures import count

EXAMPLES = int(os.environ.get("NACHOCODE_FUZZ_EXAMPLES", "100"))
settings.register_profile(
    "nachocode-fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    # Shrinking a failure on PostgreSQL can take many minutes; NACHOCODE_FUZZ_SHRINK=0 skips it.
    phases=[
        phase
        for phase in Phase
        if phase is not Phase.shrink or os.environ.get("NACHOCODE_FUZZ_SHRINK") != "0"
    ],
    # One app (and database) per test, shared by its examples on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ = settings.get_profile("nachocode-fuzz")

PREFIX = "/nachocode"
ROUTES = [route.path for route in ROUTES_BY_EVENT.values()]
#: Answers an invalid delivery may get.
REFUSALS = {400, 401, 413, 415, 422}

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
    "requestedAt",
    "purchasedAt",
    "verifiedAt",
    "refundQuantity",
    "refundedAt",
    "purchaseToken",
    "orderId",
    "originalTransactionId",
    "transactionId",
    "tokenNotFoundUserIds",
    "tokenInvalidUserIds",
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
    assert isinstance(body, dict), body
    assert isinstance(body["success"], bool), body
    assert body["success"] == (200 <= response.status_code < 300)


def auth(key: str = WEBHOOK_KEY) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


# -- strategies --------------------------------------------------------------------------

#: Text that also holds what breaks databases and encoders: NUL, lone surrogates, controls.
nasty_text = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec="utf-8"), max_size=10),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "\udfff", "\u202e", "\x1b[31m", "null"]),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    nasty_text,
    st.integers(),
    st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**70]),
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
    st.one_of(
        st.none(),
        st.booleans(),
        nasty_text,
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=6),
    max_leaves=15,
)


def dumps(value: Any) -> bytes:
    # ensure_ascii keeps lone surrogates as \\ud800 escapes, as a sender's JSON library would.
    return json.dumps(value).encode("ascii")


latin1_value = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)


header_names = st.one_of(
    st.sampled_from(
        [
            "Authorization",
            "Content-Type",
            "Content-Length",
            "Transfer-Encoding",
            "Content-Encoding",
            "Expect",
            "X-Forwarded-For",
            "X-Forwarded-Proto",
            "Proxy-Authorization",
            "Cookie",
            "Accept",
            "Connection",
            "Range",
        ]
    ),
    st.text(string.ascii_letters + "-", min_size=1, max_size=12),
)
authorization_values = st.one_of(
    latin1_value,
    st.sampled_from(
        [
            f"Bearer {WEBHOOK_KEY}",
            f"bearer {WEBHOOK_KEY}",
            f"BEARER  {WEBHOOK_KEY}\t",
            f"Bearer {WEBHOOK_KEY}x",
            f"Bearer {WEBHOOK_KEY[:-1]}",
            f"Basic {WEBHOOK_KEY}",
            f"Bearer{WEBHOOK_KEY}",
            "Bearer",
            "Bearer ",
            f"Bearer {WEBHOOK_KEY.upper()}",
            f"Token {WEBHOOK_KEY}",
            f"Bearer {WEBHOOK_KEY}, Bearer x",
        ]
    ),
)


#: Host values a server passes on. An invalid one ("." or "a..b") is refused by
#: Werkzeug's routing with its HTML 400 before any extension code runs.
hosts = st.sampled_from(
    [
        "localhost",
        "example.com",
        "127.0.0.1:8000",
        "[::1]:5000",
        "xn--bcher-kva.example",
        "EXAMPLE.COM.",
    ]
)


# -- valid bodies from the field tables --------------------------------------------------

_unique = iter(range(10**9))


def plain_text(max_size: int = 40) -> st.SearchStrategy[str]:
    # Any character a JSON string can carry and a database can store: no NUL, no lone surrogate.
    return st.text(
        st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=max_size
    )


@st.composite
def timestamps(draw: Any) -> tuple[str, datetime]:
    """An ISO 8601 text Nachocode could send, and the instant it means."""
    moment = draw(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)))
    offset_minutes = draw(st.sampled_from([0, 0, 60, -300, 330, 540, -720, 840]))
    zone = timezone(timedelta(minutes=offset_minutes))
    digits = draw(st.sampled_from([0, 3, 3, 1, 6]))
    moment = moment.replace(
        microsecond=moment.microsecond // 10 ** (6 - digits) * 10 ** (6 - digits) if digits else 0
    )
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
        data = {
            "purchaseToken": draw(plain_text()) + unique,
            "orderId": draw(plain_text(200)) + unique,
        }
    else:
        data = {
            "originalTransactionId": draw(plain_text()) + unique,
            "transactionId": draw(plain_text(200)) + unique,
        }
    quantity = draw(st.one_of(st.sampled_from([1, MAX_COUNT]), st.integers(1, MAX_COUNT)))
    body: dict[str, Any] = {
        "userId": draw(plain_text()),
        "iapLogId": draw(
            st.one_of(st.sampled_from([0, 1, 2**31, 2**63 - 1]), st.integers(0, 2**63 - 1))
        ),
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
    extra = draw(
        st.dictionaries(
            nasty_text.filter(lambda key: key not in known), finite_json_values, max_size=3
        )
    )
    if draw(st.booleans()):
        data.update(
            draw(
                st.dictionaries(
                    st.text(max_size=8).filter(lambda k: k not in data),
                    finite_json_values,
                    max_size=2,
                )
            )
        )
    return {**body, **extra}


unavailable_bodies = st.fixed_dictionaries(
    {
        "tokenNotFoundUserIds": st.lists(plain_text(), max_size=5),
        "tokenInvalidUserIds": st.lists(plain_text(), max_size=5),
    }
).filter(lambda body: body["tokenNotFoundUserIds"] or body["tokenInvalidUserIds"])

valid_bodies = st.one_of(
    st.tuples(st.just("purchase"), in_app_bodies(refund=False)),
    st.tuples(st.just("refund"), in_app_bodies(refund=True)),
    st.tuples(st.just("unavailable_users"), unavailable_bodies),
)


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
    "requestedAt": st.sampled_from(
        [
            "",
            "2025-02-19",
            "2025-02-19T02:00:31",
            "2025-02-19T02:00:31.280",
            "2025-13-19T02:00:31Z",
            "2025-02-19 02:00:31Z",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "2025-02-19T02:00:31+99:00",
            "2025-02-19T02:00:31.1234567Z",
            1739930431,
            None,
        ]
    ),
}
WRONG["purchasedAt"] = WRONG["verifiedAt"] = WRONG["refundedAt"] = WRONG["requestedAt"]


@st.composite
def broken_bodies(draw: Any) -> tuple[str, dict[str, Any]]:
    event_name = draw(st.sampled_from(["purchase", "refund"]))
    os_name = draw(st.sampled_from(["android", "ios"]))
    body = purchase_payload(os=os_name) if event_name == "purchase" else refund_payload(os=os_name)
    field = draw(
        st.sampled_from([name for name in body if name in WRONG or name == "refundQuantity"])
    )
    if field == "refundQuantity":
        body[field] = draw(st.sampled_from([0, body["quantity"] + 1, None, "1"]))
    elif draw(st.integers(0, 4)) == 0:
        del body[field]
    else:
        body[field] = draw(WRONG[field])
    if field == "data" and isinstance(body.get("data"), dict) and body["data"]:
        # The other platform's shape is wrong for this os.
        body["data"] = (
            {"orderId": "x", "purchaseToken": "y"}
            if os_name == "ios"
            else {"transactionId": "x", "originalTransactionId": "y"}
        )
    return event_name, body

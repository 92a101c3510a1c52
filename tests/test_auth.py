"""The bearer-key check: missing, wrong, partial and rotated keys, the scheme's
case, and that a refused delivery leaves no trace and reaches no handler."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from conftest import WEBHOOK_KEY, load_fixture, stored_deliveries
from flask import Flask

from flask_nachocode import NachocodeWebhook
from flask_nachocode.testing import post_delivery

URL = "/nachocode/webhooks/purchase"
AppFactory = Callable[..., "tuple[Flask, NachocodeWebhook]"]


def recording_app(make_app: AppFactory, **config: Any) -> tuple[Flask, list[Any]]:
    app, nachocode = make_app(**config)
    seen: list[Any] = []
    nachocode.on_purchase(seen.append)
    return app, seen


def post_with(app: Flask, authorization: str | None, body: Any = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = load_fixture("purchase-ios") if body is None else body
    return app.test_client().post(URL, json=body if isinstance(body, dict) else None,
                                  data=None if isinstance(body, dict) else body, headers=headers)


@pytest.mark.parametrize("authorization", [
    None,
    "",
    "Bearer",
    "Bearer ",
    f"Basic {WEBHOOK_KEY}",
    f"Token {WEBHOOK_KEY}",
    WEBHOOK_KEY,
    "Bearer wrong-key",
    f"Bearer {WEBHOOK_KEY[:-1]}",  # a prefix of the key
    f"Bearer {WEBHOOK_KEY[:1]}",
    f"Bearer {WEBHOOK_KEY}x",  # the key plus more
    f"Bearer {WEBHOOK_KEY.upper()}",  # the key is compared exactly
    f"Bearer {WEBHOOK_KEY} {WEBHOOK_KEY}",
    f"Bearer: {WEBHOOK_KEY}",
])
def test_refused_without_the_key(make_app: AppFactory, authorization: str | None) -> None:
    app, seen = recording_app(make_app)
    response = post_with(app, authorization)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.is_json and response.json["success"] is False
    assert WEBHOOK_KEY not in response.get_data(as_text=True)
    assert seen == []
    assert stored_deliveries(app) == []  # a delivery without the key leaves no trace


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_scheme_is_case_insensitive(make_app: AppFactory, scheme: str) -> None:
    app, seen = recording_app(make_app)
    assert post_with(app, f"{scheme} {WEBHOOK_KEY}").status_code == 200
    assert len(seen) == 1


@pytest.mark.parametrize("keys", [("new-key", "old-key"), ["new-key", "old-key"]])
def test_every_key_of_a_rotation_is_accepted(make_app: AppFactory, keys: Any) -> None:
    app, seen = recording_app(make_app, NACHOCODE_WEBHOOK_KEY=keys)
    assert post_with(app, "Bearer old-key").status_code == 200
    assert post_with(app, "Bearer new-key", load_fixture("purchase-android")).status_code == 200
    assert post_with(app, "Bearer older-key").status_code == 401
    assert post_with(app, "Bearer new-keyold-key").status_code == 401
    assert len(seen) == 2


def test_the_key_is_checked_before_the_body(make_app: AppFactory) -> None:
    app, seen = recording_app(make_app, NACHOCODE_MAX_BODY_BYTES=10)
    assert post_with(app, "Bearer wrong", b"not json at all, and too long").status_code == 401
    response = app.test_client().post(URL, data="x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 401
    assert stored_deliveries(app) == []


def test_no_key_configured_accepts_deliveries_without_one(make_app: AppFactory) -> None:
    app, seen = recording_app(make_app, NACHOCODE_WEBHOOK_KEY=None)
    assert post_with(app, None).status_code == 200
    assert len(seen) == 1


def test_the_key_is_never_stored(make_app: AppFactory) -> None:
    app, _ = recording_app(make_app)
    assert post_delivery(app.test_client(), "purchase", load_fixture("purchase-ios")).status_code == 200
    assert post_delivery(app.test_client(), "purchase", {"userId": 1}).status_code == 422
    rows = stored_deliveries(app)
    assert [row.outcome for row in rows] == ["handled", "invalid"]
    for row in rows:
        assert "Authorization" not in row.headers and "authorization" not in row.headers
        assert WEBHOOK_KEY not in repr(tuple(row))
    shown = app.test_cli_runner().invoke(args=["nachocode", "show", str(rows[0].id)])
    assert shown.exit_code == 0 and WEBHOOK_KEY not in shown.output


def test_a_non_ascii_key_is_compared_as_utf8_bytes(make_app: AppFactory) -> None:
    app, seen = recording_app(make_app, NACHOCODE_WEBHOOK_KEY="키-key")
    # What an HTTP client sends for that key: its UTF-8 bytes, which WSGI hands over as latin-1.
    sent = "키-key".encode("utf-8").decode("latin-1")
    assert post_with(app, f"Bearer {sent}").status_code == 200
    assert post_with(app, "Bearer ?-key").status_code == 401
    assert len(seen) == 1

"""The delivery inspector. Its server side through Flask's test client: when it is
reachable, how it is protected, CSRF on replay, escaping, filters and paging. Then
in a real headless Chromium (marked ``integration`` and ``browser``) against a
real server (``flask run``), with deliveries sent by ``flask nachocode send``;
screenshots of each page go to ``test-artifacts/inspector/``."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from flask import Flask, abort, request
from flask.testing import FlaskClient

from flask_nachocode import NachocodeWebhook
from flask_nachocode.reads import EXPORT_COLUMNS
from flask_nachocode.state import CONFIG_DEFAULTS
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload

from support.browser import chromium
from support.common import WEBHOOK_KEY
from support.live import BIN, ROOT, flask_run_args, free_port, live_server
from support.served_app import BROKEN_MARKER, INSPECTOR_TOKEN, INSTANCE_ENV

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Dialog, Page

TOKEN = "inspector-token-5f1e9a2c"
SECRET_KEY = "inspector-test-secret"
XSS = '<script>alert("xss")</script>'
TEMPLATES = Path(__file__).resolve().parent.parent / "flask_nachocode" / "templates" / "nachocode"


def ids_on(page: str) -> list[int]:
    """Delivery ids of the rows of a rendered page or fragment, in order."""
    return [int(found) for found in re.findall(r'<tr class="delivery" data-id="(\d+)"', page)]


def csrf_of(page: str) -> str:
    match = re.search(r'name="nachocode_csrf" value="([^"]+)"', page)
    assert match, "no CSRF field on the page"
    return match.group(1)


def require_admin(view: Callable[..., Any]) -> Callable[..., Any]:
    """Stands in for an app's own authentication decorator."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if request.headers.get("X-Admin") != "yes":
            abort(401)
        return view(*args, **kwargs)

    return wrapped


class FailingHandlers:
    """A purchase handler that raises while ``failing`` is true, as a bug would."""

    def __init__(self, ext: NachocodeWebhook) -> None:
        self.failing = False
        self.handled: list[str] = []
        ext.on_purchase(self.purchase)

    def purchase(self, event: Any) -> None:
        if self.failing:
            raise RuntimeError("the grant service is down")
        self.handled.append(event.user_id)


@pytest.fixture
def inspector(make_app: Callable[..., tuple[Flask, NachocodeWebhook]]) -> Callable[..., Any]:
    """An app with the inspector on, token-protected, and a client signed in to it."""

    def make(**config: Any) -> tuple[Flask, FailingHandlers, FlaskClient]:
        app, ext = make_app(
            SECRET_KEY=SECRET_KEY,
            NACHOCODE_INSPECTOR=True,
            NACHOCODE_INSPECTOR_TOKEN=TOKEN,
            **config,
        )
        handlers = FailingHandlers(ext)
        client = app.test_client()
        assert client.get(f"/nachocode/deliveries?token={TOKEN}").status_code == 303
        return app, handlers, client

    return make


def send(client: FlaskClient, **overrides: Any) -> int:
    response = post_delivery(client, "purchase", purchase_payload(**overrides))
    return int(response.json["delivery"])


# -- when it is reachable -------------------------------------------------------------


def test_off_by_default(make_app: Callable[..., Any]) -> None:
    assert CONFIG_DEFAULTS["NACHOCODE_INSPECTOR"] is False
    assert CONFIG_DEFAULTS["NACHOCODE_INSPECTOR_TOKEN"] is None
    assert CONFIG_DEFAULTS["NACHOCODE_INSPECTOR_DECORATORS"] == []
    app, _ = make_app(SECRET_KEY=SECRET_KEY, DEBUG=True)
    client = app.test_client()
    for path in (
        "/nachocode/deliveries",
        "/nachocode/deliveries/1",
        "/nachocode/inspector-static/inspector.css",
    ):
        assert client.get(path).status_code == 404
    assert not [rule for rule in app.url_map.iter_rules() if "inspector" in rule.endpoint]


def test_unprotected_outside_debug_answers_404_and_warns(
    make_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        app, _ = make_app(SECRET_KEY=SECRET_KEY, NACHOCODE_INSPECTOR=True)
    assert "without protection" in caplog.text
    assert "answer 404" in caplog.text
    client = app.test_client()
    delivery = send(client)
    for path in (
        "/nachocode/deliveries",
        "/nachocode/deliveries/poll",
        f"/nachocode/deliveries/{delivery}",
        "/nachocode/inspector-static/inspector.js",
    ):
        assert client.get(path).status_code == 404, path
    assert client.post(f"/nachocode/deliveries/{delivery}/replay").status_code == 404


def test_unprotected_in_debug_mode_is_open_and_warns(
    make_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        app, _ = make_app(SECRET_KEY=SECRET_KEY, NACHOCODE_INSPECTOR=True, DEBUG=True)
    assert "without protection" in caplog.text
    assert "debug mode" in caplog.text
    assert app.test_client().get("/nachocode/deliveries").status_code == 200


def test_protected_inspector_logs_no_warning(
    make_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        make_app(SECRET_KEY=SECRET_KEY, NACHOCODE_INSPECTOR=True, NACHOCODE_INSPECTOR_TOKEN=TOKEN)
    assert "inspector" not in caplog.text


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"NACHOCODE_INSPECTOR_TOKEN": "short"}, "at least 16 characters"),
        ({"NACHOCODE_INSPECTOR_TOKEN": TOKEN, "SECRET_KEY": None}, "SECRET_KEY"),
        (
            {"NACHOCODE_INSPECTOR_DECORATORS": ["no_such_module_xyz:login_required"]},
            "cannot import",
        ),
        ({"NACHOCODE_INSPECTOR_DECORATORS": [42]}, "not callable"),
    ],
)
def test_unusable_config_is_refused_at_start(
    make_app: Callable[..., Any], config: dict[str, Any], message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        make_app(**{"SECRET_KEY": SECRET_KEY, "NACHOCODE_INSPECTOR": True, **config})


# -- token -----------------------------------------------------------------------------


def test_token_is_given_once_then_kept_in_the_session(make_app: Callable[..., Any]) -> None:
    app, _ = make_app(
        SECRET_KEY=SECRET_KEY, NACHOCODE_INSPECTOR=True, NACHOCODE_INSPECTOR_TOKEN=TOKEN
    )
    client = app.test_client()
    assert client.get("/nachocode/deliveries").status_code == 403
    assert client.get("/nachocode/deliveries?token=" + TOKEN[:-1] + "x").status_code == 403
    assert client.get("/nachocode/deliveries").status_code == 403  # a wrong token signs nobody in

    response = client.get(f"/nachocode/deliveries?outcome=failed&token={TOKEN}")
    assert response.status_code == 303
    # Redirected to the same page without the token, so it leaves no trace in history.
    assert response.headers["Location"] == "/nachocode/deliveries?outcome=failed"
    assert client.get("/nachocode/deliveries").status_code == 200
    assert client.get("/nachocode/inspector-static/inspector.css").status_code == 200

    cookie = client.get_cookie("session")
    assert cookie is not None
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    assert TOKEN not in repr(serializer.loads(cookie.value))
    assert app.test_client().get("/nachocode/deliveries").status_code == 403  # another browser


def test_changing_the_token_signs_sessions_out(
    make_app: Callable[..., Any], tmp_path: Path
) -> None:
    app, _ = make_app(
        SECRET_KEY=SECRET_KEY, NACHOCODE_INSPECTOR=True, NACHOCODE_INSPECTOR_TOKEN=TOKEN
    )
    client = app.test_client()
    client.get(f"/nachocode/deliveries?token={TOKEN}")
    cookie = client.get_cookie("session")
    assert cookie is not None
    app2 = Flask("nachocode_test_app", instance_path=str(tmp_path / "instance2"))
    app2.config.update(
        SECRET_KEY=SECRET_KEY,
        NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / 'other.db'}",
        NACHOCODE_INSPECTOR=True,
        NACHOCODE_INSPECTOR_TOKEN=TOKEN + "-rotated",
    )
    NachocodeWebhook(app2)
    client2 = app2.test_client()
    client2.set_cookie("session", cookie.value)
    assert client2.get("/nachocode/deliveries").status_code == 403


# -- the app's own decorators ----------------------------------------------------------------


def test_decorators_wrap_every_view(make_app: Callable[..., Any]) -> None:
    app, ext = make_app(
        SECRET_KEY=SECRET_KEY,
        NACHOCODE_INSPECTOR=True,
        NACHOCODE_INSPECTOR_DECORATORS=[require_admin],
    )
    FailingHandlers(ext)
    client = app.test_client()
    delivery = send(client)
    paths = [
        "/nachocode/deliveries",
        "/nachocode/deliveries/poll",
        f"/nachocode/deliveries/{delivery}",
    ]
    for path in paths:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"X-Admin": "yes"}).status_code == 200, path
    assert client.post(f"/nachocode/deliveries/{delivery}/replay").status_code == 401


def test_decorators_apply_first_outermost_and_with_a_token_both_must_pass(
    make_app: Callable[..., Any],
) -> None:
    calls: list[str] = []

    def named(name: str) -> Callable[..., Any]:
        def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(view)
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return view(*args, **kwargs)

            return wrapped

        return decorator

    app, _ = make_app(
        SECRET_KEY=SECRET_KEY,
        NACHOCODE_INSPECTOR=True,
        NACHOCODE_INSPECTOR_TOKEN=TOKEN,
        NACHOCODE_INSPECTOR_DECORATORS=[named("outer"), named("inner"), require_admin],
    )
    client = app.test_client()
    assert client.get("/nachocode/deliveries", headers={"X-Admin": "yes"}).status_code == 403
    assert calls == []
    client.get(f"/nachocode/deliveries?token={TOKEN}")
    assert client.get("/nachocode/deliveries").status_code == 401
    assert client.get("/nachocode/deliveries", headers={"X-Admin": "yes"}).status_code == 200
    assert calls[-2:] == ["outer", "inner"]


# -- list: filters, search, paging, live rows ----------------------------------------------------


def test_list_filters_and_search(inspector: Callable[..., Any], database_url: str) -> None:
    app, handlers, client = inspector(NACHOCODE_DATABASE_URI=database_url)
    handled = send(client, userId="alice", iapLogId=700001)
    handlers.failing = True
    failed = send(client, userId="bob", iapLogId=700002)
    refund = post_delivery(client, "refund", refund_payload(userId="carol")).json[
        "delivery"
    ]  # no handler

    assert ids_on(client.get("/nachocode/deliveries").text) == [refund, failed, handled]
    assert ids_on(client.get("/nachocode/deliveries?outcome=failed").text) == [failed]
    assert ids_on(client.get("/nachocode/deliveries?outcome=unhandled").text) == [refund]
    assert ids_on(client.get("/nachocode/deliveries?event=purchase").text) == [failed, handled]
    assert ids_on(client.get("/nachocode/deliveries?q=alice").text) == [handled]
    assert ids_on(client.get("/nachocode/deliveries?q=700002").text) == [failed]
    assert (
        ids_on(client.get("/nachocode/deliveries?event=purchase&outcome=handled&q=bob").text) == []
    )
    assert "No deliveries match" in client.get("/nachocode/deliveries?q=nobody").text


def test_replays_are_listed_only_on_request(inspector: Callable[..., Any]) -> None:
    app, handlers, client = inspector()
    handlers.failing = True
    failed = send(client)
    replay_url = f"/nachocode/deliveries/{failed}/replay"
    csrf = csrf_of(client.get(f"/nachocode/deliveries/{failed}").text)
    assert client.post(replay_url, data={"nachocode_csrf": csrf}).status_code == 303
    replay = failed + 1

    page = client.get("/nachocode/deliveries?outcome=failed").text
    assert ids_on(page) == [failed]
    assert ids_on(client.get("/nachocode/deliveries?outcome=failed&replays=1").text) == [
        replay,
        failed,
    ]
    assert ids_on(client.get("/nachocode/deliveries/poll?after=0&replays=1").json["html"]) == [
        replay,
        failed,
    ]
    assert 'name="replays" value="1" checked' in client.get("/nachocode/deliveries?replays=1").text


@pytest.mark.parametrize(
    "query",
    [
        "outcome=lost",
        "event=payment",
        "before=abc",
        "after=-1",
        "per_page=0",
        "per_page=999",
        "q=" + "x" * 600,
        # Other scripts' digits are digits to str.isdigit and int(): "٣" is 3, "３" too.
        "per_page=%D9%A3",
        "before=%EF%BC%93",
        "after=%D9%A3",
    ],
)
def test_bad_list_arguments_are_a_clear_400(inspector: Callable[..., Any], query: str) -> None:
    _, _, client = inspector()
    assert client.get(f"/nachocode/deliveries?{query}").status_code == 400


def test_paging_newest_first(inspector: Callable[..., Any]) -> None:
    _, _, client = inspector()
    ids = [send(client) for _ in range(7)]
    newest_first = ids[::-1]

    first = client.get("/nachocode/deliveries?per_page=3").text
    assert ids_on(first) == newest_first[:3]
    assert "← Newer" not in first  # the first page shows new ones live instead
    older = re.search(r'rel="next" href="([^"]+)"', first)
    assert older
    second = client.get(older.group(1).replace("&amp;", "&")).text
    assert ids_on(second) == newest_first[3:6]
    third_link = re.search(r'rel="next" href="([^"]+)"', second)
    assert third_link
    third = client.get(third_link.group(1).replace("&amp;", "&")).text
    assert ids_on(third) == newest_first[6:]
    assert 'rel="next"' not in third

    newer = re.search(r'rel="prev" href="([^"]+)"', third)
    assert newer
    assert ids_on(client.get(newer.group(1).replace("&amp;", "&")).text) == newest_first[3:6]
    # Older pages do not poll: their rows would otherwise be pushed by new ones.
    assert "data-poll-url" not in second
    assert "data-poll-url" in first


def test_poll_returns_only_newer_rows_that_match_the_filters(inspector: Callable[..., Any]) -> None:
    app, handlers, client = inspector()
    first = send(client)
    page = client.get("/nachocode/deliveries?outcome=failed").text
    poll_url = re.search(r'data-poll-url="([^"]+)"', page)
    assert poll_url
    assert poll_url.group(1) == "/nachocode/deliveries/poll?outcome=failed"

    nothing = client.get(f"/nachocode/deliveries/poll?after={first}").json
    assert nothing == {"count": 0, "html": "", "latest": first}
    send(client)
    handlers.failing = True
    failed = send(client, userId=XSS)
    answer = client.get(f"/nachocode/deliveries/poll?outcome=failed&after={first}").json
    assert answer["count"] == 1
    assert answer["latest"] == failed
    assert ids_on(answer["html"]) == [failed]
    assert "<script>" not in answer["html"]
    assert "&lt;script&gt;" in answer["html"]


# -- one delivery ----------------------------------------------------------------------------


def test_detail_shows_headers_without_authorization_body_event_and_traceback(
    inspector: Callable[..., Any],
) -> None:
    _, handlers, client = inspector()
    handlers.failing = True
    delivery = send(client, userId="dora", iapLogId=424242)
    page = client.get(f"/nachocode/deliveries/{delivery}").text

    assert "Content-Type</dt><dd>application/json" in page
    assert "Authorization</dt>" not in page
    assert WEBHOOK_KEY not in page
    assert "&#34;iapLogId&#34;: 424242,\n" in page  # pretty-printed, one field a line
    assert "PurchaseEvent" in page
    assert "<dt>iap_log_id</dt><dd>424242</dd>" in page
    assert '<p class="error">' in page
    assert "RuntimeError: the grant service is down" in page
    assert 'id="replay"' in page
    assert client.get("/nachocode/deliveries/999999").status_code == 404
    assert client.get(f"/nachocode/deliveries/{2**64}").status_code == 404


def test_detail_shows_validation_errors_of_an_invalid_body(inspector: Callable[..., Any]) -> None:
    _, _, client = inspector()
    response = post_delivery(client, "purchase", purchase_payload(quantity="two"))
    assert response.status_code == 422
    page = client.get(f"/nachocode/deliveries/{response.json['delivery']}").text
    assert "not a valid purchase event" in page
    assert "<dt>quantity</dt>" in page
    assert 'id="replay"' not in page  # invalid deliveries are not replayed


def test_everything_from_a_delivery_is_escaped(inspector: Callable[..., Any]) -> None:
    _, handlers, client = inspector()
    handlers.failing = True
    payload = purchase_payload(userId=XSS, productId="</pre><img src=x onerror=alert(1)>")
    response = client.post(
        "/nachocode/webhooks/purchase",
        json=payload,
        headers={
            "Authorization": f"Bearer {WEBHOOK_KEY}",
            "X-Evil": "<b onmouseover=alert(1)>hi</b>",
        },
    )
    delivery = response.json["delivery"]
    for page in (
        client.get("/nachocode/deliveries").text,
        client.get(f"/nachocode/deliveries/{delivery}").text,
    ):
        assert "<script>" not in page
        assert "<img" not in page
        assert "<b " not in page
        assert "&lt;script&gt;alert(" in page
    detail = client.get(f"/nachocode/deliveries/{delivery}").text
    assert "&lt;/pre&gt;&lt;img src=x onerror=alert(1)&gt;" in detail
    assert "&lt;b onmouseover=alert(1)&gt;hi&lt;/b&gt;" in detail


def test_templates_never_mark_data_safe() -> None:
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert "|safe" not in text.replace(" ", ""), template.name
        assert "autoescape false" not in text, template.name


def test_pages_send_a_strict_content_security_policy(inspector: Callable[..., Any]) -> None:
    _, _, client = inspector()
    response = client.get("/nachocode/deliveries")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"


# -- replay -------------------------------------------------------------------------------------


def test_replay_after_fixing_the_handler(inspector: Callable[..., Any], database_url: str) -> None:
    _, handlers, client = inspector(NACHOCODE_DATABASE_URI=database_url)
    handlers.failing = True
    delivery = send(client, userId="erin")
    page = client.get(f"/nachocode/deliveries/{delivery}").text

    handlers.failing = False
    response = client.post(
        f"/nachocode/deliveries/{delivery}/replay", data={"nachocode_csrf": csrf_of(page)}
    )
    assert response.status_code == 303
    assert response.headers["Location"] == f"/nachocode/deliveries/{delivery}"
    assert handlers.handled == ["erin"]

    after = client.get(f"/nachocode/deliveries/{delivery}").text
    assert f"Replayed as delivery {delivery + 1}: handled (200)" in after
    assert '<span class="badge handled" id="outcome">handled</span>' in after
    assert ids_on(after) == [delivery + 1]  # the replay history
    assert 'id="replay"' not in after  # handled now: nothing left to replay
    replay_page = client.get(f"/nachocode/deliveries/{delivery + 1}").text
    assert f'href="/nachocode/deliveries/{delivery}">#{delivery}</a>' in replay_page


def test_replay_still_failing_is_reported(inspector: Callable[..., Any]) -> None:
    _, handlers, client = inspector()
    handlers.failing = True
    delivery = send(client)
    page = client.get(f"/nachocode/deliveries/{delivery}").text
    client.post(f"/nachocode/deliveries/{delivery}/replay", data={"nachocode_csrf": csrf_of(page)})
    after = client.get(f"/nachocode/deliveries/{delivery}").text
    assert "failed (500): a handler raised an exception" in after
    assert 'id="replay"' in after
    assert "Replayed 1×" in after


@pytest.mark.parametrize("token", [None, "", "forged-token"])
def test_replay_without_the_sessions_csrf_token_is_refused(
    inspector: Callable[..., Any], token: str | None
) -> None:
    app, handlers, client = inspector()
    handlers.failing = True
    delivery = send(client)
    replays = [
        re.sub(r"<[^>]*delivery_id>", str(delivery), rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("nachocode.inspector") and "POST" in (rule.methods or ())
    ]
    assert sorted(replays) == ["/nachocode/deliveries/1/replay", "/nachocode/deliveries/replay"]
    # Without the inspector token nothing is replayed; the webhook key opens nothing here.
    stranger = app.test_client()
    for url in replays:
        for headers in ({}, {"Authorization": f"Bearer {WEBHOOK_KEY}"}):
            assert stranger.post(url, headers=headers).status_code == 403
    client.get(f"/nachocode/deliveries/{delivery}")  # the session has a CSRF token now
    handlers.failing = False
    data = (
        {"upto": str(delivery)}
        if token is None
        else {"nachocode_csrf": token, "upto": str(delivery)}
    )
    for url in replays:
        response = client.post(url, data=data)
        assert response.status_code == 400
        assert "CSRF" in response.text
    assert handlers.handled == []
    assert ids_on(client.get("/nachocode/deliveries").text) == [delivery]


def test_a_csrf_token_from_another_session_is_refused(inspector: Callable[..., Any]) -> None:
    app, handlers, client = inspector()
    handlers.failing = True
    delivery = send(client)
    attacker = app.test_client()
    attacker.get(f"/nachocode/deliveries?token={TOKEN}")
    their_token = csrf_of(attacker.get(f"/nachocode/deliveries/{delivery}").text)
    client.get(f"/nachocode/deliveries/{delivery}")
    response = client.post(
        f"/nachocode/deliveries/{delivery}/replay", data={"nachocode_csrf": their_token}
    )
    assert response.status_code == 400


def test_replaying_a_handled_delivery_changes_nothing(inspector: Callable[..., Any]) -> None:
    _, handlers, client = inspector()
    delivery = send(client)
    # A handled delivery has no Replay form; take the session's token from a failed one.
    handlers.failing = True
    failed = send(client)
    token = csrf_of(client.get(f"/nachocode/deliveries/{failed}").text)
    response = client.post(
        f"/nachocode/deliveries/{delivery}/replay", data={"nachocode_csrf": token}
    )
    assert response.status_code == 303
    page = client.get(f"/nachocode/deliveries/{delivery}").text
    # Refused as not replayable, or (where replay allows it) answered as a duplicate:
    # either way the handler does not run a second time.
    assert "Not replayed: delivery" in page or "duplicate (200)" in page
    assert len(handlers.handled) == 1
    for missing in (999999, 2**64):
        response = client.post(
            f"/nachocode/deliveries/{missing}/replay", data={"nachocode_csrf": token}
        )
        assert response.status_code == 404


def test_detail_of_a_body_that_is_not_json(inspector: Callable[..., Any]) -> None:
    _, _, client = inspector()
    response = client.post(
        "/nachocode/webhooks/purchase",
        data=b'{"userId": "</pre><script>alert(1)</script>", oops',
        headers={"Authorization": f"Bearer {WEBHOOK_KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    page = client.get(f"/nachocode/deliveries/{response.json['delivery']}").text
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;&#34;, oops" in page
    assert "<script>alert" not in page
    assert "No event could be read" in page


def test_a_store_that_cannot_be_reached_is_a_503_page(
    inspector: Callable[..., Any], tmp_path: Path
) -> None:
    _, _, client = inspector(
        NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / 'missing' / 'dir' / 'n.db'}"
    )
    for path in ("/nachocode/deliveries", "/nachocode/deliveries/poll", "/nachocode/deliveries/1"):
        response = client.get(path)
        assert response.status_code == 503, path
    assert "store is unavailable" in client.get("/nachocode/deliveries").text


def test_with_the_apps_own_flask_sqlalchemy_db(tmp_path: Path) -> None:
    from flask_sqlalchemy import SQLAlchemy

    app = Flask("nachocode_db_app", instance_path=str(tmp_path / "instance"))
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'app.db'}",
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
        NACHOCODE_INSPECTOR=True,
        NACHOCODE_INSPECTOR_TOKEN=TOKEN,
    )
    db = SQLAlchemy(app)
    ext = NachocodeWebhook(app, db=db)
    with app.app_context():
        db.create_all()
    handlers = FailingHandlers(ext)
    client = app.test_client()
    client.get(f"/nachocode/deliveries?token={TOKEN}")
    handlers.failing = True
    delivery = send(client, userId="frank")
    assert ids_on(client.get("/nachocode/deliveries?q=frank").text) == [delivery]
    token = csrf_of(client.get(f"/nachocode/deliveries/{delivery}").text)
    handlers.failing = False
    client.post(f"/nachocode/deliveries/{delivery}/replay", data={"nachocode_csrf": token})
    assert handlers.handled == ["frank"]
    assert (
        '<span class="badge handled" id="outcome">'
        in client.get(f"/nachocode/deliveries/{delivery}").text
    )


def test_unicode_digits_are_no_delivery_id(inspector: Callable[..., Any]) -> None:
    _, handlers, client = inspector()
    handlers.failing = True  # replayable, so that the page has the replay form
    for _ in range(3):
        send(client)
    assert client.get("/nachocode/deliveries/3").status_code == 200
    for text in ("%D9%A3", "%EF%BC%93", "3a"):
        assert client.get(f"/nachocode/deliveries/{text}").status_code == 404, text
    token = csrf_of(client.get("/nachocode/deliveries/3").text)
    replay = client.post("/nachocode/deliveries/%D9%A3/replay", data={"nachocode_csrf": token})
    assert replay.status_code == 404
    # Nor an iapLogId to search for.
    assert ids_on(client.get("/nachocode/deliveries?q=%D9%A3").text) == []


@pytest.mark.every_database
def test_a_nul_in_the_search_is_a_400_not_a_store_error(
    inspector: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    _, _, client = inspector()
    send(client)
    with caplog.at_level(logging.ERROR):
        response = client.get("/nachocode/deliveries?q=%00")
        poll = client.get("/nachocode/deliveries/poll?after=0&q=a%00b")
    assert (response.status_code, poll.status_code) == (400, 400)
    assert "NUL" in response.text
    assert caplog.records == []


def test_the_url_spelling_of_unavailable_users_filters_too(inspector: Callable[..., Any]) -> None:
    _, _, client = inspector()
    send(client)
    body = {"tokenNotFoundUserIds": [], "tokenInvalidUserIds": ["u"]}
    pushed = post_delivery(client, "unavailable_users", body).json["delivery"]
    for spelling in ("unavailable_users", "unavailable-users"):
        assert ids_on(client.get(f"/nachocode/deliveries?event={spelling}").text) == [pushed]


def test_a_deeply_nested_body_is_shown_as_received(inspector: Callable[..., Any]) -> None:
    # 34 arrays nested 900 deep (61 KB) made a 55 MB page: indenting grows with the
    # square of the depth. Past the depth or size limit the body is shown as received.
    _, _, client = inspector()
    deep = "[" * 900 + "]" * 900
    body = ('{"userId": "deep", "nested": [' + ",".join([deep] * 34) + "]}").encode()
    response = client.post(
        "/nachocode/webhooks/purchase",
        data=body,
        headers={"Authorization": f"Bearer {WEBHOOK_KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    page = client.get(f"/nachocode/deliveries/{response.json['delivery']}").text
    assert deep in page  # as received, not indented
    assert len(page) < 2 * len(body) + 20_000

    # A shallow body is still indented.
    shallow = send(client, userId="shallow")
    page = client.get(f"/nachocode/deliveries/{shallow}").text
    assert "\n  &#34;userId&#34;: &#34;shallow&#34;," in page


@pytest.mark.every_database
@pytest.mark.parametrize(
    ("body", "answer"),
    [
        # Valid JSON and a valid purchase: the handler ran, the page must show it.
        (purchase_payload(userId="lone", note="\ud800"), 200),
        # A surrogate where the schema refuses it: stored (escaped) as an invalid delivery.
        (purchase_payload(userId="\udc00"), 422),
    ],
    ids=["unknown-field", "user-id"],
)
def test_a_lone_surrogate_in_a_body_is_shown_as_its_escape(
    inspector: Callable[..., Any], body: dict[str, Any], answer: int
) -> None:
    """JSON's "\\ud800" is a character no page can be encoded with: it is shown as the
    escape that was received, and the delivery can be replayed."""
    _, handlers, client = inspector()
    handlers.failing = answer == 200  # replayable, so that the page has the replay form
    response = post_delivery(client, "purchase", json.dumps(body))  # ASCII, escapes and all
    assert response.status_code == (500 if handlers.failing else answer)
    delivery = response.json["delivery"]
    page = client.get(f"/nachocode/deliveries/{delivery}")
    assert page.status_code == 200
    assert "\\ud800" in page.text or "\\udc00" in page.text
    assert client.get("/nachocode/deliveries").status_code == 200
    if handlers.failing:
        handlers.failing = False
        replayed = client.post(
            f"/nachocode/deliveries/{delivery}/replay",
            data={"nachocode_csrf": csrf_of(page.text)},
            follow_redirects=True,
        )
        assert replayed.status_code == 200
        assert "Replayed as delivery" in replayed.text
        assert handlers.handled == ["lone"]


# -- time range, exports, bulk replay, overview -----------------------------------------


def set_received_at(app: Flask, times: dict[int, datetime]) -> None:
    """Give deliveries the times they were received at."""
    with app.app_context():
        store = app.extensions["nachocode"].store
        with store.engine.begin() as connection:
            for delivery_id, moment in times.items():
                connection.execute(
                    sa.update(store.deliveries)
                    .where(store.deliveries.c.id == delivery_id)
                    .values(received_at=moment)
                )


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


@pytest.mark.every_database  # the time range and the grouping are each database's SQL
def test_time_range_filters_the_list_and_carries_into_links(
    inspector: Callable[..., Any], database_url: str
) -> None:
    app, _, client = inspector(NACHOCODE_DATABASE_URI=database_url)
    early, mid, late = send(client), send(client), send(client)
    set_received_at(
        app,
        {early: at("2026-11-30 23:59:59"), mid: at("2026-12-01 09:30"), late: at("2026-12-02")},
    )
    ids = lambda query: ids_on(client.get(f"/nachocode/deliveries?{query}").text)  # noqa: E731
    assert ids("from=2026-12-01") == [late, mid]
    assert ids("until=2026-12-01") == [mid, early]  # a date alone: to the end of that day
    assert ids("from=2026-12-01&until=2026-12-01") == [mid]
    assert ids("from=2026-12-01T09:30&until=2026-12-01T09:31") == [mid]  # the form's spelling
    assert ids("from=2026-12-01T18:30%2B09:00") == [late, mid]  # an offset: 09:30 UTC
    page = client.get("/nachocode/deliveries?from=2026-12-01").text
    assert 'name="from" step="1" value="2026-12-01T00:00:00"' in page
    assert "export.csv?from=2026-12-01T00:00:00" in page


@pytest.mark.parametrize(
    "query",
    [
        "from=yesterday",
        "until=2026-13-01",
        "from=2026-12-01T25:00",
        "from=0001-01-01",
        "until=9999-12-31",
        "from=2026-12-02&until=2026-12-01",
        "from=2026-12-01&until=2026-12-01T00:00",
    ],
)
@pytest.mark.parametrize(
    "path", ["deliveries", "deliveries/export.csv", "deliveries/export.jsonl", "deliveries/replay"]
)
def test_bad_time_ranges_are_a_clear_400(
    inspector: Callable[..., Any], path: str, query: str
) -> None:
    _, _, client = inspector()
    answer = client.get(f"/nachocode/{path}?{query}")
    assert answer.status_code == 400
    assert "from" in answer.text or "until" in answer.text


def test_exports_stream_the_filter_as_csv_and_json_lines(inspector: Callable[..., Any]) -> None:
    app, handlers, client = inspector()
    handled = send(client, userId='=HYPERLINK("http://evil")', iapLogId=810001)
    handlers.failing = True
    failed = send(client, userId="bob", iapLogId=810002)
    set_received_at(app, {handled: at("2026-12-01 10:00"), failed: at("2026-12-02 10:00")})

    lines = client.get("/nachocode/deliveries/export.jsonl").text.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [handled, failed]  # oldest first
    assert list(records[0]) == list(EXPORT_COLUMNS)
    assert records[1]["outcome"] == "failed"
    assert records[1]["iap_log_id"] == 810002
    assert records[1]["received_at"] == "2026-12-02T10:00:00+00:00"
    assert "the grant service is down" in records[1]["error"]

    answer = client.get("/nachocode/deliveries/export.csv?outcome=handled")
    assert answer.mimetype == "text/csv"
    assert answer.headers["Content-Disposition"].startswith('attachment; filename="deliveries-')
    rows = list(csv.reader(io.StringIO(answer.text)))
    assert rows[0] == list(EXPORT_COLUMNS)
    assert [row[0] for row in rows[1:]] == [str(handled)]
    # A spreadsheet would run it as a formula; the quote keeps it text.
    assert rows[1][EXPORT_COLUMNS.index("user_id")] == '\'=HYPERLINK("http://evil")'

    ranged = client.get("/nachocode/deliveries/export.jsonl?from=2026-12-02").text
    assert [json.loads(line)["id"] for line in ranged.splitlines()] == [failed]
    assert client.get("/nachocode/deliveries/export.csv?q=nobody").text.count("\n") == 1


def test_bulk_replay_confirms_the_count_then_replays_the_filters_failed_ones(
    inspector: Callable[..., Any],
) -> None:
    app, handlers, client = inspector()
    send(client, userId="ok")
    handlers.failing = True
    old_failure = send(client, userId="old")
    for n in range(3):
        send(client, userId=f"f{n}")
    set_received_at(app, {old_failure: at("2026-11-01 00:00")})

    page = client.get("/nachocode/deliveries/replay?from=2026-11-15").text
    assert 'id="replay-count" data-count="3"' in page
    handlers.failing = False
    send(client, userId="late")  # handled, so not replayable anyway
    handlers.failing = True
    late_failure = send(client, userId="late-failure")  # after the confirmation: left alone
    handlers.failing = False

    action = re.search(r'action="([^"]+/deliveries/replay[^"]*)"', page)
    assert action is not None
    upto = re.search(r'name="upto" value="(\d+)"', page)
    assert upto is not None
    answer = client.post(
        action.group(1).replace("&amp;", "&"),
        data={"nachocode_csrf": csrf_of(page), "upto": upto.group(1)},
    )
    assert answer.status_code == 303
    assert "from=2026-11-15" in answer.headers["Location"]
    assert "Replayed 3 deliveries: 3 handled." in client.get(answer.headers["Location"]).text
    assert handlers.handled == ["ok", "late", "f0", "f1", "f2"]
    still = ids_on(client.get("/nachocode/deliveries?outcome=failed").text)
    assert still == [late_failure, old_failure]


def test_bulk_replay_is_capped_and_needs_the_csrf_token(
    inspector: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, handlers, client = inspector()
    monkeypatch.setattr("flask_nachocode.inspector.BULK_REPLAY_LIMIT", 2)
    handlers.failing = True
    failures = [send(client, userId=f"f{n}") for n in range(3)]
    handlers.failing = False
    page = client.get("/nachocode/deliveries/replay").text
    assert "3 deliveries in this filter" in page
    assert "oldest <strong>2</strong>" in page
    upto = str(failures[-1])
    refused = client.post("/nachocode/deliveries/replay", data={"upto": upto})
    assert refused.status_code == 400
    assert handlers.handled == []
    assert (
        client.post(
            "/nachocode/deliveries/replay", data={"nachocode_csrf": csrf_of(page), "upto": "x"}
        ).status_code
        == 400
    )
    client.post(
        "/nachocode/deliveries/replay", data={"nachocode_csrf": csrf_of(page), "upto": upto}
    )
    assert handlers.handled == ["f0", "f1"]
    assert "No delivery in this filter" not in client.get("/nachocode/deliveries/replay").text


def test_bulk_replay_reports_deliveries_it_cannot_replay(inspector: Callable[..., Any]) -> None:
    _, handlers, client = inspector(NACHOCODE_KEEP_BODIES=False)
    handlers.failing = True
    bodiless = send(client)
    handlers.failing = False
    page = client.get("/nachocode/deliveries/replay").text
    answer = client.post(
        "/nachocode/deliveries/replay",
        data={"nachocode_csrf": csrf_of(page), "upto": str(bodiless)},
        follow_redirects=True,
    )
    assert "Replayed 0 deliveries; 1 could not be replayed" in answer.text
    assert handlers.handled == []


@pytest.mark.every_database  # the time range and the grouping are each database's SQL
def test_overview_counts_per_hour_and_day_by_outcome(
    inspector: Callable[..., Any], database_url: str
) -> None:
    app, handlers, client = inspector(NACHOCODE_DATABASE_URI=database_url)
    now = datetime.now(timezone.utc).replace(minute=30, second=0, microsecond=0)
    a, b = send(client), send(client)
    handlers.failing = True
    c = send(client)
    old = send(client)
    set_received_at(
        app,
        {
            a: now - timedelta(hours=2),
            b: now - timedelta(hours=2),
            c: now,
            old: now - timedelta(days=3),
        },
    )
    page = client.get("/nachocode/overview").text
    hour = (now - timedelta(hours=2)).replace(minute=30 - 30).isoformat()
    assert f'<g class="period" data-start="{hour}" data-total="2">' in page
    assert 'data-outcome="handled" data-count="2"' in page
    day = (now - timedelta(days=3)).replace(hour=0, minute=0).isoformat()
    assert f'<g class="period" data-start="{day}" data-total="1">' in page
    assert page.count('<g class="period"') == 24 + 7
    assert "Last 24 hours, per hour (UTC): 3" in page
    assert "Last 7 days, per day (UTC): 4" in page
    assert "<script" not in page.split("</head>")[1]  # drawn by the server
    assert client.get("/nachocode/overview?days=7").status_code == 400


def test_overview_axis_is_a_round_number_above_the_tallest_bar() -> None:
    from flask_nachocode.overview import _axis_top

    assert [_axis_top(n) for n in (0, 4, 5, 9, 21, 99, 401)] == [4, 4, 8, 20, 40, 200, 800]


# -- in a real browser, against a real server (integration, browser) ------------------------

SERVED_APP = "tests/support/served_app.py"

ARTIFACTS = ROOT / "test-artifacts" / "inspector"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
#: How long to wait for a page to show what the server did; polling runs every 2 s.
WAIT_MS = 20_000

OpenPage = Callable[..., "Page"]


@pytest.fixture(scope="module")
def served_instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inspector-app")


@pytest.fixture(scope="module")
def served_env(served_instance: Path) -> dict[str, str]:
    return {INSTANCE_ENV: str(served_instance), "FLASK_APP": SERVED_APP}


@pytest.fixture(scope="module")
def served_url(served_env: dict[str, str], served_instance: Path) -> Iterator[str]:
    port = free_port()
    log_path = served_instance / "server.log"
    with live_server(
        flask_run_args(SERVED_APP, port), port=port, env=served_env, log_path=log_path
    ) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:  # skips without Chromium or Playwright
        yield browser


@pytest.fixture
def open_page(browser: Browser, served_url: str) -> Iterator[OpenPage]:
    """A page in a fresh browser session, signed in with the token."""
    contexts = []

    from playwright.sync_api import expect

    def open_page(viewport: dict[str, int] = DESKTOP) -> Page:
        context = browser.new_context(viewport=viewport, base_url=served_url)  # type: ignore[arg-type]
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"/nachocode/deliveries?token={INSPECTOR_TOKEN}")
        # Signed in, and the token is gone from the address bar.
        expect(page).to_have_url(f"{served_url}/nachocode/deliveries")
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def broken_handler(served_instance: Path) -> Iterator[Path]:
    """The marker file that makes the purchase handler fail; removed afterwards."""
    marker = served_instance / BROKEN_MARKER
    marker.touch()
    yield marker
    marker.unlink(missing_ok=True)


@pytest.fixture
def send_with_cli(served_env: dict[str, str], served_url: str) -> Callable[..., int]:
    """Run ``flask nachocode send purchase --set FIELD=VALUE ...`` as a user
    does; return the id of the delivery it created."""

    def run(*assignments: str) -> int:
        command = [
            str(BIN / "flask"),
            "nachocode",
            "send",
            "purchase",
            "--url",
            f"{served_url}/nachocode/webhooks/purchase",
        ]
        for assignment in assignments:
            command += ["--set", assignment]
        result = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, **served_env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        answer: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{") :])
        return int(answer["delivery"])

    return run


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fits_the_width(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


@pytest.mark.integration
@pytest.mark.browser  # .ci/matrix leaves these out
def test_deliveries_arrive_live_and_a_failed_one_is_replayed(
    open_page: OpenPage, send_with_cli: Callable[..., int], served_instance: Path, served_url: str
) -> None:
    from playwright.sync_api import expect

    send = send_with_cli
    page = open_page()
    page.evaluate("window.notReloaded = true")

    handled = send("userId=live-alice")
    handled_row = page.locator(f'tr[data-id="{handled}"]')
    expect(handled_row.locator("td.outcome")).to_contain_text("handled")
    expect(handled_row.locator("td.user")).to_have_text("live-alice")

    (served_instance / BROKEN_MARKER).touch()
    try:
        failed = send("userId=live-bob")
    finally:
        (served_instance / BROKEN_MARKER).unlink()
    failed_row = page.locator(f'tr[data-id="{failed}"]')
    expect(failed_row.locator("td.outcome")).to_contain_text("failed")
    expect(failed_row.locator("td.status")).to_have_text("500")
    expect(page.locator("tr.delivery").first).to_have_attribute(
        "data-id", str(failed)
    )  # newest first
    assert page.evaluate("window.notReloaded") is True, "the rows came by reloading the page"
    screenshot(page, "deliveries")

    failed_row.locator("td.user").click()  # the whole row opens the delivery
    expect(page).to_have_url(f"{served_url}/nachocode/deliveries/{failed}")
    expect(page.locator("#outcome")).to_have_text("failed")
    expect(page.locator("pre.traceback")).to_contain_text("RuntimeError: the coin service is down")
    expect(page.locator("#body")).to_contain_text('"userId": "live-bob"')
    expect(page.locator("dl.headers")).not_to_contain_text("Authorization")
    screenshot(page, "delivery-failed")

    page.locator("#replay").click()  # the handler is fixed: the marker is gone
    expect(page.locator("#outcome")).to_have_text("handled")
    expect(page.locator(".flash")).to_contain_text("handled (200)")
    expect(page.locator("#replays tr.delivery")).to_have_count(1)
    expect(page.locator("#replay")).to_have_count(0)
    screenshot(page, "delivery-replayed")

    page.goto("/nachocode/deliveries?outcome=failed")
    expect(page.locator(f'tr[data-id="{failed}"]')).to_have_count(0)
    page.goto("/nachocode/deliveries?q=live-bob")
    expect(page.locator(f'tr[data-id="{failed}"] td.outcome')).to_contain_text("handled")


@pytest.mark.integration
@pytest.mark.browser  # .ci/matrix leaves these out
def test_a_script_in_a_delivery_is_shown_as_text(
    open_page: OpenPage, send_with_cli: Callable[..., int]
) -> None:
    from playwright.sync_api import expect

    page = open_page()
    dialogs: list[str] = []

    def record(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", record)

    delivery = send_with_cli(f"userId={XSS}")
    cell = page.locator(f'tr[data-id="{delivery}"] td.user')
    expect(cell).to_have_text(XSS)  # arrived through the live update
    page.reload()
    expect(cell).to_have_text(XSS)  # rendered with the page
    cell.click()
    expect(page.locator("dd.user")).to_have_text(XSS)
    expect(page.locator("#body")).to_contain_text('"userId": "<script>alert(\\"xss\\")</script>"')
    screenshot(page, "delivery-xss")

    assert dialogs == []
    # The only script on the page is the inspector's own.
    assert page.locator("script").count() == 1
    assert str(page.locator("script").get_attribute("src")).endswith("/inspector.js")


@pytest.mark.integration
@pytest.mark.browser  # .ci/matrix leaves these out
def test_pages_fit_a_phone(
    open_page: OpenPage, send_with_cli: Callable[..., int], broken_handler: Path
) -> None:
    from playwright.sync_api import expect

    delivery = send_with_cli("userId=phone-user-with-a-rather-long-identifier-0123456789")
    page = open_page(PHONE)
    expect(page.locator(f'tr[data-id="{delivery}"]')).to_be_visible()
    expect(page.locator("table#deliveries thead")).to_be_hidden()  # rows are cards on a phone
    assert fits_the_width(page)
    screenshot(page, "deliveries-phone")

    page.goto(f"/nachocode/deliveries/{delivery}")
    expect(page.locator("pre.traceback")).to_be_visible()
    expect(page.locator("#replay")).to_be_visible()
    assert fits_the_width(page)
    screenshot(page, "delivery-phone")

    page.goto("/nachocode/overview")
    expect(page.locator("#chart-day svg.bars")).to_be_visible()
    page.locator("#chart-hour details summary").click()
    assert fits_the_width(page)
    screenshot(page, "overview-phone")


def test_a_deferred_delivery_shows_it_is_queued_then_each_attempt(tmp_path: Any) -> None:
    from celery import Celery

    from flask_nachocode.state import current_state
    from flask_nachocode.worker import run_attempt

    app = Flask("deferred_inspector", instance_path=str(tmp_path))
    app.config.update(
        TESTING=True,
        SECRET_KEY=SECRET_KEY,
        NACHOCODE_WEBHOOK_KEY="key",
        NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / 'nachocode.db'}",
        NACHOCODE_INSPECTOR=True,
        NACHOCODE_INSPECTOR_TOKEN=TOKEN,
        NACHOCODE_DEFERRED=True,
        NACHOCODE_RETRY_DELAYS=[60],
    )
    # A broker no worker reads: the test runs the attempts itself, as a worker would.
    app.extensions["celery"] = Celery("deferred_inspector", broker="memory://")
    handlers = FailingHandlers(NachocodeWebhook(app))
    client = app.test_client()
    assert client.get(f"/nachocode/deliveries?token={TOKEN}").status_code == 303
    delivery = send(client)
    page = client.get(f"/nachocode/deliveries/{delivery}").text
    assert 'id="outcome">queued<' in page
    assert "Answered 202 and queued" in page
    assert "<dt>Answer</dt><dd>202 <small>(queued)</small></dd>" in page
    assert 'id="attempts"' not in page

    handlers.failing = True
    with app.app_context():
        run_attempt(current_state(), delivery, 1)
    page = client.get(f"/nachocode/deliveries/{delivery}").text
    assert "the next attempt is due" in page
    assert "RuntimeError: the grant service is down" in page
    assert "raise RuntimeError" in page  # the attempt's traceback

    handlers.failing = False
    with app.app_context():
        run_attempt(current_state(), delivery, 2)
    page = client.get(f"/nachocode/deliveries/{delivery}").text
    assert 'id="outcome">handled<' in page
    assert "Answered 202 and queued" not in page
    # Nachocode was answered 202; handled is the worker's doing.
    assert "<dt>Answer</dt><dd>202 <small>(queued; handled by the worker)</small></dd>" in page
    rows = re.findall(r"<tr>\s*<td>(\d)</td>\s*<td><span class=\"badge (\w+)\"", page)
    assert rows == [("1", "failed"), ("2", "handled")]


def store_counts(instance: Path, starts: list[str], period: str) -> dict[tuple[str, str], int]:
    """Read straight from the served app's SQLite file: each original delivery
    under its latest outcome, in the UTC hour or day of ``starts`` it arrived in."""
    counts: dict[tuple[str, str], int] = {}
    with closing(sqlite3.connect(instance / "nachocode.db")) as db:
        rows = db.execute(
            "SELECT received_at, outcome FROM nachocode_deliveries WHERE replay_of IS NULL"
        ).fetchall()
    for received_at, outcome in rows:
        moment = datetime.fromisoformat(received_at).replace(tzinfo=timezone.utc)
        moment = moment.replace(minute=0, second=0, microsecond=0)
        if period == "day":
            moment = moment.replace(hour=0)
        if moment.isoformat() in starts:
            key = (moment.isoformat(), outcome)
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.integration
@pytest.mark.browser  # .ci/matrix leaves these out
def test_overview_chart_shows_the_stores_numbers_without_javascript(
    browser: Browser, served_url: str, served_instance: Path, send_with_cli: Callable[..., int]
) -> None:
    from playwright.sync_api import expect

    sent = [send_with_cli(f"userId=overview-{n}") for n in range(6)]
    (served_instance / BROKEN_MARKER).touch()
    try:
        sent += [send_with_cli(f"userId=overview-failed-{n}") for n in range(3)]
    finally:
        (served_instance / BROKEN_MARKER).unlink()
    # Spread them over the hours and days the charts cover.
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    ago = [timedelta(hours=h) for h in (1, 1, 3, 7, 7, 30)] + [
        timedelta(hours=h) for h in (3, 50, 100)
    ]
    with closing(sqlite3.connect(served_instance / "nachocode.db")) as db, db:
        for delivery, before in zip(sent, ago, strict=True):
            db.execute(
                "UPDATE nachocode_deliveries SET received_at = ? WHERE id = ?",
                ((now - before).isoformat(sep=" "), delivery),
            )

    context = browser.new_context(
        viewport=DESKTOP,  # type: ignore[arg-type]
        base_url=served_url,
        java_script_enabled=False,
    )
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"/nachocode/overview?token={INSPECTOR_TOKEN}")
        expect(page).to_have_url(f"{served_url}/nachocode/overview")
        for period, size in (("hour", 24), ("day", 7)):
            chart = page.locator(f"#chart-{period}")
            expect(chart.locator("svg.bars")).to_be_visible()
            starts = chart.locator("g.period").evaluate_all("gs => gs.map(g => g.dataset.start)")
            assert len(starts) == size
            bars = chart.locator("rect.bar").evaluate_all(
                "rs => rs.map(r => [r.parentElement.dataset.start, r.dataset.outcome,"
                " Number(r.dataset.count), r.getBBox().height])"
            )
            expected = store_counts(served_instance, starts, period)
            assert {(start, outcome): count for start, outcome, count, _ in bars} == expected
            assert all(height > 0 for *_, height in bars)  # drawn, not just present
            cells = chart.locator("table.numbers td[data-outcome]").evaluate_all(
                "tds => tds.map(td => [td.parentElement.dataset.start, td.dataset.outcome,"
                " Number(td.textContent)])"
            )
            assert {(s, o): n for s, o, n in cells if n} == expected
        page.locator("#chart-hour details summary").click()  # the numbers open without script
        expect(page.locator("#chart-hour table.numbers")).to_be_visible()
        page.locator("#chart-hour details summary").click()
        screenshot(page, "overview")
        page.screenshot(path=str(ROOT / "docs" / "_static" / "overview.png"), full_page=True)
    finally:
        context.close()


@pytest.mark.integration
@pytest.mark.browser  # .ci/matrix leaves these out
def test_bulk_replay_of_a_filter_after_a_confirmation(
    open_page: OpenPage, send_with_cli: Callable[..., int], served_instance: Path
) -> None:
    from playwright.sync_api import expect

    (served_instance / BROKEN_MARKER).touch()
    try:
        failed = [send_with_cli("userId=bulk-user") for _ in range(2)]
    finally:
        (served_instance / BROKEN_MARKER).unlink()
    page = open_page()
    page.goto("/nachocode/deliveries?q=bulk-user&outcome=failed")
    expect(page.locator("tr.delivery")).to_have_count(2)
    page.locator("#bulk-replay").click()
    expect(page.locator("#replay-count")).to_have_attribute("data-count", "2")
    page.locator("#confirm-replay").click()
    expect(page.locator(".flash")).to_have_text("Replayed 2 deliveries: 2 handled.")
    expect(page.locator("tr.delivery")).to_have_count(0)  # back on the filtered list
    page.goto("/nachocode/deliveries?q=bulk-user")
    for delivery in failed:
        expect(page.locator(f'tr[data-id="{delivery}"] td.outcome')).to_contain_text("handled")

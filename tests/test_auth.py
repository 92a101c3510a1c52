"""The bearer-key check: missing, wrong, partial and rotated keys, the scheme's case,
constant-time comparison, the key checked before the body is read on every route,
and the key never leaking: not into logs, answers, the database, the CLI or the
inspector, nor (marked ``integration``) into a real server's output."""

from __future__ import annotations

import hmac
import io
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from flask_nachocode import NachocodeWebhook, Refuse
from flask_nachocode import auth as nachocode_auth
from flask_nachocode.delivery import REDACTED
from flask_nachocode.testing import (
    post_delivery,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)

from support.common import WEBHOOK_KEY, delivery_rows, load_fixture, stored_deliveries
from support.effects_app import create_tables, serve
from support.figures import count
from support.live import flask_run_args, free_port, live_server
from support.scrape import METRICS_CONFIG, METRICS_TOKEN

URL = "/nachocode/webhooks/purchase"
AppFactory = Callable[..., "tuple[Flask, NachocodeWebhook]"]
OLD_KEY = "old-key-3f9a8c1e"
NEW_KEY = "new-key-b27d05aa"
INSPECTOR_TOKEN = "inspector-token-5e0c11d2"


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
    return app.test_client().post(
        URL,
        json=body if isinstance(body, dict) else None,
        data=None if isinstance(body, dict) else body,
        headers=headers,
    )


class UnreadableStream(io.RawIOBase):
    """A request body that fails the test if anything reads it."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # the test client seeks to measure it; only reading is forbidden

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the body was read before the key was checked")


def webhook_rules(app: Any) -> list[str]:
    """Every webhook POST route the extension mounts (new ones are covered
    automatically); the inspector's routes have their own protection
    (test_inspector.py)."""
    return sorted(
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("nachocode.")
        and not rule.endpoint.startswith("nachocode.inspector")
        and "POST" in (rule.methods or ())
    )


# -- refused without the key, before the body is read ---------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
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
    ],
)
def test_every_route_refuses_without_the_key_before_reading_the_body(
    make_app: AppFactory, authorization: str | None
) -> None:
    # A body over the size limit, of a type that is not JSON: still 401, not 413 or 415.
    app, seen = recording_app(make_app, NACHOCODE_MAX_BODY_BYTES=10)
    client = app.test_client()
    routes = webhook_rules(app)
    assert len(routes) >= 4
    for route in routes:
        for content_type in ("application/json", "text/plain"):
            headers = {"Content-Type": content_type, "Content-Length": "100"}
            if authorization is not None:
                headers["Authorization"] = authorization
            response = client.post(route, input_stream=UnreadableStream(), headers=headers)
            count("security: unauthorised requests")
            assert response.status_code == 401, (route, response.get_json())
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.is_json
            assert response.get_json()["success"] is False
            assert WEBHOOK_KEY not in response.get_data(as_text=True)
    assert seen == []
    assert delivery_rows(app) == 0  # a delivery without the key leaves no trace


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_scheme_is_case_insensitive(make_app: AppFactory, scheme: str) -> None:
    app, seen = recording_app(make_app)
    assert post_with(app, f"{scheme} {WEBHOOK_KEY}").status_code == 200
    assert len(seen) == 1


def test_no_key_configured_accepts_deliveries_without_one(make_app: AppFactory) -> None:
    app, seen = recording_app(make_app, NACHOCODE_WEBHOOK_KEY=None)
    assert post_with(app, None).status_code == 200
    assert len(seen) == 1


def test_a_non_ascii_key_is_compared_as_utf8_bytes(make_app: AppFactory) -> None:
    app, seen = recording_app(make_app, NACHOCODE_WEBHOOK_KEY="키-key")
    # What an HTTP client sends for that key: its UTF-8 bytes, which WSGI hands over as latin-1.
    sent = "키-key".encode().decode("latin-1")
    assert post_with(app, f"Bearer {sent}").status_code == 200
    assert post_with(app, "Bearer ?-key").status_code == 401
    assert len(seen) == 1


# -- several keys: rotation, compared in constant time ---------------------------------


@pytest.mark.parametrize("container", [list, tuple])
def test_key_rotation_with_a_list_of_keys(make_app: AppFactory, container: Any) -> None:
    """The procedure SECURITY.md describes: add the new key, switch Nachocode, drop the old one."""
    handled: list[Any] = []
    steps = [
        ([OLD_KEY], {OLD_KEY: 200, NEW_KEY: 401}),
        (
            [NEW_KEY, OLD_KEY],
            {OLD_KEY: 200, NEW_KEY: 200, "older-key": 401, NEW_KEY + OLD_KEY: 401},
        ),
        ([NEW_KEY], {OLD_KEY: 401, NEW_KEY: 200}),
    ]
    for keys, expected in steps:
        app, ext = make_app(NACHOCODE_WEBHOOK_KEY=container(keys))
        ext.on_purchase(handled.append)
        client = app.test_client()
        for key, status in expected.items():
            answer = post_delivery(client, "purchase", purchase_payload(), key=key)
            assert answer.status_code == status, (keys, key)
    assert len(handled) == 4


def test_every_key_is_compared_in_constant_time(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(presented: bytes, key: bytes) -> bool:
        compared.append((presented, key))
        return compare_digest(presented, key)

    monkeypatch.setattr(nachocode_auth.hmac, "compare_digest", spy)
    app, ext = make_app(NACHOCODE_WEBHOOK_KEY=[NEW_KEY, OLD_KEY])
    ext.on_purchase(lambda event: None)
    client = app.test_client()
    for key, expected in [(NEW_KEY, 200), (OLD_KEY, 200), ("guess", 401)]:
        compared.clear()
        assert (
            post_delivery(client, "purchase", purchase_payload(), key=key).status_code == expected
        )
        # Both keys compared whichever matched: the time taken says nothing about which.
        assert compared == [(key.encode(), NEW_KEY.encode()), (key.encode(), OLD_KEY.encode())]


# -- the key never leaks ------------------------------------------------------------------


def database_text(url: str) -> bytes:
    """Everything the database holds, as bytes: SQLite's files (incl. -wal), a server's rows."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        files = [Path(str(parsed.database) + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
        return b"".join(path.read_bytes() for path in files if path.exists())
    engine = sa.create_engine(url)
    chunks = []
    tables = sa.inspect(engine).get_table_names()
    with engine.connect() as connection:
        for table in tables:
            for row in connection.execute(sa.select(sa.text("*")).select_from(sa.table(table))):
                # Text as UTF-8, bytes (MySQL's exact-text and body columns) as they are.
                chunks += [v if isinstance(v, bytes) else str(v).encode() for v in row]
    engine.dispose()
    assert chunks, "nothing stored: the search would prove nothing"
    return b"\n".join(chunks)


@pytest.mark.every_store
def test_the_key_never_reaches_logs_answers_database_or_cli(
    make_app: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    # SQLAlchemy keeps its loggers at WARNING unless told: statements, parameters and rows too.
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")
    built = make_app(
        NACHOCODE_WEBHOOK_KEY=[NEW_KEY, OLD_KEY],
        NACHOCODE_INSPECTOR=True,
        NACHOCODE_INSPECTOR_TOKEN=INSPECTOR_TOKEN,
        SECRET_KEY="session-secret-for-the-test",
        NACHOCODE_HEALTH_ROUTE=True,
        **METRICS_CONFIG,
    )
    app, ext = built

    @ext.on_purchase
    def crash_on_demand(event: Any) -> None:
        if event.user_id == "crash":
            raise RuntimeError("handler bug")

    @ext.on_refund
    def refuse(event: Any) -> None:
        raise Refuse("no such user", status=404)

    ext.on_unavailable_users(lambda event: None)

    client = app.test_client()
    purchase = purchase_payload()
    answers = [
        post_delivery(client, "purchase", purchase, key=NEW_KEY),
        post_delivery(client, "purchase", purchase, key=OLD_KEY),  # a duplicate
        post_delivery(client, "any", purchase_payload(), key=OLD_KEY),
        post_delivery(client, "purchase", purchase_payload(userId="crash"), key=NEW_KEY),
        post_delivery(client, "refund", refund_payload(), key=NEW_KEY),
        post_delivery(client, "unavailable_users", unavailable_users_payload(), key=NEW_KEY),
        post_delivery(client, "purchase", b'{"userId": 1}', key=NEW_KEY),
        post_delivery(client, "purchase", b"not json", key=NEW_KEY),
        # Wrong keys that contain the real one: if they were logged, the key would be too.
        post_delivery(client, "purchase", purchase_payload(), key=NEW_KEY + "x"),
        post_delivery(client, "purchase", purchase_payload(), key="x" + OLD_KEY),
        # Credentials in other headers are not stored either, nor the key that a
        # gateway copied into a header of its own (stored redacted, so it shows).
        client.post(
            URL,
            json=purchase_payload(),
            headers={
                "Authorization": f"bearer  {NEW_KEY} ",
                "Proxy-Authorization": f"Bearer {OLD_KEY}",
                "Cookie": f"key={NEW_KEY}",
                "X-Forwarded-Authorization": f"Bearer {NEW_KEY}",
                "X-Request-Id": "req-42",
            },
        ),
    ]
    statuses = [answer.status_code for answer in answers]
    assert statuses == [200, 200, 200, 500, 404, 200, 422, 400, 401, 401, 200]

    runner = app.test_cli_runner()
    outputs = [runner.invoke(args=["nachocode", "deliveries", "--limit", "100"]).output]
    assert delivery_rows(app) == 9
    headers = stored_deliveries(app)[-1].headers
    assert (headers["X-Forwarded-Authorization"], headers["X-Request-Id"]) == (REDACTED, "req-42")
    assert {"Authorization", "Proxy-Authorization", "Cookie"}.isdisjoint(headers)
    # Not 1 to 9: on PostgreSQL the crashed purchase's rolled-back record used up an id.
    stored = [row.id for row in stored_deliveries(app)]
    for number in stored:
        outputs.append(runner.invoke(args=["nachocode", "show", str(number)]).output)
    outputs.append(runner.invoke(args=["nachocode", "replay", "--failed"]).output)
    assert "handler bug" in "".join(outputs)  # the CLI really showed the stored details
    # The inspector's pages show the same deliveries, headers and bodies.
    pages = [client.get(f"/nachocode/deliveries?token={INSPECTOR_TOKEN}", follow_redirects=True)]
    pages += [client.get(f"/nachocode/deliveries/{number}") for number in stored]
    assert all(page.status_code == 200 for page in pages)
    assert b"handler bug" in b"".join(page.get_data() for page in pages)
    answers += pages
    # Nor what a scraper or a load balancer reads.
    scrape = client.get("/nachocode/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert b'nachocode_deliveries_total{event="purchase",outcome="handled"' in scrape.get_data()
    answers += [scrape, client.get("/nachocode/health")]

    searched = {
        "logs": caplog.text.encode(),
        "answers": b"".join(answer.get_data() + str(answer.headers).encode() for answer in answers),
        "database": database_text(built.url),
        "cli": "".join(outputs).encode() + capsys.readouterr().out.encode(),
    }
    assert b"SELECT" in searched["logs"] or b"INSERT" in searched["logs"]  # DEBUG capture worked
    for where, text in searched.items():
        count(f"security: {where} bytes searched", len(text))
        for key in (NEW_KEY, OLD_KEY):
            assert key.encode() not in text, where

    url = sa.engine.make_url(built.url)
    if url.get_backend_name() == "sqlite":
        # While connections are open the newest pages are in the -wal file; closing
        # the last one checkpoints them into the main file and removes it.
        database = Path(str(url.database))
        wal = database.with_name(database.name + "-wal")
        assert wal.stat().st_size > 0
        built.close()
        assert not wal.exists()
        for key in (NEW_KEY, OLD_KEY):
            assert key.encode() not in database.read_bytes()


@contextmanager
def flask_run(uri: str, folder: Path, keys: str) -> Iterator[tuple[str, int, Path]]:
    """The effects app under Werkzeug's development server (``flask run``)."""
    create_tables(uri)
    port = free_port()
    log = folder / "flask.log"
    env = {
        "NACHOCODE_WEBHOOK_KEY": keys,
        "EFFECTS_APP_DATABASE_URI": uri,
        "EFFECTS_APP_INSTANCE": str(folder),
        "EFFECTS_APP_LOG_LEVEL": "DEBUG",
    }
    args = flask_run_args("tests/support/effects_app.py:create_app()", port)
    with live_server(args, port=port, env=env, log_path=log) as url:
        yield url, port, log


@pytest.mark.integration
@pytest.mark.parametrize("server", ["gunicorn", "flask run"])
def test_server_output_never_shows_the_key(tmp_path: Path, server: str) -> None:
    uri = f"sqlite:///{tmp_path / 'keys.db'}"
    keys = f"{NEW_KEY},{OLD_KEY}"
    context = (
        serve(uri, 1, tmp_path, key=keys)
        if server == "gunicorn"
        else flask_run(uri, tmp_path, keys)
    )
    with context as (base_url, _, log):
        for key in (NEW_KEY, OLD_KEY, NEW_KEY + "x", "Basic " + OLD_KEY):
            for body in (purchase_payload(), {"userId": 1}):
                requests.post(
                    f"{base_url}{URL}",
                    json=body,
                    timeout=30,
                    headers={"Authorization": key if key.startswith("Basic") else f"Bearer {key}"},
                )
    output = log.read_bytes()
    count("security: server log bytes searched", len(output))
    # The log is real: requests and SQL statements with their parameters (the stored headers).
    assert b"/nachocode/webhooks/purchase" in output
    assert b"INSERT INTO nachocode_deliveries" in output
    for key in (NEW_KEY, OLD_KEY):
        assert key.encode() not in output

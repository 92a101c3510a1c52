"""Security: the key check (constant time, before parsing, on every route, rotation)
and the key never leaking into logs, answers, the database or the CLI."""

from __future__ import annotations

import hmac
import io
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import sqlalchemy as sa

from conftest import delivery_rows, stored_deliveries
from figures import count
from flask_nachocode import Refuse
from flask_nachocode import auth as nachocode_auth
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload, unavailable_users_payload
from live import flask_run_args, free_port, live_server
from reliability_app import serve

OLD_KEY = "old-key-3f9a8c1e"
NEW_KEY = "new-key-b27d05aa"


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


INSPECTOR_TOKEN = "inspector-token-5e0c11d2"


def webhook_rules(app: Any) -> list[str]:
    """Every webhook POST route the extension mounts (new ones are covered automatically);
    the inspector's routes have their own protection, tested below."""
    return sorted(
        rule.rule for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("nachocode.") and not rule.endpoint.startswith("nachocode.inspector")
        and "POST" in (rule.methods or ())
    )


def test_the_inspector_replay_refuses_without_its_token_and_the_csrf_token(make_app: Callable[..., Any]) -> None:
    app, ext = make_app(
        NACHOCODE_WEBHOOK_KEY=NEW_KEY, NACHOCODE_INSPECTOR=True, NACHOCODE_INSPECTOR_TOKEN=INSPECTOR_TOKEN,
        SECRET_KEY="session-secret-for-the-test",
    )
    calls: list[Any] = []

    @ext.on_purchase
    def fails_the_first_time(event: Any) -> None:
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("fails once")

    client = app.test_client()
    assert post_delivery(client, "purchase", purchase_payload()).status_code == 500
    replays = [rule.rule.replace("<int:delivery_id>", "1") for rule in app.url_map.iter_rules()
               if rule.endpoint.startswith("nachocode.inspector") and "POST" in (rule.methods or ())]
    assert replays
    for route in replays:
        # Neither the inspector token nor the CSRF token: nothing replayed. The webhook key opens nothing here.
        for headers in ({}, {"Authorization": f"Bearer {NEW_KEY}"}):
            response = client.post(route, headers=headers)
            count("security: unauthorised requests")
            assert response.status_code in (403, 404), response.status_code
        # With the inspector token but without the form's CSRF token: still refused.
        client.get(f"/nachocode/deliveries?token={INSPECTOR_TOKEN}")
        assert client.post(route).status_code == 400
    assert len(calls) == 1


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer wrong", f"Basic {NEW_KEY}", f"Bearer {NEW_KEY}x"])
def test_every_route_checks_the_key_before_reading_the_body(
    make_app: Callable[..., Any], authorization: str | None
) -> None:
    app, _ = make_app(NACHOCODE_WEBHOOK_KEY=NEW_KEY)
    client = app.test_client()
    routes = webhook_rules(app)
    assert len(routes) >= 4
    for route in routes:
        headers = {"Content-Type": "application/json", "Content-Length": "100"}
        if authorization is not None:
            headers["Authorization"] = authorization
        response = client.post(route, input_stream=UnreadableStream(), headers=headers)
        count("security: unauthorised requests")
        assert response.status_code == 401, (route, response.get_json())
        assert response.get_json()["success"] is False
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # A request without the key leaves no trace.
    assert delivery_rows(app) == 0


def test_every_key_is_compared_in_constant_time(make_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
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
        assert post_delivery(client, "purchase", purchase_payload(), key=key).status_code == expected
        # Both keys compared whichever matched: the time taken says nothing about which.
        assert compared == [(key.encode(), NEW_KEY.encode()), (key.encode(), OLD_KEY.encode())]


def test_key_rotation_with_a_list_of_keys(make_app: Callable[..., Any], tmp_path: Path) -> None:
    """The procedure SECURITY.md describes: add the new key, switch Nachocode, drop the old one."""
    handled: list[Any] = []
    steps = [([OLD_KEY], {OLD_KEY: 200, NEW_KEY: 401}),
             ([OLD_KEY, NEW_KEY], {OLD_KEY: 200, NEW_KEY: 200}),
             ([NEW_KEY], {OLD_KEY: 401, NEW_KEY: 200})]
    for keys, expected in steps:
        app, ext = make_app(NACHOCODE_WEBHOOK_KEY=keys)
        ext.on_purchase(handled.append)
        client = app.test_client()
        for key, status in expected.items():
            assert post_delivery(client, "purchase", purchase_payload(), key=key).status_code == status
    assert len(handled) == 4


def test_without_a_key_the_start_up_warning_is_logged(make_app: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        make_app(NACHOCODE_WEBHOOK_KEY=None, TESTING=False)
    assert "NACHOCODE_WEBHOOK_KEY is not set" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        make_app(TESTING=False)
    assert "NACHOCODE_WEBHOOK_KEY is not set" not in caplog.text


def database_text(url: str) -> bytes:
    """Everything the database holds, as bytes: SQLite's files (incl. -wal), a server's rows."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        files = [Path(parsed.database + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
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


def test_the_key_never_reaches_logs_answers_database_or_cli(
    make_app: Callable[..., Any], database_url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    # SQLAlchemy keeps its loggers at WARNING unless told: statements, parameters and rows too.
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")
    app, ext = make_app(
        NACHOCODE_WEBHOOK_KEY=[NEW_KEY, OLD_KEY], NACHOCODE_DATABASE_URI=database_url,
        NACHOCODE_INSPECTOR=True, NACHOCODE_INSPECTOR_TOKEN=INSPECTOR_TOKEN, SECRET_KEY="session-secret-for-the-test",
    )

    @ext.on_purchase
    def crash_on_demand(event: Any) -> None:
        if event.user_id == "crash":
            raise RuntimeError("handler bug")

    @ext.on_refund
    def refuse(event: Any) -> None:
        raise Refuse("no such user", status=404)

    ext.on_unavailable_users(lambda event: None)

    client = app.test_client()
    answers = [
        post_delivery(client, "purchase", purchase_payload(), key=NEW_KEY),
        post_delivery(client, "any", purchase_payload(), key=OLD_KEY),
        post_delivery(client, "purchase", purchase_payload(userId="crash"), key=NEW_KEY),
        post_delivery(client, "refund", refund_payload(), key=NEW_KEY),
        post_delivery(client, "unavailable_users", unavailable_users_payload(), key=NEW_KEY),
        post_delivery(client, "purchase", b'{"userId": 1}', key=NEW_KEY),
        post_delivery(client, "purchase", b"not json", key=NEW_KEY),
        # Wrong keys that contain the real one: if they were logged, the key would be too.
        post_delivery(client, "purchase", purchase_payload(), key=NEW_KEY + "x"),
        post_delivery(client, "purchase", purchase_payload(), key="x" + OLD_KEY),
        # Credentials in other headers are not stored either.
        client.post(
            "/nachocode/webhooks/purchase", json=purchase_payload(),
            headers={"Authorization": f"bearer  {NEW_KEY} ", "Proxy-Authorization": f"Bearer {OLD_KEY}",
                     "Cookie": f"key={NEW_KEY}"},
        ),
    ]
    assert [answer.status_code for answer in answers] == [200, 200, 500, 404, 200, 422, 400, 401, 401, 200]

    runner = app.test_cli_runner()
    outputs = [runner.invoke(args=["nachocode", "deliveries", "--limit", "100"]).output]
    assert delivery_rows(app) == 8
    # Not 1 to 8: on PostgreSQL the crashed purchase's rolled-back record used up an id.
    stored = [row.id for row in stored_deliveries(app)]
    outputs += [runner.invoke(args=["nachocode", "show", str(number)]).output for number in stored]
    outputs.append(runner.invoke(args=["nachocode", "replay", "--failed"]).output)
    assert "handler bug" in "".join(outputs)  # the CLI really showed the stored details
    # The inspector's pages show the same deliveries, headers and bodies.
    pages = [client.get(f"/nachocode/deliveries?token={INSPECTOR_TOKEN}", follow_redirects=True)]
    pages += [client.get(f"/nachocode/deliveries/{number}") for number in stored]
    assert all(page.status_code == 200 for page in pages) and b"handler bug" in b"".join(p.get_data() for p in pages)
    answers += pages

    searched = {
        "logs": caplog.text.encode(),
        "answers": b"".join(answer.get_data() + str(answer.headers).encode() for answer in answers),
        "database": database_text(database_url),
        "cli": "".join(outputs).encode() + capsys.readouterr().out.encode(),
    }
    assert b"SELECT" in searched["logs"] or b"INSERT" in searched["logs"]  # DEBUG capture really worked
    for where, text in searched.items():
        count(f"security: {where} bytes searched", len(text))
        for key in (NEW_KEY, OLD_KEY):
            assert key.encode() not in text, where


@contextmanager
def flask_run(uri: str, folder: Path, keys: str) -> Iterator[tuple[str, int, Path]]:
    """The reliability app under Werkzeug's development server (``flask run``)."""
    from reliability_app import create_tables

    create_tables(uri)
    port = free_port()
    log = folder / "flask.log"
    env = {"NACHOCODE_WEBHOOK_KEY": keys, "RELIABILITY_DATABASE_URI": uri,
           "RELIABILITY_INSTANCE": str(folder), "RELIABILITY_LOG_LEVEL": "DEBUG"}
    with live_server(flask_run_args("tests/reliability_app.py:create_app()", port), port=port, env=env, log_path=log) as url:
        yield url, port, log


@pytest.mark.parametrize("server", [serve, flask_run], ids=["gunicorn", "flask run"])
def test_server_output_never_shows_the_key(tmp_path: Path, server: Any) -> None:
    uri = f"sqlite:///{tmp_path / 'keys.db'}"
    context = serve(uri, 1, tmp_path, key=f"{NEW_KEY},{OLD_KEY}") if server is serve else flask_run(uri, tmp_path, f"{NEW_KEY},{OLD_KEY}")
    with context as (base_url, _, log):
        for key in (NEW_KEY, OLD_KEY, NEW_KEY + "x", "Basic " + OLD_KEY):
            for body in (purchase_payload(), {"userId": 1}):
                requests.post(
                    f"{base_url}/nachocode/webhooks/purchase", json=body, timeout=30,
                    headers={"Authorization": key if key.startswith("Basic") else f"Bearer {key}"},
                )
    output = log.read_bytes()
    count("security: server log bytes searched", len(output))
    # The log is real: requests and SQL statements with their parameters (the stored headers).
    assert b"/nachocode/webhooks/purchase" in output and b"INSERT INTO nachocode_deliveries" in output
    for key in (NEW_KEY, OLD_KEY):
        assert key.encode() not in output


def test_without_a_key_anyone_can_post_a_purchase(tmp_path: Path) -> None:
    """What running without a key exposes (README): a forged purchase is handled."""
    uri = f"sqlite:///{tmp_path / 'open.db'}"
    with serve(uri, 1, tmp_path, key=None) as (base_url, _, log):
        forged = requests.post(f"{base_url}/nachocode/webhooks/purchase", json=purchase_payload(userId="attacker"), timeout=30)
    assert forged.status_code == 200 and forged.json()["duplicate"] is False
    assert "NACHOCODE_WEBHOOK_KEY is not set" in log.read_text()

"""`flask nachocode send`, the HTTP sender: end to end against a real `flask run`
server (tests/support/served_app.py), as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_nachocode.sender import LAST_SENT_FILE

from support.common import FIXTURES, WEBHOOK_KEY
from support.live import BIN, ROOT, flask_run_args, free_port, live_server
from support.served_app import INSTANCE_ENV, KEY_ENV

pytestmark = pytest.mark.integration  # a real server, and a process per send

APP = "tests/support/served_app.py"

Send = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("instance")


@pytest.fixture(scope="module")
def app_env(instance: Path) -> dict[str, str]:
    return {INSTANCE_ENV: str(instance), KEY_ENV: WEBHOOK_KEY, "FLASK_APP": APP}


@pytest.fixture(scope="module")
def base_url(app_env: dict[str, str], instance: Path) -> Iterator[str]:
    port = free_port()
    with live_server(
        flask_run_args(APP, port), port=port, env=app_env, log_path=instance.parent / "server.log"
    ) as url:
        yield url


@pytest.fixture
def send(app_env: dict[str, str], base_url: str) -> Send:
    """Run `flask nachocode send ARGS...` as a user does, against the live app
    unless --url or --base-url is given."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(BIN / "flask"), "nachocode", "send", *args]
        if "--url" not in args and "--base-url" not in args:
            event = args[0]
            path = {"unavailable_users": "unavailable-users"}.get(event, event)
            command += ["--url", f"{base_url}/nachocode/webhooks/{path}"]
        return subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, **app_env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def handled(instance: Path) -> list[dict[str, Any]]:
    path = instance / "handled.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_sent(instance: Path, event: str) -> Any:
    return json.loads((instance / LAST_SENT_FILE).read_text())[event]


def answer_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON answer `send` printed after its POST and status lines."""
    lines = result.stdout.splitlines()
    return json.loads("\n".join(lines[2:]))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("event", "platform"),
    [
        ("purchase", "ios"),
        ("purchase", "android"),
        ("refund", "ios"),
        ("refund", "android"),
        ("unavailable_users", None),
    ],
)
def test_send_reaches_the_handler(
    send: Send, instance: Path, event: str, platform: str | None
) -> None:
    before = len(handled(instance))
    result = send(event, *(["--os", platform] if platform else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1].startswith("200 OK in ")
    answer = answer_of(result)
    assert answer["success"] is True
    assert answer["event"] == event
    assert answer["duplicate"] is False
    records = handled(instance)
    assert len(records) == before + 1
    assert records[-1]["event"] == event
    assert records[-1]["raw"] == last_sent(instance, event)
    if platform:
        assert records[-1]["raw"]["os"] == platform


def test_send_takes_the_urls_spelling_of_unavailable_users(send: Send, instance: Path) -> None:
    result = send("unavailable-users")
    assert result.returncode == 0, result.stdout + result.stderr
    assert answer_of(result)["event"] == "unavailable_users"
    assert handled(instance)[-1]["event"] == "unavailable_users"
    # Kept under the event's name: --repeat finds it whichever spelling sent it.
    assert send("unavailable_users", "--repeat").returncode == 0
    assert handled(instance)[-1]["raw"] == last_sent(instance, "unavailable_users")


def test_base_url_sends_to_the_route_of_the_event_on_that_server(
    send: Send, instance: Path, base_url: str
) -> None:
    # What a user under gunicorn types: the server's address, not each route's URL.
    before = len(handled(instance))
    result = send("unavailable-users", "--base-url", f"{base_url}/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"POST {base_url}/nachocode/webhooks/unavailable-users ")
    assert len(handled(instance)) == before + 1
    assert handled(instance)[-1]["event"] == "unavailable_users"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--base-url", "ftp://127.0.0.1"], "is not an http:// or https:// URL"),
        (["--url", "http://127.0.0.1:1/x"], "give it or --base-url, not both"),
    ],
)
def test_base_url_refuses_a_wrong_url_and_a_url_beside_it(
    send: Send, instance: Path, base_url: str, args: list[str], error: str
) -> None:
    before = handled(instance)
    result = send("purchase", *(["--base-url", base_url] if "--url" in args else []), *args)
    assert result.returncode == 2
    assert error in result.stderr
    assert handled(instance) == before


def test_each_send_is_a_new_delivery(send: Send, instance: Path) -> None:
    first = send("purchase")
    second = send("purchase")
    assert first.returncode == second.returncode == 0
    assert answer_of(second)["duplicate"] is False
    ids = [record["store_id"] for record in handled(instance)[-2:]]
    assert ids[0] != ids[1]


def test_repeat_is_a_duplicate_that_skips_the_handler(send: Send, instance: Path) -> None:
    assert send("purchase", "--os", "android").returncode == 0
    before = handled(instance)
    repeat = send("purchase", "--repeat")
    assert repeat.returncode == 0, repeat.stdout + repeat.stderr
    assert answer_of(repeat)["duplicate"] is True
    assert handled(instance) == before


def test_refund_refunds_the_last_purchase_on_its_platform(send: Send, instance: Path) -> None:
    assert send("purchase", "--os", "ios").returncode == 0
    purchase = last_sent(instance, "purchase")
    assert send("refund", "--os", "ios").returncode == 0
    refund = last_sent(instance, "refund")
    assert refund["data"] == purchase["data"]
    assert refund["iapLogId"] == purchase["iapLogId"]
    assert handled(instance)[-1]["store_id"] == purchase["data"]["transactionId"]
    # Another platform has no purchase to refund: a fresh one is made up.
    assert send("refund", "--os", "android").returncode == 0
    assert last_sent(instance, "refund")["data"]["orderId"] != purchase["data"]["transactionId"]


def test_set_reaches_nested_fields_and_keeps_types(send: Send, instance: Path) -> None:
    before = handled(instance)
    result = send("purchase", "--set", "userId.first=x")
    # A path through a string is refused before anything is sent.
    assert result.returncode == 2
    assert "userId.first: userId is not an object" in result.stderr
    assert handled(instance) == before
    result = send(
        "purchase",
        "--os",
        "android",
        "--set",
        "data.orderId=GPA.TEST-SET",
        "--set",
        "quantity=3",
        "--set",
        "price=9.99",
        "--set",
        'userId="42"',
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = handled(instance)[-1]
    assert record["store_id"] == "GPA.TEST-SET"
    assert record["quantity"] == 3
    assert record["price"] == "9.99"
    assert record["raw"]["userId"] == "42"


def test_set_a_wrong_type_shows_the_refusal(send: Send) -> None:
    result = send("purchase", "--set", "quantity=two")
    assert result.returncode == 1
    assert result.stdout.splitlines()[1].startswith("422 ")
    assert answer_of(result)["errors"] == {"quantity": ["Not a valid integer."]}


def test_file_is_sent_as_given(send: Send, instance: Path) -> None:
    result = send("refund", "--file", str(FIXTURES / "refund-android-partial.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert handled(instance)[-1]["raw"] == json.loads(
        (FIXTURES / "refund-android-partial.json").read_text()
    )


def test_wrong_key_exits_non_zero(send: Send, instance: Path) -> None:
    before = handled(instance)
    result = send("purchase", "--key", "not-the-key")
    assert result.returncode == 1
    assert result.stdout.splitlines()[1].startswith("401 ")
    assert answer_of(result)["error"] == "unauthorized"
    no_key = send("purchase", "--key", "")
    assert no_key.returncode == 1
    assert answer_of(no_key)["message"] == "missing Authorization: Bearer header"
    assert handled(instance) == before


def test_unreachable_url_exits_non_zero_with_a_clear_message(send: Send) -> None:
    url = f"http://127.0.0.1:{free_port()}/nachocode/webhooks/purchase"
    result = send("purchase", "--url", url)
    assert result.returncode == 1
    assert f"cannot reach {url}: connection refused" in result.stderr


def test_no_answer_within_10_seconds_exits_non_zero(send: Send) -> None:
    # A listener that accepts and never answers: what a hung app looks like.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
        thread.start()
        result = send("purchase", "--url", f"http://127.0.0.1:{port}/nachocode/webhooks/purchase")
        for connection in accepted:
            connection.close()
    assert result.returncode == 1
    assert "within 10 s" in result.stderr


def test_repeat_without_a_previous_body_is_refused(
    send: Send, tmp_path: Path, app_env: dict[str, str]
) -> None:
    result = subprocess.run(
        [str(BIN / "flask"), "nachocode", "send", "refund", "--repeat"],
        cwd=ROOT,
        env={**os.environ, **app_env, INSTANCE_ENV: str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "no refund body was sent from here yet" in result.stderr

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
    # So it is when the last purchase was no object (a --file body): a fresh one is made up.
    (instance / LAST_SENT_FILE).write_text(json.dumps({"purchase": [1]}))
    assert send("refund", "--os", "ios").returncode == 0
    assert last_sent(instance, "refund")["data"]["transactionId"].isdigit()


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


# Deeper than JSON nests in any supported Python (3.13 parses 5,000 levels, not 20,000),
# and short enough for one command-line argument (128 KiB on Linux).
DEEP = "[" * 50_000 + "]" * 50_000


def send_here(instance: Path, *args: str | bytes, **env: str) -> subprocess.CompletedProcess[str]:
    """`flask nachocode send ARGS...` with ``instance`` as the app's instance folder, no
    server needed; ARGS may be bytes, as a terminal passes what it was given."""
    return subprocess.run(
        [str(BIN / "flask"), "nachocode", "send", *args],
        cwd=ROOT,
        env={**os.environ, INSTANCE_ENV: str(instance), "FLASK_APP": APP, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://[::1"], "'http://[::1' is not a URL: Invalid IPv6 URL"),
        (["--url", "http://127.0.0.1:80a/x"], "its port is not a number from 0 to 65535"),
        (["--url", "http://127.0.0.1:99999/x"], "its port is not a number from 0 to 65535"),
        (["--url", "http://127.0.0.1:5000/a b"], "a space or a control character"),
        (["--url", "http://exa mple.com/"], "a space or a control character"),
        (["--url", "http://127.0.0.1:5000/a\x01b"], "a space or a control character"),
        (["--url", "http://127.0.0.1:5000/a\nb"], "a space or a control character"),
        (["--url", "http://127.0.0.1:5000/웹훅"], "percent-encode"),
        (["--url", b"http://\xff.example/"], "is not UTF-8 text"),
        (["--url", "http://:5000/x"], "has no host"),
        (["--key", "a\nb"], "a webhook key must not contain spaces or line breaks"),
        (["--key", "new key"], "a webhook key must not contain spaces or line breaks"),
        (["--key", b"\xff"], "is not UTF-8 text"),
        (["--set", b"userId=\xff"], "is not UTF-8 text"),
        (["--set", b"user\xffId=1"], "is not UTF-8 text"),
        (["--set", f"note={DEEP}"], "nested too deeply"),
        (["--set", ".".join(["a"] * 50_000) + "=1"], "nested too deeply"),
        (["--file", "DEEP_FILE"], "nested too deeply"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_bad_input_is_a_one_line_error_and_nothing_is_sent(
    tmp_path: Path, args: list[str | bytes], message: str
) -> None:
    deep_file = tmp_path / "deep.json"
    deep_file.write_text('{"a": ' + DEEP + "}")
    args = [str(deep_file) if arg == "DEEP_FILE" else arg for arg in args]
    # Where the body would go: a listener that would show any connection.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/nachocode/webhooks/purchase"
        with_url = args if "--url" in args else [*args, "--url", url]
        result = send_here(tmp_path, "purchase", *with_url)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ")
    assert message in error, result.stderr
    assert result.stdout == ""
    assert not (tmp_path / LAST_SENT_FILE).exists()  # nothing kept for --repeat either


@pytest.mark.parametrize(
    ("last_sent", "args", "message"),
    [
        ({"purchase": {"os": "ios"}}, ["refund"], "the last purchase sent from here has no"),
        ({"purchase": {"os": "ios", "data": 5}}, ["refund"], "the last purchase sent from"),
        ('{"purchase": ' + DEEP + "}", ["purchase", "--repeat"], "no purchase body was sent"),
    ],
    ids=["no-data", "data-not-an-object", "deep-repeat"],
)
def test_a_last_sent_body_that_cannot_be_used_is_a_one_line_error(
    tmp_path: Path, last_sent: Any, args: list[str], message: str
) -> None:
    saved = last_sent if isinstance(last_sent, str) else json.dumps(last_sent)
    (tmp_path / LAST_SENT_FILE).write_text(saved)
    result = send_here(tmp_path, *args, "--url", "http://127.0.0.1:9/nachocode/webhooks/refund")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr
    assert (tmp_path / LAST_SENT_FILE).read_text() == saved


def test_a_lone_surrogate_escape_in_a_file_is_sent_as_that_escape(
    send: Send, instance: Path, tmp_path: Path
) -> None:
    body = tmp_path / "lone.json"
    body.write_text(
        json.dumps({**json.loads((FIXTURES / "purchase-ios.json").read_text()), "note": "\ud800"})
    )
    result = send("purchase", "--file", str(body))
    assert result.returncode == 0, result.stdout + result.stderr
    assert handled(instance)[-1]["raw"]["note"] == "\ud800"
    assert last_sent(instance, "purchase")["note"] == "\ud800"
    repeat = send("purchase", "--repeat")
    assert repeat.returncode == 0, repeat.stdout + repeat.stderr
    assert answer_of(repeat)["duplicate"] is True


def test_a_key_beyond_ascii_is_sent_as_utf8(tmp_path: Path) -> None:
    """As the app compares it: the UTF-8 bytes of NACHOCODE_WEBHOOK_KEY."""
    seen: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/nachocode/webhooks/purchase"

        def answer() -> None:
            for _ in range(2):
                connection, _ = listener.accept()
                with connection:
                    request = connection.recv(65536)
                    seen.append(request.split(b"\r\n\r\n")[0])
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        given = send_here(tmp_path, "purchase", "--url", url, "--key", "키-1")
        configured = send_here(tmp_path, "purchase", "--url", url, **{KEY_ENV: "키-2"})
        thread.join(timeout=30)
    assert given.returncode == configured.returncode == 0, given.stderr + configured.stderr
    assert "Authorization: Bearer 키-1".encode() in seen[0].split(b"\r\n")
    assert "Authorization: Bearer 키-2".encode() in seen[1].split(b"\r\n")

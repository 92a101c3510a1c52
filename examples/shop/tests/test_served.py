"""The example coin shop as a real server (``flask --app examples/shop run``),
receiving the documented bodies with ``requests`` exactly as Nachocode sends
them, and its ``flask nachocode`` commands run against the same database."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from flask_nachocode.testing import purchase_payload

from support.common import POSTGRES_URL, load_fixture, reset_postgres
from support.live import BIN, ROOT, flask_run_args, free_port, live_server

pytestmark = pytest.mark.integration

KEY = "e2e-webhook-key"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shop_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The environment a user sets: the webhook key and where the database lives.
    One shop per database for the whole module: starting a server is the slow part."""
    if request.param == "sqlite":
        database_url = f"sqlite:///{tmp_path_factory.mktemp('shop') / 'shop.db'}"
    elif POSTGRES_URL:
        reset_postgres(POSTGRES_URL)
        database_url = POSTGRES_URL
    else:
        pytest.skip("NACHOCODE_TEST_POSTGRES_URL is not set; PostgreSQL tests skipped")
    return {"NACHOCODE_WEBHOOK_KEY": KEY, "FLASK_SQLALCHEMY_DATABASE_URI": database_url}


@pytest.fixture(scope="module")
def shop(shop_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("shop-log") / "server.log"
    with live_server(
        flask_run_args("examples/shop", port), port=port, env=shop_env, log_path=log_path
    ) as base_url:
        yield base_url


def balances(base_url: str, *users: str) -> dict[str, int]:
    found = requests.get(f"{base_url}/balances", timeout=10).json()
    return {user: coins for user, coins in found.items() if user in users}


def deliver(
    base_url: str, path: str, body: Any, *, key: str | None = KEY, **kwargs: Any
) -> requests.Response:
    """POST like Nachocode: JSON body, application/json, the key as a bearer token."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if not isinstance(body, dict) else json.dumps(body).encode()
    return requests.post(
        f"{base_url}/nachocode/webhooks{path}", data=data, headers=headers, timeout=10, **kwargs
    )


def flask_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flask"), "--app", "examples/shop", "nachocode", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_documented_bodies_move_coins(shop: str) -> None:
    steps = [
        ("/purchase", "purchase-ios", "purchase", {"testUser": 100}),
        ("/purchase", "purchase-android", "purchase", {"testUser": 100, "player-42": 1500}),
        ("/refund", "refund-android-partial", "refund", {"testUser": 100, "player-42": 1000}),
        ("", "refund-ios", "refund", {"testUser": 0, "player-42": 1000}),  # the all-events URL
    ]
    for path, fixture, event, expected in steps:
        response = deliver(shop, path, load_fixture(fixture))
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/json"
        answer = response.json()
        assert (answer["success"], answer["event"], answer["duplicate"]) == (True, event, False)
        assert balances(shop, "testUser", "player-42") == expected

    # A re-send from the dashboard's webhook log is acknowledged but grants nothing.
    again = deliver(shop, "", load_fixture("purchase-android"))
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert balances(shop, "testUser", "player-42") == {"testUser": 0, "player-42": 1000}

    for user in ("userId1", "userId3", "someone-else"):
        requests.post(f"{shop}/push-tokens/{user}/token-{user}", timeout=10).raise_for_status()
    response = deliver(shop, "/unavailable-users", load_fixture("unavailable-users"))
    assert response.status_code == 200
    assert response.json()["event"] == "unavailable_users"
    assert requests.get(f"{shop}/push-tokens", timeout=10).json() == {
        "someone-else": "token-someone-else"
    }


def test_refusals_over_the_wire(shop: str) -> None:
    body = purchase_payload(user_id="refusal-user", product_id="coins_500")
    unauthorized = deliver(shop, "/purchase", body, key=None)
    assert unauthorized.status_code == 401
    assert unauthorized.headers["WWW-Authenticate"].startswith("Bearer")
    assert deliver(shop, "/purchase", body, key="wrong").status_code == 401

    browsed = requests.get(f"{shop}/nachocode/webhooks/purchase", timeout=10)
    assert (browsed.status_code, browsed.json()["success"]) == (405, False)

    too_large = deliver(shop, "/purchase", b"{" + b" " * 70000 + b"}")
    assert (too_large.status_code, too_large.json()["error"]) == (413, "payload_too_large")
    # A chunked body has no Content-Length: the limit holds while reading it.
    endless = iter([b"{"] + [b" " * 8192] * 10 + [b"}"])
    chunked = deliver(shop, "/purchase", endless)
    assert (chunked.status_code, chunked.json()["error"]) == (413, "payload_too_large")

    nan = deliver(shop, "/purchase", b'{"price": NaN}')
    assert (nan.status_code, nan.json()["success"]) == (400, False)
    invalid = deliver(shop, "/purchase", {**body, "os": "android"})
    assert (invalid.status_code, sorted(invalid.json()["errors"])) == (
        422,
        ["data.orderId", "data.purchaseToken"],
    )
    assert balances(shop, "refusal-user") == {}

    chunked_ok = deliver(shop, "/purchase", iter([json.dumps(body).encode()]))
    assert chunked_ok.status_code == 200
    assert balances(shop, "refusal-user") == {"refusal-user": 500}


def test_the_cli_inspects_and_replays_the_shops_deliveries(
    shop: str, shop_env: dict[str, str]
) -> None:
    refused = deliver(shop, "/purchase", purchase_payload(user_id="cli-user", product_id="gems_10"))
    assert refused.status_code == 422
    assert refused.json()["message"] == "unknown product gems_10"
    delivery = refused.json()["delivery"]

    listed = flask_cli(shop_env, "deliveries", "--status", "refused")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [str(delivery)]

    shown = flask_cli(shop_env, "show", str(delivery))
    assert shown.returncode == 0, shown.stderr
    assert '"productId": "gems_10"' in shown.stdout
    assert "unknown product gems_10" in shown.stdout
    assert KEY not in shown.stdout

    # The product is still unknown: the replay is refused again, says why, and exits 1.
    replayed = flask_cli(shop_env, "replay", str(delivery))
    assert replayed.returncode == 1
    assert "refused (422)" in replayed.stdout
    assert "unknown product gems_10" in replayed.stdout
    assert balances(shop, "cli-user") == {}

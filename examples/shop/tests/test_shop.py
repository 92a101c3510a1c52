"""The coin shop's behaviour, through its webhook routes and its JSON pages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from flask_nachocode.testing import (
    post_delivery,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)
from shop import create_app

from support.common import drop_queue

COINS = "coins_500"  # 500 coins per unit


def balances(client: FlaskClient) -> dict[str, int]:
    return client.get("/balances").get_json()  # type: ignore[no-any-return]


def test_a_purchase_grants_coins(client: FlaskClient) -> None:
    response = post_delivery(
        client, "purchase", purchase_payload(user_id="ann", product_id=COINS, quantity=3)
    )
    assert response.status_code == 200
    assert response.get_json()["success"] is True
    assert balances(client) == {"ann": 1500}
    assert "ann" in client.get("/").get_data(as_text=True)


def test_a_partial_refund_takes_back_only_the_refunded_units(client: FlaskClient) -> None:
    purchase = purchase_payload(user_id="ann", product_id=COINS, quantity=3, os="android")
    post_delivery(client, "purchase", purchase)
    response = post_delivery(client, "refund", refund_payload(purchase, refund_quantity=1))
    assert response.status_code == 200
    assert balances(client) == {"ann": 1000}
    post_delivery(
        client,
        "refund",
        refund_payload(purchase, refund_quantity=2, refunded_at="2030-01-01T00:00:00.000Z"),
    )
    assert balances(client) == {"ann": 0}


def test_a_refund_of_more_than_was_bought_is_refused(client: FlaskClient) -> None:
    purchase = purchase_payload(user_id="ann", product_id=COINS, quantity=2)
    post_delivery(client, "purchase", purchase)
    post_delivery(client, "refund", refund_payload(purchase, refund_quantity=2))
    again = post_delivery(
        client,
        "refund",
        refund_payload(purchase, refund_quantity=1, refunded_at="2030-01-01T00:00:00.000Z"),
    )
    assert again.status_code == 422
    assert balances(client) == {"ann": 0}


def test_a_duplicate_purchase_is_not_granted_twice(client: FlaskClient) -> None:
    purchase = purchase_payload(user_id="ann", product_id=COINS)
    first = post_delivery(client, "purchase", purchase)
    again = post_delivery(client, "purchase", purchase)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.get_json()["duplicate"] is True
    assert balances(client) == {"ann": 500}


def test_an_unknown_product_is_refused_with_its_message(client: FlaskClient) -> None:
    response = post_delivery(
        client, "purchase", purchase_payload(user_id="ann", product_id="gems_10")
    )
    assert response.status_code == 422
    body = response.get_json()
    assert (body["success"], body["error"], body["message"]) == (
        False,
        "unknown_product",
        "unknown product gems_10",
    )
    assert balances(client) == {}


def test_unavailable_users_forget_their_push_tokens(client: FlaskClient) -> None:
    for user in ("ann", "bob", "cat"):
        assert client.post(f"/push-tokens/{user}/token-{user}").status_code == 200
    body = unavailable_users_payload(
        token_not_found_user_ids=["ann"], token_invalid_user_ids=["cat", "nobody"]
    )
    assert post_delivery(client, "unavailable_users", body).status_code == 200
    assert client.get("/push-tokens").get_json() == {"bob": "token-bob"}


def test_deliveries_without_the_key_are_refused(client: FlaskClient) -> None:
    response = post_delivery(
        client, "purchase", purchase_payload(product_id=COINS), key="not-the-key"
    )
    assert response.status_code == 401
    assert balances(client) == {}


def test_debug_mode_switches_the_inspector_on(tmp_path: Path) -> None:
    config = {"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'shop.db'}"}
    debug = create_app({**config, "DEBUG": True}).test_client()
    assert debug.get("/nachocode/deliveries").status_code == 200
    assert create_app(config).test_client().get("/nachocode/deliveries").status_code == 404


@pytest.mark.integration
def test_with_deferral_the_web_answers_202_and_the_worker_grants(tmp_path: Path) -> None:
    """The shop's documented way to run with deferral: the web and a real Celery worker
    (``celery -A examples.shop.worker worker``) on Redis."""
    redis_url = os.environ.get("NACHOCODE_TEST_REDIS_URL")
    if not redis_url:
        pytest.skip("NACHOCODE_TEST_REDIS_URL is not set; the shop's worker test skipped")
    # A queue of its own: other test runs may share the Redis database.
    queue = f"shop-{uuid.uuid4().hex[:12]}"
    database = f"sqlite:///{tmp_path / 'shop.db'}"
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": database,
            "NACHOCODE_WEBHOOK_KEY": "shop-test-key",
            "NACHOCODE_DEFERRED": True,
            "CELERY_BROKER_URL": redis_url,
        }
    )
    app.extensions["celery"].conf.task_default_queue = queue
    client = app.test_client()
    answer = post_delivery(client, "purchase", purchase_payload(user_id="ann", product_id=COINS))
    assert (answer.status_code, answer.get_json()["deferred"]) == (202, True)
    assert balances(client) == {}  # nothing is granted before a worker runs
    root = Path(__file__).resolve().parents[3]
    env = {
        **os.environ,
        "FLASK_NACHOCODE_DEFERRED": "true",
        "FLASK_CELERY_BROKER_URL": redis_url,
        "FLASK_SQLALCHEMY_DATABASE_URI": database,
        "NACHOCODE_WEBHOOK_KEY": "shop-test-key",
    }
    celery = Path(sys.executable).parent / "celery"
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [str(celery), "-A", "examples.shop.worker", "worker", "--pool", "solo", "-Q", queue,
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while balances(client) != {"ann": 500}:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        drop_queue(redis_url, queue)

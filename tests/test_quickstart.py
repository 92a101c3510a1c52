"""The quickstart's app (examples/minimal.py) works as the manual shows it.

The app is loaded the way ``flask --app examples/minimal.py`` loads it, and the
commands the quickstart prints are run as a user runs them, from the repository root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Flask
from flask.cli import ScriptInfo

from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload

ROOT = Path(__file__).parent.parent
APP = "examples/minimal.py"


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # The app reads FLASK_* variables, so the test needs no change to the file.
    uri = f"sqlite:///{tmp_path / 'minimal.db'}"
    monkeypatch.setenv("FLASK_SQLALCHEMY_DATABASE_URI", uri)
    monkeypatch.delenv("NACHOCODE_WEBHOOK_KEY", raising=False)
    return uri


@pytest.fixture
def app(database: str, monkeypatch: pytest.MonkeyPatch) -> Flask:
    monkeypatch.chdir(ROOT)
    return ScriptInfo(app_import_path=APP).load_app()


def coins(app: Flask, user_id: str) -> int:
    response = app.test_client().get(f"/coins/{user_id}")
    assert response.status_code == 200
    return int(response.json["coins"])


def test_a_purchase_grants_coins_once(app: Flask) -> None:
    client = app.test_client()
    body = purchase_payload(user_id="alice", quantity=2)

    first = post_delivery(client, "purchase", body)
    assert first.status_code == 200
    assert first.json["duplicate"] is False
    assert coins(app, "alice") == 200

    # The Nachocode dashboard can re-send a delivery: it must not grant twice.
    again = post_delivery(client, "purchase", body)
    assert again.status_code == 200
    assert again.json["duplicate"] is True
    assert coins(app, "alice") == 200


def test_a_refund_takes_the_coins_back(app: Flask) -> None:
    client = app.test_client()
    purchase = purchase_payload(os="android", user_id="bob", quantity=3)
    post_delivery(client, "purchase", purchase)

    answer = post_delivery(client, "refund", refund_payload(purchase, refund_quantity=1))
    assert answer.status_code == 200
    assert coins(app, "bob") == 200


def test_the_key_is_required(app: Flask) -> None:
    answer = post_delivery(app.test_client(), "purchase", purchase_payload(), key="wrong")
    assert answer.status_code == 401
    assert coins(app, "test-user") == 0


def test_the_quickstart_commands_run_from_the_repository_root(app: Flask, database: str) -> None:
    post_delivery(app.test_client(), "purchase", purchase_payload(user_id="carol"))
    flask = [sys.executable, "-m", "flask", "--app", APP, "nachocode"]
    env = {**os.environ, "FLASK_SQLALCHEMY_DATABASE_URI": database}

    urls = subprocess.run(
        [*flask, "urls"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert "http://127.0.0.1:5000/nachocode/webhooks/purchase" in urls.stdout

    listed = subprocess.run(
        [*flask, "deliveries"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert "purchase" in listed.stdout
    assert "handled" in listed.stdout
    assert "carol" in listed.stdout


def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's example is a trimmed copy of examples/minimal.py: saved as a file and
    # loaded as `flask --app coins.py` would, it must run as printed.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (source,) = re.findall(r"^```python\n(.*?)^```", readme, flags=re.M | re.S)
    (tmp_path / "coins.py").write_text(source, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NACHOCODE_WEBHOOK_KEY", "readme-key")
    monkeypatch.delenv("FLASK_SQLALCHEMY_DATABASE_URI", raising=False)
    monkeypatch.delitem(sys.modules, "coins", raising=False)
    app = ScriptInfo(app_import_path="coins.py").load_app()

    client = app.test_client()
    body = purchase_payload(user_id="dana", quantity=3)
    assert post_delivery(client, "purchase", body).json["duplicate"] is False
    assert post_delivery(client, "purchase", body).json["duplicate"] is True
    refund = refund_payload(body, refund_quantity=1)
    assert post_delivery(client, "refund", refund).status_code == 200
    assert (tmp_path / "instance" / "coins.db").exists()
    with app.app_context():
        module = sys.modules["coins"]
        assert module.db.session.get(module.Wallet, "dana").coins == 200

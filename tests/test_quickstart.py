"""A newcomer's first run: the README's commands and the quickstart's app
(examples/minimal.py) work as printed.

The app is loaded the way ``flask --app examples/minimal.py`` loads it, and the
commands the quickstart and the README print are run as a user runs them, from the
repository root (the README's, in a fresh copy of the repository).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from flask.cli import ScriptInfo

from flask_nachocode import ExactText
from flask_nachocode.testing import post_delivery, purchase_payload, refund_payload

from support.common import load_fixture
from support.live import free_port, live_server

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


def readme_commands(readme: str, heading: str) -> list[str]:
    """The ``sh`` blocks of one section of a README, as a reader copies them."""
    section = readme.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```", section, flags=re.M | re.S)


def a_fresh_shell() -> dict[str, str]:
    """A newcomer's environment: none of this project's variables, no virtualenv active."""
    here = str(Path(sys.executable).parent)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FLASK_", "NACHOCODE_", "PYTHON")) and name != "VIRTUAL_ENV"
    }
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != here)
    return env


@pytest.mark.integration
@pytest.mark.once  # pip and a server, once: what pip resolves is not the matrix's concern
def test_the_readmes_first_run_works_as_printed(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start_the_shop, send_a_purchase = readme_commands(readme, "## Run the example shop")
    # What a clone holds: the sources, without this checkout's virtualenv, database or caches.
    clone = tmp_path / "flask-nachocode"
    shutil.copytree(
        ROOT,
        clone,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "instance",
            "_build",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            "test-artifacts",
            "dist",
            "build",
        ),
    )
    port = free_port()
    # FLASK_RUN_PORT and FLASK_NACHOCODE_SEND_BASE_URL are `flask run --port` and
    # `send --base-url`, read from the environment: the commands run as printed, on a
    # port of the test's own instead of 5000.
    shell = {**a_fresh_shell(), "FLASK_RUN_PORT": str(port)}
    with live_server(
        ["bash", "-c", start_the_shop],
        port=port,
        env=shell,
        cwd=clone,
        process_group=True,
        timeout=600,  # creating the virtualenv and installing come first
        log_path=tmp_path / "shop.log",
    ) as base_url:
        sent = subprocess.run(
            ["bash", "-c", send_a_purchase],
            cwd=clone,
            env={**shell, "FLASK_NACHOCODE_SEND_BASE_URL": base_url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.splitlines()[1].startswith("200 OK")
        answer = json.loads("\n".join(sent.stdout.splitlines()[2:]))
        assert answer["duplicate"] is False

        # "The delivery inspector at http://127.0.0.1:5000/nachocode/deliveries then shows it."
        (inspector,) = re.findall(r"<http://127\.0\.0\.1:5000(/nachocode/deliveries)>", readme)
        listed = requests.get(base_url + inspector, timeout=10)
        assert listed.status_code == 200
        assert f"{inspector}/{answer['delivery']}" in listed.text
        page = requests.get(f"{base_url}{inspector}/{answer['delivery']}", timeout=10)
        body = json.loads(
            (clone / "examples" / "instance" / "nachocode-last-sent.json").read_text()
        )
        assert str(body["purchase"]["iapLogId"]) in page.text

        # The key the README names is the shop's: Nachocode's own example purchase gets in with it.
        (key,) = re.findall(r"The shop's webhook key is `([^`]+)`", readme)
        assert f"`{key}`" in (ROOT / "README.ko.md").read_text(encoding="utf-8")
        posted = requests.post(
            f"{base_url}/nachocode/webhooks/purchase",
            json=load_fixture("purchase-ios"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert posted.status_code == 200, posted.text


def test_the_quickstart_gives_the_same_first_run_as_the_readme() -> None:
    # The README's first run is tested above; the manual's copy must not drift from it.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = (ROOT / "docs" / "quickstart.rst").read_text(encoding="utf-8")
    for command in readme_commands(readme, "## Run the example shop"):
        assert f"   {command.strip()}\n" in quickstart
    (key,) = re.findall(r"The shop's webhook key is `([^`]+)`", readme)
    assert f"The shop's webhook key is ``{key}``" in quickstart


def test_ci_runs_the_readmes_test_command() -> None:
    # The README's other command, run as printed on a fresh checkout by .ci/run's last step.
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("no .ci/ here (an sdist)")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (command,) = readme_commands(readme, "## Run the tests")
    assert command.strip() in ci.read_text().splitlines()


@pytest.mark.integration
@pytest.mark.once
@pytest.mark.every_database
@pytest.mark.parametrize("example", ["quickstart", "readme"])
def test_the_examples_under_gunicorn_preload_with_four_workers(
    database_url: str, tmp_path: Path, example: str
) -> None:
    # The path teams deploy by: the app touches the database at import (create_all),
    # and gunicorn --preload imports it once, in the master, before forking four
    # workers. Every worker must open connections of its own: sharing the master's
    # answered 503s and hung on PostgreSQL and MariaDB. The quickstart's app reads its
    # database from the environment; the README's code, as written, is SQLite only.
    if example == "readme":
        if not database_url.startswith("sqlite"):
            pytest.skip("the README's code names its SQLite database")
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        (source,) = re.findall(r"^```python\n(.*?)^```", readme, flags=re.M | re.S)
        (tmp_path / "coins.py").write_text(source, encoding="utf-8")
        folder, target = tmp_path, "coins:app"
        database_url = f"sqlite:///{tmp_path / 'instance' / 'coins.db'}"
    else:
        folder, target = ROOT / "examples", "minimal:create_app()"
    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    env = {"FLASK_SQLALCHEMY_DATABASE_URI": database_url, "NACHOCODE_WEBHOOK_KEY": "fork-key"}
    args = [
        str(Path(sys.executable).parent / "gunicorn"),
        "--preload", "--workers", "4", "--bind", f"127.0.0.1:{port}", "--timeout", "60",
        "--chdir", str(folder), target,
    ]  # fmt: skip
    users = [f"forked-{n}" for n in range(12)]
    purchases = [purchase_payload(user_id=users[n % 12], quantity=1) for n in range(120)]
    # Each user's first purchase alone: two first purchases of one new user at the
    # same moment would race to create the wallet, a limit of the example's handler.
    first, burst = purchases[:12], purchases[12:] + purchases[::3]  # 40 of them twice

    def send(body: dict[str, object]) -> tuple[int, object]:
        answer = requests.post(
            f"{base_url}/nachocode/webhooks/purchase",
            data=json.dumps(body),
            headers={"Authorization": "Bearer fork-key", "Content-Type": "application/json"},
            timeout=30,
        )
        return answer.status_code, answer.json().get("duplicate")

    with live_server(args, port=port, env=env, log_path=log_path) as base_url:
        answers = [send(body) for body in first]
        with ThreadPoolExecutor(max_workers=12) as pool:
            answers += pool.map(send, burst)
    # Read as the apps declare it: ExactText is binary on MySQL.
    wallet = sa.Table(
        "wallet",
        sa.MetaData(),
        sa.Column("user_id", ExactText(255)),
        sa.Column("coins", sa.Integer),
    )
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        coins = dict(connection.execute(sa.select(wallet.c.user_id, wallet.c.coins)).all())
    engine.dispose()
    log = log_path.read_text(errors="replace")
    assert [status for status, _ in answers] == [200] * 160, log[-3000:]
    assert sum(1 for _, duplicate in answers if duplicate is False) == len(purchases)
    assert coins == dict.fromkeys(users, 100 * 10)  # each purchase granted once
    assert "Traceback" not in log, log[-3000:]
    assert "Error" not in log, log[-3000:]

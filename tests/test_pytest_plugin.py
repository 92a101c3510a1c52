"""The pytest plugin's fixtures, used as an app's own tests use them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_nachocode import NachocodeWebhook, PurchaseEvent, RefundEvent, UnavailableUsersEvent

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
KEY = "plugin-test-key"


@pytest.fixture
def received() -> list[Any]:
    return []


@pytest.fixture
def app(tmp_path: Path, received: list[Any]) -> Flask:
    """A user's app: the only fixture the plugin asks for."""
    app = Flask("plugin_user_app")
    app.config.update(
        TESTING=True,
        NACHOCODE_WEBHOOK_KEY=KEY,
        NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / 'nachocode.db'}",
    )
    nachocode = NachocodeWebhook(app)
    nachocode.on_purchase(received.append)
    nachocode.on_refund(received.append)
    nachocode.on_unavailable_users(received.append)
    return app


@pytest.mark.parametrize("event", ["purchase", "refund", "unavailable_users"])
def test_post_without_a_body_delivers_a_fresh_valid_one(
    nachocode_post: Any, received: list[Any], event: str
) -> None:
    first = nachocode_post(event)
    second = nachocode_post(event)
    assert first.status_code == second.status_code == 200
    assert first.json["duplicate"] is second.json["duplicate"] is False
    assert [type(one).name for one in received] == [event, event]
    assert received[0].raw != received[1].raw


@pytest.mark.parametrize("platform", ["android", "ios"])
def test_payload_overrides_reach_the_handler(
    nachocode_payloads: Any, nachocode_post: Any, received: list[Any], platform: str
) -> None:
    body = nachocode_payloads.purchase(os=platform, user_id="u-1", quantity=3, price=4.99)
    assert nachocode_post("purchase", body).status_code == 200
    (event,) = received
    assert isinstance(event, PurchaseEvent)
    assert (event.os, event.user_id, event.quantity, str(event.price)) == (
        platform,
        "u-1",
        3,
        "4.99",
    )
    assert event.raw == body


def test_the_same_body_twice_is_a_duplicate_handled_once(
    nachocode_payloads: Any, nachocode_post: Any, received: list[Any]
) -> None:
    body = nachocode_payloads.purchase()
    assert nachocode_post("purchase", body).json["duplicate"] is False
    assert nachocode_post("purchase", body).json["duplicate"] is True
    assert len(received) == 1


def test_a_refund_of_a_purchase_names_the_same_store_purchase(
    nachocode_payloads: Any, nachocode_post: Any, received: list[Any]
) -> None:
    purchase = nachocode_payloads.purchase(os="android", quantity=2)
    refund = nachocode_payloads.refund(purchase, refund_quantity=1)
    nachocode_post("purchase", purchase)
    assert nachocode_post("refund", refund).status_code == 200
    bought, refunded = received
    assert isinstance(refunded, RefundEvent)
    assert refunded.store_purchase_id == bought.store_purchase_id
    assert refunded.refund_quantity == 1


def test_the_all_events_url_and_for_event(
    nachocode_payloads: Any, nachocode_post: Any, received: list[Any]
) -> None:
    body = nachocode_payloads.for_event("unavailable_users", token_invalid_user_ids=["gone"])
    answer = nachocode_post("any", body)
    assert answer.status_code == 200
    assert answer.json["event"] == "unavailable_users"
    (event,) = received
    assert isinstance(event, UnavailableUsersEvent)
    assert event.token_invalid_user_ids == ["gone"]


def test_a_wrong_key_is_refused_before_any_handler(
    nachocode_post: Any, received: list[Any]
) -> None:
    answer = nachocode_post("purchase", key="not-the-key")
    assert answer.status_code == 401
    assert answer.json["error"] == "unauthorized"
    assert received == []


def test_a_bad_body_answers_the_field_errors(nachocode_payloads: Any, nachocode_post: Any) -> None:
    answer = nachocode_post("refund", nachocode_payloads.refund(quantity=1, refund_quantity=2))
    assert answer.status_code == 422
    assert answer.json["errors"] == {"refundQuantity": ["Must not exceed quantity."]}


def manual_example() -> str:
    """The complete test shown on the manual's Testing page, as a reader copies it."""
    page = (ROOT / "docs" / "testing.rst").read_text()
    section = page.split("A complete test of the example shop's handlers:", 1)[1]
    match = re.search(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", section)
    assert match, "the manual's pytest example is missing"
    return textwrap.dedent(match.group(1))


def test_the_manual_example_passes_with_the_installed_plugin(pytester: pytest.Pytester) -> None:
    # In a subprocess with a fresh interpreter: the plugin must come from the
    # installed entry point, and the example shop's module globals stay its own.
    pytester.makepyfile(test_shop_coins=manual_example())
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--rootdir={pytester.path}", "-o", f"pythonpath={ROOT}"
    )
    result.assert_outcomes(passed=3)


def manual_files(section_title: str) -> dict[str, str]:
    """The files a section of the manual's Testing page shows, by their captions."""
    page = (ROOT / "docs" / "testing.rst").read_text()
    section = page.split(f"\n{section_title}\n", 1)[1].split("\n---", 1)[0]
    blocks = re.findall(r"\.\. code-block:: \w+\n   :caption: (\S+)\n\n((?:   .*\n|\n)+)", section)
    return {name: textwrap.dedent(text) for name, text in blocks}


@pytest.mark.parametrize("configured", [True, False], ids=["pythonpath", "without"])
def test_a_new_apps_tests_run_with_a_plain_pytest(tmp_path: Path, configured: bool) -> None:
    files = manual_files("A new app's tests")
    assert set(files) == {"pyproject.toml", "tests/conftest.py", "tests/test_coins.py"}
    if not configured:  # the failure the page's configuration is there to prevent
        files["pyproject.toml"] = files["pyproject.toml"].replace('pythonpath = ["."]', "")
    project = tmp_path / "coins"
    (project / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "minimal.py", project / "coins.py")
    for name, text in files.items():
        (project / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FLASK_"))}
    # `pytest` itself, run from the project's root, as the page says; not `python -m pytest`.
    result = subprocess.run(
        [str(Path(sys.executable).parent / "pytest"), "-p", "no:cacheprovider"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if configured:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 passed" in result.stdout
    else:
        assert result.returncode != 0
        assert "No module named 'coins'" in result.stdout + result.stderr


def test_post_without_an_app_fixture_says_what_is_missing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_it(nachocode_post):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*nachocode_post needs an `app` fixture that returns your Flask app*"]
    )


def test_the_plugin_can_be_switched_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_it(nachocode_payloads):\n    pass\n")
    result = pytester.runpytest("-p", "no:flask_nachocode")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'nachocode_payloads' not found*"])

"""schemathesis against the example shop served by `flask run`, with the app's
own OpenAPI document: no 500 for any generated input, every answer as documented.

Bounded for CI: MAX_EXAMPLES cases per operation and phase, one worker, a fixed
seed (the same cases each run, so CI is not flaky; change SCHEMATHESIS_SEED to
explore). The full output goes to test-artifacts/schemathesis-<database>.txt.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import load_fixture
from live import BIN, ROOT, flask_run_args, free_port, live_server

from flask_nachocode.testing import post_delivery

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
SEED = os.environ.get("SCHEMATHESIS_SEED", "1")
SHOP_KEY = "schemathesis-key"

CHECKS = [
    "--checks", "all",
    # The shop refuses products it does not sell (422 unknown_product), a business
    # rule the document cannot know: schema-valid bodies are not all accepted.
    "--exclude-checks", "positive_data_acceptance",
]


def test_generated_deliveries_get_documented_answers_and_no_500(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    port = free_port()
    app = f"examples.shop:create_app({{'SQLALCHEMY_DATABASE_URI': {database_url!r}}})"
    with live_server(
        flask_run_args(app, port), port=port, env={"NACHOCODE_WEBHOOK_KEY": SHOP_KEY},
        log_path=tmp_path / "server.log",
    ) as base_url:
        result = subprocess.run(
            [
                str(BIN / "schemathesis"), "run", f"{base_url}/nachocode/openapi.json",
                "--header", f"Authorization: Bearer {SHOP_KEY}",
                *CHECKS,
                "--max-examples", str(MAX_EXAMPLES), "--seed", SEED, "--workers", "1",
                "--request-timeout", "10",  # Nachocode's limit
                "--report", "junit", "--report-dir", str(tmp_path / "report"),
            ],
            cwd=tmp_path, capture_output=True, text=True, timeout=540,
            env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"},
        )
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    database = request.node.callspec.params["database_url"]
    (artifacts / f"schemathesis-{database}.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated, result.stdout[-2000:]
    # Bounded, yet enough to mean something: every operation got many cases.
    assert int(generated.group(1)) >= 4 * MAX_EXAMPLES
    print(f"schemathesis on {database}: {generated.group(1)} cases generated")



@pytest.mark.parametrize(
    "event, body",
    [
        ("purchase", {**load_fixture("purchase-ios"), "requestedAt": "0001-01-01T00:00:00+03:04"}),
        ("unavailable_users", {"tokenNotFoundUserIds": ["user\x00"], "tokenInvalidUserIds": []}),
    ],
)
def test_inputs_found_while_fuzzing_are_refused_and_recorded(
    make_app: Callable[..., Any], database_url: str, event: str, body: dict[str, Any]
) -> None:
    # A year-1 timestamp with a positive offset overflowed (a 500, found by
    # schemathesis); a NUL in a push user id reached the handlers, where PostgreSQL
    # refuses it as a query parameter (a 500 for the app's handler).
    app, ext = make_app(NACHOCODE_DATABASE_URI=database_url)
    handled: list[Any] = []
    ext.handler(event)(handled.append)
    answer = post_delivery(app.test_client(), event, body)
    assert answer.status_code == 422
    assert handled == []
    with app.app_context():
        row = app.extensions["nachocode"].store.get_delivery(answer.json["delivery"])
    assert row is not None and row.outcome == "invalid"

"""The OpenAPI document at {prefix}/openapi.json: served, complete, and true to
what the routes accept and answer. Then (marked ``integration``) schemathesis
against the example shop served by ``flask run``, with the app's own document:
no 500 for any generated input, every answer as documented.

schemathesis is bounded for CI: MAX_EXAMPLES cases per operation and phase, one
worker, a fixed seed (the same cases each run, so CI is not flaky; change
SCHEMATHESIS_SEED to explore). Its full output goes to
test-artifacts/schemathesis-<database>.txt.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from flask_nachocode.schemas import SCHEMAS
from flask_nachocode.testing import payload_for, post_delivery, purchase_payload

from support.common import WEBHOOK_KEY, load_fixture
from support.live import BIN, ROOT, flask_run_args, free_port, live_server

MakeApp = Callable[..., Any]

#: The answers table of the README: every status a webhook route can answer.
ANSWERS = {"200", "400", "401", "413", "415", "422", "500", "501", "503"}
ROUTES = ["/webhooks/purchase", "/webhooks/refund", "/webhooks/unavailable-users", "/webhooks"]


def fetch_document(app: Any, prefix: str = "/nachocode") -> dict[str, Any]:
    response = app.test_client().get(f"{prefix}/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.json  # type: ignore[no-any-return]


def validator(document: dict[str, Any], component: str) -> Any:
    """A JSON Schema 2020-12 validator (the dialect of OpenAPI 3.1) for one component."""
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{component}", "components": document["components"]}
    )


def test_the_document_describes_each_route_under_the_prefix(make_app: MakeApp) -> None:
    app, _ = make_app(NACHOCODE_URL_PREFIX="/hooks/nacho/")
    document = fetch_document(app, "/hooks/nacho")
    assert document["openapi"] == "3.1.0"
    assert sorted(document["paths"]) == sorted(f"/hooks/nacho{route}" for route in ROUTES)
    for path in document["paths"].values():
        assert list(path) == ["post"]
        assert path["post"]["requestBody"]["required"] is True


def test_every_answer_of_the_table_is_documented_with_its_body(make_app: MakeApp) -> None:
    app, _ = make_app()
    document = fetch_document(app)
    for path in document["paths"].values():
        responses = path["post"]["responses"]
        assert set(responses) >= ANSWERS
        assert responses["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/HandledAnswer"
        }
        error_answer = {"$ref": "#/components/schemas/ErrorAnswer"}
        # A 422 always names what is wrong in `errors`.
        assert responses["422"]["content"]["application/json"]["schema"] == {
            "allOf": [error_answer, {"required": ["errors"]}]
        }
        for status in set(responses) - {"200", "422"}:
            assert responses[status]["content"]["application/json"]["schema"] == error_answer
        assert path["post"]["security"] == [{"webhookKey": []}]
    assert document["components"]["securitySchemes"] == {
        "webhookKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "The webhook key set in the Nachocode dashboard.",
        }
    }


def test_without_a_key_there_is_no_security_and_no_401(make_app: MakeApp) -> None:
    app, _ = make_app(NACHOCODE_WEBHOOK_KEY=None)
    document = fetch_document(app)
    assert "securitySchemes" not in document["components"]
    for path in document["paths"].values():
        assert "security" not in path["post"]
        assert "401" not in path["post"]["responses"]


def test_the_route_needs_no_key_and_can_be_switched_off(make_app: MakeApp) -> None:
    app, _ = make_app()
    assert app.test_client().get("/nachocode/openapi.json", headers={}).status_code == 200
    app, _ = make_app(NACHOCODE_OPENAPI=False)
    assert app.test_client().get("/nachocode/openapi.json").status_code == 404


@pytest.mark.parametrize(
    ("event", "component"),
    [("purchase", "Purchase"), ("refund", "Refund"), ("unavailable_users", "UnavailableUsers")],
)
def test_bodies_come_from_the_marshmallow_schemas(
    make_app: MakeApp, event: str, component: str
) -> None:
    app, _ = make_app()
    schema = fetch_document(app)["components"]["schemas"][component]
    fields = SCHEMAS[event].fields
    assert set(schema["properties"]) == set(fields)
    assert set(schema["required"]) == {name for name, field in fields.items() if field.required}


@pytest.mark.parametrize(
    ("component", "body"),
    [
        ("Purchase", load_fixture("purchase-ios")),
        ("Purchase", load_fixture("purchase-android")),
        ("Refund", load_fixture("refund-ios")),
        ("Refund", load_fixture("refund-android-partial")),
        ("UnavailableUsers", load_fixture("unavailable-users")),
        ("Purchase", payload_for("purchase", os="android")),
        ("Refund", payload_for("refund", os="ios")),
    ],
)
def test_what_nachocode_sends_is_valid_by_the_document(
    make_app: MakeApp, component: str, body: Any
) -> None:
    app, _ = make_app()
    assert validator(fetch_document(app), component).is_valid(body)


@pytest.mark.parametrize(
    "change",
    [
        {"os": "android"},  # App Store data under android
        {"quantity": "1"},
        {"price": -1},
        {"purchasedAt": "2025-02-19T02:00:31"},  # no zone
        {"environment": "staging"},
        {"userId": "user\x00"},
    ],
)
def test_what_the_routes_refuse_is_invalid_by_the_document(
    make_app: MakeApp, change: dict[str, Any]
) -> None:
    app, _ = make_app()
    body = {**load_fixture("purchase-ios"), **change}
    assert not validator(fetch_document(app), "Purchase").is_valid(body)
    assert post_delivery(app.test_client(), "purchase", body).status_code == 422


def test_real_answers_match_their_documented_bodies(make_app: MakeApp) -> None:
    app, ext = make_app()
    ext.on_purchase(lambda event: None)
    document = fetch_document(app)
    client = app.test_client()
    handled = post_delivery(client, "purchase", purchase_payload())
    invalid = post_delivery(client, "purchase", {"userId": 1})
    no_handler = post_delivery(client, "refund", payload_for("refund"))
    refused = post_delivery(client, "any", "[]")
    unauthorized = post_delivery(client, "purchase", purchase_payload(), key="wrong")
    assert [
        handled.status_code,
        invalid.status_code,
        no_handler.status_code,
        refused.status_code,
        unauthorized.status_code,
    ] == [200, 422, 501, 400, 401]
    validator(document, "HandledAnswer").validate(handled.json)
    for answer in (invalid, no_handler, refused, unauthorized):
        validator(document, "ErrorAnswer").validate(answer.json)


def test_the_documents_examples_are_valid_and_handled(make_app: MakeApp) -> None:
    app, ext = make_app()
    received: list[Any] = []
    for event in ("purchase", "refund", "unavailable_users"):
        ext.handler(event)(received.append)
    document = fetch_document(app)
    client = app.test_client()
    count = 0
    for path, operations in document["paths"].items():
        content = operations["post"]["requestBody"]["content"]["application/json"]
        for example in content.get("examples", {}).values():
            assert validator(document, content["schema"]["$ref"].rsplit("/", 1)[1]).is_valid(
                example["value"]
            )
            answer = client.post(
                path, json=example["value"], headers={"Authorization": f"Bearer {WEBHOOK_KEY}"}
            )
            assert answer.status_code == 200, answer.json
            count += 1
    assert count == len(received) == 5  # purchase and refund on each platform, unavailable_users


# -- schemathesis against the example shop (integration) --------------------------------

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
SEED = os.environ.get("SCHEMATHESIS_SEED", "1")
SHOP_KEY = "schemathesis-key"

CHECKS = [
    "--checks",
    "all",
    # The shop refuses products it does not sell (422 unknown_product), a business
    # rule the document cannot know: schema-valid bodies are not all accepted.
    "--exclude-checks",
    "positive_data_acceptance",
]


@pytest.mark.integration
@pytest.mark.every_database
def test_generated_deliveries_get_documented_answers_and_no_500(
    database_url: str, tmp_path: Path, store_variant: tuple[str, str]
) -> None:
    port = free_port()
    app = f"examples.shop:create_app({{'SQLALCHEMY_DATABASE_URI': {database_url!r}}})"
    with live_server(
        flask_run_args(app, port),
        port=port,
        env={"NACHOCODE_WEBHOOK_KEY": SHOP_KEY},
        log_path=tmp_path / "server.log",
    ) as base_url:
        result = subprocess.run(
            [
                str(BIN / "schemathesis"),
                "run",
                f"{base_url}/nachocode/openapi.json",
                "--header",
                f"Authorization: Bearer {SHOP_KEY}",
                *CHECKS,
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                SEED,
                "--workers",
                "1",
                "--request-timeout",
                "10",  # Nachocode's limit
                "--report",
                "junit",
                "--report-dir",
                str(tmp_path / "report"),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=540,
            env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"},
        )
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    database = store_variant[0]
    (artifacts / f"schemathesis-{database}.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated, result.stdout[-2000:]
    # Bounded, yet enough to mean something: every operation got many cases.
    assert int(generated.group(1)) >= 4 * MAX_EXAMPLES
    print(f"schemathesis on {database}: {generated.group(1)} cases generated")


def test_with_deferral_the_202_answer_is_documented_and_matches(tmp_path: Any) -> None:
    from celery import Celery
    from flask import Flask

    from flask_nachocode import NachocodeWebhook

    app = Flask("deferred_openapi", instance_path=str(tmp_path))
    app.config.update(
        TESTING=True,
        NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY,
        NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / 'nachocode.db'}",
        NACHOCODE_DEFERRED=True,
    )
    # A broker no worker reads: the delivery stays queued.
    app.extensions["celery"] = Celery("deferred_openapi", broker="memory://")
    NachocodeWebhook(app).on_purchase(lambda event: None)
    document = fetch_document(app)
    responses = document["paths"]["/nachocode/webhooks/purchase"]["post"]["responses"]
    assert responses["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/QueuedAnswer"
    }
    client = app.test_client()
    purchase = purchase_payload()
    queued = post_delivery(client, "purchase", purchase)
    duplicate = post_delivery(client, "purchase", purchase)
    assert [queued.status_code, duplicate.status_code] == [202, 200]
    validator(document, "QueuedAnswer").validate(queued.json)
    validator(document, "HandledAnswer").validate(duplicate.json)
    assert not validator(document, "QueuedAnswer").is_valid(duplicate.json)

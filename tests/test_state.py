"""Config read in init_app: defaults, the URL prefix, checked values and the
start-up warning about a missing key."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_nachocode import NachocodeWebhook
from flask_nachocode.state import CONFIG_DEFAULTS
from flask_nachocode.testing import post_delivery, purchase_payload

DELAYS = "NACHOCODE_RETRY_DELAYS must be a list of seconds"
METRICS = {"NACHOCODE_METRICS": True, "NACHOCODE_METRICS_ROUTE": True}
LONG_KEY = "a-webhook-key-long-enough"
AppFactory = Callable[..., "tuple[Flask, NachocodeWebhook]"]


def test_every_key_gets_its_default(tmp_path: Any) -> None:
    app = Flask("defaults", instance_path=str(tmp_path))
    NachocodeWebhook(app)
    for key, default in CONFIG_DEFAULTS.items():
        assert app.config[key] == default, key
    assert CONFIG_DEFAULTS["NACHOCODE_URL_PREFIX"] == "/nachocode"
    assert CONFIG_DEFAULTS["NACHOCODE_MAX_BODY_BYTES"] == 65536
    assert CONFIG_DEFAULTS["NACHOCODE_WEBHOOK_KEY"] is None
    assert CONFIG_DEFAULTS["NACHOCODE_HANDLERS"] == {}


def test_set_values_are_kept(make_app: AppFactory) -> None:
    app, _ = make_app(NACHOCODE_URL_PREFIX="/hooks", NACHOCODE_MAX_BODY_BYTES=1000)
    assert app.config["NACHOCODE_URL_PREFIX"] == "/hooks"
    assert app.config["NACHOCODE_MAX_BODY_BYTES"] == 1000


@pytest.mark.parametrize(
    ("prefix", "url"),
    [
        ("/nachocode", "/nachocode/webhooks/purchase"),
        ("/hooks", "/hooks/webhooks/purchase"),
        ("/hooks/", "/hooks/webhooks/purchase"),
        ("/api/v1/nachocode", "/api/v1/nachocode/webhooks/purchase"),
        ("", "/webhooks/purchase"),
    ],
)
def test_the_url_prefix_mounts_the_routes(make_app: AppFactory, prefix: str, url: str) -> None:
    app, nachocode = make_app(NACHOCODE_URL_PREFIX=prefix)
    nachocode.on_purchase(lambda event: None)
    assert post_delivery(app.test_client(), "purchase", purchase_payload()).status_code == 200
    assert {rule.rule for rule in app.url_map.iter_rules()} >= {
        url,
        url.replace("purchase", "refund"),
        url.replace("purchase", "unavailable-users"),
        url.rsplit("/", 1)[0],
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"NACHOCODE_MAX_BODY_BYTES": 0}, "NACHOCODE_MAX_BODY_BYTES must be a positive integer"),
        ({"NACHOCODE_MAX_BODY_BYTES": -1}, "NACHOCODE_MAX_BODY_BYTES must be a positive integer"),
        (
            {"NACHOCODE_MAX_BODY_BYTES": "65536"},
            "NACHOCODE_MAX_BODY_BYTES must be a positive integer",
        ),
        ({"NACHOCODE_MAX_BODY_BYTES": 1.5}, "NACHOCODE_MAX_BODY_BYTES must be a positive integer"),
        ({"NACHOCODE_MAX_BODY_BYTES": True}, "NACHOCODE_MAX_BODY_BYTES must be a positive integer"),
        ({"NACHOCODE_WEBHOOK_KEY": ""}, "NACHOCODE_WEBHOOK_KEY entries must be non-empty strings"),
        (
            {"NACHOCODE_WEBHOOK_KEY": "   "},
            "NACHOCODE_WEBHOOK_KEY entries must be non-empty strings",
        ),
        (
            {"NACHOCODE_WEBHOOK_KEY": ["key", ""]},
            "NACHOCODE_WEBHOOK_KEY entries must be non-empty strings",
        ),
        (
            {"NACHOCODE_WEBHOOK_KEY": ["key", 1]},
            "NACHOCODE_WEBHOOK_KEY entries must be non-empty strings",
        ),
        ({"NACHOCODE_WEBHOOK_KEY": []}, "NACHOCODE_WEBHOOK_KEY is an empty list"),
        (
            {"NACHOCODE_WEBHOOK_KEY": " key-from-the-dashboard\n"},
            "NACHOCODE_WEBHOOK_KEY entries must not contain spaces or line breaks",
        ),
        (
            {"NACHOCODE_WEBHOOK_KEY": ["new key", "old"]},
            "NACHOCODE_WEBHOOK_KEY entries must not contain spaces or line breaks",
        ),
        (
            # A byte that is not UTF-8 in FLASK_NACHOCODE_WEBHOOK_KEY, as Python passes it on.
            {"NACHOCODE_WEBHOOK_KEY": "key-\udcff"},
            "NACHOCODE_WEBHOOK_KEY entries must be UTF-8 text",
        ),
        (
            {"NACHOCODE_WEBHOOK_KEY": 12345},
            "NACHOCODE_WEBHOOK_KEY must be a string or a list of strings",
        ),
        (
            {"NACHOCODE_WEBHOOK_KEY": b"key"},
            "NACHOCODE_WEBHOOK_KEY must be a string or a list of strings",
        ),
        (
            {"NACHOCODE_WEBHOOK_KEY": {"key": "value"}},
            "NACHOCODE_WEBHOOK_KEY must be a string or a list of strings",
        ),
        (
            {"NACHOCODE_DEFERRED": True},
            r"NACHOCODE_DEFERRED needs the app's Celery instance in app.extensions\['celery'\]",
        ),
        ({"NACHOCODE_RETRY_DELAYS": "30,120"}, DELAYS),
        ({"NACHOCODE_RETRY_DELAYS": [30, -1]}, DELAYS),
        (
            {"NACHOCODE_RETRY_DELAYS": [30, "120"]},
            DELAYS,
        ),
        ({"NACHOCODE_RETRY_DELAYS": [True]}, DELAYS),
        ({"NACHOCODE_RETRY_DELAYS": None}, DELAYS),
        (
            {"NACHOCODE_METRICS_ROUTE": True},
            "NACHOCODE_METRICS_ROUTE serves the counters of NACHOCODE_METRICS",
        ),
        ({**METRICS, "NACHOCODE_METRICS_TOKEN": "short"}, "NACHOCODE_METRICS_TOKEN must be a"),
        ({**METRICS, "NACHOCODE_METRICS_TOKEN": 1234567890123456789}, "at least 16 characters"),
        (
            {**METRICS, "NACHOCODE_METRICS_TOKEN": LONG_KEY, "NACHOCODE_WEBHOOK_KEY": LONG_KEY},
            "NACHOCODE_METRICS_TOKEN must not be the webhook key",
        ),
        (
            {
                "NACHOCODE_INSPECTOR": True,
                "SECRET_KEY": "s",
                "NACHOCODE_INSPECTOR_TOKEN": LONG_KEY,
                "NACHOCODE_WEBHOOK_KEY": ["old-key", LONG_KEY],
            },
            "NACHOCODE_INSPECTOR_TOKEN must not be the webhook key",
        ),
        (
            {**METRICS, "NACHOCODE_METRICS_DECORATORS": ["nowhere.at.all:login_required"]},
            "NACHOCODE_METRICS_DECORATORS: cannot import",
        ),
        (
            {"NACHOCODE_METRICS": True, "NACHOCODE_METRICS_REGISTRY": "nowhere.at.all:registry"},
            "NACHOCODE_METRICS_REGISTRY: cannot import",
        ),
        (
            {"NACHOCODE_METRICS": True, "NACHOCODE_METRICS_REGISTRY": {"not": "a registry"}},
            "NACHOCODE_METRICS_REGISTRY must be a prometheus_client CollectorRegistry",
        ),
    ],
)
def test_bad_values_stop_init_app(
    make_app: AppFactory, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        make_app(**config)


@pytest.mark.parametrize(
    ("config", "warned"),
    [
        ({"NACHOCODE_WEBHOOK_KEY": None, "TESTING": False}, True),
        ({"NACHOCODE_WEBHOOK_KEY": None, "TESTING": True}, False),
        ({"NACHOCODE_WEBHOOK_KEY": None, "TESTING": False, "DEBUG": True}, False),
        ({"NACHOCODE_WEBHOOK_KEY": "key", "TESTING": False}, False),
        ({"NACHOCODE_WEBHOOK_KEY": ["new", "old"], "TESTING": False}, False),
    ],
)
def test_a_missing_key_is_warned_about_once_at_start_up(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture, config: dict[str, Any], warned: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_nachocode"):
        app, nachocode = make_app(**config)
        nachocode.on_purchase(lambda event: None)
        for _ in range(2):
            assert (
                post_delivery(app.test_client(), "purchase", purchase_payload()).status_code == 200
            )
    warnings = [r for r in caplog.records if "NACHOCODE_WEBHOOK_KEY is not set" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert warnings[0].levelno == logging.WARNING
        assert "/nachocode/webhooks" in warnings[0].getMessage()

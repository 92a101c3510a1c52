"""pytest fixtures for testing an app's Nachocode handlers without a network.

Registered through the ``pytest11`` entry point, so installing flask-nachocode
is enough (switch it off with ``-p no:flask_nachocode``). ``nachocode_post``
needs an ``app`` fixture returning your Flask app, the convention of Flask's
tutorial and of pytest-flask. Kept apart from :mod:`flask_nachocode.testing`
so that the factories import without pytest (``flask nachocode send`` uses them).
"""

from __future__ import annotations

from typing import Any

import pytest

from .testing import (
    payload_for,
    post_delivery,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)


class NachocodePayloads:
    """The payload factories of :mod:`flask_nachocode.testing`, by event name.

    Each call builds a valid body with fresh store ids; keyword arguments
    replace fields (camelCase or snake_case)::

        body = nachocode_payloads.purchase(os="android", user_id="u1", quantity=2)
        refund = nachocode_payloads.refund(body, refund_quantity=1)
    """

    purchase = staticmethod(purchase_payload)
    refund = staticmethod(refund_payload)
    unavailable_users = staticmethod(unavailable_users_payload)
    #: ``for_event("refund", os="android", ...)``: the factory for an event name.
    for_event = staticmethod(payload_for)


class NachocodePost:
    """POST deliveries to the app under test through its Flask test client,
    with the headers Nachocode sends."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.client = app.test_client()

    def __call__(self, event: str, payload: Any = None, *, key: str | None = None) -> Any:
        """Deliver ``payload`` (a dict, or raw ``str``/``bytes``) to the route of
        ``event`` (an event name, or ``"any"`` for the all-events URL) and return
        the test client's response. Without ``payload``, a fresh valid body is
        built for ``event``. ``key`` defaults to the app's first configured key.
        """
        if payload is None:
            payload = payload_for(event)
        return post_delivery(self.client, event, payload, key=key)


@pytest.fixture
def nachocode_payloads() -> NachocodePayloads:
    """Factories of valid Nachocode bodies: ``.purchase()``, ``.refund()``,
    ``.unavailable_users()``, ``.for_event(name)``."""
    return NachocodePayloads()


@pytest.fixture
def nachocode_post(request: pytest.FixtureRequest) -> NachocodePost:
    """``nachocode_post(event, payload=None, *, key=None)``: deliver a webhook to
    the Flask app of your ``app`` fixture; returns the test client's response."""
    try:
        app = request.getfixturevalue("app")
    except pytest.FixtureLookupError:
        pytest.fail(
            "nachocode_post needs an `app` fixture that returns your Flask app "
            "(with NachocodeWebhook initialised on it); define one in your conftest.py",
            pytrace=False,
        )
    return NachocodePost(app)

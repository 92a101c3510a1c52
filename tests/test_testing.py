"""The payload factories and ``post_delivery`` of ``flask_nachocode.testing``, as an
app's own tests use them (the pytest plugin's fixtures: test_pytest_plugin.py)."""

from __future__ import annotations

import pytest

from flask_nachocode.schemas import load_event
from flask_nachocode.testing import (
    payload_for,
    purchase_payload,
    refund_payload,
    unavailable_users_payload,
)

#: Event name -> its factory.
FACTORIES = {
    "purchase": purchase_payload,
    "refund": refund_payload,
    "unavailable_users": unavailable_users_payload,
}


@pytest.mark.parametrize("name", ["purchase", "refund", "unavailable_users"])
def test_factories_make_valid_bodies(name: str) -> None:
    assert load_event(name, FACTORIES[name]()).name == name
    assert load_event(name, payload_for(name)).name == name

"""The handler registry: decorators, order, NACHOCODE_HANDLERS, and one extension
serving several apps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_nachocode import NachocodeWebhook, PurchaseEvent, RefundEvent, UnavailableUsersEvent
from flask_nachocode.testing import post_delivery, purchase_payload

from support.common import load_fixture

AppFactory = Callable[..., "tuple[Flask, NachocodeWebhook]"]

#: What the handlers named in NACHOCODE_HANDLERS below saw, in order.
CALLS: list[tuple[str, Any]] = []
NOT_CALLABLE = 42


def config_handler_one(event: Any) -> None:
    CALLS.append(("config-one", event))


def config_handler_two(event: Any) -> None:
    CALLS.append(("config-two", event))


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    CALLS.clear()


FIXTURE_OF = {
    "purchase": "purchase-ios",
    "refund": "refund-ios",
    "unavailable_users": "unavailable-users",
}
EVENT_CLASS = {
    "purchase": PurchaseEvent,
    "refund": RefundEvent,
    "unavailable_users": UnavailableUsersEvent,
}


@pytest.mark.parametrize(
    ("decorator", "name"),
    [
        *[(f"on_{name}", name) for name in FIXTURE_OF],
        *[("handler", name) for name in FIXTURE_OF],
    ],
)
def test_each_decorator_receives_its_typed_event(
    make_app: AppFactory, decorator: str, name: str
) -> None:
    app, nachocode = make_app()
    seen: list[Any] = []

    def handle(event: Any) -> None:
        seen.append(event)

    register = nachocode.handler(name) if decorator == "handler" else getattr(nachocode, decorator)
    assert register(handle) is handle  # the function stays usable as it was
    for event_name in FIXTURE_OF:
        post_delivery(app.test_client(), event_name, load_fixture(FIXTURE_OF[event_name]))
    assert len(seen) == 1
    assert isinstance(seen[0], EVENT_CLASS[name])


def test_handlers_run_in_registration_order_decorated_first(make_app: AppFactory) -> None:
    app, nachocode = make_app(
        NACHOCODE_HANDLERS={
            "purchase": [f"{__name__}:config_handler_two", f"{__name__}:config_handler_one"],
        }
    )
    nachocode.on_purchase(lambda event: CALLS.append(("first", event)))
    nachocode.handler("purchase")(lambda event: CALLS.append(("second", event)))
    nachocode.on_purchase(lambda event: CALLS.append(("third", event)))
    assert post_delivery(app.test_client(), "purchase", purchase_payload()).status_code == 200
    assert [who for who, _ in CALLS] == ["first", "second", "third", "config-two", "config-one"]
    assert len({id(event) for _, event in CALLS}) == 1  # every handler gets the same event


def test_handlers_decorated_after_init_app_run_too(make_app: AppFactory) -> None:
    app, nachocode = make_app()
    assert post_delivery(app.test_client(), "purchase", purchase_payload()).status_code == 501

    @nachocode.on_purchase
    def late(event: Any) -> None:
        CALLS.append(("late", event))

    assert post_delivery(app.test_client(), "purchase", purchase_payload()).status_code == 200
    assert [who for who, _ in CALLS] == ["late"]


@pytest.mark.parametrize("name", ["purchases", "Purchase", "unavailable-users", "", "refunds"])
def test_an_unknown_event_name_raises_at_decoration_time(name: str) -> None:
    nachocode = NachocodeWebhook()
    with pytest.raises(ValueError, match="unknown Nachocode event"):
        nachocode.handler(name)


@pytest.mark.parametrize(
    "entry",
    [
        f"{__name__}:config_handler_one",
        [f"{__name__}:config_handler_one"],
        (f"{__name__}:config_handler_one", f"{__name__}:config_handler_two"),
        f"{__name__}.config_handler_one",  # werkzeug's import_string takes a dot too
    ],
)
def test_config_handlers_as_a_string_or_a_list(make_app: AppFactory, entry: Any) -> None:
    app, _ = make_app(NACHOCODE_HANDLERS={"refund": entry})
    assert post_delivery(app.test_client(), "refund", load_fixture("refund-ios")).status_code == 200
    expected = ["config-one", "config-two"] if isinstance(entry, tuple) else ["config-one"]
    assert [who for who, _ in CALLS] == expected
    assert isinstance(CALLS[0][1], RefundEvent)


@pytest.mark.parametrize(
    ("handlers", "message"),
    [
        (
            {"purchases": f"{__name__}:config_handler_one"},
            r"NACHOCODE_HANDLERS\['purchases'\]: unknown event",
        ),
        (
            {"purchase": "no_such_module_xyz:grant"},
            r"NACHOCODE_HANDLERS\['purchase'\]: cannot import 'no_such_module_xyz:grant'",
        ),
        (
            {"purchase": f"{__name__}:no_such_function"},
            rf"NACHOCODE_HANDLERS\['purchase'\]: cannot import '{__name__}:no_such_function'",
        ),
        (
            {"refund": [f"{__name__}:config_handler_one", f"{__name__}:NOT_CALLABLE"]},
            r"NACHOCODE_HANDLERS\['refund'\]: .*NOT_CALLABLE' is not callable",
        ),
        (
            {"refund": [config_handler_one]},
            r"NACHOCODE_HANDLERS\['refund'\]: <function config_handler_one"
            r".*is not a 'package.module:function' string",
        ),
        ({"unavailable_users": [None]}, r"NACHOCODE_HANDLERS\['unavailable_users'\]: None is not"),
    ],
)
def test_a_bad_config_entry_stops_init_app_naming_it(
    make_app: AppFactory, handlers: Any, message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        make_app(NACHOCODE_HANDLERS=handlers)


def test_registering_twice_on_one_app_is_an_error(make_app: AppFactory) -> None:
    app, nachocode = make_app()
    with pytest.raises(RuntimeError, match="already registered on this app"):
        nachocode.init_app(app)
    with pytest.raises(RuntimeError, match="already registered on this app"):
        NachocodeWebhook(app)


def test_one_extension_serves_two_apps(tmp_path: Path) -> None:
    nachocode = NachocodeWebhook()
    seen: list[tuple[str, str]] = []

    @nachocode.on_purchase
    def grant(event: PurchaseEvent) -> None:
        from flask import current_app

        seen.append((current_app.name, event.user_id))

    apps = []
    for name, key, prefix in [("shop_a", "key-a", "/nachocode"), ("shop_b", "key-b", "/hooks")]:
        app = Flask(name, instance_path=str(tmp_path / name))
        app.config.update(
            TESTING=True,
            NACHOCODE_WEBHOOK_KEY=key,
            NACHOCODE_URL_PREFIX=prefix,
            NACHOCODE_DATABASE_URI=f"sqlite:///{tmp_path / name}.db",
            NACHOCODE_HANDLERS={"purchase": f"{__name__}:config_handler_one"}
            if name == "shop_b"
            else {},
        )
        nachocode.init_app(app)
        apps.append(app)
    app_a, app_b = apps

    body_a, body_b = purchase_payload(user_id="alice"), purchase_payload(user_id="bob")
    assert post_delivery(app_a.test_client(), "purchase", body_a).status_code == 200
    assert post_delivery(app_b.test_client(), "purchase", body_b).status_code == 200
    # Each app keeps its own key, prefix, config handlers and store.
    assert (
        post_delivery(app_a.test_client(), "purchase", purchase_payload(), key="key-b").status_code
        == 401
    )
    assert app_b.test_client().post("/nachocode/webhooks/purchase", json=body_b).status_code == 404
    assert seen == [("shop_a", "alice"), ("shop_b", "bob")]
    assert [who for who, _ in CALLS] == ["config-one"]
    with app_a.app_context():
        assert nachocode.ledger.get(body_a["iapLogId"], environment=None) is not None
        assert nachocode.ledger.get(body_b["iapLogId"], environment=None) is None
    with app_b.app_context():
        assert nachocode.ledger.get(body_b["iapLogId"], environment=None).user_id == "bob"


def test_the_ledger_needs_an_app_with_the_extension() -> None:
    nachocode = NachocodeWebhook()
    with Flask("other").app_context(), pytest.raises(RuntimeError, match="init_app"):
        nachocode.ledger.get(1)

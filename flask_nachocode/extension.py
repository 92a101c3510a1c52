"""``NachocodeWebhook``: the extension object, its config and its handler registry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask, current_app
from werkzeug.utils import import_string

from .auth import normalize_keys
from .events import EVENT_NAMES
from .ledger import Ledger
from .registry import Handler, HandlerRegistry, check_event_name, registry_from_config
from .store import Store

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

    from .inspector import InspectorSettings

logger = logging.getLogger("flask_nachocode")

H = TypeVar("H", bound=Handler)

#: Every config key the extension reads, with its default. Documented in the README.
CONFIG_DEFAULTS: dict[str, Any] = {
    "NACHOCODE_WEBHOOK_KEY": None,
    "NACHOCODE_URL_PREFIX": "/nachocode",
    "NACHOCODE_HANDLERS": {},
    "NACHOCODE_MAX_BODY_BYTES": 65536,
    "NACHOCODE_DATABASE_URI": None,
    "NACHOCODE_KEEP_BODIES": True,
    "NACHOCODE_LEDGER": True,
    "NACHOCODE_PURCHASE_STATUS_ROUTE": False,
    "NACHOCODE_PURCHASE_STATUS_DECORATORS": [],
    "NACHOCODE_INSPECTOR": False,
    "NACHOCODE_INSPECTOR_TOKEN": None,
    "NACHOCODE_INSPECTOR_DECORATORS": [],
    "NACHOCODE_OPENAPI": True,
}


def resolve_decorators(key: str, entries: Any) -> list[Callable[[Any], Any]]:
    """A config list of view decorators: callables or ``"module:name"`` strings."""
    decorators = []
    for entry in entries or []:
        try:
            decorator = import_string(entry) if isinstance(entry, str) else entry
        except ImportError as error:
            raise RuntimeError(f"{key}: cannot import {entry!r}: {error}") from error
        if not callable(decorator):
            raise RuntimeError(f"{key}: {entry!r} is not callable")
        decorators.append(decorator)
    return decorators


@dataclass
class AppState:
    """What one app's ``init_app`` resolved, kept in ``app.extensions["nachocode"]``
    so that the request path reads no config."""

    extension: NachocodeWebhook
    keys: tuple[bytes, ...]
    url_prefix: str
    max_body_bytes: int
    keep_bodies: bool
    ledger_enabled: bool
    store: Store
    config_handlers: HandlerRegistry
    #: GET {prefix}/purchases/<iapLogId> is mounted (NACHOCODE_PURCHASE_STATUS_ROUTE).
    purchase_status_route: bool = False
    #: The app's decorators around that view (NACHOCODE_PURCHASE_STATUS_DECORATORS).
    purchase_status_decorators: list[Callable[[Any], Any]] = field(default_factory=list)
    #: The delivery inspector's protection, or None while NACHOCODE_INSPECTOR is off.
    inspector: InspectorSettings | None = None
    #: {prefix}/openapi.json is mounted (NACHOCODE_OPENAPI).
    openapi: bool = True

    def handlers(self, name: str) -> list[Handler]:
        # Decorated handlers first, then NACHOCODE_HANDLERS; read live because
        # decorators may run after init_app.
        return self.extension._registry.get(name) + self.config_handlers.get(name)


def current_state() -> AppState:
    """The current app's :class:`AppState`: the one way every module reaches it."""
    try:
        return current_app.extensions["nachocode"]  # type: ignore[no-any-return]
    except KeyError:
        raise RuntimeError(
            "NachocodeWebhook.init_app(app) was not called on the current app"
        ) from None


class NachocodeWebhook:
    """Receive Nachocode webhooks in a Flask app.

    ::

        nachocode = NachocodeWebhook(app)            # or NachocodeWebhook(db=db) + init_app(app)

        @nachocode.on_purchase
        def grant(event): ...

    Pass ``db`` (your Flask-SQLAlchemy instance) to keep deliveries, claims and
    the ledger in your app's database, committed in one transaction with your
    handlers' writes. Without it the extension uses its own engine on
    ``NACHOCODE_DATABASE_URI``.

    Handlers run synchronously inside the request, in registration order
    (decorated ones first, then ``NACHOCODE_HANDLERS``). One extension object can
    serve several apps; its decorated handlers apply to all of them.
    """

    def __init__(self, app: Flask | None = None, *, db: SQLAlchemy | None = None) -> None:
        self.db = db
        self._registry = HandlerRegistry()
        #: The purchase ledger of the current app (see :class:`~flask_nachocode.ledger.Ledger`).
        self.ledger = Ledger(lambda: current_state().store)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the config, mount the ``nachocode`` blueprint and the CLI on ``app``."""
        if "nachocode" in app.extensions:
            raise RuntimeError(
                "A NachocodeWebhook is already registered on this app. Create the extension "
                "once and call init_app once per app; to add handlers, decorate them on the "
                "existing extension object."
            )
        for key, default in CONFIG_DEFAULTS.items():
            app.config.setdefault(key, default)
        config = app.config
        try:
            keys = normalize_keys(config["NACHOCODE_WEBHOOK_KEY"])
        except ValueError as error:
            raise RuntimeError(str(error)) from None
        max_body = config["NACHOCODE_MAX_BODY_BYTES"]
        if not isinstance(max_body, int) or isinstance(max_body, bool) or max_body < 1:
            raise RuntimeError("NACHOCODE_MAX_BODY_BYTES must be a positive integer")

        state = AppState(
            extension=self,
            keys=keys,
            url_prefix=config["NACHOCODE_URL_PREFIX"].rstrip("/"),
            max_body_bytes=max_body,
            keep_bodies=bool(config["NACHOCODE_KEEP_BODIES"]),
            ledger_enabled=bool(config["NACHOCODE_LEDGER"]),
            store=Store(app, self.db),
            config_handlers=registry_from_config(config["NACHOCODE_HANDLERS"] or {}),
            purchase_status_route=bool(config["NACHOCODE_PURCHASE_STATUS_ROUTE"]),
            purchase_status_decorators=resolve_decorators(
                "NACHOCODE_PURCHASE_STATUS_DECORATORS",
                config["NACHOCODE_PURCHASE_STATUS_DECORATORS"],
            ),
            openapi=bool(config["NACHOCODE_OPENAPI"]),
        )
        if state.purchase_status_route and not state.ledger_enabled:
            raise RuntimeError(
                "NACHOCODE_PURCHASE_STATUS_ROUTE answers from the purchase ledger: "
                "it needs NACHOCODE_LEDGER = True"
            )
        if config["NACHOCODE_INSPECTOR"]:
            from .inspector import inspector_settings

            state.inspector = inspector_settings(app, state.url_prefix)
        app.extensions["nachocode"] = state

        from .cli import nachocode_cli
        from .views import make_blueprint

        app.register_blueprint(make_blueprint(state), url_prefix=state.url_prefix)
        app.cli.add_command(nachocode_cli)

        if not keys and not (app.debug or app.testing):
            logger.warning(
                "NACHOCODE_WEBHOOK_KEY is not set: anyone who can reach %s/webhooks can post "
                "purchases and refunds. Set a webhook key in the Nachocode dashboard and here.",
                state.url_prefix,
            )

    def handler(self, event_name: str) -> Callable[[H], H]:
        """Register the decorated function for ``event_name`` (``purchase``,
        ``refund`` or ``unavailable_users``). An unknown name raises ``ValueError``
        here, at decoration time."""
        check_event_name(event_name)

        def register(function: H) -> H:
            self._registry.add(event_name, function)
            return function

        return register

    def on_purchase(self, function: H) -> H:
        """Register a handler for ``purchase``; it receives a :class:`PurchaseEvent`."""
        return self.handler("purchase")(function)

    def on_refund(self, function: H) -> H:
        """Register a handler for ``refund``; it receives a :class:`RefundEvent`."""
        return self.handler("refund")(function)

    def on_unavailable_users(self, function: H) -> H:
        """Register a handler for ``unavailable_users``; it receives an
        :class:`UnavailableUsersEvent`."""
        return self.handler("unavailable_users")(function)


__all__ = ["NachocodeWebhook", "CONFIG_DEFAULTS", "EVENT_NAMES"]

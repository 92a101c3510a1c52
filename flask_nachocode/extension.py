"""``NachocodeWebhook``: the extension object. ``init_app`` wires the parts together."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask
from flask.signals import appcontext_pushed

from .cli import nachocode_cli
from .inspector import make_inspector_blueprint
from .monitoring import add_monitoring_routes
from .openapi import make_openapi_view
from .purchase_status import add_purchase_status_route
from .reads import Ledger
from .registry import Handler, HandlerRegistry, check_event_name
from .state import AppState, build_state, current_ledger
from .tables import alembic_render_item
from .views import make_blueprint

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

H = TypeVar("H", bound=Handler)


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
    (decorated ones first, then ``NACHOCODE_HANDLERS``), or in a Celery worker
    with ``NACHOCODE_DEFERRED``. One extension object can
    serve several apps; its decorated handlers apply to all of them.
    """

    def __init__(self, app: Flask | None = None, *, db: SQLAlchemy | None = None) -> None:
        self.db = db
        self._registry = HandlerRegistry()
        if app is not None:
            self.init_app(app)

    @property
    def ledger(self) -> Ledger:
        """The purchase ledger of the current app (see :class:`~flask_nachocode.Ledger`)."""
        return current_ledger

    def init_app(self, app: Flask) -> None:
        """Read and check the config, then mount the ``nachocode`` blueprint (with
        the optional routes the config switches on) and the CLI on ``app``."""
        if "nachocode" in app.extensions:
            raise RuntimeError(
                "A NachocodeWebhook is already registered on this app. Create the extension "
                "once and call init_app once per app; to add handlers, decorate them on the "
                "existing extension object."
            )
        state = build_state(app, self.db, self._registry)
        if state.deferred:
            # Imported only when switched on: Celery is the optional `celery` extra.
            from .celery_queue import CeleryQueue

            state.task_queue = CeleryQueue(app, app.extensions["celery"])
        app.extensions["nachocode"] = state

        blueprint = make_blueprint(state.metrics)
        if state.purchase_status_route:
            add_purchase_status_route(blueprint, state.purchase_status_decorators)
        if state.inspector is not None:
            blueprint.register_blueprint(make_inspector_blueprint(state))
        if state.openapi:
            blueprint.add_url_rule(
                "/openapi.json", "openapi", make_openapi_view(state), methods=["GET"]
            )
        add_monitoring_routes(blueprint, state)
        app.register_blueprint(blueprint, url_prefix=state.url_prefix)
        app.cli.add_command(nachocode_cli)
        # Flask-Migrate may be set up before or after this, and replaces its config
        # when it is; every `flask db` command pushes an app context first.
        state.migrate_listener = functools.partial(_offer_render_item, state)
        appcontext_pushed.connect(state.migrate_listener, app)

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


def _render_item_before(
    theirs: Callable[..., Any] | None, kind: str, obj: Any, autogen_context: Any
) -> Any:
    rendered = alembic_render_item(kind, obj, autogen_context)
    if rendered is False and theirs is not None:
        return theirs(kind, obj, autogen_context)
    return rendered


def _offer_render_item(state: AppState, app: Flask, **_: Any) -> None:
    """Put :func:`~flask_nachocode.tables.alembic_render_item` into the Alembic
    arguments that Flask-Migrate's ``env.py`` passes on, ahead of the app's own
    ``render_item`` if it has one, so that generated migrations run unedited."""
    arguments = getattr(app.extensions.get("migrate"), "configure_args", None)
    if isinstance(arguments, dict):
        theirs = arguments.get("render_item")
        if getattr(theirs, "func", None) is not _render_item_before:
            arguments["render_item"] = functools.partial(_render_item_before, theirs)
    # Once the app has handled a request its set-up is over (Flask's own set-up methods
    # refuse from then on), so the config this push saw is the one for good. Listening
    # on would cost every request blinker's dispatch to this receiver: 0.7% of a
    # delivery's instructions on SQLite, which 0.1.0 did not pay. Disconnected from
    # every sender, as it is this app's own, so that blinker forgets it altogether.
    if app._got_first_request and state.migrate_listener is not None:
        appcontext_pushed.disconnect(state.migrate_listener)
        state.migrate_listener = None


__all__ = ["NachocodeWebhook"]

"""Per-app state: the config keys with their defaults, read and checked once in
``init_app`` into an :class:`AppState` that the request path reads instead of config.

The state lives in ``app.extensions["nachocode"]`` and every module reaches it
through :func:`current_state`, never through the extension object: that is what
keeps the modules below the extension free of import cycles.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app
from werkzeug.utils import import_string

from .auth import normalize_keys
from .deferred import TaskQueue
from .ledger import Ledger
from .registry import Handler, HandlerRegistry, registry_from_config
from .store import Store

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

logger = logging.getLogger("flask_nachocode")

#: Every config key the extension reads, with its default (the manual's Configuration page).
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
    "NACHOCODE_DEFERRED": False,
    "NACHOCODE_RETRY_DELAYS": [30, 120, 600, 3600, 21600],
}

#: Shortest ``NACHOCODE_INSPECTOR_TOKEN`` accepted.
MIN_TOKEN_LENGTH = 16

ViewDecorator = Callable[[Any], Any]


def resolve_decorators(key: str, entries: Any) -> tuple[ViewDecorator, ...]:
    """A config list of view decorators (callables or ``"module:name"`` strings), in
    the one order every such list has: the first entry is the outermost, so it runs
    first, as stacked ``@decorator`` lines read from the top. See :func:`decorate`."""
    decorators = []
    for entry in entries or []:
        try:
            decorator = import_string(entry) if isinstance(entry, str) else entry
        except ImportError as error:
            raise RuntimeError(f"{key}: cannot import {entry!r}: {error}") from error
        if not callable(decorator):
            raise RuntimeError(f"{key}: {entry!r} is not callable")
        decorators.append(decorator)
    return tuple(decorators)


def decorate(view: Callable[..., Any], decorators: Sequence[ViewDecorator]) -> Callable[..., Any]:
    """``view`` wrapped in ``decorators``, the first one outermost."""
    for decorator in reversed(decorators):
        view = decorator(view)
    return view


@dataclass(frozen=True)
class InspectorSettings:
    """How the delivery inspector of one app is protected (see :mod:`flask_nachocode.inspector`)."""

    token: str | None
    decorators: tuple[ViewDecorator, ...]

    @property
    def protected(self) -> bool:
        return bool(self.token or self.decorators)

    @property
    def session_mark(self) -> str:
        """What the session keeps after a token login: a digest, since Flask's
        session cookie is signed but readable. Changing the token logs everyone out."""
        assert self.token is not None
        return hmac.new(
            self.token.encode(), b"flask-nachocode inspector", hashlib.sha256
        ).hexdigest()


@dataclass
class AppState:
    """What one app's ``init_app`` resolved, kept in ``app.extensions["nachocode"]``
    so that the request path reads no config."""

    keys: tuple[bytes, ...]
    url_prefix: str
    max_body_bytes: int
    keep_bodies: bool
    ledger_enabled: bool
    store: Store
    #: The extension's decorated handlers: shared, since decorators may run after init_app.
    decorated_handlers: HandlerRegistry
    config_handlers: HandlerRegistry
    #: GET {prefix}/purchases/<iapLogId> is mounted (NACHOCODE_PURCHASE_STATUS_ROUTE).
    purchase_status_route: bool
    #: The app's decorators around that view (NACHOCODE_PURCHASE_STATUS_DECORATORS).
    purchase_status_decorators: tuple[ViewDecorator, ...]
    #: The delivery inspector's protection, or None while NACHOCODE_INSPECTOR is off.
    inspector: InspectorSettings | None
    #: {prefix}/openapi.json is mounted (NACHOCODE_OPENAPI).
    openapi: bool
    #: Handlers run in a worker, after a 202 (NACHOCODE_DEFERRED).
    deferred: bool = False
    #: Seconds before each retry of a deferred delivery whose handler raised.
    retry_delays: tuple[float, ...] = ()
    #: What sends the worker's tasks; set by ``init_app`` when ``deferred``.
    task_queue: TaskQueue | None = None

    def handlers(self, name: str) -> list[Handler]:
        """The handlers of event ``name``: decorated ones first, then NACHOCODE_HANDLERS."""
        return self.decorated_handlers.get(name) + self.config_handlers.get(name)


def current_state() -> AppState:
    """The current app's :class:`AppState`: the one way every module reaches it."""
    try:
        return current_app.extensions["nachocode"]  # type: ignore[no-any-return]
    except KeyError:
        raise RuntimeError(
            "NachocodeWebhook.init_app(app) was not called on the current app"
        ) from None


#: The purchase ledger of whichever app is current: ``NachocodeWebhook.ledger``.
current_ledger = Ledger(lambda: current_state().store)


def build_state(app: Flask, db: SQLAlchemy | None, decorated: HandlerRegistry) -> AppState:
    """Read ``app.config`` (after setting the defaults) into the app's state; every
    config check is made here, so a wrong setting stops start-up with a ``RuntimeError``
    that names it, instead of failing deliveries later."""
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
    url_prefix = config["NACHOCODE_URL_PREFIX"].rstrip("/")
    ledger_enabled = bool(config["NACHOCODE_LEDGER"])
    purchase_status_route = bool(config["NACHOCODE_PURCHASE_STATUS_ROUTE"])
    if purchase_status_route and not ledger_enabled:
        raise RuntimeError(
            "NACHOCODE_PURCHASE_STATUS_ROUTE answers from the purchase ledger: "
            "it needs NACHOCODE_LEDGER = True"
        )
    deferred = bool(config["NACHOCODE_DEFERRED"])
    retry_delays = _retry_delays(config["NACHOCODE_RETRY_DELAYS"])
    if deferred and "celery" not in app.extensions:
        raise RuntimeError(
            "NACHOCODE_DEFERRED needs the app's Celery instance in app.extensions['celery'], "
            "as Flask's 'Background Tasks with Celery' pattern puts it; create it before "
            "calling init_app (pip install 'flask-nachocode[celery]')"
        )
    store = Store(app, db, ledger_enabled=ledger_enabled)
    state = AppState(
        keys=keys,
        url_prefix=url_prefix,
        max_body_bytes=max_body,
        keep_bodies=bool(config["NACHOCODE_KEEP_BODIES"]),
        ledger_enabled=ledger_enabled,
        store=store,
        decorated_handlers=decorated,
        config_handlers=registry_from_config(config["NACHOCODE_HANDLERS"] or {}),
        purchase_status_route=purchase_status_route,
        purchase_status_decorators=resolve_decorators(
            "NACHOCODE_PURCHASE_STATUS_DECORATORS", config["NACHOCODE_PURCHASE_STATUS_DECORATORS"]
        ),
        inspector=_inspector_settings(app, url_prefix) if config["NACHOCODE_INSPECTOR"] else None,
        openapi=bool(config["NACHOCODE_OPENAPI"]),
        deferred=deferred,
        retry_delays=retry_delays,
    )
    if not keys and not (app.debug or app.testing):
        logger.warning(
            "NACHOCODE_WEBHOOK_KEY is not set: anyone who can reach %s/webhooks can post "
            "purchases and refunds. Set a webhook key in the Nachocode dashboard and here.",
            url_prefix,
        )
    return state


def _retry_delays(value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        value = None
    delays = tuple(value) if value is not None else ()
    if value is None or not all(
        isinstance(delay, (int, float)) and not isinstance(delay, bool) and 0 <= delay < 10**7
        for delay in delays
    ):
        raise RuntimeError(
            "NACHOCODE_RETRY_DELAYS must be a list of seconds (non-negative numbers), "
            "e.g. [30, 120, 600, 3600, 21600]; an empty list means no retries"
        )
    return tuple(float(delay) for delay in delays)


def _inspector_settings(app: Flask, url_prefix: str) -> InspectorSettings:
    """Read the inspector's protection; refuse a config that cannot work and warn
    when the inspector is on without protection."""
    config = app.config
    token = config["NACHOCODE_INSPECTOR_TOKEN"]
    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH):
        raise RuntimeError(
            "NACHOCODE_INSPECTOR_TOKEN must be a string of at least "
            f"{MIN_TOKEN_LENGTH} characters; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    decorators = resolve_decorators(
        "NACHOCODE_INSPECTOR_DECORATORS", config["NACHOCODE_INSPECTOR_DECORATORS"]
    )
    if not app.secret_key:
        raise RuntimeError(
            "NACHOCODE_INSPECTOR needs the app's SECRET_KEY: the inspector keeps its CSRF "
            "token (and a token login) in the session cookie"
        )
    settings = InspectorSettings(token=token, decorators=decorators)
    if not settings.protected:
        if app.debug:
            logger.warning(
                "The delivery inspector at %s/deliveries is on without protection: in debug mode "
                "anyone who can reach this server can read deliveries and replay them. Set "
                "NACHOCODE_INSPECTOR_DECORATORS or NACHOCODE_INSPECTOR_TOKEN.",
                url_prefix,
            )
        else:
            logger.warning(
                "The delivery inspector at %s/deliveries is on without protection and the app is "
                "not in debug mode, so its pages answer 404. Set NACHOCODE_INSPECTOR_DECORATORS "
                "(your login decorator) or NACHOCODE_INSPECTOR_TOKEN.",
                url_prefix,
            )
    return settings

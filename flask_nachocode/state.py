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
from .metrics import Metrics
from .reads import Ledger
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
    "NACHOCODE_METRICS": False,
    "NACHOCODE_METRICS_REGISTRY": None,
    "NACHOCODE_METRICS_ROUTE": False,
    "NACHOCODE_METRICS_TOKEN": None,
    "NACHOCODE_METRICS_DECORATORS": [],
    "NACHOCODE_HEALTH_ROUTE": False,
}

#: Shortest ``NACHOCODE_INSPECTOR_TOKEN`` (or ``NACHOCODE_METRICS_TOKEN``) accepted.
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
class Protection:
    """How a page that shows business data is protected: a token, the app's own view
    decorators, or both (``NACHOCODE_<PAGE>_TOKEN`` and ``NACHOCODE_<PAGE>_DECORATORS``)."""

    token: str | None
    decorators: tuple[ViewDecorator, ...]

    @property
    def protected(self) -> bool:
        return bool(self.token or self.decorators)


@dataclass(frozen=True)
class InspectorSettings(Protection):
    """How the delivery inspector of one app is protected (see :mod:`flask_nachocode.inspector`)."""

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
    #: The Prometheus counters, or None while NACHOCODE_METRICS is off.
    metrics: Metrics | None = None
    #: {prefix}/metrics's protection, or None while NACHOCODE_METRICS_ROUTE is off.
    metrics_route: Protection | None = None
    #: {prefix}/health is mounted (NACHOCODE_HEALTH_ROUTE).
    health_route: bool = False
    #: The app's own receiver of ``appcontext_pushed`` that hands Flask-Migrate the
    #: rendering hook, held here because blinker holds receivers weakly; None once it
    #: has stopped listening (``extension.init_app``).
    migrate_listener: Callable[..., None] | None = None

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
    metrics_route = bool(config["NACHOCODE_METRICS_ROUTE"])
    if metrics_route and not config["NACHOCODE_METRICS"]:
        raise RuntimeError(
            "NACHOCODE_METRICS_ROUTE serves the counters of NACHOCODE_METRICS: "
            "set NACHOCODE_METRICS = True too"
        )
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
        inspector=_inspector_settings(app, keys, url_prefix)
        if config["NACHOCODE_INSPECTOR"]
        else None,
        openapi=bool(config["NACHOCODE_OPENAPI"]),
        deferred=deferred,
        retry_delays=retry_delays,
        metrics=(
            Metrics.start(config["NACHOCODE_METRICS_REGISTRY"])
            if config["NACHOCODE_METRICS"]
            else None
        ),
        metrics_route=(
            Protection(*_protection(app, keys, "METRICS", f"{url_prefix}/metrics"))
            if metrics_route
            else None
        ),
        health_route=bool(config["NACHOCODE_HEALTH_ROUTE"]),
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


def _inspector_settings(app: Flask, keys: tuple[bytes, ...], url_prefix: str) -> InspectorSettings:
    """Read the inspector's protection; it also needs the session."""
    if not app.secret_key:
        raise RuntimeError(
            "NACHOCODE_INSPECTOR needs the app's SECRET_KEY: the inspector keeps its CSRF "
            "token (and a token login) in the session cookie"
        )
    return InspectorSettings(*_protection(app, keys, "INSPECTOR", f"{url_prefix}/deliveries"))


def _protection(
    app: Flask, keys: tuple[bytes, ...], page: str, url: str
) -> tuple[str | None, tuple[ViewDecorator, ...]]:
    """Read ``NACHOCODE_<page>_TOKEN`` and ``NACHOCODE_<page>_DECORATORS``; refuse a
    token that cannot work or would give the webhook key away, and warn when the
    page is on without protection (it then answers only in debug mode)."""
    config = app.config
    name = f"NACHOCODE_{page}_TOKEN"
    token = config[name]
    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH):
        raise RuntimeError(
            f"{name} must be a string of at least {MIN_TOKEN_LENGTH} characters; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    if token is not None and token.encode() in keys:
        # Whoever holds this token (a browser, a scraper's config) would hold the key too.
        raise RuntimeError(f"{name} must not be the webhook key: make a token of its own")
    decorators = resolve_decorators(
        f"NACHOCODE_{page}_DECORATORS", config[f"NACHOCODE_{page}_DECORATORS"]
    )
    if not (token or decorators):
        consequence = (
            "in debug mode anyone who can reach this server can read it"
            if app.debug
            else "the app is not in debug mode, so its pages answer 404"
        )
        logger.warning(
            "%s is on without protection: %s. Set NACHOCODE_%s_DECORATORS (your login "
            "decorator) or %s.",
            url,
            consequence,
            page,
            name,
        )
    return token, decorators

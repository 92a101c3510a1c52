"""The webhook routes and their request pipeline:

    key check -> content type / size -> parse -> validate -> dispatch -> answer

A step that refuses raises a :class:`~flask_nachocode.errors.WebhookError`; the
refusal is recorded (once the key check has passed) and answered through the
single error answer. Nothing reaches a handler unless every step passed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, NoReturn

from flask import Blueprint, Response, jsonify, request

from . import signals
from .auth import check_bearer
from .delivery import Delivery, Result, dispatch, record, storable_headers
from .errors import (
    BadBody,
    InternalError,
    PayloadTooLarge,
    UnsupportedMediaType,
    WebhookError,
    WrongMethod,
    error_answer,
)
from .events import ROUTES, ROUTES_BY_NAME, utcnow
from .metrics import Metrics
from .schemas import infer_event_name, load_event
from .state import current_state

_READ_CHUNK = 16384

#: Methods answered with the JSON 405 rather than Werkzeug's HTML page: a
#: blueprint's error handlers never see routing errors, so these get a rule.
_OTHER_METHODS = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for all requests: json.loads(text, parse_constant=...) builds a new one per call.
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def read_json_object(max_bytes: int, delivery: Delivery) -> dict[str, Any]:
    """The body as a JSON object, refusing anything else before it costs much.

    The size is checked on Content-Length before reading, and the read itself is
    bounded, so a chunked body without a length cannot make us hold more than
    ``max_bytes`` either.
    """
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.mimetype or 'missing'}"
        )
    # The WSGI key itself, not request.headers.get: a header that is absent (every
    # delivery) costs the headers' lookup a KeyError raised and caught, about 90
    # bytecode instructions per delivery.
    encoding = request.environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
    if encoding != "identity":
        # RFC 9110 section 15.5.16: an unsupported content coding is a 415, whose
        # Accept-Encoding says what would be taken. Nachocode sends bodies as they are.
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed",
            headers={"Accept-Encoding": "identity"},
        )
    too_large = PayloadTooLarge(f"the body is larger than {max_bytes} bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    stream = request.stream
    while size <= max_bytes:
        chunk = stream.read(min(_READ_CHUNK, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        raise too_large
    body = b"".join(chunks)
    delivery.body = body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("the body is not UTF-8") from None
    try:
        payload = _JSON_DECODER.decode(text)
    except ValueError as error:  # JSONDecodeError is a ValueError
        raise BadBody(f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise BadBody("the body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadBody("the body must be a JSON object")
    delivery.payload = payload
    return payload


def receive(route: str) -> Result:
    """Receive one delivery on the route named ``route`` (one of ``events.ROUTES``):
    what happened to it, or a raised refusal (401, or 503 while the store is unavailable)."""
    state = current_state()
    delivery = Delivery(route=route, received_at=utcnow(), started=time.perf_counter())
    # Before anything is read or stored: a delivery without the key leaves no trace.
    check_bearer(request.headers.get("Authorization"), state.keys)
    delivery.headers = storable_headers(request.headers, state.keys)
    delivery.remote_addr = request.remote_addr
    signals.send(signals.delivery_received, delivery=delivery)
    try:
        payload = read_json_object(state.max_body_bytes, delivery)
        event = load_event(ROUTES_BY_NAME[route].event or infer_event_name(payload), payload)
    except WebhookError as refusal:
        return record(state, delivery, refusal)
    return dispatch(state, delivery, event, defer=state.deferred)


def internal_error(error: Exception) -> Response:
    """The JSON answer for an unexpected exception (Flask has logged it already)."""
    return error_answer(InternalError("an unexpected error occurred; re-send this delivery later"))


def refuse_method(route: str) -> NoReturn:
    """Answer a non-POST request on a webhook URL; nothing is read or stored."""
    raise WrongMethod(request.method)


def answer(result: Result) -> Response:
    """The JSON answer for a dispatched or recorded delivery."""
    if result.error is not None:
        return error_answer(result.error, event=result.event_name, delivery=result.delivery_id)
    body = {
        "success": True,
        "event": result.event_name,
        "delivery": result.delivery_id,
        "duplicate": result.duplicate,
    }
    if result.deferred:  # 202: the handlers run in a worker
        body["deferred"] = True
    response = jsonify(body)
    response.status_code = result.status
    return response


def make_blueprint(metrics: Metrics | None = None) -> Blueprint:
    """The ``nachocode`` blueprint with the webhook routes, counted by ``metrics``
    when the app switched them on; the extension adds the optional routes."""
    # Wrapped once, here: an app without metrics runs no counting code, not even a test.
    take = receive if metrics is None else metrics.observed(receive)
    refuse: Callable[[str], Any] = (
        refuse_method if metrics is None else metrics.observed(refuse_method)
    )

    def receive_and_answer(route: str) -> Response:
        return answer(take(route))

    blueprint = Blueprint("nachocode", __name__)
    blueprint.register_error_handler(WebhookError, error_answer)
    blueprint.register_error_handler(500, internal_error)
    for route in ROUTES:
        blueprint.add_url_rule(
            route.path,
            "wrong_method" + route.path.replace("/", "_").replace("-", "_"),
            refuse,
            methods=_OTHER_METHODS,
            provide_automatic_options=False,
            defaults={"route": route.name},
        )
        blueprint.add_url_rule(
            route.path,
            route.name.replace("-", "_"),
            receive_and_answer,
            methods=["POST"],
            defaults={"route": route.name},
        )
    return blueprint

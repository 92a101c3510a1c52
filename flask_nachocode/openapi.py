"""The OpenAPI 3.1 document of the webhook routes, served at ``{prefix}/openapi.json``.

Built with apispec from the same marshmallow schemas that validate deliveries
(:data:`~flask_nachocode.schemas.SCHEMAS`), so the document cannot drift from
what the routes accept. It describes this app as configured: its URL prefix,
and the bearer scheme only when a webhook key is set. ``NACHOCODE_OPENAPI =
False`` removes the route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Response, jsonify
from marshmallow import EXCLUDE, Schema, fields, validate

from ._version import __version__
from .errors import (
    BODY_ERRORS,
    BadBody,
    HandlerFailed,
    InvalidEvent,
    NoHandler,
    PayloadTooLarge,
    StoreUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    WebhookError,
)
from .events import EVENT_NAMES, ROUTES_BY_EVENT
from .schemas import (
    NO_NUL_PATTERN,
    SCHEMAS,
    AppStoreDataSchema,
    BoundedInteger,
    Choice,
    PlayStoreDataSchema,
    Price,
    StoreDataField,
    Text,
    UTCDateTime,
)
from .state import AppState
from .testing import payload_for

#: What the timestamps must look like; a stricter form of JSON Schema's date-time.
TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$"

#: Event name -> the component name of its body schema.
BODY_COMPONENTS = {
    "purchase": "Purchase",
    "refund": "Refund",
    "unavailable_users": "UnavailableUsers",
}

#: Added to the purchase and refund bodies: which ``data`` goes with which ``os``.
STORE_DATA_BY_OS = {
    "oneOf": [
        {
            "properties": {
                "os": {"const": "android"},
                "data": {"$ref": "#/components/schemas/PlayStoreData"},
            }
        },
        {
            "properties": {
                "os": {"const": "ios"},
                "data": {"$ref": "#/components/schemas/AppStoreData"},
            }
        },
    ]
}

#: Every refusal the routes can answer, in the order the answers table lists them.
REFUSALS: list[tuple[type[WebhookError], str]] = [
    (BadBody, "The body is not a UTF-8 JSON object."),
    (Unauthorized, "The Authorization: Bearer key is missing or wrong; nothing was stored."),
    (PayloadTooLarge, "The body is larger than NACHOCODE_MAX_BODY_BYTES."),
    (
        UnsupportedMediaType,
        "The Content-Type is not application/json, or the body is compressed "
        "(Content-Encoding other than identity).",
    ),
    (
        InvalidEvent,
        "The body is not a valid event, or refused by a handler with 422; `errors` maps "
        "dotted field paths (`_body` for the whole body) to messages.",
    ),
    (HandlerFailed, "A handler raised; the delivery is stored as failed and can be replayed."),
    (
        NoHandler,
        "No handler is registered for the event; the delivery is stored and can be replayed.",
    ),
    (
        StoreUnavailable,
        "The delivery store could not be reached, its tables are missing, or another "
        "transaction held this delivery's lock for 5 s; nothing was handled.",
    ),
]


class HandledAnswerSchema(Schema):
    """The answer to a delivery that was handled, or recognised as a duplicate."""

    class Meta:
        # Answers may gain fields; a client must not break on one.
        unknown = EXCLUDE

    success = fields.Boolean(required=True, validate=validate.OneOf([True]))
    event = fields.String(required=True, validate=validate.OneOf(EVENT_NAMES))
    delivery = fields.Integer(required=True, metadata={"description": "Id of the stored delivery."})
    duplicate = fields.Boolean(
        required=True,
        metadata={"description": "True when this event was handled before; handlers did not run."},
    )


class QueuedAnswerSchema(HandledAnswerSchema):
    """The answer to a delivery kept for a worker (``NACHOCODE_DEFERRED``)."""

    deferred = fields.Boolean(
        required=True,
        validate=validate.OneOf([True]),
        metadata={"description": "Kept as queued; a worker runs the handlers, with retries."},
    )


class ErrorAnswerSchema(Schema):
    """The one error answer (:func:`flask_nachocode.errors.error_answer`)."""

    class Meta:
        unknown = EXCLUDE

    success = fields.Boolean(required=True, validate=validate.OneOf([False]))
    error = fields.String(required=True, metadata={"description": "Stable machine-readable code."})
    message = fields.String(
        required=True, metadata={"description": "A sentence for the webhook log's reader."}
    )
    event = fields.String(allow_none=True, validate=validate.OneOf(EVENT_NAMES))
    delivery = fields.Integer(
        allow_none=True, metadata={"description": "Id of the stored delivery, when stored."}
    )
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={
            "description": "Always on a 422: each dotted field path's messages, and "
            f"reasons about the whole body under `{BODY_ERRORS}`."
        },
    )


def _custom_fields(plugin: MarshmallowPlugin) -> None:
    """Teach apispec the field types of :mod:`flask_nachocode.schemas`."""
    assert plugin.converter is not None

    def properties(self: Any, field: Any, **kwargs: Any) -> dict[str, Any]:
        # apispec gives the JSON type of the three fields.String and fields.Integer
        # subclasses; their checks are attributes, not the validators it reads.
        if isinstance(field, Text):
            text: dict[str, Any] = {}
            if field.min_length:
                text["minLength"] = field.min_length
            if field.max_length is not None:
                text["maxLength"] = field.max_length
            return {**text, "pattern": NO_NUL_PATTERN}
        if isinstance(field, Choice):
            return {"enum": field.choices}
        if isinstance(field, BoundedInteger):
            return {"minimum": field.minimum, "maximum": field.maximum}
        if isinstance(field, UTCDateTime):
            return {"type": "string", "format": "date-time", "pattern": TIMESTAMP_PATTERN}
        if isinstance(field, Price):
            return {"type": "number", "minimum": 0}
        if isinstance(field, StoreDataField):
            # Its shape depends on ``os``: see STORE_DATA_BY_OS on the body schemas.
            return {
                "type": "object",
                "description": "Play Store fields when os is android, App Store fields when ios.",
            }
        return {}

    plugin.converter.add_attribute_function(properties)  # type: ignore[no-untyped-call]


def build_document(state: AppState) -> dict[str, Any]:
    """The OpenAPI document of this app's webhook routes, as a dict."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Nachocode webhooks",
        version=__version__,
        openapi_version="3.1.0",
        plugins=[plugin],
        info={"description": "The routes that receive Nachocode's webhooks (flask-nachocode)."},
    )
    _custom_fields(plugin)
    spec.components.schema("PlayStoreData", schema=PlayStoreDataSchema)
    spec.components.schema("AppStoreData", schema=AppStoreDataSchema)
    for event, component in BODY_COMPONENTS.items():
        extra = STORE_DATA_BY_OS if event in ("purchase", "refund") else None
        spec.components.schema(component, extra, schema=SCHEMAS[event])
    spec.components.schema("HandledAnswer", schema=HandledAnswerSchema)
    spec.components.schema("ErrorAnswer", schema=ErrorAnswerSchema)
    if state.deferred:
        spec.components.schema("QueuedAnswer", schema=QueuedAnswerSchema)
    if state.keys:
        spec.components.security_scheme(
            "webhookKey",
            {
                "type": "http",
                "scheme": "bearer",
                "description": "The webhook key set in the Nachocode dashboard.",
            },
        )

    error = {"content": {"application/json": {"schema": "ErrorAnswer"}}}
    responses: dict[str, Any] = {
        "200": {
            "description": "Handled, or a duplicate of a handled event.",
            "content": {"application/json": {"schema": "HandledAnswer"}},
        }
    }
    if state.deferred:
        responses["200"]["description"] = "A duplicate of a queued or handled event."
        responses["202"] = {
            "description": "Valid and claimed: kept as queued for a worker to handle.",
            "content": {"application/json": {"schema": "QueuedAnswer"}},
        }
    for refusal, description in REFUSALS:
        if refusal is not Unauthorized or state.keys:
            responses[str(refusal.status)] = {"description": description, **error}
    invalid = {"allOf": [{"$ref": "#/components/schemas/ErrorAnswer"}, {"required": ["errors"]}]}
    responses[str(InvalidEvent.status)]["content"] = {"application/json": {"schema": invalid}}
    responses["4XX"] = {
        "description": "Refused by a handler (Refuse) with a status of its choice.",
        **error,
    }
    responses["5XX"] = {
        "description": "Refused by a handler (Refuse) with a status of its choice.",
        **error,
    }

    for route in ROUTES_BY_EVENT:
        if route == "any":
            body_schema: Any = {
                "anyOf": [
                    {"$ref": f"#/components/schemas/{name}"} for name in BODY_COMPONENTS.values()
                ]
            }
            summary = "Receive any event; the body's shape tells which."
            examples = {}
        else:
            body_schema = BODY_COMPONENTS[route]
            summary = f"Receive the {route} webhook."
            # Built by the testing factories, like the bodies of `flask nachocode send`.
            platforms: list[str | None] = (
                ["android", "ios"] if route != "unavailable_users" else [None]
            )
            examples = {
                platform or route: {"value": payload_for(route, os=platform)}
                for platform in platforms
            }
        content: dict[str, Any] = {"schema": body_schema}
        if examples:
            content["examples"] = examples
        operation: dict[str, Any] = {
            "operationId": f"receive_{route}",
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": content}},
            "responses": responses,
        }
        if state.keys:
            operation["security"] = [{"webhookKey": []}]
        spec.path(
            path=f"{state.url_prefix}{ROUTES_BY_EVENT[route].path}", operations={"post": operation}
        )
    return spec.to_dict()


def make_openapi_view(state: AppState) -> Callable[[], Response]:
    """The view answering ``GET {prefix}/openapi.json``; the document is built on
    first request, once per app."""
    document: dict[str, Any] = {}

    def openapi_json() -> Response:
        if not document:
            document.update(build_document(state))
        return jsonify(document)

    return openapi_json

"""One JSON error answer and one exception type per refusal.

Every answer the webhook routes give is JSON with a boolean ``success``, so that
Nachocode's webhook log (which keeps the response body) always says why a
delivery failed. Views never build error bodies by hand: they raise one of the
exceptions below and :func:`error_answer` turns it into the response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Response, jsonify

#: The key of ``errors`` for reasons about the whole body rather than one field.
BODY_ERRORS = "_body"


class WebhookError(Exception):
    """A delivery refused before or instead of being handled.

    ``status`` is the HTTP status answered, ``code`` a stable machine-readable
    name, ``message`` a sentence for the human reading the webhook log.
    """

    status: int = 400
    code: str = "bad_request"
    #: Stored outcome of the delivery, for refusals that happen after the key check.
    outcome: str = "invalid"

    def __init__(
        self,
        message: str,
        *,
        errors: Mapping[str, list[str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.errors = dict(errors) if errors else None
        self.headers = dict(headers) if headers else None


class Unauthorized(WebhookError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        # RFC 6750 section 3: a 401 for a bearer-protected resource names the scheme.
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="nachocode"'})


class BadBody(WebhookError):
    status = 400
    code = "bad_body"


class PayloadTooLarge(WebhookError):
    status = 413
    code = "payload_too_large"


class WrongMethod(WebhookError):
    """Anything but POST on a webhook URL, e.g. someone opening it in a browser."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, method: str) -> None:
        super().__init__(f"webhook URLs take POST only, not {method}", headers={"Allow": "POST"})


class UnsupportedMediaType(WebhookError):
    status = 415
    code = "unsupported_media_type"


class InvalidEvent(WebhookError):
    status = 422
    code = "invalid_event"


class NoHandler(WebhookError):
    status = 501
    code = "no_handler"
    outcome = "unhandled"


class HandlerFailed(WebhookError):
    """A handler raised: the answer hides the exception, the store keeps it."""

    status = 500
    code = "handler_failed"
    outcome = "failed"


class InternalError(WebhookError):
    """Anything else that went wrong outside the handlers (a bug, or a
    ``delivery_received`` receiver that raised): still one JSON answer, logged by
    Flask with its traceback."""

    status = 500
    code = "internal_error"


class StoreUnavailable(WebhookError):
    status = 503
    code = "store_unavailable"


class BadPurchaseId(WebhookError):
    """The purchase-status route was asked about something that is no ``iapLogId``."""

    status = 400
    code = "bad_iap_log_id"


class Refuse(WebhookError):
    """Raise from a handler to refuse a delivery on purpose, with your own answer.

    Unlike a crash (which answers 500 and is logged with its traceback), a refusal
    is an expected business decision, for example a purchase for a user account
    that does not exist::

        @nachocode.on_purchase
        def grant(event):
            if not User.query.get(event.user_id):
                raise Refuse("no such user", status=404)

    The handler's database writes are rolled back, the delivery is stored with
    the outcome ``refused``, and the answer is ``status`` (a 4xx or 5xx, so that
    Nachocode shows it as failed and it can be re-sent from the dashboard once
    the cause is fixed) with ``{"success": false, "error": code, "message": ...}``.
    """

    outcome = "refused"

    def __init__(self, message: str, *, status: int = 422, code: str = "refused") -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"a refusal needs a 4xx or 5xx status, not {status}")
        super().__init__(message)
        self.status = status
        self.code = code


def error_answer(error: WebhookError, **extra: Any) -> Response:
    """The single place that turns a refusal into its JSON answer; ``extra``
    adds fields such as the stored delivery's id. A 422 always has ``errors``
    (one shape for every 422): a refusal that names no field gives its message
    under :data:`BODY_ERRORS`."""
    body: dict[str, Any] = {
        "success": False,
        "error": error.code,
        "message": error.message,
        **extra,
    }
    if error.errors:
        body["errors"] = error.errors
    elif error.status == 422:
        body["errors"] = {BODY_ERRORS: [error.message]}
    response = jsonify(body)
    response.status_code = error.status
    if error.headers:
        response.headers.update(error.headers)
    return response

"""marshmallow schemas for the three webhook bodies, and the one place that maps
an event name to its schema.

The schemas follow Nachocode's field tables (``shared/nachocode/README.md``):
every documented field is required, numbers must be JSON numbers (not strings,
not booleans), timestamps are ISO 8601 UTC. Unknown fields are accepted, since
Nachocode may add some; the event keeps the original object on ``event.raw``.
Schemas are built once at import, not per request.

The fields make their checks in ``_deserialize``, in one pass, rather than through
validators, which marshmallow runs through an ``And()`` it builds on every call
(the manual's performance page has the figures). The OpenAPI document
(:mod:`flask_nachocode.openapi`) reads their bounds from the attributes they keep.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    missing,
    validates_schema,
)

from .errors import BODY_ERRORS, InvalidEvent
from .events import (
    AppStorePurchaseData,
    Event,
    PlayStorePurchaseData,
    PurchaseEvent,
    RefundEvent,
    UnavailableUsersEvent,
)

_TIMESTAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.(\d{1,6}))?(Z|[+-]\d{2}:\d{2})\Z"
)


# This base subclasses the bare ``fields.Field``: it is generic only from marshmallow 4,
# and subscripting it would fail at import on marshmallow 3, which we support too.
class _SelfChecking(fields.Field):  # type: ignore[type-arg]
    """Base of the fields below, which make all their checks in ``_deserialize``."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # Field-level pre_load / post_load functions exist from marshmallow 4 only.
        self._hooked = bool(getattr(self, "pre_load", None) or getattr(self, "post_load", None))

    def deserialize(
        self, value: Any, attr: str | None = None, data: Any = None, **kwargs: Any
    ) -> Any:
        # marshmallow's deserialize wraps _deserialize in missing/null handling, hooks
        # and validators; a present value of a field with none of those needs only it.
        if value is missing or value is None or self.validators or self._hooked:
            return super().deserialize(value, attr, data, **kwargs)
        return self._deserialize(value, attr, data, **kwargs)


class UTCDateTime(_SelfChecking):
    """An ISO 8601 timestamp with an explicit zone, loaded as an aware UTC datetime.

    Nachocode sends ``YYYY-MM-DDTHH:mm:ss.sssZ``; seconds without a fraction and
    explicit offsets are accepted too. A timestamp without a zone is refused:
    guessing its zone could shift a purchase or refund by hours.
    """

    default_error_messages = {
        "invalid": "Not an ISO 8601 timestamp with a zone, such as 2025-02-19T02:00:31.280Z."
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        match = _TIMESTAMP.match(value) if isinstance(value, str) else None
        if match is None:
            raise self.make_error("invalid")
        if len(value) == 24 and value[23] == "Z":
            # The form Nachocode sends: a 24-character match ending in "Z" has three
            # fraction digits, which 3.10 parses as they are, so only "Z" needs spelling out.
            text = value[:23] + "+00:00"
        else:
            day, time, fraction, zone = match.groups()
            # Python 3.10's fromisoformat takes neither "Z" nor 1-2 or 4-5 digit fractions.
            offset = "+00:00" if zone == "Z" else zone
            text = f"{day}T{time}.{(fraction or '').ljust(6, '0')}{offset}"
        try:
            return datetime.fromisoformat(text).astimezone(timezone.utc)
        except (ValueError, OverflowError) as error:  # month 13; year 1 with a + offset
            raise self.make_error("invalid") from error


MAX_PRICE = Decimal(10**15)


class Price(_SelfChecking):
    """A JSON number (integer or fraction), kept exactly as a ``Decimal``."""

    default_error_messages = {
        "invalid": "Not a number.",
        "negative": "Must be 0 or more.",
        "too_large": f"Must be at most {10**15}.",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal:
        if value is True or value is False or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.make_error("invalid")
        # str() of a float is its shortest round-trip form: 9.99 stays 9.99, not 9.9900000001.
        price = Decimal(value) if isinstance(value, int) else Decimal(str(value))
        if price < 0:
            raise self.make_error("negative")
        # Far above any real price; an unbounded integer would not fit the ledger's column.
        if price > MAX_PRICE:
            raise self.make_error("too_large")
        return price


#: Longest id accepted: store purchase ids (Play ``orderId``, App Store
#: ``transactionId``, the width of the ledger's column), ``userId`` (every user id of
#: an ``unavailable_users`` body too) and the product ids. Real ones are under 100
#: characters. The bound is what keeps every id inside an index entry on every
#: database: 256 characters are at most 1,024 bytes of UTF-8, below PostgreSQL's
#: B-tree limit (2,704 bytes) and InnoDB's key limit (3,072 bytes, 768 utf8mb4
#: characters), and a refund's identity built from one stays inside its 512 characters.
MAX_ID_LENGTH = 256

#: The NUL check as a pattern, for the OpenAPI document. Written for both Python and
#: ECMA 262 (JSON Schema); ``$`` may match before a final newline, but never before a NUL.
NO_NUL_PATTERN = r"^[^\x00]*$"


class Text(_SelfChecking, fields.String):
    """A string of ``min_length`` to ``max_length`` characters that databases can store.

    A NUL is refused, and so is a lone surrogate: it is legal JSON (``"\\ud800"``)
    but no database driver can encode it, and the INSERT raised UnicodeEncodeError,
    a 500, on SQLite and PostgreSQL. Every failed check is reported, with the
    messages of marshmallow's ``Length`` validator for the length.
    """

    default_error_messages = {
        "too_short": "Shorter than minimum length {min}.",
        "length": "Length must be between {min} and {max}.",
        "nul": "Must not contain NUL characters.",
        "surrogate": "Must not contain unpaired surrogate characters.",
    }

    def __init__(self, *, min_length: int = 0, max_length: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.min_length = min_length
        self.max_length = max_length

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        # Anything but a str is refused, or taken as fields.String takes it (bytes).
        text: str = value if type(value) is str else super()._deserialize(value, attr, data)
        errors: list[Any] = []
        length = len(text)
        if length < self.min_length or (self.max_length is not None and length > self.max_length):
            message = str(self.error_messages["too_short" if self.max_length is None else "length"])
            errors.append(message.format(min=self.min_length, max=self.max_length))
        if "\x00" in text:
            errors.append(self.error_messages["nul"])
        # isascii() costs nothing on CPython's strings, and ASCII holds no surrogate.
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                errors.append(self.error_messages["surrogate"])
        if errors:
            raise ValidationError(errors)
        return text


def _text(max_length: int | None = None) -> Text:
    return Text(required=True, min_length=1, max_length=max_length)


def fits_id(value: str) -> bool:
    """Whether ``value`` could be an id the schemas accept (a user id, for example),
    so that a lookup by it can find something: ids are at most :data:`MAX_ID_LENGTH`
    characters, without NUL or unpaired surrogates. Checked before a query, because
    PostgreSQL refuses a NUL in a parameter outright, as an error, not a miss."""
    if len(value) > MAX_ID_LENGTH or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Choice(_SelfChecking, fields.String):
    """One of ``choices``, with the message of marshmallow's ``OneOf`` validator."""

    default_error_messages = {"invalid_choice": "Must be one of: {choices}."}

    def __init__(self, choices: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.choices = choices
        self._choice_set = frozenset(choices)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text: str = value if type(value) is str else super()._deserialize(value, attr, data)
        if text not in self._choice_set:
            raise self.make_error("invalid_choice", choices=", ".join(self.choices))
        return text


#: Bounds that keep every integer inside a signed 64-bit (ids) or 32-bit (counts)
#: database column: JSON integers are unbounded, and an overflow at INSERT time
#: would turn a bad body into a server error instead of a 422. Counts stop at half
#: the 32-bit range because the ledger adds a refund to what was already refunded.
MAX_ID = 2**63 - 1
MAX_COUNT = 2**30 - 1

_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_id(text: str) -> int | None:
    """``text`` as an id (an ``iapLogId``, a delivery id) when it is written in ASCII
    digits and fits :data:`MAX_ID`, else None. Not ``str.isdigit``/``int``, which
    also take other scripts' digits (``"٣"`` is 3)."""
    if _ASCII_DIGITS.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= MAX_ID else None


class BoundedInteger(_SelfChecking, fields.Integer):
    """A JSON integer (not a float, string or boolean) from ``minimum`` to ``maximum``,
    with the message of marshmallow's ``Range`` validator."""

    default_error_messages = {
        "range": "Must be greater than or equal to {min} and less than or equal to {max}."
    }

    def __init__(self, *, minimum: int, maximum: int, **kwargs: Any):
        super().__init__(strict=True, **kwargs)
        self.minimum = minimum
        self.maximum = maximum

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        # Anything but an int is refused, or taken as a strict fields.Integer takes it.
        number: int = value if type(value) is int else super()._deserialize(value, attr, data)
        if not self.minimum <= number <= self.maximum:
            raise self.make_error("range", min=self.minimum, max=self.maximum)
        return number


def _count() -> BoundedInteger:
    return BoundedInteger(required=True, minimum=1, maximum=MAX_COUNT)


# The schemas validate; their ``build`` makes the typed object of what ``load``
# returned: a post_load hook would do the same through marshmallow's slower dispatch.


class PlayStoreDataSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    purchaseToken = _text()
    orderId = _text(MAX_ID_LENGTH)

    def build(self, data: dict[str, Any]) -> PlayStorePurchaseData:
        return PlayStorePurchaseData(purchase_token=data["purchaseToken"], order_id=data["orderId"])


class AppStoreDataSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    originalTransactionId = _text(MAX_ID_LENGTH)
    transactionId = _text(MAX_ID_LENGTH)

    def build(self, data: dict[str, Any]) -> AppStorePurchaseData:
        return AppStorePurchaseData(
            original_transaction_id=data["originalTransactionId"],
            transaction_id=data["transactionId"],
        )


_STORE_DATA_SCHEMAS: dict[str, PlayStoreDataSchema | AppStoreDataSchema] = {
    "android": PlayStoreDataSchema(),
    "ios": AppStoreDataSchema(),
}


class StoreDataField(_SelfChecking):
    """``data``: Play Store fields for android, App Store fields for ios.

    The shape depends on the sibling ``os`` field, which marshmallow passes to
    fields as the whole input object.
    """

    default_error_messages = {"invalid": "Not a JSON object."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        platform = data.get("os") if isinstance(data, Mapping) else None
        # ``os`` may be any JSON value here (a list is unhashable): look up strings only.
        schema = _STORE_DATA_SCHEMAS.get(platform) if isinstance(platform, str) else None
        if schema is None:
            # ``os`` itself is invalid and reported there; the store shape is unknowable.
            return None
        return schema.build(schema.load(value))


class _BodySchema(Schema):
    """The schema of one webhook body."""

    def build(self, data: dict[str, Any], body: dict[str, Any]) -> Event:
        """The event of ``data``, which :meth:`load` returned for ``body``."""
        raise NotImplementedError


class _InAppSchema(_BodySchema):
    class Meta:
        unknown = EXCLUDE

    userId = _text(MAX_ID_LENGTH)
    iapLogId = BoundedInteger(required=True, minimum=0, maximum=MAX_ID)
    nachoProductId = _text(MAX_ID_LENGTH)
    os = Choice(["android", "ios"], required=True)
    productId = _text(MAX_ID_LENGTH)
    productType = Choice(["consumable", "non-consumable"], required=True)
    quantity = _count()
    price = Price(required=True)
    environment = Choice(["sandbox", "production"], required=True)
    data = StoreDataField(required=True)

    def _common(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "user_id": data["userId"],
            "iap_log_id": data["iapLogId"],
            "nacho_product_id": data["nachoProductId"],
            "os": data["os"],
            "product_id": data["productId"],
            "product_type": data["productType"],
            "quantity": data["quantity"],
            "price": data["price"],
            "environment": data["environment"],
            "data": data["data"],
        }


class PurchaseSchema(_InAppSchema):
    requestedAt = UTCDateTime(required=True)
    purchasedAt = UTCDateTime(required=True)
    verifiedAt = UTCDateTime(required=True)

    def build(self, data: dict[str, Any], body: dict[str, Any]) -> PurchaseEvent:
        return PurchaseEvent(
            **self._common(data),
            requested_at=data["requestedAt"],
            purchased_at=data["purchasedAt"],
            verified_at=data["verifiedAt"],
            raw=body,
        )


class RefundSchema(_InAppSchema):
    refundQuantity = _count()
    refundedAt = UTCDateTime(required=True)

    @validates_schema(skip_on_field_errors=True)
    def _refund_within_quantity(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data["refundQuantity"] > data["quantity"]:
            raise ValidationError("Must not exceed quantity.", field_name="refundQuantity")

    def build(self, data: dict[str, Any], body: dict[str, Any]) -> RefundEvent:
        return RefundEvent(
            **self._common(data),
            refund_quantity=data["refundQuantity"],
            refunded_at=data["refundedAt"],
            raw=body,
        )


class UnavailableUsersSchema(_BodySchema):
    class Meta:
        unknown = EXCLUDE

    tokenNotFoundUserIds = fields.List(Text(max_length=MAX_ID_LENGTH), required=True)
    tokenInvalidUserIds = fields.List(Text(max_length=MAX_ID_LENGTH), required=True)

    def build(self, data: dict[str, Any], body: dict[str, Any]) -> UnavailableUsersEvent:
        return UnavailableUsersEvent(
            token_not_found_user_ids=data["tokenNotFoundUserIds"],
            token_invalid_user_ids=data["tokenInvalidUserIds"],
            raw=body,
        )


#: Event name -> the schema that validates its body. The only such mapping.
SCHEMAS: dict[str, _BodySchema] = {
    "purchase": PurchaseSchema(),
    "refund": RefundSchema(),
    "unavailable_users": UnavailableUsersSchema(),
}

_REFUND_MARKERS = ("refundQuantity", "refundedAt")
_PURCHASE_MARKERS = ("requestedAt", "purchasedAt", "verifiedAt")
_PUSH_MARKERS = ("tokenNotFoundUserIds", "tokenInvalidUserIds")
_MARKERS = _REFUND_MARKERS + _PURCHASE_MARKERS + _PUSH_MARKERS


def infer_event_name(body: Mapping[str, Any]) -> str:
    """Tell the event from the body's shape, for the single all-events URL.

    Nachocode puts the event type neither in the body nor in a header. Refund
    fields win over purchase fields because a refund repeats the purchase's
    fields; a body that mixes in-app purchase and push fields is refused rather
    than guessed. A marker whose value is null does not count.
    """
    # A marker that is null counts as absent: a purchase carrying "refundedAt": null
    # is a purchase, as /webhooks/purchase takes it.
    present = {key for key in _MARKERS if body.get(key) is not None}
    in_app = not present.isdisjoint(_REFUND_MARKERS + _PURCHASE_MARKERS)
    push = not present.isdisjoint(_PUSH_MARKERS)
    if in_app and push:
        raise InvalidEvent(
            "the body has both in-app purchase fields and unavailable-user lists; "
            "it fits more than one event"
        )
    if not present.isdisjoint(_REFUND_MARKERS):
        return "refund"
    if in_app:
        return "purchase"
    if push:
        return "unavailable_users"
    raise InvalidEvent(
        "the body fits no event: expected refundQuantity/refundedAt (refund), "
        "requestedAt/purchasedAt/verifiedAt (purchase) or "
        "tokenNotFoundUserIds/tokenInvalidUserIds (unavailable_users)"
    )


def flatten_errors(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested error dict -> ``{"data.orderId": [...]}``; errors about
    the whole body (marshmallow's ``_schema``) under :data:`~flask_nachocode.errors.BODY_ERRORS`."""
    if isinstance(messages, list):
        return {prefix or BODY_ERRORS: [str(message) for message in messages]}
    if not isinstance(messages, dict):
        return {prefix or BODY_ERRORS: [str(messages)]}
    flat: dict[str, list[str]] = {}
    for key, value in messages.items():
        name = BODY_ERRORS if key == "_schema" and not prefix else str(key)
        flat.update(flatten_errors(value, f"{prefix}.{key}" if prefix else name))
    return flat


def load_event(name: str, body: dict[str, Any]) -> Event:
    """Validate ``body`` as the event ``name``; raise :class:`InvalidEvent` (422)."""
    schema = SCHEMAS[name]
    try:
        data = schema.load(body)
    except ValidationError as error:
        raise InvalidEvent(
            f"the body is not a valid {name} event", errors=flatten_errors(error.messages)
        ) from None
    return schema.build(data, body)

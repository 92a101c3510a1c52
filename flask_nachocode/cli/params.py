"""What the ``flask nachocode`` commands share: their parameter types, the
delivery filter's options, and the one-line error for an unreachable store."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click
import sqlalchemy as sa

from ..events import EVENT_SPELLINGS
from ..reads import DeliveryFilter, parse_moment
from ..schemas import MAX_ID, parse_id
from ..sender import command_line_text
from ..store import describe_database_error
from ..tables import OUTCOMES


def needs_store(command: Callable[..., None]) -> Callable[..., None]:
    """A clear one-line error instead of a traceback when the database is unreachable."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except sa.exc.SQLAlchemyError as error:
            raise click.ClickException(
                f"the delivery store is unavailable: {describe_database_error(error)}"
            ) from None

    return run


class EventChoice(click.Choice):  # type: ignore[type-arg]
    """An event name, in either spelling (``unavailable_users`` or the URL's
    ``unavailable-users``); converted to the event name."""

    name = "event"

    def __init__(self) -> None:
        super().__init__(list(EVENT_SPELLINGS))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return EVENT_SPELLINGS[super().convert(value, param, ctx)]


class WholeNumber(click.IntRange):
    """A whole number in ASCII digits, from ``min`` to ``max``. Click's int also takes
    other scripts' digits ("٣" is 3), signs, spaces and underscores, as the inspector
    does not (it uses :func:`flask_nachocode.schemas.parse_id` too)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            number = parse_id(value)
            if number is None:
                wanted = f"a whole number in digits 0-9 up to {MAX_ID}"
                self.fail(f"{value!r} is not {wanted}", param, ctx)
            value = number
        return super().convert(value, param, ctx)


class Moment(click.ParamType):  # type: ignore[type-arg]
    """An ISO 8601 date (``2025-03-01``, its midnight) or date and time
    (``2025-03-01T09:30``, ``2025-03-01T09:30+09:00``), in UTC unless it names its
    offset; converted to an aware datetime in UTC."""

    name = "date"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        wanted = "an ISO date or date and time, e.g. 2025-03-01 or 2025-03-01T09:30+09:00"
        try:
            return parse_moment(value)
        except (ValueError, OverflowError, TypeError):
            self.fail(f"{value!r} is not {wanted}", param, ctx)


def _id_text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    # An empty id would be no filter at all: every delivery, not none.
    if value == "":
        raise click.BadParameter("is empty", ctx, param)
    return command_line_text(value, f"'{param.opts[0]}'")


#: The options of :func:`filter_options`, as the keyword arguments they become.
_FILTER_NAMES = ("outcome", "event", "user_id", "iap_log_id", "store_id", "since", "until")

_FILTER_OPTIONS = (
    click.option("--status", "outcome", type=click.Choice(OUTCOMES), help="Latest outcome."),
    click.option("--event", type=EventChoice()),
    click.option("--user", "user_id", metavar="ID", callback=_id_text, help="An exact user id."),
    click.option(
        "--iap-log-id",
        type=WholeNumber(0),
        metavar="N",
        help="A purchase's iapLogId (the SDK's purchaseId); finds its refunds too.",
    ),
    click.option(
        "--store-id",
        metavar="ID",
        callback=_id_text,
        help="A Play orderId or App Store transactionId: the purchase and its refunds.",
    ),
    click.option(
        "--since", type=Moment(), help="Received at or after this date or time (UTC by default)."
    ),
    click.option(
        "--until", type=Moment(), help="Received before this date or time (UTC by default)."
    ),
)


def filter_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the delivery filter's options to a command, which receives them as one
    :class:`~flask_nachocode.reads.DeliveryFilter`, ``where``. Put it just above the
    function, under the command's other decorators."""

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        values = {name: kwargs.pop(name) for name in _FILTER_NAMES}
        since, until = values.pop("since"), values.pop("until")
        if since is not None and until is not None and until <= since:
            raise click.BadParameter(
                f"{until.isoformat()} is not after --since {since.isoformat()}",
                param_hint="'--until'",
            )
        where = DeliveryFilter(
            outcome=values["outcome"] or "",
            event=values["event"] or "",
            user_id=values["user_id"] or "",
            iap_log_id=values["iap_log_id"],
            store_id=values["store_id"] or "",
            received_from=since,
            received_until=until,
        )
        command(where=where, **kwargs)

    for option in reversed(_FILTER_OPTIONS):
        run = option(run)
    return run


def has_filter(where: DeliveryFilter) -> bool:
    """Whether any of the filter's options was given."""
    return where != DeliveryFilter(replays=where.replays, replayable=where.replayable)

"""Showing stored deliveries to a person: in a terminal (the CLI) or a page (the inspector).

A stored body or answer is whatever somebody sent, so it is made safe to show here, once,
for both.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

from .errors import BODY_ERRORS, InvalidEvent
from .schemas import SCHEMAS, load_event

#: What :func:`parse_json` and :func:`pretty_json` return for a value that is not JSON.
NOT_JSON = object()


def escape_controls(text: str, keep: str = "\n\t") -> str:
    """Show control characters (except those in ``keep``) as escapes, so that a
    stored body cannot drive the terminal that displays it."""
    return "".join(
        ch
        if ch in keep or (ch.isprintable() and ch != "\x7f")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate written as its escape (``\\ud800``): legal in
    JSON, such a character cannot be encoded in UTF-8, so a page, a terminal or a
    database that holds it fails."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_json(raw: bytes | str) -> tuple[str, Any]:
    """``raw`` as text, and its parsed JSON value (``NOT_JSON`` when it is not JSON)."""
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "replace")
    try:
        return text, json.loads(text)
    except (ValueError, RecursionError):
        return text, NOT_JSON


#: Deepest nesting that is indented; a deeper body is shown as it was received.
#: Nachocode's bodies are 2 levels deep.
MAX_PRETTY_DEPTH = 20
#: Longest indented text shown (about 250 KB); past it the body is shown as received.
#: Indenting costs two spaces per level on every line, so a body of nested arrays
#: grows with the square of its depth: 61 KB of them made a 55 MB page.
MAX_PRETTY_CHARS = 250_000


def pretty_json(raw: bytes | str) -> tuple[str, Any]:
    """``raw`` indented when it is JSON (else the text as it is), and the parsed value
    (``NOT_JSON`` when it is not JSON); the text can always be encoded. A value nested deeper than
    :data:`MAX_PRETTY_DEPTH` or whose indented text would pass :data:`MAX_PRETTY_CHARS`
    is shown as received, so showing a body costs about as much as the body."""
    text, value = parse_json(raw)
    if value is NOT_JSON or not _pretty_fits(value, len(text)):
        return text, value
    # A lone surrogate comes back as the escape that was received, inside its string.
    return escape_surrogates(json.dumps(value, indent=2, ensure_ascii=False)), value


def _pretty_fits(value: Any, length: int) -> bool:
    """Whether ``value`` (``length`` characters as received) is shallow and small
    enough to indent. Walked with a stack: a deep value must not recurse here either."""
    # Each value of the received text gets at most one line, indented by its depth.
    budget = MAX_PRETTY_CHARS - length
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_PRETTY_DEPTH:
            return False
        container = isinstance(item, (dict, list))
        # A container's closing bracket takes a line of its own.
        budget -= (2 * depth + 2) * (2 if container else 1)
        if budget < 0:
            return False
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return True


def parse_stored_event(
    event_name: str | None, payload: Any
) -> tuple[str | None, list[tuple[str, str]], dict[str, list[str]] | None]:
    """What a handler received (or would receive): the event's class name and
    its fields as ``(dotted name, text)``, or the validation errors."""
    if event_name not in SCHEMAS or not isinstance(payload, dict):
        return None, [], None
    try:
        event = load_event(event_name, payload)
    except InvalidEvent as error:
        return None, [], error.errors or {BODY_ERRORS: [error.message]}
    fields = [("identity", _show(event.identity))] + list(_fields(event))
    return type(event).__name__, fields, None


def _fields(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    for field in dataclasses.fields(value):
        if field.name == "raw":  # the body, shown on its own
            continue
        item = getattr(value, field.name)
        if dataclasses.is_dataclass(item):
            yield from _fields(item, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", _show(item)


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "(none)"
    return str(value)

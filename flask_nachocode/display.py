"""Showing stored deliveries to a person: in a terminal (the CLI) or a page (the inspector).

A stored body or answer is whatever somebody sent, so it is made safe to show here, once,
for both.
"""

from __future__ import annotations

import json
from typing import Any

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


def parse_json(raw: bytes | str) -> tuple[str, Any]:
    """``raw`` as text, and its parsed JSON value (``NOT_JSON`` when it is not JSON)."""
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "replace")
    try:
        return text, json.loads(text)
    except (ValueError, RecursionError):
        return text, NOT_JSON


def pretty_json(raw: bytes | str) -> tuple[str, Any]:
    """``raw`` indented when it is JSON (else the text as it is), and the parsed value
    (``NOT_JSON`` when it is not JSON)."""
    text, value = parse_json(raw)
    if value is NOT_JSON:
        return text, value
    try:
        return json.dumps(value, indent=2, ensure_ascii=False), value
    except RecursionError:
        return text, value

"""Showing stored bodies to a person (the CLI's ``show``, the inspector's page):
indented while that stays about as large as the body, as received past that."""

from __future__ import annotations

import json

from flask_nachocode.display import MAX_PRETTY_CHARS, MAX_PRETTY_DEPTH, NOT_JSON, pretty_json


def nested(depth: int) -> str:
    """A JSON object whose innermost value is ``depth`` levels down."""
    return '{"a": ' + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "}"


def test_indented_up_to_the_depth_limit_then_as_received() -> None:
    at_limit = nested(MAX_PRETTY_DEPTH)
    text, value = pretty_json(at_limit)
    assert text == json.dumps(json.loads(at_limit), indent=2)
    assert value == json.loads(at_limit)

    deeper = nested(MAX_PRETTY_DEPTH + 1)
    text, value = pretty_json(deeper.encode())
    assert text == deeper  # as received, still parsed for the event view
    assert value == json.loads(deeper)


def test_indented_text_is_bounded_in_size() -> None:
    # Shallow but wide: 40 levels would be refused by depth, so stay under it and
    # make the indentation, not the data, pass the size limit.
    row = "[" * 15 + "0" + "]" * 15
    count = MAX_PRETTY_CHARS // 200
    body = "[" + ",".join([row] * count) + "]"
    assert len(json.dumps(json.loads(body), indent=2)) > MAX_PRETTY_CHARS
    text, _ = pretty_json(body)
    assert text == body

    small = "[" + ",".join([row] * 10) + "]"
    assert pretty_json(small)[0] == json.dumps(json.loads(small), indent=2)


def test_text_that_is_not_json_is_shown_as_it_is() -> None:
    for raw in (b"{oops", "[" * 100_000, b"\xff\xfe"):
        text, value = pretty_json(raw)
        assert value is NOT_JSON
        assert text == (raw if isinstance(raw, str) else raw.decode("utf-8", "replace"))

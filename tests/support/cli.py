"""Running ``flask nachocode`` commands in a test and reading what they print."""

from __future__ import annotations

from typing import Any


def run(store_app: Any, *args: str) -> Any:
    """``flask nachocode ARGS`` on a test app (a :class:`conftest.TestApp`)."""
    return store_app.app.test_cli_runner().invoke(args=["nachocode", *args])


def listed_ids(output: str) -> list[int]:
    """The delivery ids of a printed table, in its order."""
    return [int(line.split()[0]) for line in output.splitlines()[1:] if line.split()[0].isdigit()]


def delivery_id(answer: Any) -> int:
    """The stored delivery an answer names. Ids are not taken as 1, 2, 3...: on
    PostgreSQL a delivery whose handler failed also used up the id of the record
    its rolled-back claim had written."""
    return int(answer.get_json()["delivery"])

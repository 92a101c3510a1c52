"""The HTTP sender behind ``flask nachocode send``: POST a body to a running app as
Nachocode does, and keep the last body sent per event for ``--repeat``."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
from flask import current_app

from ._version import __version__
from .delivery import DELIVERY_BUDGET_SECONDS
from .display import escape_controls, pretty_json

#: Where ``send`` and ``urls`` expect the app when no URL is given: ``flask run``'s default.
DEFAULT_BASE_URL = "http://127.0.0.1:5000"

#: In the instance folder: the last body ``send`` sent for each event, for ``--repeat``.
LAST_SENT_FILE = "nachocode-last-sent.json"


def _last_sent_path() -> Path:
    return Path(current_app.instance_path) / LAST_SENT_FILE


def read_last_sent() -> dict[str, Any]:
    try:
        saved = json.loads(_last_sent_path().read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def save_last_sent(event: str, body: Any) -> None:
    path = _last_sent_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {**read_last_sent(), event: body}
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(saved, indent=2, ensure_ascii=False), encoding="utf-8")
    partial.replace(path)  # atomic: an interrupted send never leaves half a file


def set_field(body: Any, assignment: str) -> None:
    """Apply one ``--set path=value`` to ``body`` in place.

    The path is dotted (``data.orderId``; a number indexes a list); missing
    objects on the way are created. The value is parsed as JSON when it parses
    (``quantity=2`` stays a number, ``price=9.99`` too), else kept as a string;
    quote it to force a string (``userId='"42"'``).
    """
    path, equals, raw = assignment.partition("=")
    if not equals or not path:
        raise click.BadParameter(f"{assignment!r} is not FIELD=VALUE", param_hint="--set")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    keys = path.split(".")
    target = body
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth]) or "the body"
        if isinstance(target, dict):
            if last:
                target[key] = value
            else:
                target = target.setdefault(key, {})
        elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
            if last:
                target[int(key)] = value
            else:
                target = target[int(key)]
        elif isinstance(target, list):
            raise click.BadParameter(
                f"{path}: {where} is a list of {len(target)}; {key!r} is not an index in it",
                param_hint="--set",
            )
        else:
            raise click.BadParameter(f"{path}: {where} is not an object", param_hint="--set")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect is shown, not followed: following a 301/302 turns the POST into
    # a GET without the body, so the dashboard needs the final URL anyway.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def deliver(url: str, body: bytes, key: str | None) -> tuple[int, str, bytes, float]:
    """POST ``body`` to ``url`` as Nachocode does; return (status, reason,
    answer body, seconds taken). Raises ``click.ClickException`` when no answer
    came (unreachable, refused, timed out)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"flask-nachocode-send/{__version__}",
    }
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    started = time.perf_counter()
    try:
        with opener.open(request, timeout=DELIVERY_BUDGET_SECONDS) as response:
            status, reason, answer = response.status, response.reason, response.read()
    except urllib.error.HTTPError as error:  # a non-2xx answer: still an answer to show
        status, reason, answer = error.code, error.reason, error.read()
    except urllib.error.URLError as error:
        reason_text = error.reason
        if isinstance(reason_text, TimeoutError):
            raise _timed_out(url) from None
        if isinstance(reason_text, ConnectionRefusedError):
            raise click.ClickException(
                f"cannot reach {url}: connection refused. Is the app running "
                "(flask run), and on this host and port?"
            ) from None
        raise click.ClickException(f"cannot reach {url}: {reason_text}") from None
    except TimeoutError:
        raise _timed_out(url) from None
    except OSError as error:  # e.g. the connection reset mid-answer
        raise click.ClickException(f"no answer from {url}: {error}") from None
    return status, str(reason), answer, time.perf_counter() - started


def _timed_out(url: str) -> click.ClickException:
    return click.ClickException(
        f"no answer from {url} within {DELIVERY_BUDGET_SECONDS:g} s: Nachocode counts this "
        "delivery as failed"
    )


def show_answer(answer: bytes) -> str:
    """An app's answer, indented when it is JSON, safe for the terminal."""
    return escape_controls(pretty_json(answer)[0])

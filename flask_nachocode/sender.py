"""The HTTP sender behind ``flask nachocode send``: POST a body to a running app as
Nachocode does, and keep the last body sent per event for ``--repeat``."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from flask import current_app

from ._version import __version__
from .auth import key_bytes
from .delivery import DELIVERY_BUDGET_SECONDS
from .display import escape_controls, escape_surrogates, pretty_json
from .testing import refund_payload

#: Where ``send`` and ``urls`` expect the app when no URL is given: ``flask run``'s default.
DEFAULT_BASE_URL = "http://127.0.0.1:5000"

#: In the instance folder: the last body ``send`` sent for each event, for ``--repeat``.
LAST_SENT_FILE = "nachocode-last-sent.json"


def _last_sent_path() -> Path:
    return Path(current_app.instance_path) / LAST_SENT_FILE


#: Why a body is refused when JSON cannot hold it (Python's json recurses per level).
TOO_DEEP = "the body is nested too deeply to send"


def read_last_sent() -> dict[str, Any]:
    try:
        saved = json.loads(_last_sent_path().read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, RecursionError):  # a file edited or damaged
        return {}
    return saved if isinstance(saved, dict) else {}


def save_last_sent(event: str, body: Any) -> None:
    path = _last_sent_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {**read_last_sent(), event: body}
    try:
        text = json.dumps(saved, indent=2, ensure_ascii=False)
    except RecursionError:
        raise click.UsageError(TOO_DEEP) from None
    partial = path.with_suffix(".tmp")
    partial.write_text(escape_surrogates(text), encoding="utf-8")
    partial.replace(path)  # atomic: an interrupted send never leaves half a file


def encode_body(body: Any) -> bytes:
    """``body`` as Nachocode sends it: UTF-8 JSON. A lone surrogate (from a JSON escape
    in ``--file`` or ``--set``, such as ``"\\ud800"``) goes out as that escape."""
    try:
        text = json.dumps(body, ensure_ascii=False)
    except RecursionError:
        raise click.UsageError(TOO_DEEP) from None
    return escape_surrogates(text).encode("utf-8")


def refund_of_last_purchase(last_sent: dict[str, Any], platform: str) -> dict[str, Any] | None:
    """A refund of the last purchase sent from here, if it was on ``platform`` (else
    None). A one-line error when that purchase has nothing a refund carries over."""
    purchase = last_sent.get("purchase")
    if not isinstance(purchase, dict) or purchase.get("os") != platform:
        return None
    if not isinstance(purchase.get("data"), dict) or "quantity" not in purchase:
        raise click.ClickException(
            "the last purchase sent from here has no data or quantity to refund; "
            "send a purchase first, or give the refund's body with --file"
        )
    return refund_payload(purchase)


def command_line_text(value: str, option: str) -> str:
    """``value`` as given on the command line, refused when some of its bytes were not
    UTF-8 (Python passes each such byte on as a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise click.BadParameter(
            f"'{escape_surrogates(value)}' is not UTF-8 text", param_hint=option
        ) from None
    return value


def check_url(value: str, option: str) -> str:
    """``value`` when it is an http:// or https:// URL that can be sent as it is, else
    a one-line usage error that says what is wrong with it."""

    def refuse(why: str) -> click.BadParameter:
        return click.BadParameter(f"{value!r} {why}", param_hint=option)

    command_line_text(value, option)
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise refuse("contains a space or a control character; percent-encode it (%20)")
    if not value.isascii():
        raise refuse("is not ASCII; percent-encode it (a domain name in its xn-- form)")
    try:
        parts = urlsplit(value)
    except ValueError as error:  # "Invalid IPv6 URL"
        raise refuse(f"is not a URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise refuse("is not an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 (read for its check)
    except ValueError:
        raise refuse("is not a URL: its port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise refuse("has no host")
    return value


def check_key(key: str) -> str:
    """A ``--key`` that a Bearer header can carry and a configured key could match."""
    try:
        key_bytes(command_line_text(key, "--key"))
    except ValueError as error:
        raise click.BadParameter(f"a webhook key {error}", param_hint="--key") from None
    return key


def set_field(body: Any, assignment: str) -> None:
    """Apply one ``--set path=value`` to ``body`` in place.

    The path is dotted (``data.orderId``; a number indexes a list); missing
    objects on the way are created. The value is parsed as JSON when it parses
    (``quantity=2`` stays a number, ``price=9.99`` too), else kept as a string;
    quote it to force a string (``userId='"42"'``).
    """
    path, equals, raw = command_line_text(assignment, "--set").partition("=")
    if not equals or not path:
        raise click.BadParameter(f"{assignment!r} is not FIELD=VALUE", param_hint="--set")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    except RecursionError:
        raise click.BadParameter(
            f"{path}: the value is nested too deeply", param_hint="--set"
        ) from None
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
        # http.client sends header text as latin-1: this text is the key's UTF-8 bytes,
        # which is what the app compares (auth.key_bytes).
        headers["Authorization"] = "Bearer " + key_bytes(key).decode("latin-1")
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

"""Flask signals (blinker, as Flask's own) for metrics and logging that should not
live inside handlers. Each is sent with the app as sender.

- ``delivery_received``: a delivery passed the key check; ``delivery`` is the
  :class:`~flask_nachocode.dispatch.Delivery`.
- ``delivery_handled``: handled (answered 200), or a duplicate; ``event`` and
  ``result`` (``result.duplicate`` tells re-sends apart). With
  ``NACHOCODE_DEFERRED``, sent by the worker once the handlers' commit is done.
- ``delivery_failed``: answered with an error after the key check; ``event`` (None
  when the body was invalid), ``result`` and ``error``. With ``NACHOCODE_DEFERRED``,
  also sent by the worker when a delivery is refused, or failed after its last retry.
- ``delivery_queued``: with ``NACHOCODE_DEFERRED``, answered 202 and kept as
  ``queued``; ``event`` and ``result``.
- ``delivery_retry``: with ``NACHOCODE_DEFERRED``, an attempt's handler raised and
  another attempt is due; ``event``, ``result`` (still ``queued``), ``error`` (what the
  handler raised), ``attempt`` (its number, from 1) and ``next_attempt_at``.

All but ``delivery_received`` are sent after the delivery (or the attempt) was
committed: a receiver that raises is logged, the other receivers still run, and the
answer stays what was stored.
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import NamedSignal, Namespace
from flask import current_app

logger = logging.getLogger("flask_nachocode")

_signals = Namespace()

delivery_received = _signals.signal("nachocode-delivery-received")
delivery_handled = _signals.signal("nachocode-delivery-handled")
delivery_failed = _signals.signal("nachocode-delivery-failed")
delivery_queued = _signals.signal("nachocode-delivery-queued")
delivery_retry = _signals.signal("nachocode-delivery-retry")


def send(signal: NamedSignal, **kwargs: Any) -> None:
    """Send ``signal`` with the current app as sender; a receiver that raises
    propagates (``delivery_received``: nothing is stored yet)."""
    if signal.receivers:  # nothing listens (the usual case): skip the app lookup
        signal.send(current_app._get_current_object(), **kwargs)  # type: ignore[attr-defined]


def send_after_commit(signal: NamedSignal, **kwargs: Any) -> None:
    """Send ``signal`` with the current app as sender to each receiver in turn,
    logging (with its traceback) a receiver that raises instead of letting it turn
    a stored outcome into a different answer."""
    if not signal.receivers:  # nothing listens (the usual case): skip the app lookup
        return
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    for receiver in signal.receivers_for(app):
        try:
            receiver(app, **kwargs)
        except Exception:
            logger.exception(
                "nachocode: a receiver of %s raised; the delivery was stored and answered as %s",
                signal.name,
                kwargs["result"].outcome,
            )

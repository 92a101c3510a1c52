"""Flask signals (blinker, as Flask's own) for metrics and logging that should not
live inside handlers. Each is sent with the app as sender.

- ``delivery_received``: a delivery passed the key check; ``delivery`` is the
  :class:`~flask_nachocode.dispatch.Delivery`.
- ``delivery_handled``: answered 2xx; ``event`` and ``result`` (``result.duplicate``
  tells re-sends apart).
- ``delivery_failed``: answered with an error after the key check; ``event`` (None
  when the body was invalid), ``result`` and ``error``.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

delivery_received = _signals.signal("nachocode-delivery-received")
delivery_handled = _signals.signal("nachocode-delivery-handled")
delivery_failed = _signals.signal("nachocode-delivery-failed")

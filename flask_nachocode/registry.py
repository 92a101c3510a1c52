"""The handler registry: which functions run for which event, in what order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from werkzeug.utils import ImportStringError, import_string

from .events import EVENT_NAMES

Handler = Callable[[Any], Any]


def check_event_name(name: str) -> str:
    if name not in EVENT_NAMES:
        raise ValueError(
            f"unknown Nachocode event {name!r}; expected one of {', '.join(EVENT_NAMES)}"
        )
    return name


class HandlerRegistry:
    """Handlers per event name, kept in registration order."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {name: [] for name in EVENT_NAMES}

    def add(self, name: str, handler: Handler) -> None:
        if not callable(handler):
            raise TypeError(f"a {name} handler must be callable, not {handler!r}")
        self._handlers[check_event_name(name)].append(handler)

    def get(self, name: str) -> list[Handler]:
        return self._handlers[name]

    def extended(self, other: HandlerRegistry) -> HandlerRegistry:
        """This registry's handlers followed by ``other``'s, per event."""
        merged = HandlerRegistry()
        for name in EVENT_NAMES:
            merged._handlers[name] = self._handlers[name] + other._handlers[name]
        return merged


def registry_from_config(config: Mapping[str, Any]) -> HandlerRegistry:
    """Build the registry ``NACHOCODE_HANDLERS`` describes.

    Each entry maps an event name to ``"package.module:function"`` or a list of
    them. Anything wrong stops start-up with a message naming the entry, since
    a handler that silently fails to load is a purchase nobody grants.
    """
    registry = HandlerRegistry()
    for name, targets in config.items():
        if name not in EVENT_NAMES:
            raise RuntimeError(
                f"NACHOCODE_HANDLERS[{name!r}]: unknown event; "
                f"expected one of {', '.join(EVENT_NAMES)}"
            )
        for target in [targets] if isinstance(targets, str) else list(targets):
            if not isinstance(target, str):
                raise RuntimeError(
                    f"NACHOCODE_HANDLERS[{name!r}]: {target!r} is not a "
                    "'package.module:function' string"
                )
            try:
                handler = import_string(target)
            except (ImportError, ImportStringError) as error:
                raise RuntimeError(
                    f"NACHOCODE_HANDLERS[{name!r}]: cannot import {target!r}: {error}"
                ) from error
            if not callable(handler):
                raise RuntimeError(f"NACHOCODE_HANDLERS[{name!r}]: {target!r} is not callable")
            registry.add(name, handler)
    return registry

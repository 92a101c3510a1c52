"""The bearer-key check: the first thing every delivery goes through.

Nachocode sends ``Authorization: Bearer {webhook key}`` when a webhook key is set
in its dashboard. The key is a shared secret, not a signature: it proves the
sender knows the key, so it is only as safe as the HTTPS connection carrying it.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

from .errors import Unauthorized

#: What ``NACHOCODE_WEBHOOK_KEY`` may hold: one key, or several during a rotation.
KeyConfig = str | Sequence[str] | None


def normalize_keys(configured: KeyConfig) -> tuple[bytes, ...]:
    """Turn the config value into the tuple of accepted keys (empty: no key check).

    Raises ``ValueError`` for values that would silently disable or weaken the
    check, such as an empty string or a non-string entry.
    """
    if configured is None:
        return ()
    if isinstance(configured, str):
        candidates: Iterable[object] = (configured,)
    elif isinstance(configured, (list, tuple)):
        candidates = configured
    else:  # a number, bytes or dict would be iterated into nonsense keys
        raise ValueError("NACHOCODE_WEBHOOK_KEY must be a string or a list of strings")
    keys = []
    for key in candidates:
        if not isinstance(key, str) or not key.strip():
            raise ValueError("NACHOCODE_WEBHOOK_KEY entries must be non-empty strings")
        try:
            keys.append(key_bytes(key))
        except ValueError as error:
            raise ValueError(f"NACHOCODE_WEBHOOK_KEY entries {error}") from None
    if not keys:
        raise ValueError("NACHOCODE_WEBHOOK_KEY is an empty list; use None to disable the check")
    return tuple(keys)


def key_bytes(key: str) -> bytes:
    """``key`` as the bytes a Bearer header carries: its UTF-8. ``ValueError`` (whose
    message follows "a key") for a key that no delivery could match."""
    if any(ch.isspace() for ch in key):
        # A bearer token cannot carry white space, so such a key (usually a
        # copy-paste slip) would refuse every delivery with a 401.
        raise ValueError("must not contain spaces or line breaks")
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, passed on as lone surrogates
        raise ValueError("must be UTF-8 text") from None


def check_bearer(authorization: str | None, keys: tuple[bytes, ...]) -> None:
    """Raise :class:`Unauthorized` unless ``authorization`` carries one of ``keys``.

    The scheme is matched case-insensitively (RFC 6750 follows RFC 7235 there);
    the key itself is compared exactly and in constant time. Every configured key
    is compared, whichever matches, so timing does not reveal which one matched.
    """
    if not keys:
        return
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must use the Bearer scheme")
    # WSGI hands header values over as latin-1 text: encoding back gives the bytes sent.
    presented = token.strip(" \t").encode("latin-1", "replace")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    if not matched:
        raise Unauthorized("wrong webhook key")

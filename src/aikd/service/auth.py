"""API keys for ``/v1/*`` (``--api-key-file``): ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.

The file holds one key a line (blank lines and ``#`` comments ignored). A request's key is compared with every key
by :func:`hmac.compare_digest` (constant time, and every key is compared, so the time tells nothing about which key
came close). Keys are never logged and never echoed: a refused request gets 401 ``unauthorized`` and nothing more.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ApiKeys", "read_api_keys"]

MIN_KEY_LENGTH = 16  # shorter keys can be guessed; refuse them at start rather than serve with them


def read_api_keys(path: str | os.PathLike) -> list[str]:
    """The keys of an API key file.

    Raises:
        ValueError: the file holds no key, or a key shorter than 16 characters (the message never shows a key).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path}: no API key in it (one key a line)")
    short = [number for number, key in enumerate(keys, 1) if len(key) < MIN_KEY_LENGTH]
    if short:
        raise ValueError(f"{path}: key {short[0]} is shorter than {MIN_KEY_LENGTH} characters")
    return keys


class ApiKeys:
    """The keys a service accepts; no keys: every request is let in.

    Args:
        keys: the accepted keys.
    """

    def __init__(self, keys: list[str] | None = None) -> None:
        self._keys = [key.encode("utf-8") for key in keys or []]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def allows(self, headers: Mapping[str, str]) -> bool:
        """Whether a request with these headers (lower-case names) may use ``/v1/*``."""
        if not self._keys:
            return True
        given = _presented(headers).encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:  # every key, no early exit
            matched |= hmac.compare_digest(given, key)
        return matched and bool(given)


def _presented(headers: Mapping[str, str]) -> str:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip()

"""
HTTP dates, formatted as few times as they can be: the Date header's value
once a second, and the Last-Modified value once per file time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from time import time

from twisted.web.http import datetimeToString


class HTTPDate:
    """
    The time C{now()} gives, as an HTTP date, formatted again only when the
    second changes.
    """

    def __init__(self, now: Callable[[], float] = time) -> None:
        self._now = now
        self._second: int | None = None
        self._value = b""

    def __call__(self) -> bytes:
        second = int(self._now())
        if second != self._second:
            self._second = second
            self._value = datetimeToString(second)
        return self._value


# The server's clock, for every answer.
currentDate = HTTPDate()

# Blobs in a directory share few modification times.
lastModified = lru_cache(maxsize=256)(datetimeToString)

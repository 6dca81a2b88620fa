"""
Access log lines: the combined log format that log tools parse, or one JSON
object a line.

A request's fields go into its log event as they are, and the line is a
small object that renders itself only when an observer formats the event:
a request costs a dict and one object, never a string that nobody reads.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

FORMATS = ("combined", "json")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Characters that may not appear as they are inside a quoted field of a
# combined line: controls, the quote, the backslash, and everything past
# ASCII, written as Apache does (C{\\xNN}, C{\\"}, C{\\\\}).
_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7F, 0x100))}
_ESCAPES[ord('"')] = '\\"'
_ESCAPES[ord("\\")] = "\\\\"


def text(value: bytes | None) -> str | None:
    """
    A header or request-line value as text, byte for byte (ISO-8859-1, as
    HTTP/1.1 treats bytes past ASCII), or L{None} for an absent header.
    """
    if value is None:
        return None
    return value.decode("latin-1")


def _quoted(value: str | None) -> str:
    if value is None:
        return "-"
    return value.translate(_ESCAPES)


def combinedDate(when: float) -> str:
    """
    C{10/Oct/2000:13:55:36 +0000}: the date of a combined log line, in UTC,
    with English month names whatever the locale.
    """
    t = time.gmtime(when)
    return (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def isoTime(when: float) -> str:
    """
    C{2000-10-10T13:55:36.123Z}: an RFC 3339 UTC time with milliseconds.
    """
    t = time.gmtime(when)
    millis = int(when * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{millis:03d}Z"


class CombinedLine:
    """
    C{host - - [date] "METHOD uri protocol" status bytes "referer" "agent"
    seconds}: the combined log format, with the time the request took
    appended (as many servers' custom formats do; parsers of the combined
    format read up to the user agent).  Aborted transfers are in the JSON
    format and in the event's fields.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __format__(self, spec: str) -> str:
        f = self.fields
        request = f'{f["method"]} {f["uri"]} {f["protocol"]}'
        return (
            f'{f["client"]} - - [{combinedDate(f["time"])}] "{_quoted(request)}" '
            f'{f["status"]} {f["bytes"] or "-"} '
            f'"{_quoted(f["referer"])}" "{_quoted(f["user_agent"])}" '
            f'{f["duration"]:.6f}'
        )

    def __str__(self) -> str:
        return self.__format__("")


class JSONLine:
    """
    One JSON object: time, client, method, uri, protocol, status, bytes,
    duration (seconds), referer, user_agent, aborted (and error, the OCI
    error code of an error answer, or null).
    """

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __format__(self, spec: str) -> str:
        document = dict(self.fields)
        document["time"] = isoTime(document["time"])
        document["duration"] = round(document["duration"], 6)
        return json.dumps(document, separators=(",", ":"))

    def __str__(self) -> str:
        return self.__format__("")


LINES = {"combined": CombinedLine, "json": JSONLine}


def formatOption(value: str) -> str:
    """
    The value of C{--access-log-format}.
    """
    if value not in FORMATS:
        raise ValueError(f"one of {', '.join(FORMATS)}")
    return value


formatOption.coerceDoc = "One of: " + ", ".join(FORMATS) + "."  # type: ignore[attr-defined]


class AccessLogFile:
    """
    Access lines appended to a file of their own (C{--access-log PATH}),
    bypassing twistd's log: the lines of a reactor turn go out in one
    write, and every worker process appends to the same file (O_APPEND
    keeps each write whole).  When the path stops naming the open file
    (logrotate renamed or removed it), the next write after a second opens
    it anew, so no signal is needed.  A failing write drops its lines and
    is logged once until writes work again: serving never stops for it.
    """

    log = Logger()
    checkInterval = 1.0

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.path = path
        self.clock = clock
        self._lines: list[str] = []
        self._pending: IDelayedCall | None = None
        self._checkedAt = clock.seconds()
        self._failing = False
        self._fd = -1
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._inode = os.fstat(fd).st_ino

    def write(self, line: str) -> None:
        self._lines.append(line)
        if self._pending is None:
            self._pending = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        self._lines.clear()
        try:
            self._reopenIfMoved()
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as e:
            if not self._failing:
                self.log.error("Cannot write the access log {path}: {error}", path=self.path, error=e)
            self._failing = True
        else:
            self._failing = False

    def _reopenIfMoved(self) -> None:
        now = self.clock.seconds()
        if now - self._checkedAt < self.checkInterval:
            return
        self._checkedAt = now
        try:
            moved = os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            moved = True
        if moved:
            try:
                self._open()
            except OSError as e:
                # Keep writing where we were rather than lose the lines.
                self.log.error(
                    "Cannot open the access log {path} anew: {error}", path=self.path, error=e
                )

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

"""
Conditional requests (RFC 9110, section 13) for blobs: If-None-Match,
If-Modified-Since and If-Range, against the blob's strong ETag and its
modification time.
"""

from __future__ import annotations

from twisted.web.http import stringToDatetime
from twisted.web.iweb import IRequest


def _tags(header: bytes) -> list[bytes]:
    return [tag.strip().removeprefix(b"W/") for tag in header.split(b",")]


def _date(header: bytes) -> int | None:
    try:
        return stringToDatetime(header)
    except (ValueError, IndexError, KeyError, OverflowError):
        return None


def notModified(request: IRequest, etag: bytes, modified: int) -> bool:
    """
    Whether a GET or HEAD should be answered 304 Not Modified.

    If-None-Match, when present, decides alone (weak comparison, C{*}
    matches any blob); otherwise If-Modified-Since does, when it is a valid
    date.
    """
    noneMatch = request.getHeader(b"if-none-match")
    if noneMatch is not None:
        tags = _tags(noneMatch)
        return etag in tags or b"*" in tags
    since = request.getHeader(b"if-modified-since")
    if since is not None:
        date = _date(since)
        return date is not None and modified <= date
    return False


def rangeApplies(request: IRequest, etag: bytes, modified: int) -> bool:
    """
    Whether a Range header may be honoured: yes without If-Range; with it,
    only if it names this blob's ETag (strong comparison) or exactly its
    modification time.
    """
    ifRange = request.getHeader(b"if-range")
    if ifRange is None:
        return True
    ifRange = ifRange.strip()
    if ifRange.startswith(b'"'):
        return ifRange == etag
    if ifRange.startswith(b"W/"):
        return False
    return _date(ifRange) == modified

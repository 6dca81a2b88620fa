"""
The Range request header (RFC 9110, section 14), for byte ranges of a blob
whose size is known.

The rules are those of C{twisted.web.static.File} where it is right, and
RFC 9110 where it is not: a suffix longer than the blob selects the whole
blob (C{File} computes a negative offset), a 0-byte blob has no satisfiable
range (C{File} fails with a 500), range units match case-insensitively, and
positions are plain digits (C{File} uses C{int()}, which also takes signs,
spaces and underscores).
"""

from __future__ import annotations

import re

# Larger positions than this are past the end of any file; clamping them
# keeps int() away from very long digit strings.
_HUGE = 10**18
_MAX_DIGITS = 18

_SPEC = re.compile(rb"[ \t]*([0-9]*)-([0-9]*)[ \t]*\Z")
_UNIT = re.compile(rb"[ \t]*bytes[ \t]*=", re.IGNORECASE)
# What nydusd and most clients send: one closed range, plainly written.
_ONE_CLOSED = re.compile(rb"bytes=([0-9]{1,18})-([0-9]{1,18})\Z")


def _position(digits: bytes) -> int:
    if len(digits) > _MAX_DIGITS:
        return _HUGE
    return int(digits)


def parseRange(
    header: bytes, size: int, maxRanges: int
) -> list[tuple[int, int]] | None:
    """
    Interpret a Range header against a representation of C{size} bytes.

    @return: L{None} when the header must be ignored (it does not parse,
        names another unit, or asks for more than C{maxRanges} ranges): the
        whole blob is then served with 200.  Otherwise the satisfiable
        ranges as C{(offset, length)} pairs, sorted, with overlapping and
        adjacent ranges merged; an empty list means that none is
        satisfiable (416).
    """
    closed = _ONE_CLOSED.match(header)
    if closed is not None:
        start, last = int(closed[1]), int(closed[2])
        if last < start:
            return None
        if start >= size:
            return []
        return [(start, min(last + 1, size) - start)]
    unit = _UNIT.match(header)
    if unit is None:
        return None
    specs = [spec for spec in header[unit.end() :].split(b",") if spec.strip()]
    if not specs or len(specs) > maxRanges:
        return None
    ranges = []
    for spec in specs:
        match = _SPEC.match(spec)
        if match is None:
            return None
        first, last = match.groups()
        if first:
            start = _position(first)
            if last:
                end = _position(last) + 1
                if end <= start:
                    return None
            else:
                end = _HUGE
        elif last:
            start = size - _position(last)
            end = _HUGE
            if start == size:
                continue
        else:
            return None
        start = max(start, 0)
        if start >= size:
            continue
        ranges.append((start, min(end, size)))
    return _coalesce(ranges)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]

"""
The Range header parser, against RFC 9110 and against static.File.
"""

import warnings

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from nydusproxy.ranges import parseRange

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web.static import File


class ParseRangeTests(SynchronousTestCase):
    def test_closed(self):
        """
        A closed range selects its first to last byte, both included.
        """
        self.assertEqual(parseRange(b"bytes=0-9", 100, 16), [(0, 10)])
        self.assertEqual(parseRange(b"bytes=10-10", 100, 16), [(10, 1)])

    def test_lastPastEndClipped(self):
        """
        A last position past the end is clipped to the last byte.
        """
        self.assertEqual(parseRange(b"bytes=90-500", 100, 16), [(90, 10)])

    def test_openEnded(self):
        """
        C{bytes=N-} selects from N to the end.
        """
        self.assertEqual(parseRange(b"bytes=40-", 100, 16), [(40, 60)])

    def test_suffix(self):
        """
        C{bytes=-N} selects the last N bytes.
        """
        self.assertEqual(parseRange(b"bytes=-10", 100, 16), [(90, 10)])

    def test_suffixLongerThanBlob(self):
        """
        A suffix longer than the blob selects the whole blob (RFC 9110
        14.1.2), where static.File computes a negative offset.
        """
        self.assertEqual(parseRange(b"bytes=-1000", 100, 16), [(0, 100)])

    def test_unsatisfiable(self):
        """
        A first position at or past the end, or an empty suffix, is
        unsatisfiable: an empty list.
        """
        self.assertEqual(parseRange(b"bytes=100-", 100, 16), [])
        self.assertEqual(parseRange(b"bytes=100-200", 100, 16), [])
        self.assertEqual(parseRange(b"bytes=-0", 100, 16), [])

    def test_emptyBlob(self):
        """
        No range of a 0-byte blob is satisfiable.
        """
        for header in (b"bytes=0-", b"bytes=0-0", b"bytes=-5"):
            self.assertEqual(parseRange(header, 0, 16), [], header)

    def test_ignored(self):
        """
        A header that does not parse, or names another unit, is ignored:
        L{None}.
        """
        for header in (
            b"",
            b"bytes",
            b"bytes=",
            b"bytes=-",
            b"bytes=a-b",
            b"bytes=5-1",
            b"bytes=+1-2",
            b"bytes=1_0-20",
            b"bytes=1 0-20",
            b"items=0-1",
            b"bytes=0-1;x",
        ):
            self.assertIsNone(parseRange(header, 100, 16), header)

    def test_unitCaseAndSpaces(self):
        """
        The unit matches case-insensitively, and spaces around ranges and
        empty list elements are allowed.
        """
        self.assertEqual(parseRange(b"Bytes = 0-1 , ,5-6 ", 100, 16), [(0, 2), (5, 2)])

    def test_severalSortedAndMerged(self):
        """
        Several ranges come back sorted, overlapping and adjacent ones
        merged, unsatisfiable ones dropped.
        """
        self.assertEqual(
            parseRange(b"bytes=50-59,0-9,5-14,15-19,500-", 100, 16),
            [(0, 20), (50, 10)],
        )

    def test_overlappingCollapse(self):
        """
        Many overlapping ranges collapse to one: they cannot multiply the
        work of sending.
        """
        header = b"bytes=" + b",".join([b"0-99"] * 16)
        self.assertEqual(parseRange(header, 100, 16), [(0, 100)])

    def test_tooMany(self):
        """
        More ranges than the cap make the header ignored.
        """
        header = b"bytes=" + b",".join(b"%d-%d" % (i, i) for i in range(0, 34, 2))
        self.assertIsNone(parseRange(header, 100, 16))
        self.assertEqual(len(parseRange(header, 100, 17)), 17)

    def test_hugeNumbers(self):
        """
        Positions of any length parse without error: a huge first position
        is unsatisfiable, a huge last one clipped, a huge suffix the whole.
        """
        huge = b"9" * 5000
        self.assertEqual(parseRange(b"bytes=" + huge + b"-", 100, 16), [])
        self.assertEqual(parseRange(b"bytes=1-" + huge, 100, 16), [(1, 99)])
        self.assertEqual(parseRange(b"bytes=-" + huge, 100, 16), [(0, 100)])


def model(header: bytes, size: int) -> list[tuple[int, int]] | None:
    """
    The expected ranges, from static.File's parser where it is right.
    """
    try:
        specs = File._parseRangeHeader(None, header)
    except ValueError:
        return None
    selected = set()
    for start, end in specs:
        if start is None:
            first, last = max(size - end, 0), size - 1
            if end == 0:
                continue
        else:
            first, last = start, size - 1 if end is None else min(end, size - 1)
        selected.update(range(first, last + 1))
    result = []
    for offset in sorted(selected):
        if result and result[-1][0] + result[-1][1] == offset:
            result[-1] = (result[-1][0], result[-1][1] + 1)
        else:
            result.append((offset, 1))
    return result


digits = st.integers(min_value=0, max_value=300).map(lambda n: b"%d" % n)
spec = st.one_of(
    st.tuples(digits, digits).map(lambda t: t[0] + b"-" + t[1]),
    digits.map(lambda d: d + b"-"),
    digits.map(lambda d: b"-" + d),
)
header = st.lists(spec, min_size=1, max_size=6).map(lambda s: b"bytes=" + b",".join(s))


class ParseRangeModelTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(header=header, size=st.integers(min_value=0, max_value=200))
    def test_agreesWithModel(self, header, size):
        """
        For well-formed headers, the selected bytes are exactly those
        static.File's parser names, clipped to the blob, with RFC 9110's
        suffix rule.
        """
        self.assertEqual(parseRange(header, size, 16), model(header, size))

    @settings(max_examples=500, deadline=None)
    @given(header=st.binary(max_size=40), size=st.integers(min_value=0, max_value=200))
    def test_anyBytes(self, header, size):
        """
        Any header gives L{None} or ranges inside the blob, sorted and
        disjoint, never an exception.
        """
        result = parseRange(header, size, 16)
        if result is None:
            return
        end = -1
        for offset, length in result:
            self.assertGreater(offset, end)
            self.assertGreater(length, 0)
            end = offset + length
            self.assertLessEqual(end, size)

    @settings(max_examples=500, deadline=None)
    @given(
        first=st.integers(min_value=0, max_value=10**20),
        last=st.integers(min_value=0, max_value=10**20),
        size=st.integers(min_value=0, max_value=10**19),
    )
    def test_oneClosedRangeShortcut(self, first, last, size):
        """
        The shortcut for one plainly written closed range (what nydusd
        sends) answers as the general parser does, which a space before the
        unit sends that same header through.
        """
        header = b"bytes=%d-%d" % (first, last)
        self.assertEqual(parseRange(header, size, 16), parseRange(b" " + header, size, 16))

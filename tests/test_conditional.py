"""
The conditional-request rules on any header values.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from nydusproxy.conditional import notModified, rangeApplies

ETAG = b'"sha256:' + b"a" * 64 + b'"'


def request(headers):
    request = DummyRequest([])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


class ConditionalPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        headers=st.dictionaries(
            st.sampled_from([b"if-none-match", b"if-modified-since", b"if-range"]),
            st.one_of(st.binary(max_size=40), st.just(ETAG), st.just(b"Sun, 06 Nov 1994 08:49:37 GMT")),
        )
    )
    def test_neverRaises(self, headers):
        """
        Any header values give a yes or no, never an exception; without
        If-None-Match or If-Modified-Since nothing is "not modified".
        """
        req = request(headers)
        verdict = notModified(req, ETAG, 784111777)
        self.assertIsInstance(verdict, bool)
        self.assertIsInstance(rangeApplies(req, ETAG, 784111777), bool)
        if b"if-none-match" not in headers and b"if-modified-since" not in headers:
            self.assertFalse(verdict)

    def test_exactDate(self):
        """
        The three HTTP date forms of the blob's time all count.
        """
        for date in (b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sunday, 06-Nov-94 08:49:37 GMT",
                     b"Sun Nov  6 08:49:37 1994"):
            self.assertTrue(rangeApplies(request({b"if-range": date}), ETAG, 784111777), date)
            self.assertTrue(notModified(request({b"if-modified-since": date}), ETAG, 784111777))

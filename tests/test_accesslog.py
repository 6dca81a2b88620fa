"""
The access log: one event per request through twisted.logger, rendered as a
combined log format line or a JSON object only when an observer formats it.
"""

import json
import re

from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger, eventAsJSON, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nydusproxy import accesslog, site

from .support import InMemoryServer, makeBlobDir, sha256

BLOB = bytes(range(256)) * 8192  # 2 MiB
DIGEST = "sha256:" + sha256(BLOB)
BLOB_PATH = f"/v2/library/ubuntu/blobs/{DIGEST}".encode()
MISSING = "sha256:" + "0" * 64

# The combined log format as log parsers read it, anchored at both ends.
COMBINED = re.compile(
    r'^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<date>[^\]]+)\] '
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+|-) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)" '
    r"(?P<duration>\d+\.\d{6})$"
)

# 2000-10-10 13:55:36.250 UTC
WHEN = 971186136.25


class Clock:
    """
    A monotonic clock for the site module that answers the given times in
    turn.
    """

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


class AccessLogTestCase(SynchronousTestCase):
    format = "combined"

    def setUp(self):
        self.blobsdir = makeBlobDir(self, [BLOB])
        self.server = InMemoryServer(
            self.blobsdir, "--access-log-format", self.format
        )
        self.events = []
        self.server.site.accessLogger.observer = self.events.append
        self.patch(site, "time", lambda: WHEN)

    def lines(self):
        return [formatEvent(event) for event in self.events]


class CombinedTests(AccessLogTestCase):
    def test_rangedGet(self):
        """
        A ranged GET gives exactly one combined line: client, date in UTC,
        request line, status, body bytes, referer and user agent.
        """
        self.patch(site, "monotonic", Clock(5.0, 5.5))
        response = self.server.get(
            BLOB_PATH, range=b"bytes=0-9", user_agent=b"nydusd/2.2", referer=b"http://r/"
        )
        self.assertEqual(response.status, 206)
        self.assertEqual(
            self.lines(),
            [
                f'127.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET {BLOB_PATH.decode()} '
                'HTTP/1.1" 206 10 "http://r/" "nydusd/2.2" 0.500000'
            ],
        )
        self.assertRegex(self.lines()[0], COMBINED)

    def test_noBodyNoHeaders(self):
        """
        A HEAD sends no body bytes ("-") and absent headers are "-".
        """
        self.server.get(BLOB_PATH, method=b"HEAD")
        [line] = self.lines()
        match = COMBINED.match(line)
        self.assertIsNotNone(match, line)
        self.assertEqual(
            match.group("request", "status", "bytes", "referer", "agent"),
            (f"HEAD {BLOB_PATH.decode()} HTTP/1.1", "200", "-", "-", "-"),
        )

    def test_escaping(self):
        """
        Quotes, backslashes, control bytes and non-ASCII bytes in a field are
        escaped, so the line still parses as one combined line.
        """
        self.server.get(b"/v2/a/blobs/%22x", user_agent=b'evil" \\ \x01\xff agent')
        [line] = self.lines()
        match = COMBINED.match(line)
        self.assertIsNotNone(match, line)
        self.assertEqual(match.group("request"), 'GET /v2/a/blobs/%22x HTTP/1.1')
        self.assertEqual(match.group("agent"), 'evil\\" \\\\ \\x01\\xff agent')
        self.assertEqual(match.group("status"), "400")

    def test_eventFields(self):
        """
        The event carries the raw fields, for observers that store events
        (twisted.logger's JSON observer, for one).
        """
        self.patch(site, "monotonic", Clock(1.0, 1.125))
        response = self.server.get(path=f"/v2/a/blobs/{MISSING}".encode())
        [event] = self.events
        self.assertEqual(event["log_namespace"], "nydusproxy.access")
        self.assertEqual(
            {key: event[key] for key in (
                "time", "client", "method", "uri", "protocol", "status", "bytes",
                "duration", "referer", "user_agent", "aborted", "error")},
            {
                "time": WHEN, "client": "127.0.0.1", "method": "GET",
                "uri": f"/v2/a/blobs/{MISSING}", "protocol": "HTTP/1.1",
                "status": 404, "bytes": len(response.body), "duration": 0.125,
                "referer": None, "user_agent": None, "aborted": False,
                "error": "BLOB_UNKNOWN",
            },
        )

    def test_lazy(self):
        """
        Nothing is rendered while no observer formats the event.
        """
        rendered = []
        original = accesslog.CombinedLine.__format__

        def spy(line, spec):
            rendered.append(line)
            return original(line, spec)

        self.patch(accesslog.CombinedLine, "__format__", spy)
        self.server.get(BLOB_PATH, range=b"bytes=0-0")
        self.assertEqual((len(self.events), rendered), (1, []))
        formatEvent(self.events[0])
        self.assertEqual(len(rendered), 1)

    def test_twistedJSONObserver(self):
        """
        The event serializes with twisted.logger's JSON observer: its fields
        as they are, and the line rendered once, in log_flattened.
        """
        self.server.get(b"/v2/")
        [event] = self.events
        document = json.loads(eventAsJSON(event))
        self.assertEqual((document["status"], document["uri"]), (200, "/v2/"))
        self.assertRegex(
            document["log_flattened"]["access_line!s:"],
            r'^127\.0\.0\.1 - - \[10/Oct/2000:13:55:36 \+0000\] "GET /v2/ HTTP/1\.1" 200 2 '
            r'"-" "-" \d+\.\d{6}$',
        )
        self.assertEqual(str(event["access_line"]), document["log_flattened"]["access_line!s:"])

    def test_healthzNotLogged(self):
        """
        Health probes are not access-logged; the requests around them are.
        """
        self.assertEqual(self.server.get(b"/healthz").status, 200)
        self.server.get(b"/v2/")
        self.assertEqual([event["uri"] for event in self.events], ["/v2/"])

    def test_noAccessLog(self):
        """
        --no-access-log emits no event at all.
        """
        server = InMemoryServer(self.blobsdir, "--no-access-log")
        events = []
        server.site.accessLogger = Logger(observer=events.append)
        server.get(BLOB_PATH, range=b"bytes=0-9")
        self.assertEqual(events, [])

    def test_unixPeer(self):
        """
        A client on a UNIX socket has no host: the line says "-".
        """
        protocol = self.server.site.buildProtocol(UNIXAddress(None))
        from twisted.internet.testing import StringTransport

        transport = StringTransport(peerAddress=UNIXAddress(None))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        protocol.connectionLost(None)
        [line] = self.lines()
        self.assertTrue(line.startswith("- - - [10/Oct/2000:13:55:36 +0000] "), line)
        self.assertRegex(line, COMBINED)


class JSONTests(AccessLogTestCase):
    format = "json"

    def test_rangedGet(self):
        """
        --access-log-format json: one JSON object a line with every field.
        """
        self.patch(site, "monotonic", Clock(2.0, 2.0625))
        self.server.get(BLOB_PATH, range=b"bytes=10-19", user_agent=b"nydusd")
        [line] = self.lines()
        self.assertNotIn("\n", line)
        self.assertEqual(
            json.loads(line),
            {
                "time": "2000-10-10T13:55:36.250Z", "client": "127.0.0.1",
                "method": "GET", "uri": BLOB_PATH.decode(), "protocol": "HTTP/1.1",
                "status": 206, "bytes": 10, "duration": 0.0625, "referer": None,
                "user_agent": "nydusd", "aborted": False, "error": None,
            },
        )

    def test_aborted(self):
        """
        A client that leaves before the end of its response gives one line
        with aborted true and the bytes sent so far.
        """
        protocol, transport = self.server.connect()
        protocol.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % (BLOB_PATH,))
        # The producer has written its first turn, and waits for the next.
        self.assertTrue(self.server.clock.getDelayedCalls())
        protocol.connectionLost(Failure(ConnectionDone()))
        [line] = self.lines()
        document = json.loads(line)
        self.assertEqual(
            (document["aborted"], document["status"], document["bytes"]),
            (True, 200, 1024 * 1024),
        )


class FormatTests(SynchronousTestCase):
    def test_dateEnglishMonths(self):
        """
        Combined dates have English month names and a UTC offset.
        """
        self.assertEqual(accesslog.combinedDate(0), "01/Jan/1970:00:00:00 +0000")
        self.assertEqual(accesslog.combinedDate(971186136.9), "10/Oct/2000:13:55:36 +0000")

    def test_isoTime(self):
        """
        JSON times are RFC 3339 in UTC with milliseconds.
        """
        self.assertEqual(accesslog.isoTime(971186136.0625), "2000-10-10T13:55:36.062Z")

    def test_badFormat(self):
        """
        Only combined and json are formats.
        """
        from twisted.python.usage import UsageError

        blobsdir = makeBlobDir(self)
        from .support import makeOptions

        error = self.assertRaises(
            UsageError, makeOptions, blobsdir, "--access-log-format", "apache"
        )
        self.assertIn("combined, json", str(error))

"""
The limits: request deadline, head size, idle and unread connections,
connection counts, and the drain at shutdown.  Exact behaviour on an
in-memory transport with a clock the test moves; then the same limits over
real loopback sockets, each while a normal client is being served.
"""

import json
import os
import time
from email.utils import parsedate_to_datetime

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import version as twistedWebVersion

from nydusproxy import limits, tap

from .loopback import captureLogs, connect, fetch, listen, parseResponse, pause, request, waitFor
from .support import InMemoryServer, makeBlobDir, makeOptions, parseResponses, sha256

BLOB = os.urandom(1024 * 1024 + 3)
DIGEST = "sha256:" + sha256(BLOB)
BLOB_PATH = f"/v2/library/ubuntu/blobs/{DIGEST}".encode()
GET_BLOB = request(b"GET", BLOB_PATH, close=False)
LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)
LOCAL6 = IPv6Address("TCP", "::1", 40000)


def connectFrom(server, address=LOCAL):
    protocol = server.site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def runTurns(server):
    """
    Let the producer write what it may: run the calls due now.
    """
    now = server.clock.seconds
    while any(call.getTime() <= now() for call in server.clock.getDelayedCalls()):
        server.clock.advance(0)


def recordDelays(server, protocol):
    """
    The delays of the calls C{protocol} schedules from now on, in order.
    """
    scheduled = []

    def callLater(delay, *args, **kwargs):
        scheduled.append(delay)
        return server.clock.callLater(delay, *args, **kwargs)

    protocol.callLater = callLater
    return scheduled


def assertRefused(testCase, raw, status, message):
    """
    Check a refusal: its status, a JSON DENIED error with C{message}, and
    the head every answer carries (Date, as RFC 9110 requires of 4xx, and
    Server).
    """
    [response] = parseResponses(raw, [b"GET"])
    testCase.assertEqual(response.status, status)
    testCase.assertEqual(response.header("connection"), "close")
    testCase.assertEqual(response.header("content-type"), "application/json")
    testCase.assertEqual(response.header("server"), twistedWebVersion.decode())
    sent = parsedate_to_datetime(response.header("date")).timestamp()
    testCase.assertLessEqual(abs(sent - time.time()), 2)
    error = json.loads(response.body)["errors"][0]
    testCase.assertEqual((error["code"], error["message"]), ("DENIED", message))


class RequestDeadlineTests(SynchronousTestCase):
    def setUp(self):
        self.server = InMemoryServer(makeBlobDir(self, [BLOB]), "--header-timeout", "10")

    def test_slowDripRefused(self):
        """
        A client that sends its request a byte at a time, each within the
        idle timeout, gets a 408 once the deadline passes, counted from its
        first byte, and the connection is closed.
        """
        protocol, transport = connectFrom(self.server)
        for byte in b"GET /v2/ ":
            protocol.dataReceived(bytes([byte]))
            self.server.clock.advance(3)
            if transport.disconnecting:
                break
        self.assertEqual(self.server.clock.seconds(), 12)
        assertRefused(self, transport.value(), 408, "request not received in time")
        self.assertTrue(transport.disconnecting)

    def test_othersServedMeanwhile(self):
        """
        While a slow client holds its connection, others are answered.
        """
        protocol, transport = connectFrom(self.server)
        protocol.dataReceived(b"GET /v2/")
        self.server.clock.advance(5)
        self.assertEqual(self.server.get(BLOB_PATH).body, BLOB)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_deadlineOnlyWhileReceiving(self):
        """
        The deadline runs from a request's first byte to its end: a
        keep-alive connection whose requests each arrive in time lives on,
        however long it lasts, and so does a response that takes long.
        """
        protocol, transport = connectFrom(self.server)
        for _ in range(3):
            protocol.dataReceived(GET_BLOB[:20])
            self.server.clock.advance(9)
            protocol.dataReceived(GET_BLOB[20:])
            runTurns(self.server)
            self.server.clock.advance(9)
        responses = parseResponses(transport.value(), [b"GET"] * 3)
        self.assertEqual([r.body for r in responses], [BLOB] * 3)
        self.assertFalse(transport.disconnecting)

    def test_stalledBodyRefused(self):
        """
        The deadline covers a request's body too: a head that announces
        five bytes followed by two of them, and nothing more, gets a 408.
        """
        protocol, transport = connectFrom(self.server)
        protocol.dataReceived(
            b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhe"
        )
        self.server.clock.advance(9.5)
        self.assertFalse(transport.disconnecting)
        self.server.clock.advance(0.5)
        assertRefused(self, transport.value(), 408, "request not received in time")
        self.assertTrue(transport.disconnecting)

    def test_wholeRequestsStartNoClock(self):
        """
        Requests that arrive whole, each in one read, need no deadline, and
        none is scheduled (a timer per request is a cost of every small
        range); an idle keep-alive connection is closed only by the idle
        timeout.
        """
        protocol, transport = connectFrom(self.server)
        scheduled = recordDelays(self.server, protocol)
        for _ in range(3):
            protocol.dataReceived(GET_BLOB)
            runTurns(self.server)
        self.assertNotIn(10, scheduled)
        self.server.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)

    def test_pipelinedRequestDeadline(self):
        """
        A pipelined request that arrives whole while the one before it is
        answered is served; one that is left incomplete gets its own
        deadline once the server reads it.
        """
        protocol, transport = connectFrom(self.server)
        protocol.dataReceived(GET_BLOB + GET_BLOB + b"GET /v2/ HT")
        runTurns(self.server)
        self.server.clock.advance(9.5)
        self.assertFalse(transport.disconnecting)
        self.server.clock.advance(0.5)
        self.assertTrue(transport.disconnecting)
        raw = transport.value()
        responses = parseResponses(raw[: raw.rindex(b"HTTP/1.1 408")], [b"GET"] * 2)
        self.assertEqual([r.body for r in responses], [BLOB] * 2)
        assertRefused(self, raw[raw.rindex(b"HTTP/1.1 408") :], 408, "request not received in time")


class SmallHeadTestCase(SynchronousTestCase):
    """
    A server with --max-header-bytes 1024, and one connection per send.
    """

    def setUp(self):
        self.server = InMemoryServer(makeBlobDir(self, [BLOB]), "--max-header-bytes", "1024")

    def send(self, data):
        protocol, transport = connectFrom(self.server)
        protocol.dataReceived(data)
        runTurns(self.server)
        return transport


class HeadSizeTests(SmallHeadTestCase):

    def test_requestLineTooLong(self):
        """
        A request line longer than --max-header-bytes is answered 414, whether
        it arrives whole or its end has not come yet, and the connection
        is closed.
        """
        line = b"GET /v2/" + b"a/" * 600 + b"blobs/" + DIGEST.encode() + b" HTTP/1.1\r\n"
        for data in (line + b"Host: x\r\n\r\n", line[:1100]):
            transport = self.send(data)
            assertRefused(self, transport.value(), 414, "request line too long")
            self.assertTrue(transport.disconnecting)

    def test_headersTooLarge(self):
        """
        Headers that take the head over --max-header-bytes, many small ones
        or one large one, are answered 431 and the connection is closed.
        """
        many = b"".join(b"X-Header-%d: value\r\n" % i for i in range(100))
        large = b"Cookie: " + b"c" * 2000 + b"\r\n"
        for headers in (many, large):
            transport = self.send(b"GET /v2/ HTTP/1.1\r\n" + headers + b"\r\n")
            assertRefused(self, transport.value(), 431, "request header fields too large")
            self.assertTrue(transport.disconnecting)

    def test_atTheLimit(self):
        """
        A head of exactly --max-header-bytes bytes is served; one more byte
        is refused.
        """
        head = request(b"GET", BLOB_PATH, close=False, range=b"bytes=0-9")
        padding = b"X-Pad: " + b"p" * (1024 - len(head) - 9) + b"\r\n"
        exact = head[:-2] + padding + b"\r\n"
        self.assertEqual(len(exact), 1024)
        [response] = parseResponses(self.send(exact).value(), [b"GET"])
        self.assertEqual((response.status, response.body), (206, BLOB[:10]))
        over = head[:-2] + b"X-Pad: p" + padding[7:] + b"\r\n"
        assertRefused(self, self.send(over).value(), 431, "request header fields too large")


class BodyTests(SmallHeadTestCase):

    def test_largeBodyRefused(self):
        """
        A body larger than --max-header-bytes, or a chunked one, is refused
        with 413 before it is stored, and the connection closed.
        """
        for headers, body in (
            (b"Content-Length: 100000\r\n", b"x" * 5000),
            (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        ):
            transport = self.send(b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\n" + headers + b"\r\n" + body)
            assertRefused(self, transport.value(), 413, "request body too large")
            self.assertTrue(transport.disconnecting)

    def test_smallBody(self):
        """
        A small body is read, and the request answered as usual.
        """
        transport = self.send(
            b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" + GET_BLOB
        )
        post, get = parseResponses(transport.value(), [b"POST", b"GET"])
        self.assertEqual(post.status, 405)
        self.assertEqual(get.body, BLOB)


class IdleTests(SynchronousTestCase):
    def setUp(self):
        self.blob = os.urandom(6 * 1024 * 1024)
        self.server = InMemoryServer(makeBlobDir(self, [self.blob]), "--idle-timeout", "5")
        self.path = f"/v2/a/blobs/sha256:{sha256(self.blob)}".encode()

    def test_idleTimeout(self):
        """
        A connection that sends nothing for --idle-timeout seconds is
        closed.
        """
        protocol, transport = connectFrom(self.server)
        self.server.clock.advance(4.5)
        self.assertFalse(transport.disconnecting)
        self.server.clock.advance(0.5)
        self.assertTrue(transport.disconnecting)

    def test_idleFromLastByteAndLastResponse(self):
        """
        The idle time counts from the last byte received, and from the end
        of the last response.
        """
        protocol, transport = connectFrom(self.server)
        self.server.clock.advance(3)
        protocol.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
        self.server.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"\r\n")
        self.server.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.server.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        [response] = parseResponses(transport.value(), [b"GET"])
        self.assertEqual(response.status, 200)

    def test_noTimerPerRequest(self):
        """
        Keep-alive requests schedule no idle timer of their own (a timer
        per request is a cost of every small range): the connection's one
        timer notices activity when it comes due, and waits again.
        """
        protocol, transport = connectFrom(self.server)
        scheduled = recordDelays(self.server, protocol)
        small = request(b"GET", b"/v2/", close=False)
        for _ in range(8):
            protocol.dataReceived(small)
            self.server.clock.advance(0.25)
        self.assertEqual(scheduled, [])
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 8)
        # The timer set at connection comes due at 5 s, 3.25 s after the
        # last request, and waits the 1.75 s left.
        self.server.clock.advance(3)
        self.assertEqual(scheduled, [1.75])
        self.server.clock.advance(1.5)
        self.assertFalse(transport.disconnecting)
        self.server.clock.advance(0.25)
        self.assertTrue(transport.disconnecting)

    def test_unreadResponse(self):
        """
        A client that stops reading a response (the socket pauses the
        server) for --idle-timeout seconds has its connection aborted, which
        closes the blob's file; one that reads again in time is served.
        """
        protocol, transport = connectFrom(self.server)
        protocol.dataReceived(request(b"GET", self.path, close=False))
        protocol.pauseProducing()
        self.server.clock.advance(4.9)
        protocol.resumeProducing()
        protocol.pauseProducing()
        self.server.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        fds = len(os.listdir("/proc/self/fd"))
        self.server.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertLess(len(transport.value()), len(self.blob))
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds - 1)
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_slowReaderServed(self):
        """
        Pauses shorter than --idle-timeout, however many, do not end a
        response.
        """
        protocol, transport = connectFrom(self.server)
        protocol.dataReceived(request(b"GET", self.path, close=False))
        pauses = 0
        while len(transport.value()) < len(self.blob):
            protocol.pauseProducing()
            self.server.clock.advance(4)
            protocol.resumeProducing()
            pauses += 1
        # Paused for 4 s at a time, far longer than 5 s in all.
        self.assertGreaterEqual(pauses, 5)
        [response] = parseResponses(transport.value(), [b"GET"])
        self.assertEqual(response.body, self.blob)
        self.assertFalse(transport.disconnecting)


class ConnectionCapTests(SynchronousTestCase):
    def setUp(self):
        self.server = InMemoryServer(
            makeBlobDir(self, [BLOB]),
            "--max-connections", "3",
            "--max-connections-per-client", "2",
        )

    def test_perClient(self):
        """
        A client at --max-connections-per-client has further connections
        closed at once, with nothing written; another client is served
        meanwhile; once one of the first client's connections ends, it may
        connect again.
        """
        held = [connectFrom(self.server) for _ in range(2)]
        protocol, transport = connectFrom(self.server)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        other, otherTransport = connectFrom(self.server, LOCAL6)
        other.dataReceived(GET_BLOB)
        runTurns(self.server)
        [response] = parseResponses(otherTransport.value(), [b"GET"])
        self.assertEqual(response.body, BLOB)
        for protocol, transport in held:
            self.assertFalse(transport.disconnecting)
        held[0][0].connectionLost(None)
        again, againTransport = connectFrom(self.server)
        self.assertFalse(againTransport.disconnecting)
        self.assertEqual(self.server.site.connections.perClient, {"127.0.0.1": 2, "::1": 1})

    def test_total(self):
        """
        At --max-connections, new connections are closed at once, while the
        open ones are still served.
        """
        held = [connectFrom(self.server, LOCAL), connectFrom(self.server, LOCAL6),
                connectFrom(self.server, LOCAL6)]
        protocol, transport = connectFrom(self.server, IPv4Address("TCP", "127.0.0.1", 1))
        self.assertTrue(transport.disconnecting)
        first, firstTransport = held[0]
        first.dataReceived(GET_BLOB)
        runTurns(self.server)
        [response] = parseResponses(firstTransport.value(), [b"GET"])
        self.assertEqual(response.body, BLOB)
        self.assertEqual(len(self.server.site.connections), 3)
        self.assertEqual(self.server.site.connections.refused, 1)

    def test_unixSocketPeers(self):
        """
        Peers on a UNIX socket have no address: they count towards the
        total only.
        """
        from twisted.internet.address import UNIXAddress

        held = [connectFrom(self.server, UNIXAddress(None)) for _ in range(3)]
        self.assertEqual([t.disconnecting for _, t in held], [False] * 3)
        self.assertEqual(self.server.site.connections.perClient, {})


class DrainTests(SynchronousTestCase):
    def setUp(self):
        self.blob = os.urandom(3 * 1024 * 1024)
        self.server = InMemoryServer(makeBlobDir(self, [self.blob]))
        self.path = f"/v2/a/blobs/sha256:{sha256(self.blob)}".encode()
        self.connections = self.server.site.connections

    def busyConnection(self):
        protocol, transport = connectFrom(self.server)
        protocol.dataReceived(request(b"GET", self.path, close=False))
        protocol.pauseProducing()
        return protocol, transport

    def test_waitsForResponses(self):
        """
        Draining closes idle connections at once, refuses new ones, lets a
        response in flight finish whole, closes its connection after it,
        and fires once no connection is left.
        """
        idle, idleTransport = connectFrom(self.server)
        busy, busyTransport = self.busyConnection()
        drained = self.connections.drain(10)
        self.assertTrue(idleTransport.disconnecting)
        idle.connectionLost(None)
        self.assertNoResult(drained)
        late, lateTransport = connectFrom(self.server)
        self.assertTrue(lateTransport.disconnecting)
        self.server.clock.advance(5)
        busy.resumeProducing()
        runTurns(self.server)
        [response] = parseResponses(busyTransport.value(), [b"GET"])
        self.assertEqual(response.body, self.blob)
        self.assertTrue(busyTransport.disconnecting)
        self.assertNoResult(drained)
        busy.connectionLost(None)
        self.assertIsNone(self.successResultOf(drained))
        timers = [call.func for call in self.server.clock.getDelayedCalls()]
        self.assertNotIn(self.connections._closeRest, timers)

    def test_timeout(self):
        """
        A response still being sent when the shutdown timeout ends is cut
        off.
        """
        busy, busyTransport = self.busyConnection()
        drained = self.connections.drain(10)
        self.server.clock.advance(9.9)
        self.assertNoResult(drained)
        self.server.clock.advance(0.1)
        self.assertTrue(busyTransport.disconnected)
        self.assertIsNone(self.successResultOf(drained))

    def test_nothingOpen(self):
        """
        With no connection open, the drain is over at once.
        """
        self.assertIsNone(self.successResultOf(self.connections.drain(10)))

    def test_serviceDrains(self):
        """
        The service twistd stops drains the site after its ports, within
        --shutdown-timeout.
        """
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        options = makeOptions(makeBlobDir(self), "--shutdown-timeout", "3",
                              "--listen", "tcp:0:interface=127.0.0.1", "--workers", "1")
        service = tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        [(_, site, _, _)] = reactor.tcpServers
        protocol = site.buildProtocol(LOCAL)
        protocol.makeConnection(StringTransport(peerAddress=LOCAL))
        protocol.dataReceived(b"GET /v2/ H")
        stopped = service.stopService()
        self.assertTrue(protocol.transport.disconnecting)
        self.assertNoResult(stopped)
        protocol.connectionLost(None)
        self.successResultOf(stopped)
        self.assertEqual(service.getServiceNamed("graceful-shutdown").timeout, 3)


class OptionTests(SynchronousTestCase):
    def test_badValues(self):
        """
        Each limit must be a positive number; the head must hold a request
        line.
        """
        blobsdir = makeBlobDir(self)
        for option, value in (
            ("--idle-timeout", "0"),
            ("--header-timeout", "-1"),
            ("--header-timeout", "nan"),
            ("--shutdown-timeout", "inf"),
            ("--max-connections", "0"),
            ("--max-connections-per-client", "x"),
            ("--max-header-bytes", "100"),
        ):
            self.assertRaises(
                tap.usage.UsageError, makeOptions, blobsdir, option, value
            )


class FileLimitTests(SynchronousTestCase):
    def setUp(self):
        self.calls = []
        self.logs = captureLogs(self)
        self.patch(limits.resource, "setrlimit", lambda which, value: self.calls.append(value))

    def raiseWith(self, soft, hard):
        self.patch(limits.resource, "getrlimit", lambda which: (soft, hard))
        limits.raiseFileLimit(limits.Limits(maxConnections=1024))

    def test_raised(self):
        """
        A soft limit of open files below two per connection is raised.
        """
        self.raiseWith(1024, 4096)
        self.assertEqual(self.calls, [(2112, 4096)])
        self.assertFalse([line for line in self.logs if "open files" in line])

    def test_hardLimit(self):
        """
        Up to the hard limit only, and then the shortfall is logged.
        """
        self.raiseWith(1024, 1500)
        self.assertEqual(self.calls, [(1500, 1500)])
        [line] = [line for line in self.logs if "open files" in line]
        self.assertIn("Only 1500 open files allowed; --max-connections 1024 may need 2112", line)

    def test_enough(self):
        """
        A limit high enough is left alone.
        """
        self.raiseWith(65536, 65536)
        self.assertEqual(self.calls, [])


class LoopbackTests(TestCase):
    """
    The limits on real sockets, each while a normal client is served.
    """

    def serve(self, *extra):
        self.site = tap.buildSite(makeOptions(makeBlobDir(self, [BLOB]), *extra))
        self.port = listen(self, self.site)

    async def test_slowDripClients(self):
        """
        Three clients dripping a byte every 0.2 s get a 408 and are closed
        at --header-timeout, while a normal client gets its blob.
        """
        self.serve("--header-timeout", "1")
        drips = []
        for _ in range(3):
            client = await connect(self.port)
            data = iter(GET_BLOB)
            loop = LoopingCall(lambda c=client, d=data: c.send(bytes([next(d)])))
            loop.start(0.2)
            client.closed.addBoth(lambda result, loop=loop: loop.stop() or result)
            drips.append(client)
        response = await fetch(self.port, b"GET", BLOB_PATH)
        self.assertEqual((response.status, response.body), (200, BLOB))
        for client in drips:
            raw = await client.closed
            assertRefused(self, raw, 408, "request not received in time")
        self.assertEqual((await fetch(self.port, b"GET", BLOB_PATH)).body, BLOB)

    async def test_oversizedHead(self):
        """
        An oversized request line and a megabyte of headers are answered
        414 and 431 (whole, though the client was still sending) and the
        connection closes; a normal client is then served.
        """
        self.serve("--max-header-bytes", "4096")
        for data, status in (
            (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
            (b"GET /v2/ HTTP/1.1\r\n" + b"X-Filler: yyyyyyyy\r\n" * 50000 + b"\r\n", 431),
        ):
            client = await connect(self.port)
            client.send(data)
            response = parseResponse(await client.closed)
            self.assertEqual(response.status, status)
            self.assertEqual(json.loads(response.body)["errors"][0]["code"], "DENIED")
        self.assertEqual((await fetch(self.port, b"GET", BLOB_PATH)).body, BLOB)

    async def test_perClientCap(self):
        """
        Over --max-connections-per-client, a connection is closed with no
        answer; a client from another address is served meanwhile, and so
        is the first client once one of its connections ends.
        """
        self.serve("--max-connections-per-client", "2")
        port6 = self.listen6()
        held = [await connect(self.port) for _ in range(2)]
        await waitFor(lambda: len(self.site.connections) == 2)
        refused = await connect(self.port)
        refused.send(request(b"GET", BLOB_PATH))
        self.assertEqual(await refused.closed, b"")
        response = await fetch(port6, b"GET", BLOB_PATH, host="::1")
        self.assertEqual(response.body, BLOB)
        held[0].transport.loseConnection()
        await held[0].closed
        await waitFor(lambda: len(self.site.connections) == 1)
        self.assertEqual((await fetch(self.port, b"GET", BLOB_PATH)).body, BLOB)
        held[1].transport.loseConnection()

    def listen6(self):
        from twisted.internet import reactor

        try:
            port = reactor.listenTCP(0, self.site, interface="::1")
        except Exception as e:
            self.skipTest(f"no IPv6 loopback: {e}")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def test_totalCap(self):
        """
        Over --max-connections, a connection is closed with no answer, while
        the open ones are still served.
        """
        self.serve("--max-connections", "2")
        held = [await connect(self.port) for _ in range(2)]
        await waitFor(lambda: len(self.site.connections) == 2)
        refused = await connect(self.port)
        self.assertEqual(await refused.closed, b"")
        held[0].send(request(b"GET", BLOB_PATH))
        self.assertEqual(parseResponse(await held[0].closed).body, BLOB)
        held[1].transport.loseConnection()

    async def test_unreadResponse(self):
        """
        A client that stops reading a large blob is cut off after
        --idle-timeout, which frees its connection and file, while another
        client is served.
        """
        big = os.urandom(1024 * 1024) * 16
        blobsdir = makeBlobDir(self, [big, BLOB])
        self.site = tap.buildSite(makeOptions(blobsdir, "--idle-timeout", "1"))
        self.port = listen(self, self.site)
        stalled = await connect(self.port)
        stalled.smallReceiveBuffer()
        stalled.stopReading()
        stalled.send(request(b"GET", f"/v2/a/blobs/sha256:{sha256(big)}".encode()))
        await waitFor(lambda: len(self.site.connections) == 1)
        self.assertEqual((await fetch(self.port, b"GET", BLOB_PATH)).body, BLOB)
        await waitFor(lambda: len(self.site.connections) == 0)
        stalled.startReading()
        response = parseResponse(await stalled.closed)
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        self.assertEqual(response.body, big[: len(response.body)])

    async def test_clientAddress(self):
        """
        The channel's transport is still the socket: the access log names
        the client's address.
        """
        logs = captureLogs(self)
        self.serve()
        response = await fetch(self.port, b"HEAD", BLOB_PATH)
        self.assertEqual(response.status, 200)
        [line] = [line for line in logs if '"HEAD /v2/library/ubuntu' in line]
        self.assertTrue(line.startswith('127.0.0.1 - - ['), line)

    async def test_slowReaderGetsEveryByte(self):
        """
        A client reading a 16 MiB blob in fits and starts, through a small
        receive buffer, gets every byte: the socket's back-pressure pauses
        and resumes the producer through the limits' channel.
        """
        big = os.urandom(1024 * 1024) * 16
        self.site = tap.buildSite(makeOptions(makeBlobDir(self, [big]), "--idle-timeout", "5"))
        self.port = listen(self, self.site)
        client = await connect(self.port)
        client.smallReceiveBuffer()
        client.send(request(b"GET", f"/v2/a/blobs/sha256:{sha256(big)}".encode()))
        while not client.closed.called:
            client.stopReading()
            await pause(0.02)
            client.startReading()
            await pause(0.005)
        response = parseResponse(await client.closed)
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        self.assertEqual(response.body, big)
        self.assertEqual(response.header("connection"), "close")

"""
Blob bodies over real loopback sockets, through both ways of sending them:
sendfile(2) to the socket, and writes through the transport's buffer.
"""

import os

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from nydusproxy import producer, tap, web

from .support import makeOptions, parseResponses, sha256

BLOB = os.urandom(16 * 1024 * 1024 + 3)
HEX = sha256(BLOB)
URL = b"/v2/library/ubuntu/blobs/sha256:" + HEX.encode()


class RawClient(protocol.Protocol):
    """
    Sends raw request bytes and collects everything until the server
    closes.  It can stop reading (like a slow or stalled client) and start
    again.
    """

    def __init__(self, request: bytes):
        self.request = request
        self.received = []
        self.closed = defer.Deferred()
        self.firstData = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received.append(data)
        if not self.firstData.called:
            self.firstData.callback(None)

    def connectionLost(self, reason):
        self.closed.callback(b"".join(self.received))


def rawRequest(method=b"GET", path=URL, **headers):
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: test", b"Connection: close"]
    lines += [b"%s: %s" % (name.replace("_", "-").encode(), value) for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def openFilesUnder(directory):
    """
    The paths under C{directory} that this process holds open.
    """
    directory = os.path.abspath(directory) + os.sep
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory):
            paths.append(target)
    return paths


def within(d, seconds):
    """
    Fail C{d} if it has not fired within C{seconds}: a hang is a failure,
    not a stuck test run.
    """
    return d.addTimeout(seconds, reactor)


class TransferTestsMixin:
    extraOptions: tuple[str, ...] = ()
    expectedProducer: type

    def setUp(self):
        self.blobsdir = self.mktemp()
        os.makedirs(self.blobsdir)
        self.blobPath = os.path.join(self.blobsdir, HEX)
        with open(self.blobPath, "wb") as f:
            f.write(BLOB)
        self.producers = []
        for name in ("FileProducer", "SendfileProducer"):
            original = getattr(web, name)
            self.patch(web, name, self.recording(original))
        site = tap.buildSite(makeOptions(self.blobsdir, *self.extraOptions), reactor)
        self.site = site
        self.serverProtocols = []
        buildProtocol = site.buildProtocol

        def recordingBuildProtocol(address):
            protocol = buildProtocol(address)
            self.serverProtocols.append(protocol)
            return protocol

        site.buildProtocol = recordingBuildProtocol
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def recording(self, original):
        producers = self.producers

        class Recording(original):
            def start(self):
                producers.append(original)
                super().start()

        return Recording

    async def connect(self, request):
        client = RawClient(request)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        await connectProtocol(endpoint, client)
        return client

    async def fetch(self, **headers):
        client = await self.connect(rawRequest(**headers))
        raw = await within(client.closed, 30)
        [response] = parseResponses(raw, [b"GET"])
        return response

    async def test_whole(self):
        """
        The whole blob arrives exactly, through the expected producer.
        """
        response = await self.fetch()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, BLOB)
        self.assertEqual(self.producers, [self.expectedProducer])

    async def test_range(self):
        """
        A multi-MiB range arrives exactly, with its Content-Range.
        """
        response = await self.fetch(range=b"bytes=1048576-5242879")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.header("content-range"), f"bytes 1048576-5242879/{len(BLOB)}")
        self.assertEqual(response.body, BLOB[1048576:5242880])

    async def test_smallRange(self):
        """
        A 4 KiB range is read at once and returned whatever the mode: no
        producer.
        """
        response = await self.fetch(range=b"bytes=4096-8191")
        self.assertEqual(response.body, BLOB[4096:8192])
        self.assertEqual(self.producers, [])

    async def test_slowReader(self):
        """
        A client that stops reading for a while, so that the server's
        socket buffer fills, still gets every byte.
        """
        client = await self.connect(rawRequest())
        await within(client.firstData, 10)
        client.transport.pauseProducing()
        await deferLater(reactor, 0.5, lambda: None)
        client.transport.resumeProducing()
        raw = await within(client.closed, 30)
        [response] = parseResponses(raw, [b"GET"])
        self.assertEqual(response.body, BLOB)

    async def test_truncatedWhileSending(self):
        """
        A blob truncated while it is sent ends the response early: the
        connection closes and the client has fewer bytes than promised,
        never a hang.
        """
        client = await self.connect(rawRequest())
        await within(client.firstData, 10)
        client.transport.pauseProducing()
        await deferLater(reactor, 0.2, lambda: None)
        os.truncate(self.blobPath, 1024)
        client.transport.resumeProducing()
        raw = await within(client.closed, 30)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: %d" % (len(BLOB),), head)
        self.assertLess(len(body), len(BLOB))
        if self.copiesBytes:
            self.assertEqual(body, BLOB[: len(body)])

    async def test_replacedByRenameWhileSending(self):
        """
        A blob replaced by rename while it is sent keeps sending the old
        file's bytes, whole; the next request gets the new ones.
        """
        client = await self.connect(rawRequest())
        await within(client.firstData, 10)
        client.transport.pauseProducing()
        replacement = self.blobPath + ".new"
        with open(replacement, "wb") as f:
            f.write(BLOB[::-1])
        os.rename(replacement, self.blobPath)
        await deferLater(reactor, 0.2, lambda: None)
        client.transport.resumeProducing()
        raw = await within(client.closed, 30)
        [response] = parseResponses(raw, [b"GET"])
        self.assertEqual(response.body, BLOB)
        again = await self.fetch(range=b"bytes=0-99")
        self.assertEqual(again.body, BLOB[::-1][:100])

    async def test_stalledClient(self):
        """
        A client that reads nothing for --idle-timeout seconds is
        disconnected at once, without waiting for it to read what is
        buffered, and the file is closed.
        """
        self.site.resource.blobs.sendTimeout = 0.5
        client = await self.connect(rawRequest())
        await within(client.firstData, 10)
        client.transport.pauseProducing()
        await deferLater(reactor, 1.5, lambda: None)
        [server] = self.serverProtocols
        self.assertTrue(server.transport.disconnected)
        client.transport.resumeProducing()
        await within(client.closed, 10)
        self.assertLess(sum(map(len, client.received)), len(BLOB))
        self.assertEqual(openFilesUnder(self.blobsdir), [])

    async def test_keepAliveAfterBody(self):
        """
        A request that follows a sendfile body on the same connection is
        answered in order.
        """
        two = rawRequest(range=b"bytes=0-1048575").replace(b"Connection: close\r\n", b"")
        two += rawRequest(range=b"bytes=-100")
        client = await self.connect(two)
        raw = await within(client.closed, 30)
        first, second = parseResponses(raw, [b"GET", b"GET"])
        self.assertEqual(first.body, BLOB[:1048576])
        self.assertEqual(second.body, BLOB[-100:])

    async def test_accessLogCountsBytes(self):
        """
        The access log's byte count is the body length on either path.
        """
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.fetch(range=b"bytes=0-2097151")
        lengths = [e["bytes"] for e in events if e.get("log_namespace") == "nydusproxy.access"]
        self.assertEqual(lengths, [2097152])


class SendfileTransferTests(TransferTestsMixin, TestCase):
    expectedProducer = producer.SendfileProducer
    # sendfile queues page references: bytes truncated away while queued
    # arrive as zeros, in a response that is still cut short.
    copiesBytes = False


class BufferedTransferTests(TransferTestsMixin, TestCase):
    extraOptions = ("--no-sendfile",)
    expectedProducer = producer.FileProducer
    copiesBytes = True

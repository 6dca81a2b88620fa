"""
Integration over real loopback sockets, in process: the site that
C{nydusproxy.tap.buildSite} builds, listening on 127.0.0.1, read by treq
through a real L{Agent} and by a raw TCP client that can stall and hang up.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import FailTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from nydusproxy.tap import Options, buildSite

KiB = 1024
MiB = 1024 * KiB


def checkBodyHasErrorCodes(
    testCase: SynchronousTestCase,
    contentType: bytes | str | None,
    body: bytes,
    *codes: str,
) -> dict[str, Any]:
    """
    Check that C{body} is the OCI distribution error document listing
    exactly C{codes}, served as JSON, and return it decoded.
    """
    if isinstance(contentType, str):
        contentType = contentType.encode("ascii")
    testCase.assertEqual(contentType, b"application/json")
    document = json.loads(body)
    testCase.assertEqual([error["code"] for error in document["errors"]], list(codes))
    for error in document["errors"]:
        testCase.assertIsInstance(error["message"], str)
        testCase.assertTrue(error["message"])
    return document


def blobName(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def randomBlob(size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    return blobName(data), data


def openFds() -> dict[int, str]:
    """
    The open file descriptors of this process (the server's process), each
    with what it points at.
    """
    fds = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            fds[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except FileNotFoundError:
            # The descriptor listdir itself used, closed since.
            pass
    return fds


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def waitUntil(
    predicate: Callable[[], bool], describe: Callable[[], str], timeout: float = 5.0
) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise FailTest(f"not true after {timeout} s: {describe()}")
        await sleep(0.01)


class RawClient(Protocol):
    """
    A client that sends one request as raw bytes and keeps everything the
    server sends, and whose reading the test pauses, resumes or cuts.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = bytearray()
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()
        self._want = 0
        self._reached: Deferred[int] | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._reached is not None and len(self.received) >= self._want:
            reached, self._reached = self._reached, None
            reached.callback(len(self.received))

    def connectionLost(self, reason: Failure) -> None:
        if self._reached is not None:
            reached, self._reached = self._reached, None
            reached.errback(reason)
        self.reason = reason
        self.lost.callback(None)

    def receivedAtLeast(self, count: int) -> Deferred[int]:
        if len(self.received) >= count:
            return succeed(len(self.received))
        self._want = count
        self._reached = Deferred()
        return self._reached

    def response(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        """
        The status line, headers (lowercased names) and body received.
        """
        head, _, body = bytes(self.received).partition(b"\r\n\r\n")
        statusLine, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return statusLine, headers, body


class LoopbackTests(TestCase):
    """
    The site served on a real loopback port.
    """

    timeout = 60

    def setUp(self) -> None:
        self.blobsdir = FilePath(self.mktemp())
        self.blobsdir.makedirs()
        options = Options()
        options.parseOptions(["--blobsdir", self.blobsdir.path])
        site = buildSite(options, reactor)
        self.serverConnectionsOpen = 0
        build = site.buildProtocol

        def buildProtocol(addr):
            protocol = build(addr)
            connectionLost = protocol.connectionLost

            def lost(reason):
                self.serverConnectionsOpen -= 1
                connectionLost(reason)

            protocol.connectionLost = lost
            self.serverConnectionsOpen += 1
            return protocol

        site.buildProtocol = buildProtocol
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(lambda: Deferred.fromCoroutine(self._serverDisconnected()))
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def _serverDisconnected(self) -> None:
        # Trial fails a test whose sockets outlive it: wait for the server's
        # side of every connection to be gone once the clients have closed.
        await waitUntil(
            lambda: self.serverConnectionsOpen == 0,
            lambda: f"{self.serverConnectionsOpen} server connections still open",
        )

    def addBlob(self, data: bytes, name: str | None = None) -> str:
        name = name or blobName(data)
        self.blobsdir.child(name).setContent(data)
        return name

    def url(self, name: str, repo: str = "library/ubuntu") -> str:
        return f"{self.base}/v2/{repo}/blobs/sha256:{name}"

    async def get(self, url: str, rangeHeader: bytes | None = None):
        headers = {b"Range": [rangeHeader]} if rangeHeader is not None else None
        response = await self.client.get(url, headers=headers)
        body = await response.content()
        return response, body

    def header(self, response, name: bytes) -> bytes | None:
        # Twisted's Agent keeps Content-Length of a GET answer out of the
        # headers (it is response.length); a HEAD answer keeps it.
        values = response.headers.getRawHeaders(name)
        if values is None:
            return None
        self.assertEqual(len(values), 1, f"{name!r} repeated: {values!r}")
        return values[0]

    async def connectRaw(self, path: str) -> RawClient:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        client = RawClient(request)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        await connectProtocol(endpoint, client)
        return client

    def blobFds(self, name: str) -> list[int]:
        path = os.path.realpath(self.blobsdir.child(name).path)
        return [fd for fd, target in openFds().items() if target == path]

    async def test_head(self) -> None:
        """
        HEAD answers 200 with the blob's size as Content-Length, the
        registry headers, and no body.
        """
        data = os.urandom(70001)
        name = self.addBlob(data)
        response = await self.client.head(self.url(name))
        body = await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, b"Content-Length"), b"70001")
        self.assertEqual(
            self.header(response, b"Docker-Content-Digest"), f"sha256:{name}".encode()
        )
        self.assertEqual(self.header(response, b"ETag"), f'"sha256:{name}"'.encode())
        self.assertEqual(self.header(response, b"Accept-Ranges"), b"bytes")
        self.assertEqual(
            self.header(response, b"Content-Type"), b"application/octet-stream"
        )
        self.assertEqual(
            self.header(response, b"Docker-Distribution-API-Version"), b"registry/2.0"
        )

    async def test_closedRange(self) -> None:
        """
        C{bytes=a-b} answers 206 with exactly bytes a to b and their
        Content-Range.
        """
        data = os.urandom(100000)
        name = self.addBlob(data)
        response, body = await self.get(self.url(name), b"bytes=4096-8191")
        self.assertEqual(response.code, 206)
        self.assertEqual(body, data[4096:8192])
        self.assertEqual(self.header(response, b"Content-Range"), b"bytes 4096-8191/100000")
        self.assertEqual(response.length, 4096)

    async def test_closedRangePastTheEnd(self) -> None:
        """
        A closed range whose end is past the blob's end is cut at the end.
        """
        data = os.urandom(5000)
        name = self.addBlob(data)
        response, body = await self.get(self.url(name), b"bytes=4000-9999")
        self.assertEqual(response.code, 206)
        self.assertEqual(body, data[4000:])
        self.assertEqual(self.header(response, b"Content-Range"), b"bytes 4000-4999/5000")

    async def test_openEndedRange(self) -> None:
        """
        C{bytes=N-} answers 206 with everything from N to the end.
        """
        data = os.urandom(300000)
        name = self.addBlob(data)
        response, body = await self.get(self.url(name), b"bytes=123457-")
        self.assertEqual(response.code, 206)
        self.assertEqual(body, data[123457:])
        self.assertEqual(
            self.header(response, b"Content-Range"), b"bytes 123457-299999/300000"
        )

    async def test_suffixRange(self) -> None:
        """
        C{bytes=-N} answers 206 with the last N bytes.
        """
        data = os.urandom(300000)
        name = self.addBlob(data)
        response, body = await self.get(self.url(name), b"bytes=-1000")
        self.assertEqual(response.code, 206)
        self.assertEqual(body, data[-1000:])
        self.assertEqual(
            self.header(response, b"Content-Range"), b"bytes 299000-299999/300000"
        )

    async def test_suffixLongerThanBlob(self) -> None:
        """
        A suffix longer than the blob selects the whole blob (RFC 9110
        14.1.2), not a 500.
        """
        data = os.urandom(3000)
        name = self.addBlob(data)
        response, body = await self.get(self.url(name), b"bytes=-5000")
        self.assertEqual(response.code, 206)
        self.assertEqual(body, data)
        self.assertEqual(self.header(response, b"Content-Range"), b"bytes 0-2999/3000")

    async def test_wholeLargeBlob(self) -> None:
        """
        A blob of several MiB, larger than any socket buffer, so that the
        server's producer is paused and resumed, arrives whole and intact.
        """
        data = os.urandom(3 * MiB + 12345)
        name = self.addBlob(data)
        response, body = await self.get(self.url(name))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(data))
        self.assertEqual(len(body), len(data))
        self.assertEqual(hashlib.sha256(body).hexdigest(), name)
        self.assertEqual(body, data)

    async def test_stalledReader(self) -> None:
        """
        A client that stops reading several times while a large blob is
        sent still gets all of it, intact, once it reads again.
        """
        data = os.urandom(12 * MiB)
        name = self.addBlob(data)
        client = await self.connectRaw(f"/v2/sealer/blobs/sha256:{name}")
        for step in range(1, 6):
            await client.receivedAtLeast(step * 2 * MiB)
            client.transport.pauseProducing()
            await sleep(0.05)
            client.transport.resumeProducing()
        await client.lost
        statusLine, headers, body = client.response()
        self.assertEqual(statusLine, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"content-length"], b"%d" % (len(data),))
        self.assertEqual(len(body), len(data))
        self.assertEqual(body, data)

    async def test_unsatisfiableRange(self) -> None:
        """
        A range that starts at or after the end answers 416 with
        C{Content-Range: bytes */size} and a RANGE_INVALID error.
        """
        data = os.urandom(1000)
        name = self.addBlob(data)
        response, body = await self.get(self.url(name), b"bytes=1000-")
        self.assertEqual(response.code, 416)
        self.assertEqual(self.header(response, b"Content-Range"), b"bytes */1000")
        self.assertEqual(response.length, len(body))
        checkBodyHasErrorCodes(
            self, self.header(response, b"Content-Type"), body, "RANGE_INVALID"
        )

    async def test_unknownBlob(self) -> None:
        """
        A blob that is not in the directory answers 404 with a BLOB_UNKNOWN
        error whose detail names the digest.
        """
        name = "0" * 64
        response, body = await self.get(self.url(name))
        self.assertEqual(response.code, 404)
        document = checkBodyHasErrorCodes(
            self, self.header(response, b"Content-Type"), body, "BLOB_UNKNOWN"
        )
        self.assertEqual(document["errors"][0]["detail"], {"digest": f"sha256:{name}"})

    async def test_clientDisconnectsMidDownload(self) -> None:
        """
        When a client hangs up in the middle of a large blob, the server
        closes the blob's file (the process's descriptors come back to
        what they were) and goes on answering.
        """
        data = os.urandom(32 * MiB)
        name = self.addBlob(data)
        # Trial runs the reactor only once the test awaits, and the reactor
        # opens its signal pipes when it starts: count after that.
        await sleep(0)
        before = openFds()
        self.assertEqual(self.blobFds(name), [])

        client = await self.connectRaw(f"/v2/a/b/c/blobs/sha256:{name}")
        await client.receivedAtLeast(256 * KiB)
        client.transport.pauseProducing()
        # The server cannot have sent 32 MiB into the socket buffers: it is
        # paused in the middle of the blob, holding its file open.
        await waitUntil(
            lambda: len(self.blobFds(name)) == 1,
            lambda: f"blob descriptors: {self.blobFds(name)}",
        )
        client.transport.abortConnection()
        await client.lost
        self.assertLess(len(client.received), len(data))

        await waitUntil(
            lambda: self.blobFds(name) == [] and len(openFds()) == len(before),
            lambda: f"descriptors before: {before}, now: {openFds()}",
        )
        self.assertEqual(sorted(openFds()), sorted(before))

        response, body = await self.get(self.url(name, "a/b/c"), b"bytes=1048576-2097151")
        self.assertEqual(response.code, 206)
        self.assertEqual(body, data[MiB : 2 * MiB])

    async def test_replacedByRename(self) -> None:
        """
        A blob replaced by renaming another file over it is served with the
        new bytes and size from the next request on.
        """
        name = "ab" * 32
        old = os.urandom(40000)
        new = os.urandom(50000)
        self.addBlob(old, name)
        response, body = await self.get(self.url(name))
        self.assertEqual((response.code, body), (200, old))

        temporary = self.blobsdir.child("incoming.tmp")
        temporary.setContent(new)
        os.replace(temporary.path, self.blobsdir.child(name).path)

        response, body = await self.get(self.url(name))
        self.assertEqual((response.code, body), (200, new))
        response = await self.client.head(self.url(name))
        await response.content()
        self.assertEqual(self.header(response, b"Content-Length"), b"50000")
        response, body = await self.get(self.url(name), b"bytes=45000-")
        self.assertEqual(body, new[45000:])
        self.assertEqual(self.header(response, b"Content-Range"), b"bytes 45000-49999/50000")

    async def test_replacedDuringDownload(self) -> None:
        """
        A download in progress when its blob is replaced by rename goes on
        with the bytes it started with; the next request gets the new ones.
        """
        name = "cd" * 32
        old = os.urandom(16 * MiB)
        new = os.urandom(1000)
        self.addBlob(old, name)
        client = await self.connectRaw(f"/v2/sealer/blobs/sha256:{name}")
        await client.receivedAtLeast(256 * KiB)
        client.transport.pauseProducing()

        temporary = self.blobsdir.child("incoming.tmp")
        temporary.setContent(new)
        os.replace(temporary.path, self.blobsdir.child(name).path)

        client.transport.resumeProducing()
        await client.lost
        statusLine, headers, body = client.response()
        self.assertEqual(statusLine, b"HTTP/1.1 200 OK")
        self.assertEqual(len(body), len(old))
        self.assertEqual(body, old)

        response, body = await self.get(self.url(name, "sealer"))
        self.assertEqual((response.code, body), (200, new))

    async def test_truncatedDuringDownload(self) -> None:
        """
        A blob truncated while it is being sent ends its response early by
        closing the connection: the client gets less than the promised
        Content-Length, and no hang; the file is closed.  What it read
        before the truncation is the blob's (what sendfile had queued but
        not yet sent may arrive as zeros: test_transfer covers each way
        of sending).
        """
        name = "ef" * 32
        data = os.urandom(32 * MiB)
        self.addBlob(data, name)
        client = await self.connectRaw(f"/v2/sealer/blobs/sha256:{name}")
        await client.receivedAtLeast(256 * KiB)
        client.transport.pauseProducing()
        readBefore = len(client.response()[2])
        os.truncate(self.blobsdir.child(name).path, MiB)
        client.transport.resumeProducing()
        await client.lost

        statusLine, headers, body = client.response()
        self.assertEqual(statusLine, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"content-length"], b"%d" % (len(data),))
        self.assertLess(len(body), len(data))
        self.assertEqual(body[:readBefore], data[:readBefore])
        await waitUntil(
            lambda: self.blobFds(name) == [],
            lambda: f"blob descriptors: {self.blobFds(name)}",
        )

    async def test_addedAfterStart(self) -> None:
        """
        A blob written into the directory while the server runs is served.
        """
        data = os.urandom(20000)
        name = blobName(data)
        response, body = await self.get(self.url(name))
        self.assertEqual(response.code, 404)

        self.addBlob(data)
        response, body = await self.get(self.url(name))
        self.assertEqual(response.code, 200)
        self.assertEqual(body, data)

    async def test_deleted(self) -> None:
        """
        A blob removed while the server runs answers 404 BLOB_UNKNOWN.
        """
        data = os.urandom(20000)
        name = self.addBlob(data)
        response, body = await self.get(self.url(name))
        self.assertEqual((response.code, body), (200, data))

        self.blobsdir.child(name).remove()
        response, body = await self.get(self.url(name))
        self.assertEqual(response.code, 404)
        checkBodyHasErrorCodes(
            self, self.header(response, b"Content-Type"), body, "BLOB_UNKNOWN"
        )

"""
TLS through Twisted's C{ssl:} endpoint, with certificates made in the test,
over real loopback sockets.
"""

from __future__ import annotations

import os
import shutil
import warnings

from twisted.internet import endpoints, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from nydusproxy import tap, web
from nydusproxy.producer import FileProducer

from .clientsupport import makeAgent, readAll
from .support import makeBlobDir, parseResponses, sha256
from .tlssupport import makeCA, makeServer, requireTLS, writePEM

# Twisted 26.10's TLS code hands pyOpenSSL objects to pyOpenSSL 26, which
# deprecates that; the warnings come from Twisted's own module, at each
# connection.  Ignore exactly those.
warnings.filterwarnings(
    "ignore",
    message=r"Passing pyOpenSSL (X509|PKey) objects is deprecated",
    category=DeprecationWarning,
)

BLOB = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = "sha256:" + sha256(BLOB)
BLOB_PATH = f"/v2/library/ubuntu/blobs/{DIGEST}".encode()


def sslListen(key: str, cert: str, chain: str | None = None) -> str:
    description = (
        "ssl:0:interface=127.0.0.1"
        f":privateKey={endpoints.quoteStringArgument(key)}"
        f":certKey={endpoints.quoteStringArgument(cert)}"
    )
    if chain is not None:
        description += f":extraCertChain={endpoints.quoteStringArgument(chain)}"
    return description


def trusting(caPEM: bytes):
    from twisted.internet.ssl import Certificate
    from twisted.web.client import BrowserLikePolicyForHTTPS

    return BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(caPEM))


class TLSServerMixin:
    """
    A server on C{ssl:0} built from the command line, as twistd would.
    """

    def setUp(self):
        requireTLS()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.root = makeCA("nydus-proxy test root")
        self.intermediate = makeCA("nydus-proxy test intermediate", self.root)
        self.server = makeServer(self.root)
        self.caFile = writePEM(self.dir, "ca.pem", self.root.certPEM())
        self.keyFile = writePEM(self.dir, "server.key", self.server.keyPEM())
        self.certFile = writePEM(self.dir, "server.pem", self.server.certPEM())
        self.blobsdir = makeBlobDir(self, [BLOB])

    async def listen(self, description: str, *extra: str) -> int:
        options = tap.Options()
        options.parseOptions(["--blobsdir", self.blobsdir, "--listen", description, *extra])
        site = tap.buildSite(options, reactor)
        port = await endpoints.serverFromString(reactor, options["listen"][0]).listen(site)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def url(self, port: int, host: str = "127.0.0.1", scheme: str = "https") -> bytes:
        return f"{scheme}://{host}:{port}".encode() + BLOB_PATH


class TLSTests(TLSServerMixin, TestCase):
    async def test_ranges(self):
        """
        A client that verifies the server against the test CA reads the
        size and exact ranges: 206 with Content-Range, as over plain HTTP.
        """
        port = await self.listen(sslListen(self.keyFile, self.certFile))
        agent = makeAgent(reactor, trusting(self.root.certPEM()))
        head = await agent.request(b"HEAD", self.url(port))
        self.assertEqual(head.code, 200)
        self.assertEqual(head.headers.getRawHeaders(b"content-length"), [b"%d" % len(BLOB)])
        await readAll(head)
        size = len(BLOB)
        for first, last, host in ((0, 4095, "127.0.0.1"), (1048576, 2097151, "127.0.0.1"),
                                  (size - 10, size - 1, "localhost")):
            headers = Headers({b"Range": [b"bytes=%d-%d" % (first, last)]})
            response = await agent.request(b"GET", self.url(port, host), headers)
            self.assertEqual(response.code, 206)
            self.assertEqual(response.headers.getRawHeaders(b"content-range"),
                             [b"bytes %d-%d/%d" % (first, last, size)])
            self.assertEqual(await readAll(response), BLOB[first:last + 1])

    async def test_untrustedCertificate(self):
        """
        A client that trusts another CA refuses the server: the
        verification is real.
        """
        port = await self.listen(sslListen(self.keyFile, self.certFile))
        other = makeCA("some other root")
        agent = makeAgent(reactor, trusting(other.certPEM()))
        with self.assertRaises(ResponseNeverReceived) as caught:
            await agent.request(b"HEAD", self.url(port))
        self.assertIn("certificate verify failed", str(caught.exception.reasons[0].value))

    async def test_extraCertChain(self):
        """
        A server certificate issued by an intermediate CA verifies against
        the root only when C{extraCertChain} names the intermediate.
        """
        leaf = makeServer(self.intermediate)
        key = writePEM(self.dir, "leaf.key", leaf.keyPEM())
        cert = writePEM(self.dir, "leaf.pem", leaf.certPEM())
        chain = writePEM(self.dir, "chain.pem", self.intermediate.certPEM())
        agent = makeAgent(reactor, trusting(self.root.certPEM()))
        withoutChain = await self.listen(sslListen(key, cert))
        with self.assertRaises(ResponseNeverReceived):
            await agent.request(b"HEAD", self.url(withoutChain))
        withChain = await self.listen(sslListen(key, cert, chain))
        response = await agent.request(b"GET", self.url(withChain))
        self.assertEqual(response.code, 200)
        self.assertEqual(await readAll(response), BLOB)

    async def test_plainHttpRefused(self):
        """
        Plain HTTP to the TLS port fails cleanly for that client (no HTTP
        answer, connection closed, nothing logged as an error), and the
        port keeps serving TLS clients.
        """
        port = await self.listen(sslListen(self.keyFile, self.certFile))
        with self.assertRaises((ResponseFailed, ResponseNeverReceived)):
            await makeAgent(reactor).request(b"GET", self.url(port, scheme="http"))

        received = await rawExchange(port, b"GET " + BLOB_PATH + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertFalse(received.startswith(b"HTTP/"), received[:40])

        agent = makeAgent(reactor, trusting(self.root.certPEM()))
        response = await agent.request(b"GET", self.url(port), Headers({b"Range": [b"bytes=5-9"]}))
        self.assertEqual((response.code, await readAll(response)), (206, BLOB[5:10]))

    async def test_curl(self):
        """
        curl, verifying with C{--cacert}, reads a range; without TLS it
        fails, and the server serves the next TLS client.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed (apt-get install curl)")
        port = await self.listen(sslListen(self.keyFile, self.certFile))
        headerFile = os.path.join(self.dir, "headers")
        out, err, code = await getProcessOutputAndValue(
            curl, ["-sS", "--cacert", self.caFile, "-r", "100-199", "-D", headerFile,
                   self.url(port).decode()], env=dict(os.environ))
        self.assertEqual(code, 0, err)
        self.assertEqual(out, BLOB[100:200])
        with open(headerFile, "rb") as f:
            head = f.read()
        self.assertTrue(head.startswith(b"HTTP/1.1 206 "), head)
        self.assertIn(b"\r\nContent-Range: bytes 100-199/%d\r\n" % len(BLOB), head)
        _, _, plainCode = await getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "30", self.url(port, scheme="http").decode()],
            env=dict(os.environ))
        self.assertNotEqual(plainCode, 0)
        out, err, code = await getProcessOutputAndValue(
            curl, ["-sS", "--cacert", self.caFile, "-r", "0-0", self.url(port).decode()],
            env=dict(os.environ))
        self.assertEqual((code, out), (0, BLOB[:1]), err)


class RawClient(Protocol):
    def __init__(self, request: bytes, onData=None):
        self.request = request
        self.onData = onData
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data
        if self.onData is not None:
            self.onData(self)

    def connectionLost(self, reason=None):
        self.done.callback(bytes(self.received))


async def rawExchange(port: int, request: bytes) -> bytes:
    """
    Send bytes over plain TCP; return all that came back until the server
    closed the connection.
    """
    client = RawClient(request)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoints.connectProtocol(endpoint, client)
    return await client.done


class BackPressureTests(TLSServerMixin, TestCase):
    async def test_slowClientPausesProducer(self):
        """
        A TLS client that stops reading pauses the server's FileProducer
        through the TLS layer (the file is not read ahead into memory); when
        it reads again the producer resumes, and the client gets exactly
        the blob.
        """
        import socket

        from twisted.internet.ssl import Certificate, optionsForClientTLS

        blob = os.urandom(24 * 1024 * 1024)
        digest = "sha256:" + sha256(blob)
        with open(os.path.join(self.blobsdir, digest[7:]), "wb") as f:
            f.write(blob)
        producers = []
        self.patch(web, "FileProducer", recordingProducer(producers))
        port = await self.listen(sslListen(self.keyFile, self.certFile))

        paused = []

        def pauseAtFirstData(client):
            if not paused:
                paused.append(True)
                client.transport.pauseProducing()

        request = (b"GET /v2/a/blobs/" + digest.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                   b"Connection: close\r\n\r\n")
        client = RawClient(request, pauseAtFirstData)
        options = optionsForClientTLS("127.0.0.1", Certificate.loadPEM(self.root.certPEM()))
        endpoint = endpoints.wrapClientTLS(
            options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        protocol = await endpoints.connectProtocol(endpoint, client)
        # A small receive buffer, so that the kernel holds little for the
        # paused client.
        protocol.transport.transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)

        # Wait (a bounded number of polls) until the server stops reading
        # the file: its producer paused and its offset steady.
        steady, last = 0, None
        for _ in range(1000):
            await task.deferLater(reactor, 0.01, lambda: None)
            if not producers:
                continue
            producer = producers[0]
            if producer._paused and producer._offset == last:
                steady += 1
                if steady == 10:
                    break
            else:
                steady, last = 0, producer._offset
        self.assertEqual(steady, 10, "the producer never stayed paused")
        self.assertTrue(paused)
        self.assertLess(producer._offset, len(blob) // 2)
        self.assertIsNotNone(producer._fd)

        client.transport.resumeProducing()
        received = await client.done
        [response] = parseResponses(received, [b"GET"])
        self.assertEqual(response.status, 200)
        self.assertEqual(len(response.body), len(blob))
        self.assertTrue(response.body == blob, "the body differs from the blob")
        self.assertGreater(producer.pauses, 0)
        self.assertGreater(producer.resumes, producer.pauses)
        self.assertIsNone(producer._fd)


def recordingProducer(instances):
    class RecordingProducer(FileProducer):
        pauses = 0
        resumes = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            instances.append(self)

        def pauseProducing(self):
            self.pauses += 1
            super().pauseProducing()

        def resumeProducing(self):
            self.resumes += 1
            super().resumeProducing()

    return RecordingProducer


class TLSOptionsTests(SynchronousTestCase):
    def setUp(self):
        requireTLS()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.blobsdir = makeBlobDir(self)
        root = makeCA("nydus-proxy test root")
        server = makeServer(root)
        self.key = writePEM(self.dir, "server.key", server.keyPEM())
        self.cert = writePEM(self.dir, "server.pem", server.certPEM())
        self.both = writePEM(self.dir, "both.pem", server.keyPEM() + server.certPEM())

    def test_sslListen(self):
        """
        C{--listen ssl:PORT:privateKey=K:certKey=C} listens with TLS on
        that port, next to plain ones; key and certificate may share a file.
        """
        options = tap.Options()
        options.parseOptions([
            "--blobsdir", self.blobsdir,
            "--listen", f"ssl:8443:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}",
            "--listen", f"ssl:9443:privateKey={self.both}",
            "--listen", "tcp:8000",
        ])
        memory = MemoryReactor()
        tap.makeService(options, memory).privilegedStartService()
        self.assertEqual([(port, host) for port, _, _, _, host in memory.sslServers],
                         [(8443, "127.0.0.1"), (9443, "")])
        self.assertEqual([port for port, _, _, _ in memory.tcpServers], [8000])

    def test_badFiles(self):
        """
        A missing key file, or a key that is not the certificate's, stops
        the start with one line naming the endpoint.
        """
        other = makeServer(makeCA("other"))
        otherKey = writePEM(self.dir, "other.key", other.keyPEM())
        for description in (
            f"ssl:8443:privateKey={self.dir}/missing.key:certKey={self.cert}",
            f"ssl:8443:privateKey={otherKey}:certKey={self.cert}",
            f"ssl:8443:privateKey={self.cert}",
        ):
            options = tap.Options()
            options.parseOptions(["--blobsdir", self.blobsdir, "--listen", description])
            error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
            self.assertIn(description, str(error))

    def test_withoutPyOpenSSL(self):
        """
        Without pyOpenSSL, an ssl: endpoint says which extra to install.
        """

        def noOpenSSL(reactor, description):
            raise ImportError("No module named 'OpenSSL'")

        self.patch(endpoints, "serverFromString", noOpenSSL)
        description = f"ssl:8443:privateKey={self.key}"
        options = tap.Options()
        options.parseOptions(["--blobsdir", self.blobsdir, "--listen", description])
        error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
        self.assertEqual(
            str(error),
            f"--listen {description!r}: TLS needs pyOpenSSL (No module named 'OpenSSL'): "
            "pip install 'nydus-proxy[tls]'",
        )

"""
--verify-digest: blobs served only when their bytes match their digest,
hashed once per file, off the reactor thread.
"""

import hashlib
import os
import shutil
import threading

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nydusproxy import tap, verify

from .loopback import captureLogs, fetch, listen
from .support import (
    FIXTURE_BLOBS,
    InMemoryServer,
    assertErrorCode,
    copyFixtureBlobs,
    makeBlobDir,
    makeOptions,
    parseResponses,
    sha256,
)

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def path(hexdigest: str, algorithm: str = "sha256") -> bytes:
    return f"/v2/sealer/blobs/{algorithm}:{hexdigest}".encode()


class Hasher:
    """
    Stands for the thread pool: records each hashing job, and runs it when
    the test says (at once with C{immediate}).
    """

    def __init__(self, immediate=True):
        self.immediate = immediate
        self.jobs = []

    def __call__(self, f, *args):
        if self.immediate:
            self.jobs.append(None)
            try:
                return succeed(f(*args))
            except Exception:
                return fail()
        done = Deferred()
        self.jobs.append((done, f, args))
        return done

    def run(self, index=-1):
        done, f, args = self.jobs[index]
        done.callback(f(*args))


class VerifyingServer(InMemoryServer):
    def __init__(self, blobsdir, *extra, immediate=True):
        super().__init__(blobsdir, "--verify-digest", *extra)
        self.hasher = Hasher(immediate)
        self.verifier = self.site.resource.blobs.verifier
        self.verifier._runInThread = self.hasher

    def send(self, method, url, **headers):
        """
        Send one request and leave the connection open: the answer may
        come later.
        """
        protocol = self.site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        lines = [b"%s %s HTTP/1.1" % (method, url), b"Host: test"]
        lines += [b"%s: %s" % (name.encode(), value) for name, value in headers.items()]
        protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
        self.runTurns()
        return protocol, transport

    def runTurns(self):
        now = self.clock.seconds
        while any(call.getTime() <= now() for call in self.clock.getDelayedCalls()):
            self.clock.advance(0)

    @staticmethod
    def response(transport, method=b"GET"):
        [response] = parseResponses(transport.value(), [method])
        return response


class FixtureTests(SynchronousTestCase):
    """
    The real nydus blobs: two named by their sha256, one not.
    """

    def setUp(self):
        self.blobsdir = copyFixtureBlobs(self)
        self.data = {}
        for name in FIXTURE_BLOBS:
            with open(os.path.join(self.blobsdir, name), "rb") as f:
                self.data[name] = f.read()

    def test_verified(self):
        """
        With --verify-digest the two blobs named by their sha256 are
        served; the other is 404 BLOB_UNKNOWN, HEAD included, with a log
        line naming its digest.
        """
        logs = captureLogs(self)
        server = VerifyingServer(self.blobsdir)
        good, other, misnamed = FIXTURE_BLOBS
        for name in (good, other):
            self.assertEqual(server.get(path(name)).body, self.data[name])
            self.assertEqual(server.get(path(name), range=b"bytes=1024-2047").body,
                             self.data[name][1024:2048])
        error = assertErrorCode(self, server.get(path(misnamed)), 404, "BLOB_UNKNOWN")
        self.assertEqual(error["detail"], {"digest": "sha256:" + misnamed})
        self.assertEqual(server.get(path(misnamed), method=b"HEAD").status, 404)
        self.assertEqual(len(server.hasher.jobs), 3)
        [line] = [line for line in logs if "does not match" in line]
        self.assertIn("sha256:" + misnamed, line)
        self.assertIn(sha256(self.data[misnamed]), line)

    def test_notVerifiedByDefault(self):
        """
        Without --verify-digest, the blob not named by its sha256 is served.
        """
        server = InMemoryServer(self.blobsdir)
        misnamed = FIXTURE_BLOBS[2]
        self.assertIsNone(server.site.resource.blobs.verifier)
        self.assertEqual(server.get(path(misnamed)).body, self.data[misnamed])


class VerdictTests(SynchronousTestCase):
    def setUp(self):
        self.blob = os.urandom(300 * 1024)
        self.hex = sha256(self.blob)
        self.blobsdir = makeBlobDir(self, [self.blob])
        self.file = os.path.join(self.blobsdir, self.hex)
        self.server = VerifyingServer(self.blobsdir)

    def test_hashedOnce(self):
        """
        A verdict is kept: the file is hashed for its first request only.
        """
        for _ in range(3):
            self.assertEqual(self.server.get(path(self.hex)).body, self.blob)
        self.assertEqual(self.server.get(path(self.hex), method=b"HEAD").status, 200)
        self.assertEqual(len(self.server.hasher.jobs), 1)

    def test_modifiedAfterVerification(self):
        """
        A blob modified after its verification, in place and to the same
        size, is hashed again and no longer served; put back, it is served.
        """
        self.assertEqual(self.server.get(path(self.hex)).body, self.blob)
        with open(self.file, "r+b") as f:
            f.write(b"X")
        assertErrorCode(self, self.server.get(path(self.hex)), 404, "BLOB_UNKNOWN")
        with open(self.file, "r+b") as f:
            f.write(self.blob[:1])
        self.assertEqual(self.server.get(path(self.hex)).body, self.blob)
        self.assertEqual(len(self.server.hasher.jobs), 3)

    def test_sha512(self):
        """
        A sha512 digest is checked with sha512.
        """
        hex512 = hashlib.sha512(self.blob).hexdigest()
        os.makedirs(os.path.join(self.blobsdir, "blobs", "sha512"))
        shutil.copy(self.file, os.path.join(self.blobsdir, "blobs", "sha512", hex512))
        self.assertEqual(self.server.get(path(hex512, "sha512")).body, self.blob)
        wrong = "0" * 128
        shutil.copy(self.file, os.path.join(self.blobsdir, "blobs", "sha512", wrong))
        assertErrorCode(self, self.server.get(path(wrong, "sha512")), 404, "BLOB_UNKNOWN")

    def test_cacheBounded(self):
        """
        Only the last C{cacheSize} verdicts are kept.
        """
        self.server.verifier.cacheSize = 2
        blobs = [os.urandom(100) for _ in range(3)]
        server = self.server
        for data in blobs:
            with open(os.path.join(self.blobsdir, sha256(data)), "wb") as f:
                f.write(data)
            self.assertEqual(server.get(path(sha256(data))).body, data)
        self.assertEqual(len(server.verifier.verdicts), 2)
        self.assertEqual([key[6] for key in server.verifier.verdicts],
                         [sha256(data) for data in blobs[1:]])


class WaitingTests(SynchronousTestCase):
    """
    Requests that arrive while their blob is being hashed.
    """

    def setUp(self):
        self.blob = os.urandom(300 * 1024)
        self.hex = sha256(self.blob)
        self.server = VerifyingServer(makeBlobDir(self, [self.blob]), immediate=False)

    def test_answeredWhenHashed(self):
        """
        A request waits for the hash, and gets the blob once it is known
        to match; requests that come meanwhile share that one hash.
        """
        first, firstTransport = self.server.send(b"GET", path(self.hex))
        second, secondTransport = self.server.send(b"GET", path(self.hex), Range=b"bytes=0-9")
        self.assertEqual((firstTransport.value(), secondTransport.value()), (b"", b""))
        self.assertEqual(len(self.server.hasher.jobs), 1)
        self.server.hasher.run()
        self.server.runTurns()
        self.assertEqual(self.server.response(firstTransport).body, self.blob)
        self.assertEqual(self.server.response(secondTransport).body, self.blob[:10])

    def test_unavailableWhileHashing(self):
        """
        A request still waiting after C{waitTime} seconds is answered 503
        UNAVAILABLE with a Retry-After, and its file is closed; the hashing
        goes on, and the next request is served from its verdict.
        """
        fds = len(os.listdir("/proc/self/fd"))
        protocol, transport = self.server.send(b"GET", path(self.hex))
        self.server.clock.advance(verify.DigestVerifier.waitTime)
        response = self.server.response(transport)
        assertErrorCode(self, response, 503, "UNAVAILABLE")
        self.assertEqual(response.header("retry-after"), "1")
        protocol.connectionLost(Failure(ConnectionDone()))
        # The hashing job still holds its own copy of the descriptor.
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds + 1)
        self.server.hasher.run()
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds)
        self.server.hasher.immediate = True
        self.assertEqual(self.server.get(path(self.hex)).body, self.blob)
        self.assertEqual(len(self.server.hasher.jobs), 1)

    def test_clientLeaves(self):
        """
        A client that goes away while waiting has its blob's file closed;
        the verdict still comes, for later requests.
        """
        fds = len(os.listdir("/proc/self/fd"))
        protocol, transport = self.server.send(b"HEAD", path(self.hex))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds + 1)
        self.server.hasher.run()
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds)
        self.assertEqual(list(self.server.verifier.verdicts.values()), [True])
        timers = [call.func.__name__ for call in self.server.clock.getDelayedCalls()]
        self.assertNotIn("_timedOut", timers)

    def test_changedWhileHashing(self):
        """
        A file that changed while it was hashed gets no verdict: the
        waiting request is told to retry, and the next one hashes again.
        """
        protocol, transport = self.server.send(b"GET", path(self.hex))
        done, f, args = self.server.hasher.jobs[0]
        digest, identity = f(*args)
        done.callback((digest, identity[:2] + (identity[2] + 1,) + identity[3:]))
        assertErrorCode(self, self.server.response(transport), 503, "UNAVAILABLE")
        self.assertEqual(len(self.server.verifier.verdicts), 0)
        self.server.hasher.immediate = True
        self.assertEqual(self.server.get(path(self.hex)).body, self.blob)
        self.assertEqual(len(self.server.hasher.jobs), 2)

    def test_hashingFails(self):
        """
        A read error while hashing is logged and answered 500 UNKNOWN.
        """
        protocol, transport = self.server.send(b"GET", path(self.hex))
        done, f, args = self.server.hasher.jobs[0]
        os.close(args[0])
        done.errback(OSError(5, "Input/output error"))
        assertErrorCode(self, self.server.response(transport), 500, "UNKNOWN")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(len(self.server.verifier.verdicts), 0)


class ThreadTests(TestCase):
    async def test_hashedInAThread(self):
        """
        Over a real socket, with the reactor's thread pool: the blobs are
        hashed off the reactor thread, served when they match and refused
        when not.
        """
        blobsdir = copyFixtureBlobs(self)
        site = tap.buildSite(makeOptions(blobsdir, "--verify-digest"))
        port = listen(self, site)
        threads = []
        hashFile = verify.hashFile

        def recordingHashFile(*args):
            threads.append(threading.current_thread())
            return hashFile(*args)

        self.patch(verify, "hashFile", recordingHashFile)
        good, other, misnamed = FIXTURE_BLOBS
        with open(os.path.join(blobsdir, good), "rb") as f:
            data = f.read()
        response = await fetch(port, b"GET", path(good))
        self.assertEqual((response.status, response.body), (200, data))
        assertErrorCode(self, await fetch(port, b"GET", path(misnamed)), 404, "BLOB_UNKNOWN")
        self.assertEqual(len(threads), 2)
        self.assertNotIn(threading.main_thread(), threads)

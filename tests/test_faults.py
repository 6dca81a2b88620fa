"""
Faults while serving, over real loopback sockets: blobs that change or
fail under a transfer, a log that cannot be written, and SIGTERM in the
middle of a download.  Each time, other clients go on being served.
"""

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.logger import globalLogPublisher, textFileLogObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nydusproxy import producer, tap

from .loopback import captureLogs, connect, fetch, listen, parseResponse, pause, request
from .support import assertErrorCode, makeBlobDir, makeOptions, sha256

MiB = 1024 * 1024


def bigBlob(mebibytes: int) -> bytes:
    """
    Random bytes, each mebibyte different, cheaply.
    """
    base = os.urandom(MiB)
    return b"".join(i.to_bytes(8, "big") + base[8:] for i in range(mebibytes))


def blobPath(data: bytes) -> bytes:
    return f"/v2/library/ubuntu/blobs/sha256:{sha256(data)}".encode()


class ChangingBlobTests(TestCase):
    """
    A blob that changes while a slow client downloads it.
    """

    def setUp(self):
        self.big = bigBlob(16)
        self.small = os.urandom(300 * 1024)
        self.blobsdir = makeBlobDir(self, [self.big, self.small])
        self.bigFile = os.path.join(self.blobsdir, sha256(self.big))
        self.site = tap.buildSite(makeOptions(self.blobsdir))
        self.port = listen(self, self.site)
        self.logs = captureLogs(self)

    async def startSlowDownload(self):
        client = await connect(self.port)
        client.smallReceiveBuffer()
        client.send(request(b"GET", blobPath(self.big)))
        client.stopReading()
        # Let the server fill the socket buffers and pause.
        await pause(0.3)
        return client

    async def test_truncated(self):
        """
        A blob truncated while it is being sent ends that response early
        and closes the connection: a short body of the blob's own bytes,
        never a hang; the server logs it and serves others.
        """
        client = await self.startSlowDownload()
        os.truncate(self.bigFile, 8 * MiB)
        self.assertEqual((await fetch(self.port, b"GET", blobPath(self.small))).body, self.small)
        client.startReading()
        response = parseResponse(await client.closed)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), str(len(self.big)))
        self.assertFalse(response.complete)
        self.assertGreaterEqual(len(response.body), 8 * MiB)
        self.assertEqual(response.body, self.big[: len(response.body)])
        self.assertTrue(any("ended" in line and "early" in line for line in self.logs))

    async def test_replacedByRename(self):
        """
        A blob replaced by rename while it is being sent keeps sending the
        old file's bytes, all of them; the next request gets the new file.
        """
        client = await self.startSlowDownload()
        replacement = self.bigFile + ".new"
        newBytes = bigBlob(2)
        with open(replacement, "wb") as f:
            f.write(newBytes)
        os.rename(replacement, self.bigFile)
        client.startReading()
        response = parseResponse(await client.closed)
        self.assertTrue(response.complete)
        self.assertEqual(response.body, self.big)
        self.assertEqual((await fetch(self.port, b"GET", blobPath(self.big))).body, newBytes)


class UnreadableBlobTests(TestCase):
    def setUp(self):
        self.blob = bigBlob(4)
        self.other = os.urandom(100 * 1024)
        self.site = tap.buildSite(makeOptions(makeBlobDir(self, [self.blob, self.other])))
        self.port = listen(self, self.site)
        self.store = self.site.resource.blobs.store
        self.logs = captureLogs(self)

    async def test_permissionDenied(self):
        """
        A blob the server may not open is 403 DENIED in JSON, with a log
        line naming it, and other blobs are served.  (Root opens any file,
        so the store is made to fail as it does for others.)
        """
        original = self.store.open
        denied = sha256(self.blob)

        def open(algorithm, hexdigest):
            if hexdigest == denied:
                raise PermissionError(errno.EACCES, "Permission denied")
            return original(algorithm, hexdigest)

        self.patch(self.store, "open", open)
        response = await fetch(self.port, b"GET", blobPath(self.blob))
        assertErrorCode(self, response, 403, "DENIED")
        self.assertTrue(any(denied in line and "cannot be read" in line for line in self.logs))
        self.assertEqual((await fetch(self.port, b"GET", blobPath(self.other))).body, self.other)

    async def test_readFailsMidway(self):
        """
        A read error after the first mebibyte (a failing disk) ends that
        response early, closes its connection, is logged, and the server
        serves others.
        """
        original = self.store.open
        failing: set[int] = set()

        def open(algorithm, hexdigest):
            found = original(algorithm, hexdigest)
            if found is not None and hexdigest == sha256(self.blob):
                failing.add(found[0])
            return found

        realPread = os.pread

        def pread(fd, length, offset):
            if fd in failing and offset >= MiB:
                raise OSError(errno.EIO, "Input/output error")
            return realPread(fd, length, offset)

        self.patch(self.store, "open", open)
        self.patch(producer.os, "pread", pread)
        # Every byte through pread: sendfile would read the file itself.
        self.site.resource.blobs.useSendfile = False
        response = await fetch(self.port, b"GET", blobPath(self.blob))
        failing.clear()
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        self.assertEqual(response.body, self.blob[:MiB])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(any("Reading a blob failed" in line for line in self.logs))
        self.assertEqual((await fetch(self.port, b"GET", blobPath(self.other))).body, self.other)


class _FullFile:
    """
    A log file on a full disk.
    """

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")


class UnwritableLogTests(TestCase):
    async def test_logObserverFails(self):
        """
        When the log file stops taking writes (a full disk), every log
        event fails, and the requests are answered all the same.
        """
        blob = os.urandom(200 * 1024)
        site = tap.buildSite(makeOptions(makeBlobDir(self, [blob])))
        port = listen(self, site)
        observer = textFileLogObserver(_FullFile())
        globalLogPublisher.addObserver(observer)
        try:
            for _ in range(3):
                response = await fetch(port, b"GET", blobPath(blob), range=b"bytes=10-19")
                self.assertEqual((response.status, response.body), (206, blob[10:20]))
            missing = await fetch(port, b"GET", blobPath(b"missing"))
            assertErrorCode(self, missing, 404, "BLOB_UNKNOWN")
        finally:
            globalLogPublisher.removeObserver(observer)
        # The publisher reports each failed write to the other observers.
        self.assertGreater(len(self.flushLoggedErrors(OSError)), 0)


TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Twistd:
    """
    C{twistd -n nydus-proxy} in a subprocess, from a temporary directory.
    """

    def __init__(self, testCase, blobsdir, *options, logfile=None, listen=None):
        self.cwd = os.path.abspath(testCase.mktemp())
        os.makedirs(self.cwd)
        self.logfile = logfile or os.path.join(self.cwd, "twistd.log")
        listen = listen or "tcp:0:interface=127.0.0.1"
        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "--logfile", self.logfile, "nydus-proxy",
             "--blobsdir", blobsdir, "--listen", listen, *options],
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        testCase.addCleanup(self.kill)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()

    def log(self) -> str:
        with open(self.logfile, encoding="utf-8", errors="replace") as f:
            return f.read()

    def port(self) -> int:
        for _ in range(600):
            if os.path.exists(self.logfile):
                found = re.search(r"BlobSite starting on (\d+)", self.log())
                if found:
                    return int(found.group(1))
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited: {self.process.stdout.read()!r}")
            time.sleep(0.05)
        raise AssertionError("twistd did not start listening")

    def exit(self, timeout=60) -> int:
        """
        Wait for the process to end; twistd ends itself with the signal
        that stopped it, so SIGTERM gives -SIGTERM.
        """
        return self.process.wait(timeout)


def blockingClient(port, rcvbuf=None):
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.settimeout(30)
    client.connect(("127.0.0.1", port))
    return client


def readResponseHead(client) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before the head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def readToEnd(client) -> bytes:
    chunks = []
    try:
        while True:
            chunk = client.recv(1024 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def refusesConnections(port, attempts=200) -> bool:
    for _ in range(attempts):
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            return True
        probe.close()
        time.sleep(0.05)
    return False


class TwistdTests(SynchronousTestCase):
    """
    The server as twistd runs it, stopped with SIGTERM, and with a log file
    that takes no writes.
    """

    def setUp(self):
        self.big = bigBlob(32)
        self.blobsdir = makeBlobDir(self, [self.big])
        self.path = blobPath(self.big)

    def test_sigtermLetsDownloadFinish(self):
        """
        On SIGTERM the server stops accepting connections and closes idle
        ones at once, while a download in flight goes on to its last byte;
        then the process exits.
        """
        twistd = Twistd(self, self.blobsdir, "--shutdown-timeout", "60")
        port = twistd.port()
        idle = blockingClient(port)
        idle.sendall(request(b"HEAD", self.path, close=False))
        self.assertIn(b" 200 ", readResponseHead(idle)[0])
        client = blockingClient(port, rcvbuf=64 * 1024)
        client.sendall(request(b"GET", self.path))
        head, body = readResponseHead(client)
        self.assertIn(b"HTTP/1.1 200 ", head)
        twistd.process.send_signal(signal.SIGTERM)
        self.assertEqual(readToEnd(idle), b"")
        self.assertTrue(refusesConnections(port))
        self.assertIsNone(twistd.process.poll())
        body += readToEnd(client)
        self.assertEqual(len(body), len(self.big))
        self.assertEqual(body, self.big)
        self.assertEqual(twistd.exit(), -signal.SIGTERM)
        log = twistd.log()
        self.assertIn("Stopping: waiting up to 60.0 s for 1 response(s) in flight", log)
        self.assertIn("Server Shut Down", log)

    def test_sigtermTimeout(self):
        """
        A download that is still going when --shutdown-timeout ends is cut
        off, and the process exits.
        """
        twistd = Twistd(self, self.blobsdir, "--shutdown-timeout", "0.5")
        port = twistd.port()
        client = blockingClient(port, rcvbuf=64 * 1024)
        client.sendall(request(b"GET", self.path))
        head, body = readResponseHead(client)
        twistd.process.send_signal(signal.SIGTERM)
        self.assertEqual(twistd.exit(), -signal.SIGTERM)
        body += readToEnd(client)
        self.assertLess(len(body), len(self.big))
        self.assertEqual(body, self.big[: len(body)])
        self.assertIn("closing 1 connection(s) still sending after the shutdown timeout", twistd.log())

    def test_logOnFullDevice(self):
        """
        With its log file on a full device, where every write fails, the
        server still starts and answers.
        """
        if not os.path.exists("/dev/full"):
            self.skipTest("no /dev/full to stand for a full disk")
        socketDir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, socketDir)
        socketPath = os.path.join(socketDir, "nydus-proxy.sock")
        twistd = Twistd(self, self.blobsdir, logfile="/dev/full", listen=f"unix:{socketPath}")
        for _ in range(600):
            if os.path.exists(socketPath) or twistd.process.poll() is not None:
                break
            time.sleep(0.05)
        self.assertIsNone(twistd.process.poll())
        for _ in range(3):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(30)
            client.connect(socketPath)
            client.sendall(request(b"GET", self.path, range=b"bytes=0-99"))
            response = parseResponse(readToEnd(client))
            client.close()
            self.assertEqual((response.status, response.body), (206, self.big[:100]))
        twistd.process.send_signal(signal.SIGTERM)
        self.assertEqual(twistd.exit(), -signal.SIGTERM)

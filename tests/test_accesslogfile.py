"""
--access-log PATH: access lines in a file of their own.
"""

import os

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from nydusproxy import tap

from .support import InMemoryServer, makeBlobDir, sha256
from .test_accesslog import COMBINED
from .processes import fileText, waitFor
from .test_e2e import E2EMixin, registryPath

BLOB = b"x" * 5000
PATH = f"/v2/a/blobs/sha256:{sha256(BLOB)}".encode()


class AccessLogFileTests(SynchronousTestCase):
    def setUp(self):
        self.log = os.path.abspath(self.mktemp())
        self.server = InMemoryServer(makeBlobDir(self, [BLOB]), "--access-log", self.log)
        self.addCleanup(lambda: self.server.site.accessFile.close())
        self.events = []
        self.server.site.accessLogger.observer = self.events.append

    def lines(self):
        self.server.clock.advance(0)
        with open(self.log) as f:
            return f.read().splitlines()

    def test_linesInTheFile(self):
        """
        Each request appends one combined line to the file, and none goes
        to twistd's log.
        """
        self.server.get(PATH, range=b"bytes=0-9")
        self.server.get(PATH, method=b"HEAD")
        lines = self.lines()
        self.assertEqual(len(lines), 2)
        for line in lines:
            self.assertRegex(line, COMBINED)
        self.assertIn('"GET /v2/a/blobs/', lines[0])
        self.assertIn(" 206 10 ", lines[0])
        self.assertEqual(self.events, [])

    def test_reopenedAfterRotation(self):
        """
        After the file is renamed away (logrotate), lines go to a new file
        at the path within a second; the old file keeps what it had.
        """
        self.server.get(PATH)
        self.lines()
        os.rename(self.log, self.log + ".1")
        self.server.clock.advance(1.5)
        self.server.get(PATH, method=b"HEAD")
        self.server.clock.advance(0)
        with open(self.log + ".1") as f:
            self.assertEqual(len(f.read().splitlines()), 1)
        self.assertEqual(len(self.lines()), 1)
        self.assertIn('"HEAD ', self.lines()[0])

    def test_unwritable(self):
        """
        A write that fails is logged once and serving goes on.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        accessFile = self.server.site.accessFile
        os.close(accessFile._fd)
        accessFile._fd = os.open(os.devnull, os.O_RDONLY)
        for _ in range(3):
            self.assertEqual(self.server.get(PATH).status, 200)
            self.server.clock.advance(0)
        complaints = [formatEvent(e) for e in events
                      if "Cannot write the access log" in formatEvent(e)]
        self.assertEqual(len(complaints), 1, complaints)

    def test_linesAfterThePortsClose(self):
        """
        Lines of responses that end after the ports closed (a shutdown's
        drain) still go to the file, which closes when the process ends.
        """
        site = self.server.site
        site.stopFactory()
        self.server.get(PATH, method=b"HEAD")
        self.assertEqual(len(self.lines()), 1)
        [trigger] = [t for t in self.server.clock.triggers["after"]["shutdown"]
                     if t[0] == site.accessFile.close]
        self.assertEqual(self.events, [])

    def test_badPath(self):
        """
        A path that cannot be opened stops the start with one line.
        """
        options = tap.Options()
        options.parseOptions(["--blobsdir", makeBlobDir(self), "--workers", "1",
                              "--access-log", "/nonexistent/dir/access.log"])
        error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
        self.assertEqual(str(error), "access log /nonexistent/dir/access.log: No such file or directory")


class WorkersAccessLogFileTests(E2EMixin, SynchronousTestCase):
    realBlobs = False

    def test_everyWorkerWrites(self):
        """
        With two workers, every request is one whole line of the file.
        """
        log = self.runDir / "access.log"
        server = self.startServer("--workers", "2", "--access-log", str(log))
        waitFor(lambda: fileText(server.logPath).count("starting on") >= 2 or None,
                server.output, 30)
        port = server.port()
        import http.client

        name = sorted(self.blobs)[0]
        for _ in range(40):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("HEAD", registryPath("sealer", name))
            self.assertEqual(connection.getresponse().status, 200)
            connection.close()
        waitFor(lambda: len(fileText(log).splitlines()) == 40 or None,
                lambda: fileText(log), 10)
        for line in fileText(log).splitlines():
            self.assertRegex(line, COMBINED)
        self.assertNotIn('"HEAD ', fileText(server.logPath))

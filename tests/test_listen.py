"""
Listening beyond TCP: a UNIX socket with its mode, and a socket handed over
by systemd (socket activation), with the unit files that contrib/ ships.
"""

import os
import shlex
import signal
import stat
import tempfile

from zope.interface import implementer

from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory

from nydusproxy import tap

from .processes import CONTRIB, TWISTD, Process, freePort, need, readAll, request, waitFor
from .support import makeBlobDir, makeOptions, sha256

BLOB = os.urandom(300 * 1024)
DIGEST = "sha256:" + sha256(BLOB)
BLOB_PATH = f"/v2/library/ubuntu/blobs/{DIGEST}"


@implementer(IAgentEndpointFactory)
class UNIXSocket:
    """
    Every request of an Agent goes to one UNIX socket, whatever its URL.
    """

    def __init__(self, path):
        self.path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, self.path)


class UNIXSocketTests(TestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self, [BLOB])
        # UNIX socket paths are short (108 bytes): not under _trial_temp.
        directory = tempfile.mkdtemp(prefix="nydus-proxy-")
        self.addCleanup(os.rmdir, directory)
        self.socket = os.path.join(directory, "nydus-proxy.sock")

    async def test_unixSocket(self):
        """
        --listen unix:PATH:mode=660 creates the socket with that mode, and
        serves blobs over it; the access log names no client host.
        """
        service = tap.makeService(
            makeOptions(self.blobsdir, "--listen", f"unix:{self.socket}:mode=660"), reactor
        )
        events = []
        [site] = {s.factory for s in service if hasattr(s, "factory")}
        site.accessLogger = Logger(observer=events.append)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(stat.S_IMODE(os.stat(self.socket).st_mode), 0o660)
        self.assertTrue(stat.S_ISSOCK(os.stat(self.socket).st_mode))

        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, UNIXSocket(self.socket), pool=pool)
        response = await agent.request(
            b"GET", b"http://nydus-proxy" + BLOB_PATH.encode(),
            Headers({b"Range": [b"bytes=1000-204799"]}),
        )
        body = await readAll(response)
        self.assertEqual(response.code, 206)
        self.assertEqual(body, BLOB[1000:204800])
        self.assertEqual(
            response.headers.getRawHeaders(b"content-range"),
            [b"bytes 1000-204799/%d" % (len(BLOB),)],
        )
        [line] = [formatEvent(event) for event in events]
        self.assertTrue(line.startswith("- - - ["), line)
        self.assertIn(f'"GET {BLOB_PATH} HTTP/1.1" 206 203800 ', line)


class SystemdUnitTests(SynchronousTestCase):
    def unit(self, name):
        """
        The settings of a contrib unit file: {key: [values]}.
        """
        settings = {}
        for line in (CONTRIB / name).read_text().splitlines():
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
        return settings

    def execStart(self, blobsdir):
        """
        The service's command, with its virtual environment and blob
        directory replaced by this test's.
        """
        [command] = self.unit("nydus-proxy.service")["ExecStart"]
        argv = shlex.split(command)
        self.assertEqual(argv[0], "/opt/nydus-proxy/bin/twistd")
        self.assertEqual(argv.count("/srv/nydus/blobs"), 1)
        return TWISTD + [blobsdir if arg == "/srv/nydus/blobs" else arg for arg in argv[1:]]

    def test_unitsAgree(self):
        """
        The socket unit listens on IPv4, which is the domain the service
        adopts; the service runs in the foreground without a pid file.
        """
        socketUnit = self.unit("nydus-proxy.socket")
        service = self.unit("nydus-proxy.service")
        self.assertEqual(socketUnit["ListenStream"], ["0.0.0.0:8000"])
        self.assertEqual(service["Requires"], ["nydus-proxy.socket"])
        argv = shlex.split(service["ExecStart"][0])
        self.assertEqual(argv[argv.index("--listen") + 1], "systemd:domain=INET:index=0")
        self.assertIn("--nodaemon", argv)
        self.assertIn("--pidfile=", argv)
        self.assertEqual(service["ReadOnlyPaths"], ["/srv/nydus/blobs"])

    def test_socketActivation(self):
        """
        Under systemd-socket-activate, which binds the port and passes it
        as file descriptor 3 (LISTEN_FDS=1), the service's own command
        serves on that socket: the first connection starts it and is
        answered; SIGTERM stops it cleanly.
        """
        tool = need(
            "systemd-socket-activate", "needed to test socket activation", "systemd"
        )
        blobsdir = makeBlobDir(self, [BLOB])
        cwd = self.mktemp()
        os.makedirs(cwd)
        port = freePort()
        output = os.path.join(cwd, "output.log")
        # Twisted adopts inherited sockets only when LISTEN_FDNAMES is set,
        # as systemd always sets it (to the socket unit's name by default);
        # systemd-socket-activate sets it only when given --fdname.
        process = Process(
            self,
            [tool, "-l", f"127.0.0.1:{port}", "--fdname=nydus-proxy.socket",
             *self.execStart(blobsdir)],
            output,
            cwd=cwd,
        )
        waitFor(lambda: f"Listening on 127.0.0.1:{port}" in process.text(), "the socket")
        # This connection waits in the socket's backlog while the server
        # starts.
        status, headers, body = request(port, "/v2/")
        self.assertEqual((status, body), (200, b"{}"))
        status, headers, body = request(port, BLOB_PATH, headers={"Range": "bytes=0-4095"})
        self.assertEqual((status, body), (206, BLOB[:4096]))
        self.assertEqual(headers["content-range"], f"bytes 0-4095/{len(BLOB)}")
        # twistd ends by re-raising the signal that stopped it, as
        # systemd expects of a service (SIGTERM is a clean stop there).
        self.assertEqual(process.stop(), -signal.SIGTERM)
        log = process.text()
        self.assertIn(f"Listening on 127.0.0.1:{port} as 3.", log)
        self.assertIn("[nydusproxy.access#info] 127.0.0.1 - - [", log)
        self.assertIn(f'"GET {BLOB_PATH} HTTP/1.1" 206 4096 "-" "-"', log)
        self.assertIn("Server Shut Down.", log)
        # No other port: the server listened on the inherited socket only.
        self.assertNotIn("BlobSite starting on", log.replace(f"BlobSite starting on {port}", ""))

"""
--workers: the supervisor and its worker processes, run for real.
"""

import http.client
import os
import re
import signal
import socket
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from nydusproxy.workers import tcpAddress

from .processes import fileText, waitFor
from .test_e2e import E2EMixin, ServerProcess, registryPath

LISTENING = re.compile(r"Listening on 127\.0\.0\.1:(\d+) with (\d+) workers")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def socketCount(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


class TCPAddressTests(SynchronousTestCase):
    def test_forms(self):
        """
        tcp: and tcp6: descriptions give family, interface, port and
        backlog, positional or named, with escaped colons; others none.
        """
        self.assertEqual(tcpAddress("tcp:8000"), (socket.AF_INET, "", 8000, 50))
        self.assertEqual(tcpAddress("tcp:port=0:interface=127.0.0.1:backlog=9"),
                         (socket.AF_INET, "127.0.0.1", 0, 9))
        self.assertEqual(tcpAddress("tcp:8000:127.0.0.2"), (socket.AF_INET, "127.0.0.2", 8000, 50))
        self.assertEqual(tcpAddress(r"tcp6:8000:interface=\:\:1"), (socket.AF_INET6, "::1", 8000, 50))
        self.assertEqual(tcpAddress("tcp6:8000"), (socket.AF_INET6, "::", 8000, 50))
        for other in ("unix:/x.sock", "ssl:8443", "tcp:notaport", "tcp", "systemd:domain=INET:index=0"):
            self.assertIsNone(tcpAddress(other), other)


class SupervisorTests(E2EMixin, SynchronousTestCase):
    realBlobs = False

    def start(self):
        server = self.startServer("--workers", "2")
        found = waitFor(lambda: LISTENING.search(fileText(server.logPath)), server.output, 30)
        self.assertEqual(found.group(2), "2")
        server.port()  # a worker has started listening
        pid = server.process.pid
        waitFor(lambda: len(children(pid)) == 2 or None, server.output, 30)
        return server, int(found.group(1)), pid

    def head(self, port):
        name = sorted(self.blobs)[0]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("HEAD", registryPath("sealer", name))
        response = connection.getresponse()
        response.read()
        connection.close()
        self.assertEqual(response.getheader("Content-Length"), str(len(self.blobs[name])))
        return response.status

    def test_spreadsConnections(self):
        """
        Connections reach both workers, each on its own socket.
        """
        server, port, pid = self.start()
        workers = children(pid)
        before = {worker: socketCount(worker) for worker in workers}
        connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        self.addCleanup(lambda: [c.close() for c in connections])
        for connection in connections:
            connection.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"200 OK", connection.recv(4096))
        gained = {worker: socketCount(worker) - before[worker] for worker in workers}
        # Counted from outside while the workers run: allow one socket of
        # their own opening or closing meanwhile.
        self.assertIn(sum(gained.values()), (31, 32, 33), gained)
        self.assertTrue(all(count >= 1 for count in gained.values()), gained)

    def test_restartsDeadWorker(self):
        """
        A worker that dies is started again, and the port keeps answering.
        """
        server, port, pid = self.start()
        first, second = children(pid)
        os.kill(first, signal.SIGKILL)
        waitFor(
            lambda: (len(children(pid)) == 2 and first not in children(pid)) or None,
            server.output,
            30,
        )
        self.assertIn(second, children(pid))
        self.assertIn("starting it again", fileText(server.logPath))
        for _ in range(10):
            self.assertEqual(self.head(port), 200)

    def test_sigtermStopsAll(self):
        """
        SIGTERM to the supervisor stops every worker, then the supervisor.
        """
        server, port, pid = self.start()
        workers = children(pid)
        self.assertEqual(self.head(port), 200)
        server.stopCleanly(self)
        for worker in workers:
            self.assertFalse(os.path.exists(f"/proc/{worker}"), f"worker {worker} left running")

    def test_supervisorKilled(self):
        """
        Workers do not outlive a supervisor killed without warning.
        """
        server, port, pid = self.start()
        workers = children(pid)
        os.kill(pid, signal.SIGKILL)
        server.process.wait(10)
        waitFor(
            lambda: not any(os.path.exists(f"/proc/{w}") and
                            "zombie" not in open(f"/proc/{w}/status").read() for w in workers) or None,
            lambda: f"workers left: {workers}",
            30,
        )


class EventLineTests(SynchronousTestCase):
    def test_roundTrip(self):
        """
        An event crosses from a worker to the supervisor with its fields,
        its level and its text; an access line goes rendered; a failure
        goes as its traceback.
        """
        from twisted.logger import LogLevel, formatEvent
        from twisted.python.failure import Failure

        from nydusproxy.accesslog import CombinedLine
        from nydusproxy.workers import _eventAsLine, _eventFromLine

        fields = {"time": 0.0, "client": "127.0.0.1", "method": "GET", "uri": "/v2/",
                  "protocol": "HTTP/1.1", "status": 200, "bytes": 2, "duration": 0.5,
                  "referer": None, "user_agent": None}
        event = {"log_format": "{access_line!s}", "access_line": CombinedLine(fields),
                 "log_level": LogLevel.info, "log_namespace": "nydusproxy.access",
                 "log_logger": object(), **fields}
        relayed = _eventFromLine(_eventAsLine(event).encode())
        self.assertEqual(formatEvent(relayed), str(CombinedLine(fields)))
        self.assertIs(relayed["log_level"], LogLevel.info)
        self.assertEqual((relayed["status"], relayed["referer"]), (200, None))
        self.assertNotIn("log_logger", relayed)

        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        broken = {"log_format": "it broke: {what}", "what": "x", "log_failure": failure,
                  "log_level": LogLevel.critical, "log_namespace": "n"}
        relayed = _eventFromLine(_eventAsLine(broken).encode())
        self.assertIs(relayed["log_level"], LogLevel.critical)
        text = formatEvent(relayed)
        self.assertTrue(text.startswith("it broke: x\n"), text)
        self.assertIn("ZeroDivisionError", text)


class SupervisorStartTests(E2EMixin, SynchronousTestCase):
    realBlobs = False

    def test_portSharedByAnotherServer(self):
        """
        A port that another server listens on with SO_REUSEPORT (another
        nydus-proxy, say) stops the start: the workers would otherwise join
        its sockets and split its connections.
        """
        other = socket.socket()
        self.addCleanup(other.close)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        server = self.startServer("--workers", "2", "--listen", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(server.process.wait(30), 1, server.output())
        self.assertEqual(
            fileText(server.stderrPath).strip(),
            f"nydus-proxy: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use",
        )

    def test_workersUseInstalledPackage(self):
        """
        Workers import the installed nydusproxy, not a checkout (or
        anything else of that name) in the working directory.
        """
        broken = self.runDir / "nydusproxy"
        broken.mkdir()
        (broken / "__init__.py").write_text("raise ImportError('the wrong nydusproxy')\n")
        # The twistd script, as users run it: its own directory, not the
        # working one, is first on sys.path.
        twistd = Path(sys.executable).parent / "twistd"
        if not twistd.exists():
            raise SkipTest(f"no twistd script beside {sys.executable}")
        server = ServerProcess(
            self,
            [str(twistd), "-n", "--pidfile=", "nydus-proxy", "--blobsdir", str(self.blobsdir),
             "--listen", "tcp:0:interface=127.0.0.1", "--workers", "2"],
            self.runDir,
        )
        port = int(waitFor(lambda: LISTENING.search(fileText(server.logPath)), server.output, 30)
                   .group(1))
        waitFor(lambda: fileText(server.logPath).count("starting on") >= 2 or None,
                server.output, 30)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/v2/")
        self.assertEqual(connection.getresponse().status, 200)
        connection.close()
        self.assertNotIn("the wrong nydusproxy", fileText(server.logPath))

"""
End to end: the installed C{twistd nydus-proxy} plugin and the
C{nydus-backend-proxy} script, run as processes from a temporary working
directory (so the checkout is not on C{sys.path}), on a copy of the real
Nydus blobs in C{<repo>/../shared/fixtures/nydus}, read by curl, aria2c and
a client that asks what nydusd's registry backend asks.

The processes run the package installed next to C{sys.executable}:
reinstall it (C{pip install '.[test]'}) after changing C{nydusproxy/}.
"""

from __future__ import annotations

import ctypes
import hashlib
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from time import monotonic

from twisted.python.filepath import FilePath
from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase

from tests.processes import TWISTD, fileText, need, stopProcess, waitFor
from tests.test_loopback import checkBodyHasErrorCodes

KiB = 1024
MiB = 1024 * KiB

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "nydus"
FIXTURE_BLOBS = FIXTURES / "blobs"

# Blob ids that are not the sha256 of their file (fixtures README.md): the
# sha256 of the bytes.  Every other fixture blob is named by its sha256.
NOT_NAMED_BY_SHA256 = {
    "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef":
        "4b16fb83ae9f62d8263323b8569535e66ebf21171cf98fd94db9db27b59755ac",
}

LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"
STARTED = re.compile(r"BlobSite starting on (\d+)")
ACCESS_LINE = re.compile(
    r'(?P<peer>\S+) - - \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.[01]" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-) "[^"]*" "[^"]*" (?P<duration>\d+\.\d+)$'
)


def childEnvironment() -> dict[str, str]:
    """
    The environment of every process a test starts: no PYTHONPATH (the
    installed package must be the one that runs) and no HTTP proxy between
    the clients and 127.0.0.1.
    """
    env = dict(os.environ)
    for name in list(env):
        if name == "PYTHONPATH" or name.lower() in (
            "http_proxy", "https_proxy", "all_proxy", "no_proxy"
        ):
            del env[name]
    return env


def expectedSha256(name: str) -> str:
    return NOT_NAMED_BY_SHA256.get(name, name)


def fixtureBlobs() -> dict[str, bytes]:
    """
    Every fixture blob, by name, checked against what the fixtures'
    README says of it.
    """
    if not FIXTURE_BLOBS.is_dir():
        raise SkipTest(
            f"the Nydus fixtures are not at {FIXTURES} "
            "(expected at <repo>/../shared/fixtures/nydus)"
        )
    blobs = {path.name: path.read_bytes() for path in sorted(FIXTURE_BLOBS.iterdir())}
    for name, data in blobs.items():
        if hashlib.sha256(data).hexdigest() != expectedSha256(name):
            raise FailTest(f"fixture blob {name} is not the file the README describes")
    return blobs


def processesMentioning(marker: str) -> list[int]:
    """
    The live processes (not zombies: those have no command line) whose
    command line contains C{marker}, a temporary path unique to a test.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                commandLine = f.read()
        except OSError:
            continue
        if marker.encode() in commandLine:
            found.append(int(entry))
    return found


def killProcessesMentioning(marker: str) -> None:
    for pid in processesMentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def accessLines(text: str) -> list[re.Match[str]]:
    return [m for m in map(ACCESS_LINE.search, text.splitlines()) if m is not None]


class ServerProcess:
    """
    A server process whose standard output and error go to files (a pipe
    that nobody reads would block a server that logs every request).
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        argv: Sequence[str],
        cwd: Path,
        logPath: Path | None = None,
    ) -> None:
        self.stdoutPath = cwd / "stdout.txt"
        self.stderrPath = cwd / "stderr.txt"
        self.logPath = logPath or self.stdoutPath
        with open(self.stdoutPath, "wb") as out, open(self.stderrPath, "wb") as err:
            self.process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=childEnvironment(),
            )
        case.addCleanup(self.stop)

    def output(self) -> str:
        return (
            f"exit status {self.process.poll()}\n--- log:\n{fileText(self.logPath)}"
            f"\n--- stderr:\n{fileText(self.stderrPath)}"
        )

    def port(self, timeout: float = 30.0) -> int:
        """
        The port the server listens on, from its log line "BlobSite
        starting on N".
        """

        def started() -> int | None:
            found = STARTED.search(fileText(self.logPath))
            if found is not None:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise FailTest(f"the server exited:\n{self.output()}")
            return None

        return waitFor(started, self.output, timeout)  # type: ignore[return-value]

    def stopCleanly(self, case: SynchronousTestCase) -> None:
        """
        Stop the server with SIGTERM and check that it shut down cleanly:
        twistd exits by re-raising the signal that stopped it.
        """
        status = self.stop()
        case.assertIn(status, (0, -signal.SIGTERM), self.output())
        case.assertIn("Server Shut Down", fileText(self.logPath), self.output())

    def stop(self) -> int:
        return stopProcess(self.process, timeout=10)


def assertSameBytes(case: SynchronousTestCase, got: bytes, want: bytes, what: str) -> None:
    """
    Compare two byte strings without printing megabytes when they differ.
    """
    if got == want:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want))
    )
    case.fail(
        f"{what}: {len(got)} bytes (sha256 {hashlib.sha256(got).hexdigest()}) instead of "
        f"{len(want)} (sha256 {hashlib.sha256(want).hexdigest()}); first difference at {at}"
    )


def registryPath(repo: str, name: str) -> str:
    """
    Where nydusd's registry backend asks for a blob.
    """
    return f"/v2/{repo}/blobs/sha256:{name}"


def httpProxyPath(repo: str, name: str) -> str:
    """
    Where nydusd's http-proxy backend asks for a blob, with
    C{path: /<namespace>/<repo>/blobs}: the bare id.
    """
    return f"/{repo}/blobs/{name}"


class NydusdLikeClient:
    """
    Reads blobs as nydusd's registry backend does (NYDUSD.md), over one
    keep-alive connection that must stay open throughout.
    """

    def __init__(self, case: SynchronousTestCase, port: int) -> None:
        self.case = case
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        case.addCleanup(self.connection.close)
        self.socket: socket.socket | None = None
        self.requests = 0

    def request(
        self, method: str, path: str, rangeHeader: str | None = None
    ) -> tuple[http.client.HTTPResponse, bytes]:
        headers = {"Range": rangeHeader} if rangeHeader is not None else {}
        self.connection.request(method, path, headers=headers)
        response = self.connection.getresponse()
        body = response.read()
        self.requests += 1
        self.case.assertFalse(
            response.will_close, f"the server closes the connection after {method} {path}"
        )
        # http.client reconnects silently when the server has closed: the
        # same socket object means the same connection.
        if self.socket is None:
            self.socket = self.connection.sock
        self.case.assertIs(self.connection.sock, self.socket, "a new connection")
        return response, body

    def checkRange(self, path: str, data: bytes, first: int, last: int) -> bytes:
        """
        Ask for C{bytes=first-last}, which must be inside the blob, and
        check the 206 answer.
        """
        response, body = self.request("GET", path, f"bytes={first}-{last}")
        what = f"GET {path} bytes={first}-{last}"
        self.case.assertEqual(response.status, 206, what)
        self.case.assertEqual(
            response.getheader("Content-Range"), f"bytes {first}-{last}/{len(data)}", what
        )
        self.case.assertEqual(response.getheader("Content-Length"), str(last - first + 1), what)
        assertSameBytes(self.case, body, data[first : last + 1], what)
        return body

    def readBlob(self, path: str, name: str, data: bytes, rng: random.Random) -> None:
        case = self.case
        size = len(data)

        # Blob size: HEAD, whose Content-Length nydusd requires.
        response, body = self.request("HEAD", path)
        case.assertEqual(response.status, 200, f"HEAD {path}")
        case.assertEqual(response.getheader("Content-Length"), str(size), f"HEAD {path}")
        case.assertEqual(body, b"")

        # The whole blob in 1 MiB closed ranges.
        chunks = [
            self.checkRange(path, data, first, min(first + MiB, size) - 1)
            for first in range(0, size, MiB)
        ]
        whole = b"".join(chunks)
        assertSameBytes(case, whole, data, f"{path} read in 1 MiB ranges")
        case.assertEqual(hashlib.sha256(whole).hexdigest(), expectedSha256(name))

        # Chunk reads of 4 to 128 KiB anywhere in the blob.
        for _ in range(200):
            first = rng.randrange(size)
            last = min(first + rng.randint(4 * KiB, 128 * KiB), size) - 1
            self.checkRange(path, data, first, last)

        # Stream reads: open-ended from an offset, and the whole blob.
        first = rng.randrange(1, size)
        response, body = self.request("GET", path, f"bytes={first}-")
        case.assertEqual(response.status, 206)
        case.assertEqual(
            response.getheader("Content-Range"), f"bytes {first}-{size - 1}/{size}"
        )
        assertSameBytes(case, body, data[first:], f"GET {path} bytes={first}-")
        response, body = self.request("GET", path)
        case.assertEqual(response.status, 200)
        case.assertEqual(response.getheader("Content-Length"), str(size))
        assertSameBytes(case, body, data, f"GET {path}")


class E2EMixin:
    """
    A temporary working directory with a writable copy of the fixture blobs:
    the real nydus blobs when the fixtures are there.  Tests that read them
    for their own sake skip without them; the others (C{realBlobs} false)
    run on random blobs instead.
    """

    realBlobs = True

    def setUp(self) -> None:
        super().setUp()
        self.runDir = Path(FilePath(self.mktemp()).path).resolve()
        self.runDir.mkdir(parents=True)
        self.blobsdir = self.runDir / "blobs"
        if FIXTURE_BLOBS.is_dir() or self.realBlobs:
            self.blobs = fixtureBlobs()
            shutil.copytree(FIXTURE_BLOBS, self.blobsdir)
        else:
            self.blobs = {}
            self.blobsdir.mkdir()
            for size in (3 * MiB + 7, 994935, 14554):
                data = os.urandom(size)
                name = hashlib.sha256(data).hexdigest()
                self.blobs[name] = data
                (self.blobsdir / name).write_bytes(data)
        self.blobsdir.chmod(0o755)
        for path in self.blobsdir.iterdir():
            path.chmod(0o644)
        self.addCleanup(killProcessesMentioning, str(self.runDir))

    serverArguments: tuple[str, ...] = ()

    def startServer(self, *extra: str) -> ServerProcess:
        return ServerProcess(
            self,
            TWISTD + ["-n", "--pidfile=", "nydus-proxy", "--blobsdir", str(self.blobsdir),
                      "--listen", LOOPBACK_ANY_PORT, *self.serverArguments, *extra],
            self.runDir,
        )


class ForegroundTests(E2EMixin, SynchronousTestCase):
    """
    C{twistd -n nydus-proxy} serving the fixture blobs, with two worker
    processes sending large bodies with sendfile(2).
    """

    serverArguments = ("--workers", "2")

    def url(self, port: int, name: str, repo: str = "library/ubuntu") -> str:
        return f"http://127.0.0.1:{port}{registryPath(repo, name)}"

    def test_curl(self) -> None:
        """
        curl downloads every fixture blob whole, and a range of it, and
        gets its size from HEAD.
        """
        curl = need("curl", "this test needs it", "curl")
        port = self.startServer().port()
        out = self.runDir / "curl.out"
        headers = self.runDir / "curl.headers"
        for name, data in self.blobs.items():
            url = self.url(port, name)
            subprocess.run(
                [curl, "-sS", "--fail", "-o", str(out), url],
                check=True, timeout=60, env=childEnvironment(),
            )
            got = out.read_bytes()
            assertSameBytes(self, got, data, f"curl {url}")
            self.assertEqual(hashlib.sha256(got).hexdigest(), expectedSha256(name))

            first = len(data) // 3
            last = first + min(100000, len(data) - first - 1)
            subprocess.run(
                [curl, "-sS", "--fail", "-r", f"{first}-{last}", "-D", str(headers),
                 "-o", str(out), url],
                check=True, timeout=60, env=childEnvironment(),
            )
            headerText = headers.read_bytes().decode("latin-1")
            self.assertRegex(headerText, r"^HTTP/1\.1 206 ")
            self.assertIn(f"Content-Range: bytes {first}-{last}/{len(data)}\r\n", headerText)
            assertSameBytes(self, out.read_bytes(), data[first : last + 1], f"curl -r {url}")

            head = subprocess.run(
                [curl, "-sS", "--fail", "-I", url], check=True, timeout=60,
                capture_output=True, env=childEnvironment(),
            ).stdout.decode("latin-1")
            self.assertRegex(head, r"^HTTP/1\.1 200 ")
            self.assertIn(f"Content-Length: {len(data)}\r\n", head)

    def test_aria2c(self) -> None:
        """
        aria2c with 4 connections downloads every fixture blob, checks its
        sha256, and the large one arrives in several ranged requests.
        """
        aria2c = need("aria2c", "this test needs it", "aria2")
        server = self.startServer()
        port = server.port()
        downloads = self.runDir / "downloads"
        downloads.mkdir()
        for name, data in self.blobs.items():
            url = self.url(port, name)
            result = subprocess.run(
                [aria2c, "--no-conf", "-q", "-x4", "-s4", "--min-split-size=1M",
                 f"--checksum=sha-256={expectedSha256(name)}",
                 "--allow-overwrite=true", "--auto-file-renaming=false",
                 "--file-allocation=none", "-d", str(downloads), "-o", name, url],
                capture_output=True, text=True, timeout=60, env=childEnvironment(),
            )
            self.assertEqual(result.returncode, 0, f"aria2c {url}: {result.stdout}{result.stderr}")
            assertSameBytes(self, (downloads / name).read_bytes(), data, f"aria2c {url}")

        largest = max(self.blobs, key=lambda name: len(self.blobs[name]))
        self.assertGreater(len(self.blobs[largest]), 2 * MiB)
        ranged = lambda: [
            line for line in accessLines(fileText(server.logPath))
            if line["path"].endswith(largest) and line["status"] == "206"
        ]
        waitFor(lambda: len(ranged()) >= 2, lambda: f"ranged requests: {ranged()}")

    def readEveryBlobAsNydusd(self, pathFor: Callable[[str, str], str], repo: str) -> None:
        port = self.startServer().port()
        client = NydusdLikeClient(self, port)
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        for name, data in self.blobs.items():
            path = pathFor(repo, name)
            try:
                client.readBlob(path, name, data, rng)
            except self.failureException as e:
                raise self.failureException(f"{path} (random seed {seed}): {e}") from e
        self.assertGreater(client.requests, 200 * len(self.blobs))

    def test_registryBackendSealer(self) -> None:
        """
        nydusd's registry backend reads every blob under C{sealer}.
        """
        self.readEveryBlobAsNydusd(registryPath, "sealer")

    def test_registryBackendLibraryUbuntu(self) -> None:
        """
        nydusd's registry backend reads every blob under C{library/ubuntu}.
        """
        self.readEveryBlobAsNydusd(registryPath, "library/ubuntu")

    def test_registryBackendThreeComponents(self) -> None:
        """
        nydusd's registry backend reads every blob under C{a/b/c}.
        """
        self.readEveryBlobAsNydusd(registryPath, "a/b/c")

    def test_httpProxyBackendSealer(self) -> None:
        """
        nydusd's http-proxy backend reads every blob at C{/sealer/blobs/<id>}.
        """
        self.readEveryBlobAsNydusd(httpProxyPath, "sealer")

    def test_httpProxyBackendLibraryUbuntu(self) -> None:
        """
        nydusd's http-proxy backend reads every blob at
        C{/library/ubuntu/blobs/<id>}.
        """
        self.readEveryBlobAsNydusd(httpProxyPath, "library/ubuntu")

    def test_httpProxyBackendThreeComponents(self) -> None:
        """
        nydusd's http-proxy backend reads every blob at C{/a/b/c/blobs/<id>}.
        """
        self.readEveryBlobAsNydusd(httpProxyPath, "a/b/c")

    def test_concurrentClients(self) -> None:
        """
        32 clients reading random ranges of random blobs at once, each over
        its own keep-alive connection, all get exactly the bytes they ask
        for.
        """
        port = self.startServer().port()
        clients = 32
        seconds = 3.0
        maxRequests = 300
        names = sorted(self.blobs)
        errors: list[str] = []
        counts = [0] * clients
        barrier = threading.Barrier(clients)

        def client(index: int) -> None:
            rng = random.Random(index)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                barrier.wait(30)
                deadline = monotonic() + seconds
                firstSocket = None
                while counts[index] < maxRequests and monotonic() < deadline:
                    name = rng.choice(names)
                    data = self.blobs[name]
                    first = rng.randrange(len(data))
                    last = min(first + rng.randint(4 * KiB, 256 * KiB), len(data)) - 1
                    connection.request(
                        "GET", registryPath("library/ubuntu", name),
                        headers={"Range": f"bytes={first}-{last}"},
                    )
                    response = connection.getresponse()
                    body = response.read()
                    counts[index] += 1
                    if firstSocket is None:
                        firstSocket = connection.sock
                    contentRange = response.getheader("Content-Range")
                    if (
                        response.status != 206
                        or contentRange != f"bytes {first}-{last}/{len(data)}"
                        or body != data[first : last + 1]
                        or response.will_close
                        or connection.sock is not firstSocket
                    ):
                        errors.append(
                            f"client {index}: {name} bytes={first}-{last}: "
                            f"{response.status} {contentRange} {len(body)} bytes, "
                            f"will_close={response.will_close}"
                        )
                        return
            except Exception as e:
                errors.append(f"client {index}: {e!r}")
            finally:
                connection.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertFalse([t for t in threads if t.is_alive()], "clients still running")
        self.assertEqual(errors, [])
        self.assertGreaterEqual(min(counts), 10, f"requests per client: {counts}")

    def test_accessLog(self) -> None:
        """
        Every request gets one access line, with the peer, method, path,
        status, bytes sent and duration.
        """
        server = self.startServer()
        client = NydusdLikeClient(self, server.port())
        name = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
        data = self.blobs[name]
        path = registryPath("library/ubuntu", name)
        missing = registryPath("sealer", "0" * 64)
        expected = []
        for method, target, rangeHeader in [
            ("HEAD", path, None),
            ("GET", path, "bytes=0-4095"),
            ("GET", missing, None),
            ("GET", path, None),
            ("GET", "/v2/", None),
        ]:
            response, body = client.request(method, target, rangeHeader)
            expected.append((method, target, str(response.status), str(len(body)) if body else "-"))
        self.assertEqual(
            [status for _, _, status, _ in expected], ["200", "206", "404", "200", "200"]
        )
        self.assertEqual(expected[3][3], str(len(data)))

        # Stop the server so that every line it would write is written.
        server.stopCleanly(self)
        lines = accessLines(fileText(server.logPath))
        self.assertEqual(
            [(m["method"], m["path"], m["status"], m["bytes"]) for m in lines], expected
        )
        for line in lines:
            self.assertEqual(line["peer"], "127.0.0.1")
            self.assertLess(float(line["duration"]), 10.0)

    def test_accessLogNamespace(self) -> None:
        """
        Access lines are logged under the C{nydusproxy.access} namespace
        that C{BlobSite.accessLogger} is given, so that an observer can
        tell them from the server's other messages.
        """
        server = self.startServer()
        client = NydusdLikeClient(self, server.port())
        path = registryPath("sealer", sorted(self.blobs)[0])
        response, body = client.request("HEAD", path)
        self.assertEqual(response.status, 200)
        server.stopCleanly(self)
        [line] = [line for line in fileText(server.logPath).splitlines()
                  if f'"HEAD {path} HTTP/1.1"' in line]
        self.assertIn("[nydusproxy.access#info] ", line)

    def test_noAccessLog(self) -> None:
        """
        With C{--no-access-log}, requests are answered and not logged.
        """
        server = self.startServer("--no-access-log")
        client = NydusdLikeClient(self, server.port())
        name = sorted(self.blobs)[0]
        response, body = client.request("GET", registryPath("sealer", name), "bytes=0-99")
        self.assertEqual(response.status, 206)
        assertSameBytes(self, body, self.blobs[name][:100], "bytes=0-99")
        server.stopCleanly(self)
        log = fileText(server.logPath)
        self.assertEqual(accessLines(log), [])

    def test_unknownBlob(self) -> None:
        """
        A blob that is not in the directory answers 404 BLOB_UNKNOWN, in
        both path forms.
        """
        client = NydusdLikeClient(self, self.startServer().port())
        for path in (registryPath("a/b/c", "f" * 64), httpProxyPath("a/b/c", "f" * 64)):
            response, body = client.request("GET", path)
            self.assertEqual(response.status, 404, path)
            checkBodyHasErrorCodes(self, response.getheader("Content-Type"), body, "BLOB_UNKNOWN")


class SingleProcessForegroundTests(ForegroundTests):
    """
    The same, served by one process that writes every body through the
    transport's buffer.
    """

    serverArguments = ("--workers", "1", "--no-sendfile")


class ConsoleScriptTests(E2EMixin, SynchronousTestCase):
    """
    The C{nydus-backend-proxy} console script.
    """

    realBlobs = False

    def test_serves(self) -> None:
        """
        C{nydus-backend-proxy -b DIR --listen ...} serves the blobs in DIR
        in the foreground, and leaves no pidfile.
        """
        script = Path(sys.executable).parent / "nydus-backend-proxy"
        self.assertTrue(
            script.exists(), f"{script} is missing: is the package installed in this venv?"
        )
        server = ServerProcess(
            self, [str(script), "-b", str(self.blobsdir), "--listen", LOOPBACK_ANY_PORT],
            self.runDir,
        )
        client = NydusdLikeClient(self, server.port())
        name = max(self.blobs, key=lambda n: len(self.blobs[n]))
        response, body = client.request("HEAD", registryPath("sealer", name))
        self.assertEqual(response.getheader("Content-Length"), str(len(self.blobs[name])))
        response, body = client.request("GET", registryPath("sealer", name))
        self.assertEqual(response.status, 200)
        assertSameBytes(self, body, self.blobs[name], name)
        self.assertEqual(server.process.poll(), None)
        self.assertEqual(sorted(p.name for p in self.runDir.iterdir()),
                         ["blobs", "stderr.txt", "stdout.txt"])


class DaemonTests(E2EMixin, SynchronousTestCase):
    """
    C{twistd nydus-proxy} as a daemon, with a pidfile and a log file.
    """

    realBlobs = False

    def test_daemon(self) -> None:
        """
        The daemon starts (exit 0), writes its pid, serves and logs each
        request to its log file; on SIGTERM it removes its pidfile and logs
        that it shut down.
        """
        pidfile = self.runDir / "twistd.pid"
        logfile = self.runDir / "twistd.log"
        with open(self.runDir / "out.txt", "wb") as out, open(self.runDir / "err.txt", "wb") as err:
            result = subprocess.run(
                TWISTD + ["--pidfile", str(pidfile), "--logfile", str(logfile),
                          "nydus-proxy", "--blobsdir", str(self.blobsdir),
                          "--listen", LOOPBACK_ANY_PORT],
                cwd=self.runDir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=childEnvironment(), timeout=60,
            )
        output = fileText(self.runDir / "out.txt") + fileText(self.runDir / "err.txt")
        self.assertEqual(result.returncode, 0, output + fileText(logfile))

        pid = int(pidfile.read_text().strip())
        self.assertIn(pid, processesMentioning(str(self.runDir)))

        found = waitFor(lambda: STARTED.search(fileText(logfile)), lambda: fileText(logfile))
        client = NydusdLikeClient(self, int(found.group(1)))
        name = sorted(self.blobs)[-1]
        path = registryPath("library/ubuntu", name)
        client.checkRange(path, self.blobs[name], 1000, 9999)
        client.connection.close()
        waitFor(
            lambda: [m for m in accessLines(fileText(logfile))
                     if (m["method"], m["path"], m["status"], m["bytes"])
                     == ("GET", path, "206", "9000")],
            lambda: fileText(logfile),
        )

        os.kill(pid, signal.SIGTERM)
        pidPath = FilePath(str(pidfile))

        def pidfileGone() -> bool:
            pidPath.changed()
            return not pidPath.exists()

        waitFor(pidfileGone, lambda: f"{pidfile} still there")
        waitFor(lambda: pid not in processesMentioning(str(self.runDir)),
                lambda: f"process {pid} still running")
        lastLine = fileText(logfile).rstrip("\n").splitlines()[-1]
        self.assertIn("Server Shut Down", lastLine)


def _dropFileAccessOverrides() -> None:
    """
    In a child about to run as root: give up the capabilities that let
    root read any directory, so that permissions apply to it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP = 24
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


class StartupErrorTests(E2EMixin, SynchronousTestCase):
    """
    A server that cannot start says why in one line on standard error,
    exits non-zero, prints no traceback, and as a daemon leaves neither
    a pidfile nor a process behind.
    """

    realBlobs = False

    TWISTD_DAEMON_HINT = "Please look at log file for more information."

    def assertStartFails(
        self,
        daemon: bool,
        arguments: Sequence[str],
        mentions: Sequence[str],
        preexec: Callable[[], None] | None = None,
    ) -> None:
        pidfile = self.runDir / "twistd.pid"
        logfile = self.runDir / "twistd.log"
        if daemon:
            mode = ["--pidfile", str(pidfile), "--logfile", str(logfile)]
        else:
            mode = ["-n", "--pidfile="]
        stdoutPath = self.runDir / "stdout.txt"
        stderrPath = self.runDir / "stderr.txt"
        with open(stdoutPath, "wb") as out, open(stderrPath, "wb") as err:
            result = subprocess.run(
                TWISTD + mode + ["nydus-proxy", *arguments],
                cwd=self.runDir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=childEnvironment(), timeout=30, preexec_fn=preexec,
            )
        stdout, stderr = fileText(stdoutPath), fileText(stderrPath)
        everything = f"exit status {result.returncode}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}\n--- log:\n{fileText(logfile)}"
        self.assertNotEqual(result.returncode, 0, everything)
        lines = [line for line in stderr.splitlines() if line.strip()]
        if daemon and lines[1:] == [self.TWISTD_DAEMON_HINT]:
            # twistd's daemon parent adds this line to a child's failure.
            lines = lines[:1]
        self.assertEqual(len(lines), 1, f"expected one line on stderr; {everything}")
        for text in mentions:
            self.assertIn(text, lines[0], everything)
        self.assertNotIn("Traceback", stdout + stderr + fileText(logfile), everything)
        if daemon:
            self.assertFalse(pidfile.exists(), f"pidfile left behind; {everything}")
            waitFor(
                lambda: not processesMentioning(str(self.runDir)),
                lambda: f"processes left: {processesMentioning(str(self.runDir))}",
                timeout=5,
            )

    def missingDirectory(self, daemon: bool) -> None:
        missing = str(self.runDir / "no-such-dir")
        self.assertStartFails(
            daemon, ["--blobsdir", missing, "--listen", LOOPBACK_ANY_PORT],
            [missing, "not exist"],
        )

    def test_missingDirectory(self) -> None:
        """
        A blobsdir that does not exist.
        """
        self.missingDirectory(daemon=False)

    def test_missingDirectoryDaemon(self) -> None:
        """
        A blobsdir that does not exist, in daemon mode.
        """
        self.missingDirectory(daemon=True)

    def fileAsDirectory(self, daemon: bool) -> None:
        path = str(self.blobsdir / sorted(self.blobs)[0])
        self.assertStartFails(
            daemon, ["--blobsdir", path, "--listen", LOOPBACK_ANY_PORT],
            [path, "not a directory"],
        )

    def test_fileAsDirectory(self) -> None:
        """
        A blobsdir that is a file.
        """
        self.fileAsDirectory(daemon=False)

    def test_fileAsDirectoryDaemon(self) -> None:
        """
        A blobsdir that is a file, in daemon mode.
        """
        self.fileAsDirectory(daemon=True)

    def unreadableDirectory(self, daemon: bool) -> None:
        preexec = _dropFileAccessOverrides if os.geteuid() == 0 else None
        self.blobsdir.chmod(0)
        self.addCleanup(self.blobsdir.chmod, 0o755)
        try:
            probe = subprocess.run(
                [sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])",
                 str(self.blobsdir)],
                preexec_fn=preexec, capture_output=True, timeout=30,
            )
        except subprocess.SubprocessError as e:
            raise SkipTest(f"running as root and cannot drop CAP_DAC_OVERRIDE: {e}")
        if probe.returncode == 0:
            raise SkipTest(
                "this user can read a directory of mode 000 even without "
                "CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH"
            )
        self.assertStartFails(
            daemon, ["--blobsdir", str(self.blobsdir), "--listen", LOOPBACK_ANY_PORT],
            [str(self.blobsdir)], preexec,
        )

    def test_unreadableDirectory(self) -> None:
        """
        A blobsdir that cannot be read (mode 000; as root, run without the
        capabilities that bypass permissions).
        """
        self.unreadableDirectory(daemon=False)

    def test_unreadableDirectoryDaemon(self) -> None:
        """
        A blobsdir that cannot be read, in daemon mode.
        """
        self.unreadableDirectory(daemon=True)

    def busyPort(self, daemon: bool) -> None:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        self.assertStartFails(
            daemon,
            ["--blobsdir", str(self.blobsdir), "--listen", f"tcp:{port}:interface=127.0.0.1"],
            [str(port)],
        )

    def test_busyPort(self) -> None:
        """
        A port that another socket listens on.
        """
        self.busyPort(daemon=False)

    def test_busyPortDaemon(self) -> None:
        """
        A port that another socket listens on, in daemon mode.
        """
        self.busyPort(daemon=True)

    def malformedListen(self, daemon: bool) -> None:
        self.assertStartFails(
            daemon, ["--blobsdir", str(self.blobsdir), "--listen", "tcp:notaport"],
            ["tcp:notaport"],
        )

    def test_malformedListen(self) -> None:
        """
        A --listen that is not an endpoint description.
        """
        self.malformedListen(daemon=False)

    def test_malformedListenDaemon(self) -> None:
        """
        A --listen that is not an endpoint description, in daemon mode.
        """
        self.malformedListen(daemon=True)

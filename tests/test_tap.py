"""
The command line and the service it builds, without running a reactor.
"""

import os
import sys

from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from nydusproxy import tap
from nydusproxy.site import BlobSite

from .support import makeBlobDir


def defaults(**changes):
    """
    The whole parsed options of a plain command line, with C{changes}
    (underscores for dashes).
    """
    values = {
        "blobsdir": None,
        "images": None,
        "listen": ["tcp:8000"],
        "max-ranges": 16,
        "no-access-log": 0,
        "no-sendfile": 0,
        "workers": os.cpu_count(),
        "htpasswd": None,
        "token-file": None,
        "access-log": None,
        "access-log-format": "combined",
        "metrics": 0,
        "metrics-listen": None,
        "idle-timeout": 60.0,
        "header-timeout": 10.0,
        "max-header-bytes": 16384,
        "max-connections": 1024,
        "max-connections-per-client": 128,
        "shutdown-timeout": 10.0,
        "verify-digest": 0,
    }
    for name, value in changes.items():
        key = name.replace("_", "-")
        assert key in values, key
        values[key] = value
    return values


class OptionsTests(SynchronousTestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self)

    def test_defaults(self):
        """
        Only --blobsdir is needed; it is made absolute, and the server
        listens on tcp:8000.
        """
        options = tap.Options()
        relative = os.path.relpath(self.blobsdir)
        options.parseOptions(["--blobsdir", relative])
        self.assertEqual(dict(options), defaults(blobsdir=os.path.abspath(relative)))

    def test_everything(self):
        """
        Every option, with the upstream proxy's short C{-b}.
        """
        options = tap.Options()
        options.parseOptions(
            [
                "-b", self.blobsdir,
                "--listen", "tcp:8001:interface=127.0.0.1",
                "--listen", "unix:/tmp/nydus-proxy-test.sock",
                "--max-ranges", "4",
                "--no-access-log",
                "--no-sendfile",
                "--htpasswd", "users.htpasswd",
                "--token-file", "tokens",
                "--access-log-format", "json",
                "--metrics-listen", "tcp:9100:interface=127.0.0.1",
                "--idle-timeout", "30",
                "--header-timeout", "2.5",
                "--max-header-bytes", "8192",
                "--max-connections", "100",
                "--max-connections-per-client", "10",
                "--shutdown-timeout", "0.5",
                "--verify-digest",
            ]
        )
        self.assertEqual(
            dict(options),
            defaults(
                blobsdir=self.blobsdir,
                listen=["tcp:8001:interface=127.0.0.1", "unix:/tmp/nydus-proxy-test.sock"],
                max_ranges=4,
                no_access_log=1,
                no_sendfile=1,
                workers=1,
                htpasswd=os.path.abspath("users.htpasswd"),
                token_file=os.path.abspath("tokens"),
                access_log_format="json",
                metrics=1,
                metrics_listen="tcp:9100:interface=127.0.0.1",
                idle_timeout=30.0,
                header_timeout=2.5,
                max_header_bytes=8192,
                max_connections=100,
                max_connections_per_client=10,
                shutdown_timeout=0.5,
                verify_digest=1,
            ),
        )

    def test_blobsdirRequired(self):
        """
        Without --blobsdir or --images the command line is wrong.
        """
        error = self.assertRaises(UsageError, tap.Options().parseOptions, [])
        self.assertEqual(str(error), "--blobsdir DIR or --images ROOT is required")

    def test_imagesAlone(self):
        """
        --images ROOT (or -i) is enough without --blobsdir, and is made
        absolute.
        """
        relative = os.path.relpath(self.blobsdir)
        for flag in ("--images", "-i"):
            options = tap.Options()
            options.parseOptions([flag, relative])
            self.assertEqual(
                dict(options),
                defaults(blobsdir=None, images=os.path.abspath(relative)),
            )

    def test_imagesBesideBlobsdir(self):
        """
        --images and --blobsdir can be given together.
        """
        options = tap.Options()
        options.parseOptions(["--images", self.blobsdir, "-b", self.blobsdir])
        self.assertEqual((options["images"], options["blobsdir"]), (self.blobsdir, self.blobsdir))

    def test_workers(self):
        """
        --workers takes a number; "auto" (the default) is one per core when
        every endpoint is TCP, and one otherwise.
        """
        def parse(*extra):
            options = tap.Options()
            options.parseOptions(["--blobsdir", self.blobsdir, *extra])
            return options["workers"]

        self.assertEqual(parse(), os.cpu_count())
        self.assertEqual(parse("--workers", "3"), 3)
        self.assertEqual(parse("--workers", "auto", "--listen", "tcp6:8000"), os.cpu_count())
        self.assertEqual(parse("--listen", "tcp:8000", "--listen", "unix:/tmp/x.sock"), 1)
        self.assertEqual(parse("--listen", "unix:/tmp/x.sock", "--workers", "1"), 1)
        for bad in (["--workers", "0"], ["--workers", "many"],
                    ["--workers", "2", "--listen", "unix:/tmp/x.sock"]):
            self.assertRaises(UsageError, parse, *bad)

    def test_version(self):
        """
        C{--version} names nydus-proxy and its version, then Twisted's and
        Python's, and exits 0 without needing C{--blobsdir}.
        """
        from importlib.metadata import version
        from io import StringIO

        from twisted import version as twistedVersion

        out = StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as exited:
            tap.Options().parseOptions(["--version"])
        self.assertEqual(exited.exception.code, 0)
        self.assertEqual(
            out.getvalue(),
            f"nydus-proxy {version('nydus-proxy')} (Twisted {twistedVersion.short()}, "
            f"Python {sys.version.split()[0]})\n",
        )

    def test_badMaxRanges(self):
        """
        --max-ranges is a whole number of at least 1.
        """
        for value in ("0", "x"):
            self.assertRaises(
                UsageError,
                tap.Options().parseOptions,
                ["--blobsdir", self.blobsdir, "--max-ranges", value],
            )


class MakeServiceTests(SynchronousTestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self)
        self.addCleanup(setattr, sys, "excepthook", sys.excepthook)

    def options(self, *extra):
        options = tap.Options()
        options.parseOptions(["--blobsdir", self.blobsdir, *extra])
        return options

    def test_badListen(self):
        """
        An endpoint string that does not parse stops the start with one
        line naming it.
        """
        for description in ("bogus:1", "tcp:notaport", "ssl:8443:privateKey=/nonexistent"):
            options = self.options("--listen", description)
            error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
            self.assertIn(repr(description), str(error))

    def test_listens(self):
        """
        One listening service per --listen, all serving the same site.
        """
        reactor = MemoryReactor()
        service = tap.makeService(
            self.options("--workers", "1",
                         "--listen", "tcp:8001", "--listen", "tcp:8002:interface=127.0.0.2"),
            reactor=reactor,
        )
        IService(service).privilegedStartService()
        self.assertEqual([(port, host) for port, _, _, host in reactor.tcpServers],
                         [(8001, ""), (8002, "127.0.0.2")])
        factories = {factory for _, factory, _, _ in reactor.tcpServers}
        self.assertEqual(len(factories), 1)
        [site] = factories
        self.assertIsInstance(site, BlobSite)
        self.assertTrue(site.accessLog)

    def test_noAccessLog(self):
        """
        --no-access-log turns the access log off.
        """
        site = tap.buildSite(self.options("--no-access-log"), MemoryReactor())
        self.assertFalse(site.accessLog)

    def test_blobsdirProblems(self):
        """
        A missing, non-directory or unreadable blob directory stops the
        start with one line naming it.
        """
        missing = os.path.join(self.blobsdir, "missing")
        notDir = os.path.join(self.blobsdir, "file")
        with open(notDir, "w"):
            pass
        for path, problem in ((missing, "does not exist"), (notDir, "is not a directory")):
            options = self.options()
            options["blobsdir"] = path
            error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
            self.assertEqual(str(error), f"blob directory {path} {problem}")

    def test_imagesProblems(self):
        """
        A missing or non-directory image root stops the start with one line
        naming it.
        """
        missing = os.path.join(self.blobsdir, "missing")
        notDir = os.path.join(self.blobsdir, "file")
        with open(notDir, "w"):
            pass
        for path, problem in ((missing, "does not exist"), (notDir, "is not a directory")):
            options = tap.Options()
            options.parseOptions(["--images", path])
            error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
            self.assertEqual(str(error), f"image directory {path} {problem}")

    def test_unreadableBlobsdir(self):
        """
        A blob directory the server cannot read stops the start.
        """
        if os.getuid() == 0:
            self.skipTest("root reads every directory")
        os.chmod(self.blobsdir, 0)
        self.addCleanup(os.chmod, self.blobsdir, 0o755)
        error = self.assertRaises(tap.StartupError, tap.makeService, self.options(), MemoryReactor())
        self.assertIn("cannot be read", str(error))

    def test_cannotListen(self):
        """
        A port that cannot be listened on fails the start with a
        StartupError naming it, and logs it.
        """

        class BusyReactor(MemoryReactor):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        service = tap.makeService(
            self.options("--workers", "1", "--listen", "tcp:8001"), reactor=BusyReactor()
        )
        error = self.assertRaises(tap.StartupError, IService(service).privilegedStartService)
        self.assertEqual(str(error), "cannot listen on *:8001: [Errno 98] Address already in use")

    def test_startupErrorWithoutTraceback(self):
        """
        A StartupError reaching the interpreter prints its message alone;
        other exceptions keep the usual report.
        """
        seen = []
        sys.excepthook = lambda *args: seen.append(args)
        error = tap.StartupError("the reason")
        stderr = self.mktemp()
        with open(stderr, "w") as f:
            self.patch(sys, "__stderr__", f)
            sys.excepthook(tap.StartupError, error, None)
            sys.excepthook(ValueError, ValueError("other"), None)
        with open(stderr) as f:
            self.assertEqual(f.read(), "nydus-proxy: the reason\n")
        self.assertEqual([args[0] for args in seen], [ValueError])

"""
Where the access log goes under twistd: --logfile (and its rotation on
SIGUSR1), standard output appended to a file rotated by logrotate with the
contrib snippet, and --logger.
"""

import json
import os
import signal
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from .processes import CONTRIB, TWISTD, Process, fileText, need, portFromLog, request, waitFor
from .support import makeBlobDir, sha256

BLOB = os.urandom(64 * 1024)
DIGEST = "sha256:" + sha256(BLOB)


def blobPath(name):
    return f"/v2/{name}/blobs/{DIGEST}"


class LogTestCase(SynchronousTestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self, [BLOB])
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)

    def plugin(self, *extra):
        return [
            "nydus-proxy", "--blobsdir", self.blobsdir,
            "--listen", "tcp:0:interface=127.0.0.1", *extra,
        ]

    def get(self, port, name):
        status, _, body = request(port, blobPath(name), headers={"Range": "bytes=0-99"})
        self.assertEqual((status, body), (206, BLOB[:100]))


class LogfileTests(LogTestCase):
    def test_daemonLogfileAndRotation(self):
        """
        A daemon with --logfile writes its access lines there; SIGUSR1 makes
        twistd rotate it (FILE becomes FILE.1, a new FILE is opened); SIGTERM
        stops it and removes the pid file.
        """
        log = os.path.join(self.cwd, "nydus-proxy.log")
        pidfile = os.path.join(self.cwd, "nydus-proxy.pid")
        started = subprocess.run(
            [*TWISTD, "--pidfile", pidfile, "--logfile", log, *self.plugin()],
            cwd=self.cwd, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(started.returncode, 0, started.stderr)
        pid = int(fileText(pidfile))
        self.addCleanup(self.kill, pid)
        port = portFromLog(log)
        self.get(port, "before")
        waitFor(lambda: "/v2/before/" in fileText(log), "the first access line")
        self.assertRegex(
            fileText(log),
            r"\[nydusproxy\.access#info\] 127\.0\.0\.1 - - \[[^\]]+\] "
            rf'"GET /v2/before/blobs/{DIGEST} HTTP/1\.1" 206 100 "-" "-" \d+\.\d{{6}}\n',
        )

        os.kill(pid, signal.SIGUSR1)
        waitFor(lambda: os.path.exists(log + ".1"), "the rotated log")
        self.get(port, "after")
        waitFor(lambda: "/v2/after/" in fileText(log), "the second access line")
        self.assertIn("/v2/before/", fileText(log + ".1"))
        self.assertNotIn("/v2/after/", fileText(log + ".1"))
        self.assertNotIn("/v2/before/", fileText(log))

        os.kill(pid, signal.SIGTERM)
        waitFor(lambda: not os.path.exists(pidfile), "the pid file to go")
        waitFor(lambda: "Server Shut Down." in fileText(log), "the last line")

    def kill(self, pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LogrotateTests(LogTestCase):
    def test_appendedStdoutWithContribSnippet(self):
        """
        The foreground server's standard output appended to a file (as
        systemd's StandardOutput=append: does), rotated by logrotate with
        contrib/nydus-proxy.logrotate: old lines in FILE.1, new lines at the
        start of FILE, and no hole of NUL bytes.
        """
        logrotate = need("logrotate", "needed to test the logrotate snippet", "logrotate")
        log = os.path.join(self.cwd, "nydus-proxy.log")
        snippet = (CONTRIB / "nydus-proxy.logrotate").read_text()
        self.assertEqual(snippet.count("/var/log/nydus-proxy/nydus-proxy.log {"), 1)
        config = os.path.join(self.cwd, "logrotate.conf")
        with open(config, "w") as f:
            f.write(snippet.replace("/var/log/nydus-proxy/nydus-proxy.log {", f"{log} {{"))
        # logrotate refuses a configuration or a log directory that others
        # may write to, whatever this process's umask made them.
        os.chmod(config, 0o644)
        os.chmod(self.cwd, 0o755)
        with open(log, "ab") as out:
            Process(self, [*TWISTD, "--nodaemon", "--pidfile=", *self.plugin()],
                    log, cwd=self.cwd, stdout=out)
        port = portFromLog(log)
        self.get(port, "before")
        waitFor(lambda: "/v2/before/" in fileText(log), "the first access line")

        rotated = subprocess.run(
            [logrotate, "--force", "--state", os.path.join(self.cwd, "state"), config],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(rotated.returncode, 0, rotated.stderr)
        self.assertIn("/v2/before/", fileText(log + ".1"))
        self.get(port, "after")
        waitFor(lambda: "/v2/after/" in fileText(log), "the second access line")
        with open(log, "rb") as f:
            content = f.read()
        self.assertNotIn(b"\0", content)
        self.assertNotIn(b"/v2/before/", content)
        self.assertTrue(content.startswith(b"20"), content[:80])


OBSERVER_MODULE = '''
from twisted.logger import jsonFileLogObserver

def observer():
    return jsonFileLogObserver(open({path!r}, "a"))
'''


class LoggerTests(LogTestCase):
    def test_loggerOption(self):
        """
        twistd --logger takes an observer factory: with Twisted's JSON
        observer, each access event arrives with its fields.
        """
        events = os.path.join(self.cwd, "events.json")
        with open(os.path.join(self.cwd, "jsonlog.py"), "w") as f:
            f.write(OBSERVER_MODULE.format(path=events))
        output = os.path.join(self.cwd, "output")
        env = dict(os.environ, PYTHONPATH=self.cwd)
        Process(
            self, [*TWISTD, "--nodaemon", "--pidfile=", "--logger", "jsonlog.observer",
                   *self.plugin()],
            output, cwd=self.cwd, env=env,
        )
        port = portFromLog(events)
        self.get(port, "structured")

        def accessEvent():
            # Records are "\x1e" + JSON + "\n"; the last may be half written.
            for record in fileText(events).split("\x1e"):
                if record.endswith("\n"):
                    event = json.loads(record)
                    if event.get("log_namespace") == "nydusproxy.access":
                        return event

        event = waitFor(accessEvent, "the access event")
        self.assertEqual(
            (event["method"], event["uri"], event["status"], event["bytes"], event["aborted"]),
            ("GET", blobPath("structured"), 206, 100, False),
        )
        self.assertEqual(event["client"], "127.0.0.1")

"""
twistd's --uid/--gid: started as root, the server binds its ports (a
privileged one too), then runs as an unprivileged user.  These tests need
root; elsewhere they skip.
"""

from __future__ import annotations

import grp
import http.client
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .support import sha256

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
BLOB = bytes(range(256)) * 1024 + b"!"
DIGEST = "sha256:" + sha256(BLOB)
BLOB_PATH = f"/v2/library/ubuntu/blobs/{DIGEST}"


def unprivileged() -> tuple[int, int]:
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        raise SkipTest("there is no user nobody") from None
    for group in ("nogroup", "nobody"):
        try:
            return uid, grp.getgrnam(group).gr_gid
        except KeyError:
            pass
    raise SkipTest("there is no group nogroup or nobody")


def freePrivilegedAddress() -> tuple[str, int] | None:
    """
    A loopback address whose port 443 is free (root can bind it).
    """
    for _ in range(20):
        host = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(2, 255)}"
        with socket.socket() as probe:
            try:
                probe.bind((host, 443))
            except OSError:
                continue
        return host, 443
    return None


class DropPrivilegesTests(SynchronousTestCase):
    def setUp(self):
        if os.getuid() != 0:
            raise SkipTest(
                "twistd can drop privileges only when started as root; "
                "run the tests as root to cover --uid/--gid"
            )
        self.uid, self.gid = unprivileged()
        # twistd imports all it needs before it drops privileges, so the
        # code may stay where nobody can read it; the blobs and the
        # htpasswd file may not.  Not under _trial_temp: its parents (the
        # checkout) need not let nobody in.  /tmp does.
        self.dir = tempfile.mkdtemp(prefix="nydus-proxy-privileges-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        os.chmod(self.dir, 0o755)
        self.blobsdir = os.path.join(self.dir, "blobs")
        os.mkdir(self.blobsdir, 0o755)
        blobPath = os.path.join(self.blobsdir, DIGEST[7:])
        with open(blobPath, "wb") as f:
            f.write(BLOB)
        os.chmod(blobPath, 0o644)
        self.log = os.path.join(self.dir, "twistd.log")

    def start(self, *options: str) -> subprocess.Popen:
        command = [
            *TWISTD, "-n", "--pidfile=", "--logfile", self.log,
            "--uid", str(self.uid), "--gid", str(self.gid),
            "nydus-proxy", "--blobsdir", self.blobsdir, *options,
        ]
        process = subprocess.Popen(command, cwd=self.dir, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        self.addCleanup(self.stop, process)
        return process

    def stop(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
        process.stderr.close()

    def ports(self, process: subprocess.Popen, count: int) -> list[int]:
        """
        The ports of the "BlobSite starting on N" lines, once C{count} are
        logged.
        """
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.fail(f"twistd exited {process.returncode}: {process.stderr.read()!r}")
            if os.path.exists(self.log):
                with open(self.log) as f:
                    found = re.findall(r"BlobSite starting on (\d+)", f.read())
                if len(found) >= count:
                    return [int(port) for port in found]
            time.sleep(0.05)
        self.fail("the server never logged its ports")

    def ids(self, pid: int) -> dict[str, list[int]]:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        return {name: [int(n) for n in fields[name].split()] for name in ("Uid", "Gid", "Groups")}

    def get(self, host: str, port: int, headers: dict[str, str]) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        try:
            connection.request("GET", BLOB_PATH, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def test_dropsPrivileges(self):
        """
        With --uid/--gid the server runs as that user and group (real,
        effective, saved and file-system ids; no root group), after binding
        a port below 1024; it serves a blob that user can read, and reads
        the htpasswd file again as that user when it changes.
        """
        self.dropsPrivileges(workers=1)

    def test_workersDropPrivileges(self):
        """
        The same with two worker processes: the supervisor and both
        workers run as that user and group.
        """
        self.dropsPrivileges(workers=2)

    def dropsPrivileges(self, workers):
        import bcrypt

        privileged = freePrivilegedAddress()
        if privileged is None:
            raise SkipTest("no free port 443 on a loopback address")
        host, low = privileged
        htpasswd = os.path.join(self.dir, "htpasswd")
        with open(htpasswd, "wb") as f:
            f.write(b"alice:" + bcrypt.hashpw(b"a", bcrypt.gensalt(4)) + b"\n")
        os.chmod(htpasswd, 0o644)
        process = self.start(
            "--listen", "tcp:0:interface=127.0.0.1",
            "--listen", f"tcp:{low}:interface={host}",
            "--htpasswd", htpasswd,
            "--workers", str(workers),
        )
        found = self.ports(process, 2 * workers)
        self.assertEqual(found.count(low), workers)
        [port] = set(found) - {low}
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        self.assertEqual(len(children), workers if workers > 1 else 0)
        for pid in [process.pid, *children]:
            ids = self.ids(pid)
            self.assertEqual(ids["Uid"], [self.uid] * 4)
            self.assertEqual(ids["Gid"], [self.gid] * 4)
            self.assertNotIn(0, ids["Groups"])

        alice = {"Authorization": "Basic YWxpY2U6YQ==", "Range": "bytes=1000-1999"}
        self.assertEqual(self.get("127.0.0.1", port, {})[0], 401)
        self.assertEqual(self.get("127.0.0.1", port, alice), (206, BLOB[1000:2000]))
        self.assertEqual(self.get(host, low, alice), (206, BLOB[1000:2000]))

        replacement = htpasswd + ".new"
        with open(replacement, "wb") as f:
            f.write(b"bob:" + bcrypt.hashpw(b"b", bcrypt.gensalt(4)) + b"\n")
        os.chmod(replacement, 0o644)
        os.replace(replacement, htpasswd)
        bob = {"Authorization": "Basic Ym9iOmI=", "Range": "bytes=0-9"}
        self.assertEqual(self.get("127.0.0.1", port, bob), (206, BLOB[:10]))
        self.assertEqual(self.get("127.0.0.1", port, alice)[0], 401)

        # twistd stops cleanly, then ends by the signal it got.
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=30), -signal.SIGTERM)
        with open(self.log) as f:
            self.assertIn("Server Shut Down.", f.read().splitlines()[-1])

    def test_unreadableCredentialsStopStart(self):
        """
        An htpasswd file that only root can read stops the start once the
        privileges are dropped, with one line saying so: it could never be
        read again after a change.
        """
        import bcrypt

        htpasswd = os.path.join(self.dir, "htpasswd")
        with open(htpasswd, "wb") as f:
            f.write(b"alice:" + bcrypt.hashpw(b"a", bcrypt.gensalt(4)) + b"\n")
        os.chmod(htpasswd, 0o600)
        process = self.start("--listen", "tcp:0:interface=127.0.0.1", "--htpasswd", htpasswd)
        self.assertEqual(process.wait(timeout=60), 1)
        self.assertEqual(
            process.stderr.read().decode(),
            f"nydus-proxy: htpasswd file {htpasswd}: Permission denied (as uid {self.uid})\n",
        )

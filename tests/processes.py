"""
Running nydus-proxy (and the tools in front of it) as real processes, and
talking to them with a blocking HTTP client: for the tests of deployment.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import FailTest, SkipTest

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def need(tool: str, why: str, package: str) -> str:
    """
    The path of C{tool}, or skip the test saying what is missing.
    """
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise SkipTest(f"{tool} is not installed ({why}; apt-get install {package})")
    return path


def freePort() -> int:
    """
    A loopback TCP port free a moment ago, for tools that cannot be told
    to pick one (nginx, systemd-socket-activate).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitFor(predicate, what, timeout: float = 30.0):
    """
    Poll C{predicate} until it returns something true, and return that;
    fail after C{timeout} seconds, saying C{what} was awaited (a string, or
    a callable that makes one, e.g. from a log read at that moment).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise FailTest(
                f"not true after {timeout} s: {what() if callable(what) else what}"
            )
        time.sleep(0.02)


def request(port: int, path: str, method: str = "GET", headers=None, host="127.0.0.1"):
    """
    One HTTP request on a new connection: (status, headers, body).
    """
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def fileText(path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def portFromLog(path) -> int:
    """
    The port a twistd with C{--listen tcp:0} bound, from its log.
    """
    match = waitFor(
        lambda: re.search(r"BlobSite starting on (\d+)", fileText(path)), f"a port in {path}"
    )
    return int(match.group(1))


def stopProcess(popen: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """
    Stop a child with C{sig}, and kill it if it is still there after
    C{timeout} seconds.

    @return: its exit status.
    """
    if popen.poll() is None:
        popen.send_signal(sig)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    return popen.returncode


class Process:
    """
    A child process with its output in a file, stopped at cleanup.
    """

    def __init__(self, testCase, argv, output, cwd=None, env=None, stdout=None):
        self.output = output
        out = stdout if stdout is not None else open(output, "ab")
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT,
        )
        if stdout is None:
            out.close()
        testCase.addCleanup(self.stop)

    def stop(self, sig=signal.SIGTERM) -> int:
        return stopProcess(self.popen, sig)

    def text(self) -> str:
        return fileText(self.output)


def readAll(response):
    """
    The body of an Agent's response.  (Like twisted.web.client.readBody,
    which warns about a transport without abortConnection when the body has
    already arrived.)
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Protocol
    from twisted.web.client import ResponseDone
    from twisted.web.http import PotentialDataLoss

    done = Deferred()
    chunks = []

    class Collect(Protocol):
        def dataReceived(self, data):
            chunks.append(data)

        def connectionLost(self, reason):
            if reason.check(ResponseDone, PotentialDataLoss):
                done.callback(b"".join(chunks))
            else:
                done.errback(reason)

    response.deliverBody(Collect())
    return done

"""
What the tests share: blob directories, an in-memory HTTP round trip over a
real Site, and the check of OCI error bodies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest

from nydusproxy import tap

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "nydus"

# The real nydus blobs of the fixtures; the last is not named by its sha256.
FIXTURE_BLOBS = (
    "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00",
    "d7b86b1e74e316fe945741d1a9fa1b271459fe41481e304977659e0c6ecf56ac",
    "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef",
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def makeBlobDir(testCase, blobs=()) -> str:
    """
    A new temporary blob directory holding C{blobs} (bytes), each named by
    its sha256.
    """
    path = FilePath(testCase.mktemp())
    path.makedirs()
    for data in blobs:
        path.child(sha256(data)).setContent(data)
    return path.path


def copyFixtureBlobs(testCase) -> str:
    """
    A temporary copy of the fixtures' real nydus blobs, writable.
    """
    source = FIXTURES / "blobs"
    if not source.is_dir():
        raise SkipTest(f"the nydus fixtures are not at {source}")
    target = FilePath(testCase.mktemp())
    shutil.copytree(source, target.path)
    for name in os.listdir(target.path):
        os.chmod(os.path.join(target.path, name), 0o644)
    return target.path


def makeOptions(blobsdir: str, *extra: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["--blobsdir", blobsdir, *extra])
    return options


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    raw: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def parseHead(raw: bytes) -> tuple[int, dict[str, list[str]], bytes, bytes]:
    """
    The status, headers (lowercased names) and head of the response that
    begins C{raw}, and the bytes after its head.
    """
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"incomplete response head: {head[:200]!r}")
    statusLine, *headerLines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in headerLines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(statusLine.split()[1]), headers, head, rest


def bodyLength(headers: dict[str, list[str]], method: bytes) -> int:
    """
    How many body bytes a response announces (none after a HEAD, whatever
    its Content-Length says).
    """
    return 0 if method == b"HEAD" else int(headers.get("content-length", ["0"])[0])


def parseResponses(raw: bytes, methods: list[bytes]) -> list[Response]:
    """
    Split the bytes a server wrote into responses, one per request method
    given.
    """
    responses = []
    for method in methods:
        status, headers, head, raw = parseHead(raw)
        length = bodyLength(headers, method)
        if len(raw) < length:
            raise AssertionError(f"short body: {len(raw)} of {length} bytes")
        body, raw = raw[:length], raw[length:]
        responses.append(Response(status, headers, body, head))
    if raw:
        raise AssertionError(f"bytes after the last response: {raw[:80]!r}")
    return responses


class InMemoryServer:
    """
    The real Site of the server over a L{StringTransport}, with a clock
    that the test advances: exact wire bytes, no sockets, no reactor.
    """

    def __init__(self, blobsdir: str, *extra: str) -> None:
        self.clock = MemoryReactorClock()
        self.site = tap.buildSite(makeOptions(blobsdir, *extra), self.clock)
        self.site.startFactory()

    def connect(self):
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def exchange(self, *requests: tuple[bytes, bytes, dict[bytes, bytes]]) -> list[Response]:
        """
        Send requests of (method, path, headers) over one connection and
        return their responses.
        """
        protocol, transport = self.connect()
        data = b""
        for method, path, headers in requests:
            lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: test"]
            lines += [b"%s: %s" % item for item in headers.items()]
            data += b"\r\n".join(lines) + b"\r\n\r\n"
        protocol.dataReceived(data)
        # The producer yields between turns with callLater(0).
        now = self.clock.seconds
        while any(call.getTime() <= now() for call in self.clock.getDelayedCalls()):
            self.clock.advance(0)
        raw = transport.value()
        protocol.connectionLost(None)
        return parseResponses(raw, [method for method, _, _ in requests])

    def get(self, path: bytes, method: bytes = b"GET", **headers: bytes) -> Response:
        named = {name.replace("_", "-").encode(): value for name, value in headers.items()}
        [response] = self.exchange((method, path, named))
        return response


def assertErrorCode(testCase, response: Response, status: int, code: str) -> dict:
    """
    Check an OCI error response: the status, a JSON body with C{code} first
    (no body for HEAD), and return the first error.
    """
    testCase.assertEqual(response.status, status, response.body)
    testCase.assertEqual(response.header("content-type"), "application/json")
    document = json.loads(response.body)
    testCase.assertEqual(document["errors"][0]["code"], code)
    testCase.assertIsInstance(document["errors"][0]["message"], str)
    return document["errors"][0]

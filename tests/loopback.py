"""
Real loopback sockets for the tests that need them: a server Site on
127.0.0.1 and raw HTTP clients on trial's reactor, which can read slowly,
stop reading, or drip bytes.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from .support import Response, bodyLength, parseHead


def listen(testCase, site) -> int:
    """
    Listen with C{site} on an ephemeral 127.0.0.1 port for the test; at
    its end, stop listening and wait until the site's connections are gone.
    """
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def cleanup():
        await port.stopListening()
        for _ in range(500):
            if not len(site.connections):
                return
            await deferLater(reactor, 0.01, lambda: None)
        for protocol in list(site.connections.open):
            protocol.channel.abort()
        await deferLater(reactor, 0.01, lambda: None)

    testCase.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    return port.getHost().port


def captureLogs(testCase) -> list[str]:
    """
    The text of every event logged during the test.
    """
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


def pause(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


async def waitFor(condition, timeout: float = 30.0, step: float = 0.01) -> None:
    """
    Wait until C{condition()} is true, failing after C{timeout} seconds (a
    hang, not a slow machine).
    """
    for _ in range(int(timeout / step)):
        if condition():
            return
        await pause(step)
    raise AssertionError(f"still waiting after {timeout} s for {condition}")


class RawClient(Protocol):
    """
    A client that sends what it is told and keeps every byte it receives.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.whenConnected = Deferred()
        self.closed = Deferred()
        self.reason = None

    def connectionMade(self) -> None:
        self.whenConnected.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.closed.callback(bytes(self.received))

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def stopReading(self) -> None:
        self.transport.pauseProducing()

    def startReading(self) -> None:
        self.transport.resumeProducing()

    def smallReceiveBuffer(self, size: int = 32 * 1024) -> None:
        """
        Keep the kernel from buffering much for this client while it does
        not read.
        """
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class _Factory(ClientFactory):
    def __init__(self, client: RawClient) -> None:
        self.client = client

    def buildProtocol(self, addr):
        return self.client

    def clientConnectionFailed(self, connector, reason):
        self.client.whenConnected.errback(reason)


async def connect(port: int, host: str = "127.0.0.1", client: RawClient | None = None) -> RawClient:
    client = client or RawClient()
    reactor.connectTCP(host, port, _Factory(client), timeout=10)
    return await client.whenConnected


def request(method: bytes, path: bytes, close: bool = True, **headers: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: test"]
    if close:
        lines.append(b"Connection: close")
    lines += [b"%s: %s" % (name.replace("_", "-").encode(), value) for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass
class PartialResponse(Response):
    """
    A response as far as the connection carried it: C{complete} is false
    when the body is shorter than its Content-Length.
    """

    complete: bool = True


def parseResponse(raw: bytes, method: bytes = b"GET") -> PartialResponse:
    """
    The first response of C{raw}, whose body may be cut short.
    """
    status, headers, head, rest = parseHead(raw)
    length = bodyLength(headers, method)
    body = rest[:length]
    return PartialResponse(status, headers, body, head, complete=len(body) == length)


async def fetch(port: int, method: bytes, path: bytes, host: str = "127.0.0.1", **headers: bytes) -> PartialResponse:
    """
    One request on a new connection, closed after the answer.
    """
    client = await connect(port, host)
    client.send(request(method, path, **headers))
    return parseResponse(await client.closed, method)

"""
A real HTTP(S) client for loopback tests: Twisted's Agent without a
persistent pool, and a body reader.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss


class BodyCollector(Protocol):
    """
    Collects a response body; C{done} fires with the bytes.  C{onData}, if
    set, sees each piece as it arrives (a test may pause the transport).
    """

    def __init__(self, onData=None) -> None:
        self.done: Deferred[bytes] = Deferred()
        self.pieces: list[bytes] = []
        self.received = 0
        self.onData = onData

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)
        self.received += len(data)
        if self.onData is not None:
            self.onData(self, data)

    def connectionLost(self, reason: Failure = None) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.pieces))
        else:
            self.done.errback(reason)


def readAll(response, onData=None) -> Deferred[bytes]:
    collector = BodyCollector(onData)
    response.deliverBody(collector)
    return collector.done


def makeAgent(reactor, contextFactory=None) -> Agent:
    """
    An Agent whose connections close after each response, so that trial
    finds no socket left behind.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    if contextFactory is None:
        return Agent(reactor, pool=pool)
    return Agent(reactor, contextFactory=contextFactory, pool=pool)

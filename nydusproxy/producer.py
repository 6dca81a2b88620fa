"""
Streaming parts of an open file to an HTTP request, with back-pressure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from zope.interface import implementer

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

# One part of a response body: bytes to send as they are, then C{length}
# bytes of the file from C{offset}.
Part = tuple[bytes, int, int]


@implementer(IPushProducer)
class FileProducer:
    """
    A push producer that writes parts of a file descriptor to a request.

    It writes a chunk whenever the consumer is not paused: a TCP transport
    pauses it as soon as its buffer holds more than 64 KiB and resumes it
    once the buffer has drained, so a slow client never makes the server
    hold more than about one chunk for it.  A consumer that never pauses
    gets C{turnLimit} bytes per reactor turn, so that one response cannot
    starve the others.

    The file descriptor belongs to the producer from C{start} on, and is
    closed when the response ends for any reason.  A file that ends before
    the promised length (truncated while being sent) ends the response
    early by closing the connection: the client sees a short body, never a
    hang and never bytes of another file.
    """

    chunkSize = 256 * 1024
    turnLimit = 4 * chunkSize
    log = Logger()

    def __init__(
        self,
        request: IRequest,
        fd: int,
        parts: Sequence[Part],
        clock: IReactorTime,
    ) -> None:
        self._request = request
        self._fd: int | None = fd
        self._parts = iter(parts)
        self._clock = clock
        self._prefix = b""
        self._offset = 0
        self._remaining = 0
        self._paused = False
        self._producing = False
        self._nextTurn: IDelayedCall | None = None

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._connectionLost)
        self._nextPart()
        self._request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._producing or self._fd is None:
            return
        self._producing = True
        try:
            self._produce()
        finally:
            self._producing = False

    def stopProducing(self) -> None:
        self._close()

    def _nextPart(self) -> bool:
        part = next(self._parts, None)
        if part is None:
            return False
        self._prefix, self._offset, self._remaining = part
        return True

    def _produce(self) -> None:
        budget = self.turnLimit
        request = self._request
        while not self._paused and self._fd is not None:
            if budget <= 0:
                self._nextTurn = self._clock.callLater(0, self._turn)
                return
            if self._prefix:
                request.write(self._prefix)
                self._prefix = b""
            if self._remaining == 0:
                if not self._nextPart():
                    self._finish()
                    return
                continue
            try:
                data = os.pread(
                    self._fd, min(self.chunkSize, self._remaining), self._offset
                )
            except OSError:
                self.log.failure("Reading a blob failed; closing the connection")
                self._abort()
                return
            if not data:
                self.log.warn(
                    "Blob ended {missing} bytes early (truncated while being "
                    "sent?); closing the connection",
                    missing=self._remaining,
                )
                self._abort()
                return
            self._offset += len(data)
            self._remaining -= len(data)
            budget -= len(data)
            request.write(data)

    def _turn(self) -> None:
        self._nextTurn = None
        if not self._paused:
            self.resumeProducing()

    def _finish(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.loseConnection()

    def _connectionLost(self, reason: Failure) -> None:
        self._close()

    def _close(self) -> None:
        if self._nextTurn is not None:
            self._nextTurn.cancel()
            self._nextTurn = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

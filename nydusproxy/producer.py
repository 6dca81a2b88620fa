"""
Streaming parts of an open file to an HTTP request, with back-pressure:
through the transport's buffer (any transport, TLS included), or with
sendfile(2) straight from the file to a plain TCP socket.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from zope.interface import implementer

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
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
    starve the others.  A client that reads nothing for C{stallTimeout}
    seconds is disconnected (Twisted suspends its idle timeout while a
    response is being written).

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
        stallTimeout: float = 60.0,
    ) -> None:
        self._request = request
        self._fd: int | None = fd
        self._parts = iter(parts)
        self._clock = clock
        self._stallTimeout = stallTimeout
        self._prefix = b""
        self._offset = 0
        self._remaining = 0
        self._paused = False
        self._pausedAt = 0.0
        self._producing = False
        self._nextTurn: IDelayedCall | None = None
        self._stallCheck: IDelayedCall | None = None
        self._forceClose: IDelayedCall | None = None

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._connectionLost)
        self._nextPart()
        self._request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True
        self._pausedAt = self._clock.seconds()
        if self._stallCheck is None and self._fd is not None:
            self._stallCheck = self._clock.callLater(self._stallTimeout, self._checkStall)

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
                self._truncated()
                return
            self._offset += len(data)
            self._remaining -= len(data)
            budget -= len(data)
            request.write(data)

    def _turn(self) -> None:
        self._nextTurn = None
        if not self._paused:
            self.resumeProducing()

    def _checkStall(self) -> None:
        self._stallCheck = None
        if not self._paused or self._fd is None:
            return
        waited = self._clock.seconds() - self._pausedAt
        if waited >= self._stallTimeout:
            self.log.info(
                "Client read nothing for {seconds:.0f} s; closing the connection",
                seconds=waited,
            )
            self._abort(flush=False)
        else:
            self._stallCheck = self._clock.callLater(
                self._stallTimeout - waited, self._checkStall
            )

    def _truncated(self) -> None:
        self.log.warn(
            "Blob ended {missing} bytes early (truncated while being sent?); "
            "closing the connection",
            missing=self._remaining,
        )
        self._abort()

    def _finish(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self, flush: bool = True) -> None:
        """
        End the response early by closing the connection: after what is
        buffered has been sent if C{flush}, and at the latest after
        C{stallTimeout} seconds; at once otherwise.
        """
        self._close()
        self._request.unregisterProducer()
        transport = getattr(getattr(self._request, "channel", None), "transport", None)
        if flush or transport is None:
            self._request.loseConnection()
            if transport is not None:
                self._forceClose = self._clock.callLater(
                    self._stallTimeout, transport.abortConnection
                )
        else:
            transport.abortConnection()

    def _connectionLost(self, reason: Failure) -> None:
        if self._forceClose is not None and self._forceClose.active():
            self._forceClose.cancel()
        self._close()

    def _close(self) -> None:
        for call in (self._nextTurn, self._stallCheck):
            if call is not None and call.active():
                call.cancel()
        self._nextTurn = self._stallCheck = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def sendfileTransport(request: IRequest) -> tcp.Connection | None:
    """
    The plain TCP transport under C{request}, if sendfile(2) may write to
    its socket directly: not TLS, and no wrapper that alters or counts what
    is written.
    """
    transport = getattr(getattr(request, "channel", None), "transport", None)
    while type(transport) is ProtocolWrapper:
        transport = transport.transport
    if isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
        return transport
    return None


class SendfileProducer(FileProducer):
    """
    One part of a file sent with sendfile(2): the bytes go from the page
    cache to the socket without passing through Python.

    The response headers go through the transport as usual; sendfile starts
    only once the transport's buffer has drained, so nothing is reordered.
    The wait relies on Twisted's FileDescriptor: marked paused, it resumes
    its streaming producer when its buffer is empty and the socket
    writable.  The same wait follows each full socket buffer.

    sendfile queues references to the file's pages, not copies: a file
    truncated in place while they wait in the socket buffer sends zeros
    where its bytes were.  So the last C{tailSize} bytes are sent only
    after checking that the file's size and modification time are still
    those it had when it was opened; if not, the response is cut short and
    the client sees the failure.  (A blob replaced by rename keeps its old
    inode and bytes, and is sent whole.)
    """

    tailSize = 64 * 1024

    def __init__(
        self,
        request: IRequest,
        fd: int,
        part: Part,
        clock: IReactorTime,
        transport: tcp.Connection,
        status: os.stat_result,
        stallTimeout: float = 60.0,
    ) -> None:
        """
        @param status: the file's C{fstat} when it was opened.
        """
        super().__init__(request, fd, [part], clock, stallTimeout)
        self._transport = transport
        self._identity = (status.st_size, status.st_mtime_ns)

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._connectionLost)
        self._nextPart()
        self._request.registerProducer(self, True)
        self._request.write(b"")
        self._waitForDrain()

    def _waitForDrain(self) -> None:
        self.pauseProducing()
        self._transport.producerPaused = True
        self._transport.startWriting()

    def _produce(self) -> None:
        socket = self._transport.fileno()
        budget = self.turnLimit * 4
        while self._remaining > self.tailSize:
            if budget <= 0:
                self._waitForDrain()
                return
            try:
                sent = os.sendfile(
                    socket,
                    self._fd,
                    self._offset,
                    min(self._remaining - self.tailSize, budget),
                )
            except BlockingIOError:
                self._waitForDrain()
                return
            except OSError as e:
                self.log.info("Sending a blob failed ({error}); closing", error=e)
                self._abort(flush=False)
                return
            if sent == 0:
                self._truncated()
                return
            self._offset += sent
            self._remaining -= sent
            budget -= sent
            self._request.sentLength += sent
        status = os.fstat(self._fd)
        if (status.st_size, status.st_mtime_ns) != self._identity:
            self._truncated()
            return
        # The tail is copied: its bytes cannot change once written.
        super()._produce()

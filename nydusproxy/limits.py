"""
Limits on what one client, or all of them, can hold of the server: how long
a request may take to arrive, how large its head may be, how long a
connection may sit idle or unread, and how many connections are open.

Twisted's L{HTTPChannel} has an idle timeout (through TimeoutMixin), but
it restarts on every byte received, so a client that sends one byte a
minute keeps a socket for ever; and it cancels and schedules a timer for
every request, a cost that shows on small range reads.
L{LimitedHTTPChannel} keeps the idle timeout with one timer a connection
that is checked when it comes due, adds the missing request deadline and
the head caps, and counts itself into the site's L{Connections}; its
transport stays the real socket, so back-pressure reaches the blob producer
as before.  (While a response is being sent the idle timeout waits: the
blob producers time out a client that stops reading.)
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import server
from twisted.web.http import HTTPChannel

from . import errors
from .httpdate import currentDate

# The protocol errors of this module are not in the distribution spec's
# table, which describes refusals of valid requests; DENIED is the nearest
# code, and the status and message say what happened.
REQUEST_TIMEOUT = errors.ErrorCode(
    "DENIED", "request not received in time", 408
)
URI_TOO_LONG = errors.ErrorCode("DENIED", "request line too long", 414)
HEADERS_TOO_LARGE = errors.ErrorCode(
    "DENIED", "request header fields too large", 431
)
BODY_TOO_LARGE = errors.ErrorCode("DENIED", "request body too large", 413)

_log = Logger()

_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


@dataclass(frozen=True)
class Limits:
    """
    The limits of one site, from the command line.

    @ivar idleTimeout: seconds a connection may send nothing between
        requests, or leave a response unread, before it is closed.
    @ivar headerTimeout: seconds from the first byte of a request to its
        last (request line, headers, and any body, which this server never
        reads).
    @ivar maxHeaderBytes: the most bytes of request line and headers.
    @ivar maxConnections: the most connections open at once.
    @ivar maxConnectionsPerClient: the most connections from one address.
    """

    idleTimeout: float = 60
    headerTimeout: float = 10
    maxHeaderBytes: int = 16384
    maxConnections: int = 1024
    maxConnectionsPerClient: int = 128


_DEFAULT = Limits()

# The command line options of the limits, for tap.Options: name, default,
# help, type.  Each must be positive.
optParameters = [
    ["idle-timeout", None, float(_DEFAULT.idleTimeout), "Seconds a connection may send nothing "
     "between requests, or leave a response unread, before it is closed.", float],
    ["header-timeout", None, float(_DEFAULT.headerTimeout), "Seconds a client has, from its first "
     "byte, to send a whole request.", float],
    ["max-header-bytes", None, _DEFAULT.maxHeaderBytes, "Most bytes of request line and "
     "headers; more is answered 414 or 431.", int],
    ["max-connections", None, _DEFAULT.maxConnections, "Most connections open at once; more "
     "are closed at once.", int],
    ["max-connections-per-client", None, _DEFAULT.maxConnectionsPerClient, "Most connections open at "
     "once from one client address; more are closed at once.", int],
    ["shutdown-timeout", None, 10.0, "Seconds a stopping server lets "
     "responses in flight finish before it closes them.", float],
]

# The smallest head that holds a request line of a blob path.
_MIN_HEADER_BYTES = 256


def checkOptions(options: usage.Options) -> None:
    """
    @raise usage.UsageError: a limit is out of range.
    """
    for name, *_ in optParameters:
        value = options[name]
        if not value > 0 or value == float("inf"):
            raise usage.UsageError(f"--{name} must be a positive number")
    if options["max-header-bytes"] < _MIN_HEADER_BYTES:
        raise usage.UsageError(f"--max-header-bytes must be at least {_MIN_HEADER_BYTES}")


def fromOptions(options: usage.Options) -> Limits:
    return Limits(
        idleTimeout=options["idle-timeout"],
        headerTimeout=options["header-timeout"],
        maxHeaderBytes=options["max-header-bytes"],
        maxConnections=options["max-connections"],
        maxConnectionsPerClient=options["max-connections-per-client"],
    )


def errorResponse(code: errors.ErrorCode, detail: Any = None) -> bytes:
    """
    A whole HTTP/1.1 error response that closes the connection, for errors
    found before there is a request to answer through.
    """
    body = errors.errorBody(code, detail)
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"Server: %s\r\n"
        b"Date: %s\r\n"
        b"Connection: close\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"%s: %s\r\n"
        b"\r\n%s"
        % (
            code.status,
            _REASONS[code.status],
            server.version,
            currentDate(),
            len(body),
            errors.API_VERSION_HEADER,
            errors.API_VERSION,
            body,
        )
    )


class LimitedHTTPChannel(HTTPChannel):
    """
    An L{HTTPChannel} with a deadline for each request to arrive, and a cap
    on the size of its head answered with a JSON 414 or 431 (and 413 for a
    body larger than that, or chunked).  (A client that stops reading a
    response is the blob producer's to time out.)

    A refused client gets its answer, then the server stops sending
    (half-close) and discards what the client still sends for up to
    C{lingerTime} seconds before closing: closing at once with unread
    input would reset the connection and could destroy the answer before
    the client reads it.
    """

    lingerTime = 2.0
    _log = Logger()

    def __init__(self, limits: Limits, connections: Connections) -> None:
        super().__init__()
        self.limits = limits
        self.connections = connections
        self.admitted = False
        # Twisted's own caps: the longest line, and the whole head (which
        # it answers with a bare 400).  Ours are checked first.
        self.MAX_LENGTH = self._maxHeaderBytes = limits.maxHeaderBytes
        self._delimiterLength = len(self.delimiter)
        self.totalHeadersSize = limits.maxHeaderBytes
        self.busy = False
        self._refused = False
        self._headBytes = 0
        self._headLines = 0
        self._deadline: IDelayedCall | None = None
        self._linger: IDelayedCall | None = None
        self._idleCheck: IDelayedCall | None = None
        self._seconds = connections.clock.seconds
        self._lastActive = 0.0

    # Receiving a request.

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        self._lastActive = self._seconds()
        HTTPChannel.dataReceived(self, data)
        # The clock starts only for a request left incomplete by this read
        # (most arrive whole, and a timer per request costs), at the read
        # that brought its first bytes; bytes of a pipelined request held
        # while the one before it is answered come back through here.
        if self._deadline is None and not self._refused and self._receiving():
            self._deadline = self.callLater(
                self.limits.headerTimeout, self._requestTimedOut
            )

    def _receiving(self) -> bool:
        """
        Whether part of a request has been read and the rest is awaited.
        """
        if self.busy:
            return False
        if not self.line_mode:
            # A body announced by the head.
            return True
        # LineReceiver keeps the start of an unfinished line in _buffer.
        return bool(self._headLines or self._buffer)

    def lineReceived(self, line: bytes) -> None:
        # Called for every line of every head: kept lean.
        headBytes = self._headBytes + len(line) + self._delimiterLength
        if headBytes > self._maxHeaderBytes:
            self._refuse(HEADERS_TOO_LARGE if self._headLines else URI_TOO_LONG)
            return
        self._headBytes = headBytes
        self._headLines += 1
        HTTPChannel.lineReceived(self, line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(HEADERS_TOO_LARGE if self._headLines else URI_TOO_LONG)

    def allHeadersReceived(self) -> None:
        HTTPChannel.allHeadersReceived(self)
        # No request this server answers has a body: refuse to store a
        # large or chunked one (Twisted would spool it to a file).
        if self.length is None or self.length > self.limits.maxHeaderBytes:
            self._refuse(BODY_TOO_LARGE)

    def allContentReceived(self) -> None:
        if self._refused:
            return
        if self._deadline is not None:
            self._cancel("_deadline")
        self._headBytes = self._headLines = 0
        self.busy = True
        HTTPChannel.allContentReceived(self)

    def requestDone(self, request) -> None:
        self.busy = False
        self._lastActive = self._seconds()
        HTTPChannel.requestDone(self, request)

    def _checkIdle(self) -> None:
        self._idleCheck = None
        timeout = self.limits.idleTimeout
        idle = 0.0 if self.busy else self._seconds() - self._lastActive
        if idle >= timeout:
            self.timeoutConnection()
        else:
            self._idleCheck = self.callLater(timeout - idle, self._checkIdle)

    def _requestTimedOut(self) -> None:
        self._deadline = None
        self._log.info(
            "Request from {peer} not received within {timeout} s; closing",
            peer=str(self.transport.getPeer()),
            timeout=self.limits.headerTimeout,
        )
        self._refuse(REQUEST_TIMEOUT)

    def _refuse(self, code: errors.ErrorCode) -> None:
        if self._refused:
            return
        self._refused = True
        self._cancel("_deadline")
        self._cancel("_idleCheck")
        self.clearLineBuffer()
        self._networkProducer.unregisterProducer()
        self.transport.write(errorResponse(code))
        halfClose = getattr(self.transport, "loseWriteConnection", None)
        if halfClose is None:
            self.transport.loseConnection()
            return
        halfClose()
        self._linger = self.callLater(self.lingerTime, self._endLinger)

    def _endLinger(self) -> None:
        self._linger = None
        self.abort()

    # The connection.

    def makeConnection(self, transport) -> None:
        if not self.connections.admit(self, transport.getPeer()):
            transport.loseConnection()
            return
        self.admitted = True
        super().makeConnection(transport)
        self._lastActive = self._seconds()
        self._idleCheck = self.callLater(self.limits.idleTimeout, self._checkIdle)

    def shutdown(self) -> None:
        """
        The server is stopping: close the connection now if no response is
        in flight, else once the one in flight is sent.
        """
        if self.busy:
            self.persistent = False
        else:
            self.loseConnection()

    def abort(self) -> None:
        """
        Close the connection at once, dropping anything not yet sent.
        """
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.connections.release(self)
        for name in ("_deadline", "_linger", "_idleCheck"):
            self._cancel(name)
        super().connectionLost(reason)

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None:
            setattr(self, name, None)
            if call.active():
                call.cancel()


def _clientKey(address: IAddress) -> str | None:
    # IPv4 and IPv6 peers are counted per host; local (UNIX socket) peers
    # are all the same machine, and count only towards the total.
    return getattr(address, "host", None)


class Connections:
    """
    The open connections of a site: counted in total and per client
    address, and closed in order when the server stops.
    """

    log = Logger()

    def __init__(self, limits: Limits, clock: IReactorTime) -> None:
        self.limits = limits
        self.clock = clock
        self.open: dict[LimitedHTTPChannel, str | None] = {}
        self.perClient: dict[str, int] = {}
        self.refused = 0
        self.draining = False
        self._drained: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self.open)

    def admit(self, channel: LimitedHTTPChannel, peer: IAddress) -> bool:
        key = _clientKey(peer)
        if self.draining:
            return False
        if len(self.open) >= self.limits.maxConnections:
            return self._refuse(peer, "open connections", self.limits.maxConnections)
        if key is not None and self.perClient.get(key, 0) >= self.limits.maxConnectionsPerClient:
            return self._refuse(
                peer, "connections from one client", self.limits.maxConnectionsPerClient
            )
        if self.refused:
            self.log.info(
                "Accepting connections again; {count} refused at the limit",
                count=self.refused,
            )
            self.refused = 0
        self.open[channel] = key
        if key is not None:
            self.perClient[key] = self.perClient.get(key, 0) + 1
        return True

    def _refuse(self, peer: IAddress, what: str, limit: int) -> bool:
        # One line when the limit is first reached, one when it is left.
        if not self.refused:
            self.log.warn(
                "Limit of {limit} {what} reached: refusing {peer} and further "
                "connections over the limit",
                limit=limit,
                what=what,
                peer=str(peer),
            )
        self.refused += 1
        return False

    def release(self, channel: LimitedHTTPChannel) -> None:
        key = self.open.pop(channel, None)
        if key is not None:
            left = self.perClient[key] - 1
            if left:
                self.perClient[key] = left
            else:
                del self.perClient[key]
        if self.draining and not self.open:
            self._fireDrained()

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Refuse new connections, close the idle ones, let the responses in
        flight finish, and close whatever is still open after C{timeout}
        seconds.

        @return: a L{Deferred} that fires once no connection is open.
        """
        self.draining = True
        for channel in list(self.open):
            channel.shutdown()
        if not self.open:
            return succeed(None)
        self.log.info(
            "Stopping: waiting up to {timeout} s for {count} response(s) in "
            "flight",
            timeout=timeout,
            count=sum(channel.busy for channel in self.open),
        )
        done: Deferred[None] = Deferred()
        self._drained.append(done)
        timer = self.clock.callLater(timeout, self._closeRest)

        def cancelTimer(result):
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(cancelTimer)

    def _closeRest(self) -> None:
        self.log.warn(
            "Stopping: closing {count} connection(s) still sending after the "
            "shutdown timeout",
            count=len(self.open),
        )
        for channel in list(self.open):
            channel.abort()
        self._fireDrained()

    def _fireDrained(self) -> None:
        drained, self._drained = self._drained, []
        for done in drained:
            done.callback(None)


def raiseFileLimit(limits: Limits) -> None:
    """
    Each connection may hold a socket and an open blob: raise the soft
    limit of open files towards what C{maxConnections} needs, as far as
    the hard limit allows, and say so when that is not enough.
    """
    needed = 2 * limits.maxConnections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        _log.warn(
            "Only {soft} open files allowed; --max-connections {count} may "
            "need {needed}",
            soft=soft,
            count=limits.maxConnections,
            needed=needed,
        )

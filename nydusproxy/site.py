"""
The HTTP site: Twisted's, with an access log through C{twisted.logger}
(combined log format or JSON lines) that also records how long each request
took and the ones cut short, and the hooks that feed the metrics.
"""

from __future__ import annotations

from time import monotonic, time
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import IResource

from .accesslog import LINES, AccessLogFile, text
from .httpdate import currentDate
from .limits import Connections, Limits, LimitedHTTPChannel

# Health probes come every few seconds: they are not access-logged.
_QUIET_PATHS = frozenset({b"/healthz"})


# The first byte of a TLS handshake record, which no HTTP request starts with.
_TLS_HANDSHAKE = b"\x16"


class AccessLoggingRequest(server.Request):
    """
    Twisted's request, timed for the access log and counted into the
    metrics, and processed for a site whose root routes every path itself.
    """

    startedAt: float | None = None

    def process(self) -> None:
        self.startedAt = monotonic()
        site = self.site = self.channel.site
        metrics = getattr(site, "metrics", None)
        if metrics is not None:
            metrics.requestStarted()
        root = site.resource
        if self.path == b"*" or not getattr(root, "isLeaf", False):
            super().process()
            return
        # What server.Request.process does for a leaf root, less its costs
        # for every request: the Date formatted anew, both values
        # sanitized, and a walk (with a copy of the empty prepath) that
        # cannot go below the root.
        headers = self.responseHeaders._rawHeaders
        headers[b"Server"] = [server.version]
        headers[b"Date"] = [currentDate()]
        self.prepath = []
        self.sitepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        try:
            self.render(root)
        except BaseException:
            self.processingFailed(Failure())

    def connectionLost(self, reason) -> None:
        site = getattr(self, "site", None)
        if not self.finished and self.startedAt is not None and site is not None:
            site.logAccess(self, aborted=True)
        super().connectionLost(reason)


class BlobChannel(LimitedHTTPChannel):
    """
    Twisted's HTTP/1.1 channel with the server's limits, counted into the
    metrics, and with two costs of every request taken out: the addresses
    of both ends are asked of the transport once per connection instead of
    once per request, and the response head goes to the transport as one
    string instead of four pieces per header.
    """

    _host = None
    _peer = None
    _started = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.site.metrics is not None:
            self.site.metrics.connectionOpened()

    def connectionLost(self, reason) -> None:
        if self.admitted and self.site.metrics is not None:
            self.site.metrics.connectionClosed()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            if data[:1] == _TLS_HANDSHAKE:
                # Registry clients told not to verify TLS (skopeo, podman
                # with --tls-verify=false) try https first and fall back to
                # http only when that fails.  A handshake holds no line end
                # for the HTTP parser, so without this they would wait out
                # their handshake timeout: answer 400 and close at once.
                data = _TLS_HANDSHAKE + b"\r\n"
        LimitedHTTPChannel.dataReceived(self, data)

    def getHost(self):
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self):
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def writeHeaders(self, version, code, reason, headers) -> None:
        # Values come from a Headers object, which has sanitized them.
        lines = [b"%s %s %s\r\n" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))


class BlobSite(server.Site):
    """
    A L{server.Site} that writes one access line per request to the
    C{twisted.logger} log (twistd's log file), or none when C{accessLog} is
    false, and counts requests into C{metrics} (a L{nydusproxy.metrics.Metrics})
    when it is given.
    """

    requestFactory = AccessLoggingRequest

    def __init__(
        self,
        resource: IResource,
        accessLog: bool = True,
        accessLogFormat: str = "combined",
        metrics=None,
        limits: Limits = Limits(),
        accessLogPath: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        # The channel keeps the idle timeout (limits.LimitedHTTPChannel),
        # more cheaply than Twisted's TimeoutMixin.
        self.timeOut = None
        self.connections = Connections(limits, self.reactor)
        # HTTP/1.1 only: Twisted's default wraps the channel in a protocol
        # that can switch to HTTP/2, which this server does not offer.
        self.protocol = lambda: BlobChannel(limits, self.connections)
        self.accessLog = accessLog
        # An instance attribute: a Logger class attribute would log under
        # the class's name, whatever namespace it was given.
        self.accessLogger = Logger(namespace="nydusproxy.access", source=self)
        self.accessLogFormat = accessLogFormat
        self._line = LINES[accessLogFormat]
        self.metrics = metrics
        self.accessLogPath = accessLogPath
        self.accessFile: AccessLogFile | None = None

    def startFactory(self) -> None:
        super().startFactory()
        if self.accessLog and self.accessLogPath is not None and self.accessFile is None:
            self.accessFile = AccessLogFile(self.accessLogPath, self.reactor)
            # Open until the process ends: responses still draining after
            # the ports closed (stopFactory) log their lines too.
            self.reactor.addSystemEventTrigger("after", "shutdown", self.accessFile.close)

    def stopFactory(self) -> None:
        if self.accessFile is not None:
            self.accessFile.flush()
        super().stopFactory()

    def log(self, request) -> None:  # type: ignore[override]
        if self.accessLog or self.metrics is not None:
            self.logAccess(request, aborted=False)

    def logAccess(self, request: AccessLoggingRequest, aborted: bool) -> None:
        """
        A request has ended, answered (C{aborted} false) or cut short by
        the client leaving (C{aborted} true): count it and log it.
        """
        startedAt = request.startedAt
        duration = 0.0 if startedAt is None else monotonic() - startedAt
        if self.metrics is not None and startedAt is not None:
            self.metrics.requestEnded(request, duration, aborted)
        if not self.accessLog or request.path in _QUIET_PATHS:
            return
        address = request.getClientAddress()
        fields = {
            "time": time(),
            "client": getattr(address, "host", "-"),
            "method": text(request.method),
            "uri": text(request.uri),
            "protocol": text(request.clientproto),
            "status": request.code,
            "bytes": request.sentLength,
            "duration": duration,
            "referer": text(request.getHeader(b"referer")),
            "user_agent": text(request.getHeader(b"user-agent")),
            "aborted": aborted,
            "error": getattr(request, "ociError", None),
        }
        if self.accessFile is not None:
            self.accessFile.write(f"{self._line(fields)}\n")
        else:
            self.accessLogger.info("{access_line!s}", access_line=self._line(fields), **fields)

"""
The HTTP site: Twisted's, with an access log through C{twisted.logger}
(combined log format or JSON lines) that also records how long each request
took and the ones cut short, and the hooks that feed the metrics.
"""

from __future__ import annotations

from time import monotonic, time

from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource

from .accesslog import LINES, text

# Health probes come every few seconds: they are not access-logged.
_QUIET_PATHS = frozenset({b"/healthz"})


class AccessLoggingRequest(server.Request):
    startedAt: float | None = None

    def process(self) -> None:
        self.startedAt = monotonic()
        metrics = getattr(getattr(self.channel, "site", None), "metrics", None)
        if metrics is not None:
            metrics.requestStarted()
        super().process()

    def connectionLost(self, reason) -> None:
        site = getattr(self, "site", None)
        if not self.finished and self.startedAt is not None and site is not None:
            site.logAccess(self, aborted=True)
        super().connectionLost(reason)


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
        **kwargs,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.accessLog = accessLog
        # An instance attribute: a Logger class attribute would log under
        # the class's name, whatever namespace it was given.
        self.accessLogger = Logger(namespace="nydusproxy.access", source=self)
        self.accessLogFormat = accessLogFormat
        self._line = LINES[accessLogFormat]
        self.metrics = metrics

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        metrics = self.metrics
        if metrics is not None and protocol is not None:
            metrics.connectionOpened()
            connectionLost = protocol.connectionLost

            def countedConnectionLost(reason):
                metrics.connectionClosed()
                connectionLost(reason)

            protocol.connectionLost = countedConnectionLost
        return protocol

    def log(self, request) -> None:  # type: ignore[override]
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
        self.accessLogger.info("{access_line!s}", access_line=self._line(fields), **fields)

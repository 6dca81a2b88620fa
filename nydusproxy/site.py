"""
The HTTP site: Twisted's, with an access log through C{twisted.logger}
that also records how long each request took and the ones cut short.
"""

from __future__ import annotations

from time import monotonic

from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import IResource

_ACCESS_FORMAT = (
    '{client} "{method} {uri} {protocol}" {status} {length} {duration:.6f}'
    "{aborted}"
)


# A module-level Logger keeps its namespace; one stored as a class
# attribute takes the class's name instead.
accessLog = Logger(namespace="nydusproxy.access")


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace")


# The first byte of a TLS handshake record, which no HTTP request starts with.
_TLS_HANDSHAKE = b"\x16"


class AccessLoggingRequest(server.Request):
    startedAt: float | None = None

    def process(self) -> None:
        self.startedAt = monotonic()
        super().process()

    def connectionLost(self, reason) -> None:
        site = getattr(self, "site", None)
        if not self.finished and self.startedAt is not None and site is not None:
            site.logAccess(self, aborted=True)
        super().connectionLost(reason)


class BlobChannel(http.HTTPChannel):
    """
    Twisted's HTTP/1.1 channel, with two costs of every request taken out:
    the local address is asked of the socket once per connection instead
    of once per request, and the response head goes to the transport as
    one string instead of four pieces per header.
    """

    _host = None
    _started = False

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
        super().dataReceived(data)

    def getHost(self):
        if self._host is None:
            self._host = super().getHost()
        return self._host

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
    false.
    """

    requestFactory = AccessLoggingRequest
    # HTTP/1.1 only: Twisted's default wraps the channel in a protocol that
    # can switch to HTTP/2, which this server does not offer.
    protocol = BlobChannel

    def __init__(self, resource: IResource, accessLog: bool = True, **kwargs) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.accessLog = accessLog

    def log(self, request) -> None:  # type: ignore[override]
        self.logAccess(request, aborted=False)

    def logAccess(self, request: AccessLoggingRequest, aborted: bool) -> None:
        if not self.accessLog:
            return
        address = request.getClientAddress()
        accessLog.info(
            _ACCESS_FORMAT,
            client=getattr(address, "host", "-"),
            method=_text(request.method),
            uri=_text(request.uri),
            protocol=_text(request.clientproto),
            status=request.code,
            length=request.sentLength,
            duration=monotonic() - (request.startedAt or monotonic()),
            aborted=" aborted" if aborted else "",
        )

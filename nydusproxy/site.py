"""
The HTTP site: Twisted's, with an access log through C{twisted.logger}
that also records how long each request took and the ones cut short.
"""

from __future__ import annotations

from time import monotonic

from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource

_ACCESS_FORMAT = (
    '{client} "{method} {uri} {protocol}" {status} {length} {duration:.6f}'
    "{aborted}"
)


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace")


# The first byte of a TLS handshake record, which no HTTP request starts with.
_TLS_HANDSHAKE = b"\x16"


def _answerTLSAtOnce(protocol) -> None:
    """
    Make a connection that opens with a TLS handshake get a 400 and be
    closed at once.  Registry clients told not to verify TLS (skopeo and
    podman with C{--tls-verify=false}) try https first and fall back to
    plain http only when that fails; without this they wait out their TLS
    handshake timeout (10 seconds) on every run, since the handshake holds
    no line end for the HTTP parser to act on.
    """
    receive = protocol.dataReceived

    def firstData(data: bytes) -> None:
        del protocol.dataReceived
        if data[:1] == _TLS_HANDSHAKE:
            data = _TLS_HANDSHAKE + b"\r\n"
        receive(data)

    protocol.dataReceived = firstData


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


class BlobSite(server.Site):
    """
    A L{server.Site} that writes one access line per request to the
    C{twisted.logger} log (twistd's log file), or none when C{accessLog} is
    false.
    """

    requestFactory = AccessLoggingRequest
    accessLogger = Logger(namespace="nydusproxy.access")

    def __init__(self, resource: IResource, accessLog: bool = True, **kwargs) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.accessLog = accessLog

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            _answerTLSAtOnce(protocol)
        return protocol

    def log(self, request) -> None:  # type: ignore[override]
        self.logAccess(request, aborted=False)

    def logAccess(self, request: AccessLoggingRequest, aborted: bool) -> None:
        if not self.accessLog:
            return
        address = request.getClientAddress()
        self.accessLogger.info(
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

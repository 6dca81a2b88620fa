"""
Prometheus metrics of one site, in a registry of its own, and the resource
that serves them as text exposition at C{/metrics}.

Requests are counted when they end, in the site's access-log hook: a few
counter increments and one histogram observation a request, never work per
byte.  Gauges read plain integers when scraped.

Needs the C{prometheus_client} package (the C{metrics} extra).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from . import errors
from .site import BlobSite

# Request durations in seconds: a 4 KiB chunk on a LAN takes about a
# millisecond, a whole blob to a slow client minutes.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)

# Label values are bounded: any other method counts as OTHER.
_METHODS = {b"GET": "GET", b"HEAD": "HEAD"}
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class Metrics:
    """
    The counters of one site.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.inFlight = 0
        self.openConnections = 0
        self._requests = Counter(
            "nydusproxy_http_requests",
            "HTTP requests ended, by method and status class.",
            ["method", "status"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "nydusproxy_http_response_bytes",
            "Bytes of response bodies sent.",
            registry=self.registry,
        )
        self._aborted = Counter(
            "nydusproxy_http_requests_aborted",
            "Requests whose client left before the response ended.",
            registry=self.registry,
        )
        self._notFound = Counter(
            "nydusproxy_blob_not_found",
            "Blob requests answered 404 BLOB_UNKNOWN.",
            registry=self.registry,
        )
        self._duration = Histogram(
            "nydusproxy_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        Gauge(
            "nydusproxy_http_requests_in_flight",
            "Requests being answered now.",
            registry=self.registry,
        ).set_function(lambda: self.inFlight)
        Gauge(
            "nydusproxy_http_connections_open",
            "Client connections open now.",
            registry=self.registry,
        ).set_function(lambda: self.openConnections)
        self._children: dict[tuple[str, str], Counter] = {}

    def requestStarted(self) -> None:
        self.inFlight += 1

    def requestEnded(self, request: IRequest, duration: float, aborted: bool) -> None:
        self.inFlight -= 1
        key = (
            _METHODS.get(request.method, "OTHER"),
            _STATUS_CLASSES.get(request.code // 100, "other"),
        )
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._requests.labels(*key)
        child.inc()
        if request.sentLength:
            self._bytes.inc(request.sentLength)
        self._duration.observe(duration)
        if aborted:
            self._aborted.inc()
        if getattr(request, "ociError", None) == errors.BLOB_UNKNOWN.value:
            self._notFound.inc()

    def connectionOpened(self) -> None:
        self.openConnections += 1

    def connectionClosed(self) -> None:
        self.openConnections -= 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource:
    """
    C{GET /metrics}: the text exposition of one L{Metrics}.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return errors.writeError(request, errors.UNSUPPORTED)
        body = self.metrics.exposition()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.setHeader(b"Cache-Control", b"no-store")
        return b"" if request.method == b"HEAD" else body


class MetricsSite(Resource):
    """
    The root of the C{--metrics-listen} site: C{/metrics} and nothing else.
    """

    isLeaf = True

    def __init__(self, page: MetricsResource) -> None:
        super().__init__()
        self.page = page

    def render(self, request: IRequest) -> bytes:
        if request.postpath == [b"metrics"]:
            return self.page.render(request)
        return errors.writeError(request, errors.NAME_UNKNOWN)


def metricsSite(metrics: Metrics, reactor=None) -> BlobSite:
    """
    The site of C{--metrics-listen}: C{/metrics} of C{metrics}, and nothing
    else; its own requests are neither logged nor counted.
    """
    return BlobSite(MetricsSite(MetricsResource(metrics)), accessLog=False, reactor=reactor)

"""
--metrics: Prometheus text exposition at /metrics, counters that move with
the requests, a registry per site, and --metrics-listen for a site of its own.
"""

import sys

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nydusproxy import site as sitemodule, tap

from .support import InMemoryServer, assertErrorCode, makeBlobDir, makeOptions, parseResponses, sha256
from .test_accesslog import Clock

BLOB = bytes(range(256)) * 8192  # 2 MiB
DIGEST = "sha256:" + sha256(BLOB)
BLOB_PATH = f"/v2/sealer/blobs/{DIGEST}".encode()
MISSING_PATH = ("/v2/sealer/blobs/sha256:" + "0" * 64).encode()


def scrape(server, path=b"/metrics"):
    """
    GET the metrics page and return its samples as {(name, labels): value}.
    """
    response = server.get(path)
    assert response.status == 200, response
    assert response.header("content-type").startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def exchange(site, method, path):
    """
    One request to any site, in memory: its response.
    """
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method, path))
    protocol.connectionLost(Failure(ConnectionDone()))
    [response] = parseResponses(transport.value(), [method])
    return response


class MetricsTests(SynchronousTestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self, [BLOB])
        self.server = InMemoryServer(self.blobsdir, "--metrics")

    def test_counters(self):
        """
        Requests count by method and status class, with the body bytes
        sent, their durations, and the blobs not found.
        """
        # Every request reads the clock when it arrives and when it ends.
        self.patch(sitemodule, "monotonic", Clock(0.0, 0.002, 1.0, 1.2, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0))
        ranged = self.server.get(BLOB_PATH, range=b"bytes=0-4095")
        head = self.server.get(BLOB_PATH, method=b"HEAD")
        missing = self.server.get(MISSING_PATH)
        post = self.server.get(BLOB_PATH, method=b"POST")
        unknown = self.server.get(b"/nothing")
        self.assertEqual(
            [r.status for r in (ranged, head, missing, post, unknown)], [206, 200, 404, 405, 404]
        )
        samples = scrape(self.server)
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="GET", status="2xx"), 1)
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="HEAD", status="2xx"), 1)
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="GET", status="4xx"), 2)
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="OTHER", status="4xx"), 1)
        self.assertEqual(
            value(samples, "nydusproxy_http_response_bytes_total"),
            4096 + len(missing.body) + len(post.body) + len(unknown.body),
        )
        self.assertEqual(value(samples, "nydusproxy_blob_not_found_total"), 1)
        self.assertEqual(value(samples, "nydusproxy_http_requests_aborted_total"), 0)
        self.assertEqual(value(samples, "nydusproxy_http_request_duration_seconds_count"), 5)
        self.assertAlmostEqual(value(samples, "nydusproxy_http_request_duration_seconds_sum"), 0.202)
        self.assertEqual(
            value(samples, "nydusproxy_http_request_duration_seconds_bucket", le="0.0025"), 4
        )
        self.assertEqual(
            value(samples, "nydusproxy_http_request_duration_seconds_bucket", le="0.25"), 5
        )
        # The scrape itself is the one request in flight, on the one
        # connection open.
        self.assertEqual(value(samples, "nydusproxy_http_requests_in_flight"), 1)
        self.assertEqual(value(samples, "nydusproxy_http_connections_open"), 1)

    def test_scrapesCount(self):
        """
        A scrape is a request like any other: the next scrape counts it.
        """
        first = scrape(self.server)
        second = scrape(self.server)
        key = ("nydusproxy_http_requests_total", (("method", "GET"), ("status", "2xx")))
        self.assertNotIn(key, first)
        self.assertEqual(second[key], 1)

    def test_aborted(self):
        """
        A client that leaves mid-response counts as aborted, with the bytes
        sent so far; in-flight and open connections go back to zero.
        """
        protocol, transport = self.server.connect()
        protocol.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % (BLOB_PATH,))
        metrics = self.server.site.metrics
        self.assertEqual((metrics.inFlight, metrics.openConnections), (1, 1))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((metrics.inFlight, metrics.openConnections), (0, 0))
        samples = scrape(self.server)
        self.assertEqual(value(samples, "nydusproxy_http_requests_aborted_total"), 1)
        self.assertEqual(value(samples, "nydusproxy_http_response_bytes_total"), 1024 * 1024)
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="GET", status="2xx"), 1)

    def test_keepAliveConnection(self):
        """
        Several requests on one connection: one connection open, each
        request counted once.
        """
        responses = self.server.exchange(
            (b"HEAD", BLOB_PATH, {}), (b"GET", BLOB_PATH, {b"Range": b"bytes=0-0"}),
            (b"GET", b"/metrics", {}),
        )
        samples = {}
        for family in text_string_to_metric_families(responses[2].body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        self.assertEqual(value(samples, "nydusproxy_http_connections_open"), 1)
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="GET", status="2xx"), 1)
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="HEAD", status="2xx"), 1)
        self.assertEqual(self.server.site.metrics.openConnections, 0)

    def test_registryPerSite(self):
        """
        Each site counts into its own registry.
        """
        other = InMemoryServer(self.blobsdir, "--metrics")
        self.server.get(BLOB_PATH, method=b"HEAD")
        self.server.get(BLOB_PATH, method=b"HEAD")
        other.get(BLOB_PATH, method=b"HEAD")
        self.assertIsNot(self.server.site.metrics.registry, other.site.metrics.registry)
        self.assertEqual(value(scrape(self.server), "nydusproxy_http_requests_total", method="HEAD", status="2xx"), 2)
        self.assertEqual(value(scrape(other), "nydusproxy_http_requests_total", method="HEAD", status="2xx"), 1)

    def test_headAndOtherMethods(self):
        """
        HEAD /metrics has the headers and no body; other methods are 405.
        """
        head = self.server.get(b"/metrics", method=b"HEAD")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertGreater(int(head.header("content-length")), 0)
        assertErrorCode(self, self.server.get(b"/metrics", method=b"POST"), 405, "UNSUPPORTED")

    def test_off(self):
        """
        Without --metrics, /metrics is an unknown path and nothing counts.
        """
        server = InMemoryServer(self.blobsdir)
        assertErrorCode(self, server.get(b"/metrics"), 404, "NAME_UNKNOWN")
        self.assertIsNone(server.site.metrics)


class MetricsListenTests(SynchronousTestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self, [BLOB])

    def sites(self, *extra):
        reactor = MemoryReactorClock()
        service = tap.makeService(makeOptions(self.blobsdir, *extra), reactor=reactor)
        service.privilegedStartService()
        return {port: factory for port, factory, _, _ in reactor.tcpServers}

    def test_ownSite(self):
        """
        --metrics-listen serves /metrics on its endpoint only, with the
        blob site's counters; the blob site answers 404 there.
        """
        sites = self.sites("--listen", "tcp:8000", "--metrics-listen", "tcp:9100:interface=127.0.0.1")
        blobSite, metricsSite = sites[8000], sites[9100]
        self.assertEqual(exchange(blobSite, b"HEAD", BLOB_PATH).status, 200)
        assertErrorCode(self, exchange(blobSite, b"GET", b"/metrics"), 404, "NAME_UNKNOWN")
        response = exchange(metricsSite, b"GET", b"/metrics")
        self.assertEqual(response.status, 200)
        samples = {}
        for family in text_string_to_metric_families(response.body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="HEAD", status="2xx"), 1)
        self.assertEqual(value(samples, "nydusproxy_http_requests_total", method="GET", status="4xx"), 1)
        # Scrapes are not counted, and nothing else is served there.
        self.assertEqual(value(samples, "nydusproxy_http_requests_in_flight"), 0)
        assertErrorCode(self, exchange(metricsSite, b"GET", BLOB_PATH), 404, "NAME_UNKNOWN")
        self.assertEqual(exchange(blobSite, b"GET", b"/healthz").status, 200)

    def test_impliesMetrics(self):
        """
        --metrics-listen alone turns the metrics on.
        """
        options = makeOptions(self.blobsdir, "--metrics-listen", "tcp:9100")
        self.assertEqual((options["metrics"], options["metrics-listen"]), (1, "tcp:9100"))

    def test_badEndpoint(self):
        """
        An endpoint that does not parse stops the start with one line
        naming it.
        """
        options = makeOptions(self.blobsdir, "--metrics-listen", "nope:1")
        error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
        self.assertIn("'nope:1'", str(error))


class MissingLibraryTests(SynchronousTestCase):
    def test_startupError(self):
        """
        --metrics without prometheus_client stops the start with one line
        saying what to install.
        """
        self.addCleanup(setattr, sys, "excepthook", sys.excepthook)
        saved = {name: sys.modules.get(name) for name in ("prometheus_client", "nydusproxy.metrics")}

        def restore():
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module

        self.addCleanup(restore)
        sys.modules["prometheus_client"] = None
        sys.modules.pop("nydusproxy.metrics", None)
        options = makeOptions(makeBlobDir(self), "--metrics")
        error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
        self.assertIn("--metrics needs the prometheus_client package", str(error))
        self.assertIn("pip install 'nydus-proxy[metrics]'", str(error))
        self.assertNotIn("\n", str(error))

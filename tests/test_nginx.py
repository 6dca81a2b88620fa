"""
contrib/nginx-cache.conf, as shipped, in a real nginx in front of the
server: ranged reads are byte-exact, a slice read once is served from
nginx's cache, and error answers pass through as the server gives them.
"""

import os
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from nydusproxy import tap

from .processes import CONTRIB, freePort, need, readAll
from .support import makeBlobDir, makeOptions, sha256

SLICE = 1024 * 1024
BLOB = os.urandom(2 * SLICE + 512 * 1024)  # two slices and a half
DIGEST = "sha256:" + sha256(BLOB)
BLOB_PATH = f"/v2/library/ubuntu/blobs/{DIGEST}".encode()
MISSING_PATH = ("/v2/library/ubuntu/blobs/sha256:" + "0" * 64).encode()

MAIN_CONF = """\
daemon off;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    include {site};
}}
"""


def nginxWithSlice() -> str:
    nginx = need("nginx", "needed to test the nginx caching tier", "nginx")
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    if "--with-http_slice_module" not in built:
        from twisted.trial.unittest import SkipTest

        raise SkipTest(f"{nginx} is built without the slice module")
    return nginx


def render(conf: str, listen: int, upstream: int, cache: str) -> str:
    """
    The shipped configuration with this test's ports and cache directory;
    each replaced setting must be found exactly once.
    """
    for old, new in (
        ("listen 8080;", f"listen 127.0.0.1:{listen};"),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};"),
        ("proxy_cache_path /var/cache/nginx/nydus-proxy ", f"proxy_cache_path {cache} "),
    ):
        assert conf.count(old) == 1, f"{old!r} is not once in contrib/nginx-cache.conf"
        conf = conf.replace(old, new)
    return conf


class Exited(ProcessProtocol):
    def __init__(self):
        self.ended = Deferred()
        self.output = b""

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class NginxCacheTests(TestCase):
    def setUp(self):
        return Deferred.fromCoroutine(self.start())

    async def start(self):
        nginx = nginxWithSlice()
        blobsdir = makeBlobDir(self, [BLOB])
        # The server, in this process, on a free loopback port.
        # (--metrics for its count of requests in flight.)
        self.site = tap.buildSite(makeOptions(blobsdir, "--metrics"), reactor)
        self.upstream = []
        logAccess = self.site.logAccess

        def recordUpstream(request, aborted):
            self.upstream.append(
                (request.method, request.uri, request.getHeader(b"range"), request.code)
            )
            logAccess(request, aborted)

        self.site.logAccess = recordUpstream
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.sitePort = port.getHost().port

        # nginx, with its own prefix, configuration, pid and cache.
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(tmp, "cache"))
        self.nginxPort = freePort()
        site = os.path.join(tmp, "nydus-proxy-cache.conf")
        with open(site, "w") as f:
            f.write(render((CONTRIB / "nginx-cache.conf").read_text(), self.nginxPort,
                           port.getHost().port, os.path.join(tmp, "cache")))
        main = os.path.join(tmp, "nginx.conf")
        with open(main, "w") as f:
            # As root, nginx's workers would run as nobody, who cannot write
            # into this test's directories.
            user = "user root;" if os.getuid() == 0 else ""
            f.write(MAIN_CONF.format(tmp=tmp, site=site, user=user))
        self.nginx = Exited()
        process = reactor.spawnProcess(
            self.nginx, nginx, [nginx, "-p", tmp + "/", "-c", main, "-e", tmp + "/error.log"],
            env=None,
        )
        self.addCleanup(self.stopNginx, process)

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)
        for _ in range(200):
            if self.nginx.ended.called:
                self.fail(f"nginx did not start: {self.nginx.output!r}")
            try:
                await self.get(b"/v2/")
                break
            except ConnectionRefusedError:
                await deferLater(reactor, 0.05)
        else:
            self.fail("nginx did not start listening")
        await self.settled()
        self.upstream.clear()

    async def stopNginx(self, process):
        if not self.nginx.ended.called:
            process.signalProcess("TERM")
        reason = await self.nginx.ended
        self.assertIsInstance(reason, (ProcessDone, ProcessTerminated))

    async def get(self, path, method=b"GET", range=None):
        headers = Headers({b"Range": [range]} if range else {})
        url = b"http://127.0.0.1:%d%s" % (self.nginxPort, path)
        response = await self.agent.request(method, url, headers)
        body = await readAll(response)
        return response, body

    async def settled(self):
        """
        Wait for the server to end the requests nginx made: nginx passes a
        slice on to its client while still receiving it.
        """
        for _ in range(200):
            if self.site.metrics.inFlight == 0:
                return
            await deferLater(reactor, 0.05)
        self.fail("the server's requests did not end")

    def header(self, response, name):
        values = response.headers.getRawHeaders(name)
        return values[-1].decode() if values else None

    async def test_rangedReadsAreExact(self):
        """
        Closed, open-ended and suffix ranges, within one slice and across
        slices, and the whole blob, are the blob's bytes; HEAD gives the
        blob's size, as nydusd needs.
        """
        size = len(BLOB)
        for range, first, last in (
            (b"bytes=0-4095", 0, 4095),
            (b"bytes=1048000-1049999", 1048000, 1049999),  # across two slices
            (b"bytes=100-2200000", 100, 2200000),  # three slices
            (b"bytes=2097252-", 2097252, size - 1),
            (b"bytes=-500", size - 500, size - 1),
            (b"bytes=2621000-9999999", 2621000, size - 1),  # clipped
        ):
            response, body = await self.get(BLOB_PATH, range=range)
            self.assertEqual(response.code, 206, range)
            self.assertEqual(body, BLOB[first:last + 1], range)
            self.assertEqual(self.header(response, b"content-range"), f"bytes {first}-{last}/{size}")
        response, body = await self.get(BLOB_PATH)
        self.assertEqual((response.code, len(body), body == BLOB), (200, size, True))
        self.assertEqual(self.header(response, b"docker-content-digest"), DIGEST)
        response, body = await self.get(BLOB_PATH, method=b"HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(self.header(response, b"content-length"), str(size))
        # nginx asked the server for whole 1 MiB slices only.
        await self.settled()
        ranges = {r for _, _, r, _ in self.upstream}
        self.assertEqual(
            ranges, {b"bytes=0-1048575", b"bytes=1048576-2097151", b"bytes=2097152-3145727"}
        )

    async def test_secondReadFromCache(self):
        """
        A slice read once is not asked of the server again, whichever part
        of it the next reads want.
        """
        response, body = await self.get(BLOB_PATH, range=b"bytes=4096-8191")
        self.assertEqual((response.code, body), (206, BLOB[4096:8192]))
        self.assertEqual(self.header(response, b"x-cache-status"), "MISS")
        await self.settled()
        self.assertEqual(
            self.upstream, [(b"GET", BLOB_PATH, b"bytes=0-1048575", 206)]
        )
        for range, first, last in ((b"bytes=4096-8191", 4096, 8191), (b"bytes=0-99", 0, 99),
                                   (b"bytes=1000000-1048575", 1000000, 1048575)):
            response, body = await self.get(BLOB_PATH, range=range)
            self.assertEqual((response.code, body), (206, BLOB[first:last + 1]))
            self.assertEqual(self.header(response, b"x-cache-status"), "HIT")
        await self.settled()
        self.assertEqual(len(self.upstream), 1)

    async def assertPassesThrough(self, path, range, status):
        """
        The answer through nginx has the server's status, Content-Type,
        Content-Range and body.
        """
        direct = await self.agent.request(
            b"GET", b"http://127.0.0.1:%d%s" % (self.sitePort, path),
            Headers({b"Range": [range]} if range else {}),
        )
        directBody = await readAll(direct)
        response, body = await self.get(path, range=range)
        self.assertEqual((direct.code, response.code), (status, status))
        for name in (b"content-type", b"content-range"):
            self.assertEqual(self.header(response, name), self.header(direct, name), name)
        self.assertEqual(body, directBody)
        return response, body

    async def test_notFound(self):
        """
        404 BLOB_UNKNOWN passes through, and is not cached.
        """
        response, body = await self.assertPassesThrough(MISSING_PATH, b"bytes=0-9", 404)
        self.assertIn(b'"code":"BLOB_UNKNOWN"', body)
        await self.settled()
        self.upstream.clear()
        await self.get(MISSING_PATH, range=b"bytes=0-9")
        await self.settled()
        self.assertEqual([code for _, _, _, code in self.upstream], [404])

    async def test_rangeNotSatisfiable(self):
        """
        416 RANGE_INVALID with Content-Range: bytes */size, whether the
        range starts past the last slice (the server's answer) or inside it
        (nginx's own refusal, answered by the configuration alike).
        """
        size = len(BLOB)
        for range in (b"bytes=%d-" % (4 * SLICE,), b"bytes=%d-" % (size,),
                      b"bytes=%d-%d" % (size + 10, size + 20)):
            response, body = await self.assertPassesThrough(BLOB_PATH, range, 416)
            self.assertEqual(self.header(response, b"content-range"), f"bytes */{size}")
            self.assertEqual(
                body,
                b'{"errors":[{"code":"RANGE_INVALID","message":"requested range not '
                b'satisfiable","detail":{"size":%d}}]}' % (size,),
            )

    async def test_otherRoutes(self):
        """
        /v2/ and /healthz pass through uncached.
        """
        for path in (b"/v2/", b"/healthz", b"/healthz"):
            response, body = await self.get(path)
            self.assertEqual(response.code, 200)
            self.assertIsNone(self.header(response, b"x-cache-status"))
        await self.settled()
        self.assertEqual([uri for _, uri, _, _ in self.upstream], [b"/v2/", b"/healthz", b"/healthz"])

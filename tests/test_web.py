"""
Routes and responses, on the wire of a real Site kept in memory, and with
DummyRequest where the routing alone is tested.
"""

import os
import re

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from nydusproxy import tap

from .support import (
    FIXTURE_BLOBS,
    InMemoryServer,
    assertErrorCode,
    copyFixtureBlobs,
    makeBlobDir,
    makeOptions,
    parseResponses,
    sha256,
)

BLOB = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes
HEX = sha256(BLOB)
DIGEST = "sha256:" + HEX


def path(name: str, reference: str) -> bytes:
    return f"/v2/{name}/blobs/{reference}".encode()


class BlobResponseTests(SynchronousTestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self, [BLOB])
        self.server = InMemoryServer(self.blobsdir)

    def test_head(self):
        """
        HEAD answers 200 with the blob's size in Content-Length, the
        registry headers, and no body.
        """
        response = self.server.get(path("library/ubuntu", DIGEST), method=b"HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), str(len(BLOB)))
        self.assertEqual(response.header("docker-content-digest"), DIGEST)
        self.assertEqual(response.header("content-type"), "application/octet-stream")
        self.assertEqual(response.header("accept-ranges"), "bytes")
        self.assertEqual(response.header("etag"), f'"{DIGEST}"')
        self.assertEqual(response.header("docker-distribution-api-version"), "registry/2.0")
        self.assertEqual(response.body, b"")

    def test_eachHeaderOnce(self):
        """
        Every answer names each header once, in Twisted's canonical case
        (some are stored as made, past Headers' own spelling of names).
        """
        answers = [
            self.server.get(path("a", DIGEST), method=b"HEAD"),
            self.server.get(path("a", DIGEST)),
            self.server.get(path("a", DIGEST), range=b"bytes=0-9"),
            self.server.get(path("a", DIGEST), range=b"bytes=9999999-"),
            self.server.get(path("a", DIGEST), if_none_match=f'"{DIGEST}"'.encode()),
            self.server.get(path("a", "sha256:" + "0" * 64)),
        ]
        self.assertEqual([a.status for a in answers], [200, 200, 206, 416, 304, 404])
        for answer in answers:
            names = [line.split(b":")[0] for line in answer.raw.split(b"\r\n")[1:] if line]
            self.assertEqual(len(names), len(set(names)), names)
            self.assertIn(b"Docker-Distribution-Api-Version", names)
            self.assertIn(b"Date", names)
            if answer.status != 404:
                self.assertIn(b"ETag", names)
                self.assertIn(b"Docker-Content-Digest", names)

    def test_headIgnoresRange(self):
        """
        HEAD with a Range still answers 200 with the full size, which is
        what nydusd reads as the blob size.
        """
        response = self.server.get(path("a", DIGEST), method=b"HEAD", range=b"bytes=0-9")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), str(len(BLOB)))
        self.assertIsNone(response.header("content-range"))

    def test_getWhole(self):
        """
        GET without a Range answers the whole blob.
        """
        response = self.server.get(path("a/b/c", DIGEST))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), str(len(BLOB)))
        self.assertEqual(response.body, BLOB)

    def test_closedRange(self):
        """
        A closed range answers 206 with exactly that slice and a
        Content-Range naming the blob's size.
        """
        response = self.server.get(path("sealer", DIGEST), range=b"bytes=4096-8191")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.header("content-range"), f"bytes 4096-8191/{len(BLOB)}")
        self.assertEqual(response.header("content-length"), "4096")
        self.assertEqual(response.body, BLOB[4096:8192])

    def test_lastByteClipped(self):
        """
        A last byte past the end is clipped to the end.
        """
        response = self.server.get(path("a", DIGEST), range=b"bytes=1048570-2000000")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.header("content-range"), f"bytes 1048570-1048579/{len(BLOB)}")
        self.assertEqual(response.body, BLOB[1048570:])

    def test_openEndedRange(self):
        """
        C{bytes=N-} answers from N to the end.
        """
        response = self.server.get(path("a", DIGEST), range=b"bytes=1000-")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.body, BLOB[1000:])

    def test_suffixRange(self):
        """
        C{bytes=-N} answers the last N bytes.
        """
        response = self.server.get(path("a", DIGEST), range=b"bytes=-100")
        self.assertEqual(response.status, 206)
        self.assertEqual(
            response.header("content-range"), f"bytes {len(BLOB) - 100}-{len(BLOB) - 1}/{len(BLOB)}"
        )
        self.assertEqual(response.body, BLOB[-100:])

    def test_suffixLongerThanBlob(self):
        """
        A suffix longer than the blob answers the whole blob as one range,
        where static.File answers 500.
        """
        response = self.server.get(path("a", DIGEST), range=b"bytes=-99999999")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.header("content-range"), f"bytes 0-{len(BLOB) - 1}/{len(BLOB)}")
        self.assertEqual(response.body, BLOB)

    def test_unsatisfiable(self):
        """
        A range past the end answers 416 with C{Content-Range: bytes */size}
        and a RANGE_INVALID body.
        """
        response = self.server.get(path("a", DIGEST), range=b"bytes=2000000-")
        assertErrorCode(self, response, 416, "RANGE_INVALID")
        self.assertEqual(response.header("content-range"), f"bytes */{len(BLOB)}")

    def test_malformedRangeIgnored(self):
        """
        A Range header that does not parse is ignored: 200, whole blob.
        """
        for header in (b"bytes=9-1", b"lines=1-2", b"bytes=x"):
            response = self.server.get(path("a", DIGEST), range=header)
            self.assertEqual(response.status, 200, header)
            self.assertEqual(response.body, BLOB, header)

    def test_severalRanges(self):
        """
        Several ranges answer 206 multipart/byteranges, each part with its
        Content-Range and exactly its slice.
        """
        response = self.server.get(path("a", DIGEST), range=b"bytes=0-9,100-199,-5")
        self.assertEqual(response.status, 206)
        contentType = response.header("content-type")
        boundary = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", contentType).group(1)
        parts = response.body.split(b"--" + boundary.encode())
        self.assertEqual(parts[0], b"\r\n")
        self.assertEqual(parts[-1], b"--\r\n")
        expected = [(0, 9), (100, 199), (len(BLOB) - 5, len(BLOB) - 1)]
        self.assertEqual(len(parts[1:-1]), len(expected))
        for part, (first, last) in zip(parts[1:-1], expected):
            head, _, body = part.partition(b"\r\n\r\n")
            self.assertIn(b"Content-Range: bytes %d-%d/%d" % (first, last, len(BLOB)), head)
            self.assertEqual(body, BLOB[first : last + 1] + b"\r\n")

    def test_tooManyRanges(self):
        """
        More ranges than --max-ranges answer 200 with the whole blob.
        """
        server = InMemoryServer(self.blobsdir, "--max-ranges", "2")
        response = server.get(path("a", DIGEST), range=b"bytes=0-1,5-6,9-10")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, BLOB)

    def test_keepAlive(self):
        """
        Several requests on one connection each get their own exact answer,
        as nydusd's connection pool sends them.
        """
        responses = self.server.exchange(
            (b"HEAD", path("a", DIGEST), {}),
            (b"GET", path("a", DIGEST), {b"Range": b"bytes=0-1048575"}),
            (b"GET", path("a", DIGEST), {b"Range": b"bytes=1048576-1048579"}),
            (b"GET", path("a", DIGEST), {b"Range": b"bytes=10-"}),
        )
        self.assertEqual([r.status for r in responses], [200, 206, 206, 206])
        self.assertEqual(responses[1].body + responses[2].body, BLOB)
        self.assertEqual(responses[3].body, BLOB[10:])

    def test_missing(self):
        """
        An unknown blob is 404 BLOB_UNKNOWN with the digest as detail; HEAD
        gets the status and no body.
        """
        other = "sha256:" + "0" * 64
        error = assertErrorCode(self, self.server.get(path("a", other)), 404, "BLOB_UNKNOWN")
        self.assertEqual(error["detail"], {"digest": other})
        head = self.server.get(path("a", other), method=b"HEAD")
        self.assertEqual(head.status, 404)
        self.assertEqual(head.body, b"")

    def test_bareId(self):
        """
        nydusd's http-proxy backend asks for the bare 64-hex id, with or
        without /v2.
        """
        for url in (f"/v2/ns/repo/blobs/{HEX}", f"/ns/repo/blobs/{HEX}"):
            response = self.server.get(url.encode(), range=b"bytes=0-3")
            self.assertEqual(response.status, 206, url)
            self.assertEqual(response.body, BLOB[:4], url)
            self.assertEqual(response.header("docker-content-digest"), DIGEST)

    def test_upstreamForm(self):
        """
        The upstream proxy's C{/<namespace>/<repo>/blobs/<digest>} serves
        the blob too.
        """
        response = self.server.get(f"/ns/repo/blobs/{DIGEST}".encode())
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, BLOB)

    def test_queryIgnored(self):
        """
        A query string does not change which blob is served.
        """
        response = self.server.get(path("a", DIGEST) + b"?x=1", range=b"bytes=0-0")
        self.assertEqual(response.body, BLOB[:1])


class EdgeBlobTests(SynchronousTestCase):
    def test_emptyBlob(self):
        """
        A 0-byte blob answers 200 with Content-Length 0, and any range of
        it 416 with C{bytes */0}.
        """
        server = InMemoryServer(makeBlobDir(self, [b""]))
        digest = "sha256:" + sha256(b"")
        response = server.get(path("a", digest))
        self.assertEqual((response.status, response.header("content-length")), (200, "0"))
        self.assertEqual(response.body, b"")
        for header in (b"bytes=0-", b"bytes=-1", b"bytes=0-0"):
            ranged = server.get(path("a", digest), range=header)
            assertErrorCode(self, ranged, 416, "RANGE_INVALID")
            self.assertEqual(ranged.header("content-range"), "bytes */0")

    def test_fixtureNotNamedBySha256(self):
        """
        A blob is served by name: the fixture whose name is not the sha256
        of its bytes is served as it is.
        """
        blobsdir = copyFixtureBlobs(self)
        server = InMemoryServer(blobsdir)
        name = FIXTURE_BLOBS[2]
        with open(os.path.join(blobsdir, name), "rb") as f:
            data = f.read()
        self.assertNotEqual(sha256(data), name)
        response = server.get(path("sealer", "sha256:" + name))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, data)
        ranged = server.get(path("sealer", "sha256:" + name), range=b"bytes=1024-5119")
        self.assertEqual(ranged.body, data[1024:5120])

    def test_ociLayout(self):
        """
        A blob at C{DIR/blobs/sha256/<hex>}, as in an OCI image layout, is
        served; so is a sha512 one.
        """
        blobsdir = makeBlobDir(self)
        data512 = b"five-twelve"
        import hashlib

        hex512 = hashlib.sha512(data512).hexdigest()
        for algorithm, hexdigest, data in (("sha256", HEX, BLOB), ("sha512", hex512, data512)):
            os.makedirs(os.path.join(blobsdir, "blobs", algorithm))
            with open(os.path.join(blobsdir, "blobs", algorithm, hexdigest), "wb") as f:
                f.write(data)
        server = InMemoryServer(blobsdir)
        self.assertEqual(server.get(path("a", DIGEST)).body, BLOB)
        self.assertEqual(server.get(path("a", "sha512:" + hex512)).body, data512)

    def test_truncatedBeforeStart(self):
        """
        A blob truncated to 0 bytes after the size was taken cannot be
        tested here; see the producer tests.  A blob changed between
        requests answers its new size at once.
        """
        blobsdir = makeBlobDir(self, [BLOB])
        server = InMemoryServer(blobsdir)
        with open(os.path.join(blobsdir, HEX), "r+b") as f:
            f.truncate(10)
        response = server.get(path("a", DIGEST), method=b"HEAD")
        self.assertEqual(response.header("content-length"), "10")


class SmallBodyTests(SynchronousTestCase):
    def test_shorterThanItsSize(self):
        """
        A small body that turns out shorter than the size just taken (the
        blob was truncated in between) is not answered with fewer bytes
        than promised: the connection is closed, and a warning logged.
        """
        blobsdir = makeBlobDir(self, [BLOB])
        server = InMemoryServer(blobsdir)
        store = server.site.resource.blobs.store
        original = store.open

        def grownStat(algorithm, hexdigest):
            fd, status = original(algorithm, hexdigest)
            os.truncate(os.path.join(blobsdir, HEX), 100)
            return fd, status

        store.open = grownStat
        protocol, transport = server.connect()
        protocol.dataReceived(b"GET " + path("a", DIGEST) + b" HTTP/1.1\r\nHost: x\r\n"
                              b"Range: bytes=0-4095\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)


class RouteTests(SynchronousTestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self, [BLOB])
        self.server = InMemoryServer(self.blobsdir)

    def test_versionCheck(self):
        """
        C{/v2/} (and C{/v2}) answers 200, C{{}}, and the API version header.
        """
        for url in (b"/v2/", b"/v2"):
            response = self.server.get(url)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.body, b"{}")
            self.assertEqual(response.header("content-type"), "application/json")
            self.assertEqual(response.header("docker-distribution-api-version"), "registry/2.0")
        head = self.server.get(b"/v2/", method=b"HEAD")
        self.assertEqual((head.status, head.header("content-length"), head.body), (200, "2", b""))

    def test_invalidDigests(self):
        """
        Anything but C{sha256:} + 64 lowercase hex, C{sha512:} + 128, or a
        bare 64-hex id is 400 DIGEST_INVALID.
        """
        for reference in (
            "sha256:" + HEX.upper(),
            "sha256:" + HEX[:-1],
            "sha256:" + HEX + "0",
            "sha512:" + HEX,
            "md5:" + HEX[:32],
            "SHA256:" + HEX,
            HEX[:-1],
            "sha256:" + HEX[:-2] + "%00",
            "sha256:..",
            "..",
            "latest",
            "",
        ):
            response = self.server.get(path("a", reference))
            assertErrorCode(self, response, 400, "DIGEST_INVALID")

    def test_invalidNames(self):
        """
        A name that breaks the OCI grammar is 400 NAME_INVALID: upper case,
        dot segments, percent-encoded separators, empty components.
        """
        for name in (
            "Library/ubuntu",
            "a/../b",
            "..",
            ".",
            "a/./b",
            "a%2Fb",
            "a%2F..%2Fb",
            "a//b",
            "-a",
            "a_",
            "a___b",
            "a" * 256,
        ):
            response = self.server.get(path(name, DIGEST))
            assertErrorCode(self, response, 400, "NAME_INVALID")

    def test_checkedPathsCacheBounded(self):
        """
        The cache of checked blob paths holds answers for paths of bounded
        length only, and a cached answer is the same as the first: asked
        again, an invalid name or digest is refused again and a valid one
        served again.
        """
        from nydusproxy.web import _blobReference

        _blobReference.cache_clear()
        for reference in ("sha256:" + "a" * 5000, "sha256:" + HEX):
            response = self.server.get(path("a" * 300, reference))
            assertErrorCode(self, response, 400, "NAME_INVALID")
        response = self.server.get(path("a", "sha256:" + "a" * 5000))
        assertErrorCode(self, response, 400, "DIGEST_INVALID")
        self.assertEqual(_blobReference.cache_info().currsize, 0)
        for _ in range(2):
            assertErrorCode(self, self.server.get(path("A", DIGEST)), 400, "NAME_INVALID")
            assertErrorCode(self, self.server.get(path("a", "sha256:0")), 400, "DIGEST_INVALID")
            self.assertEqual(self.server.get(path("a", DIGEST)).body, BLOB)
        info = _blobReference.cache_info()
        self.assertEqual((info.currsize, info.hits), (3, 3))

    def test_validNames(self):
        """
        Names of the OCI grammar are accepted, up to 255 characters.
        """
        for name in ("a", "library/ubuntu", "a/b/c", "my-repo.x__y", "a--b", "x" * 255):
            response = self.server.get(path(name, DIGEST), method=b"HEAD")
            self.assertEqual(response.status, 200, name)

    def test_unknownRoutes(self):
        """
        Other paths are 404 with a JSON error, never a listing or HTML.
        """
        for url in (b"/", b"/" + HEX.encode(), b"/v2/a/tags/list", b"/blobs/" + HEX.encode(),
                    b"/v2/blobs/" + DIGEST.encode(), b"/favicon.ico",
                    b"/v2/a/blobs/" + DIGEST.encode() + b"/"):
            response = self.server.get(url)
            self.assertEqual(response.status, 404, url)
            self.assertEqual(response.header("content-type"), "application/json", url)
        assertErrorCode(self, self.server.get(b"/v2/a/manifests/latest"), 404, "MANIFEST_UNKNOWN")

    def test_otherMethods(self):
        """
        Methods other than GET and HEAD on a blob or under /v2/ are 405
        UNSUPPORTED with C{Allow: GET, HEAD}, and change nothing.
        """
        before = sorted(os.listdir(self.blobsdir))
        for method, url in (
            (b"PUT", path("a", DIGEST)),
            (b"DELETE", path("a", DIGEST)),
            (b"POST", path("a", DIGEST)),
            (b"DELETE", f"/ns/repo/blobs/{DIGEST}".encode()),
            (b"POST", b"/v2/a/blobs/uploads/"),
            (b"PATCH", b"/v2/a/blobs/uploads/x"),
            (b"PUT", b"/v2/a/manifests/latest"),
            (b"OPTIONS", b"/v2/"),
        ):
            response = self.server.get(url, method=method)
            assertErrorCode(self, response, 405, "UNSUPPORTED")
            self.assertEqual(response.header("allow"), "GET, HEAD")
        self.assertEqual(sorted(os.listdir(self.blobsdir)), before)
        self.assertEqual(self.server.get(path("a", DIGEST)).body, BLOB)

    def test_notRegularFiles(self):
        """
        A directory, a FIFO, or a link leading outside the blob directory
        is not a blob: 404.  A link inside it is served.
        """
        outside = makeBlobDir(self, [b"secret"])
        names = {
            "dir": "1" * 64,
            "fifo": "2" * 64,
            "outside": "3" * 64,
            "inside": "4" * 64,
            "loop": "5" * 64,
            "dangling": "6" * 64,
        }
        os.mkdir(os.path.join(self.blobsdir, names["dir"]))
        os.mkfifo(os.path.join(self.blobsdir, names["fifo"]))
        os.symlink(os.path.join(outside, sha256(b"secret")), os.path.join(self.blobsdir, names["outside"]))
        os.symlink(HEX, os.path.join(self.blobsdir, names["inside"]))
        os.symlink(names["loop"], os.path.join(self.blobsdir, names["loop"]))
        os.symlink("nowhere", os.path.join(self.blobsdir, names["dangling"]))
        for kind in ("dir", "fifo", "outside", "loop", "dangling"):
            response = self.server.get(path("a", "sha256:" + names[kind]))
            assertErrorCode(self, response, 404, "BLOB_UNKNOWN")
        self.assertEqual(self.server.get(path("a", "sha256:" + names["inside"])).body, BLOB)

    def test_layoutDirectoryLinkOutside(self):
        """
        C{DIR/blobs} linked to a directory outside the blob directory is not
        followed.
        """
        outside = makeBlobDir(self)
        os.makedirs(os.path.join(outside, "sha256"))
        with open(os.path.join(outside, "sha256", "7" * 64), "wb") as f:
            f.write(b"secret")
        os.symlink(outside, os.path.join(self.blobsdir, "blobs"))
        response = self.server.get(path("a", "sha256:" + "7" * 64))
        assertErrorCode(self, response, 404, "BLOB_UNKNOWN")

    def test_unreadableBlob(self):
        """
        A blob that cannot be opened for lack of permission is 403 DENIED.
        """
        if os.getuid() == 0:
            self.skipTest("root reads every file; see test_openFailure")
        os.chmod(os.path.join(self.blobsdir, HEX), 0)
        assertErrorCode(self, self.server.get(path("a", DIGEST)), 403, "DENIED")

    def test_permissionDenied(self):
        """
        A PermissionError from the store is 403 DENIED (whoever runs the
        tests), and the next request is served.
        """
        store = self.server.site.resource.blobs.store
        original = store.open

        def denied(algorithm, hexdigest):
            raise PermissionError(13, "Permission denied")

        store.open = denied
        assertErrorCode(self, self.server.get(path("a", DIGEST)), 403, "DENIED")
        store.open = original
        self.assertEqual(self.server.get(path("a", DIGEST)).status, 200)

    def test_openFailure(self):
        """
        An unexpected error is logged and answered 500 UNKNOWN in JSON, with
        no traceback to the client; the next request is served.
        """
        store = self.server.site.resource.blobs.store
        original = store.open

        def broken(algorithm, hexdigest):
            raise OSError(5, "Input/output error")

        store.open = broken
        response = self.server.get(path("a", DIGEST))
        assertErrorCode(self, response, 500, "UNKNOWN")
        self.assertNotIn(b"Traceback", response.body)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        store.open = original
        self.assertEqual(self.server.get(path("a", DIGEST)).status, 200)


class DummyRequestTests(SynchronousTestCase):
    """
    Routing through C{getChildForRequest} and C{render}, as twisted.web's
    own tests do it.
    """

    def setUp(self):
        self.root = tap.buildSite(makeOptions(makeBlobDir(self, [BLOB]))).resource

    def render(self, postpath, method=b"GET"):
        request = DummyRequest(postpath)
        request.method = method
        resource = getChildForRequest(self.root, request)
        request.render(resource)
        return request

    def test_leafRoutesEverything(self):
        """
        The root is a leaf: every path reaches it whole.
        """
        request = DummyRequest([b"v2", b"a", b"b", b"blobs", DIGEST.encode()])
        self.assertIs(getChildForRequest(self.root, request), self.root)
        self.assertEqual(request.postpath, [b"v2", b"a", b"b", b"blobs", DIGEST.encode()])

    def test_headWritesNothing(self):
        """
        A HEAD on a blob sets the size and writes no body.
        """
        request = self.render([b"v2", b"a", b"blobs", DIGEST.encode()], b"HEAD")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"%d" % len(BLOB)])
        self.assertEqual(b"".join(request.written), b"")

    def test_getStreamsWholeBlob(self):
        """
        A GET streams the whole blob through the producer and finishes.
        """
        request = self.render([b"v2", b"a", b"blobs", DIGEST.encode()])
        self.assertEqual(b"".join(request.written), BLOB)
        self.assertEqual(request.finished, 1)

    def test_errorBody(self):
        """
        An unknown route renders a JSON error body.
        """
        request = self.render([b"nothing"])
        self.assertEqual(request.responseCode, 404)
        self.assertIn(b'"code":"NAME_UNKNOWN"', b"".join(request.written))


class ConditionalTests(SynchronousTestCase):
    """
    Caching headers and conditional requests (RFC 9110, section 13).
    """

    def setUp(self):
        blobsdir = makeBlobDir(self, [BLOB])
        self.modified = 1_700_000_000
        os.utime(os.path.join(blobsdir, HEX), (self.modified, self.modified))
        self.server = InMemoryServer(blobsdir)
        self.lastModified = "Tue, 14 Nov 2023 22:13:20 GMT"
        self.etag = f'"{DIGEST}"'

    def test_cachingHeaders(self):
        """
        A blob is immutable: strong ETag, a year of Cache-Control, and its
        file's modification time as Last-Modified.
        """
        for method in (b"GET", b"HEAD"):
            response = self.server.get(path("a", DIGEST), method=method)
            self.assertEqual(response.header("etag"), self.etag)
            self.assertEqual(response.header("cache-control"), "public, max-age=31536000, immutable")
            self.assertEqual(response.header("last-modified"), self.lastModified)

    def test_ifNoneMatch(self):
        """
        A matching If-None-Match is 304 with no body, on GET and HEAD; a
        weak tag, a list, and C{*} match; another tag does not.
        """
        for value in (self.etag, f"W/{self.etag}", f'"other", {self.etag}', "*"):
            for method in (b"GET", b"HEAD"):
                response = self.server.get(path("a", DIGEST), method=method,
                                           if_none_match=value.encode())
                self.assertEqual(response.status, 304, value)
                self.assertEqual(response.body, b"")
                self.assertEqual(response.header("etag"), self.etag)
                self.assertIsNone(response.header("content-length"))
                self.assertIsNone(response.header("content-type"))
        response = self.server.get(path("a", DIGEST), if_none_match=b'"sha256:other"')
        self.assertEqual((response.status, response.body), (200, BLOB))

    def test_ifNoneMatchBeatsIfModifiedSince(self):
        """
        With If-None-Match, If-Modified-Since is not looked at.
        """
        response = self.server.get(path("a", DIGEST), if_none_match=b'"x"',
                                   if_modified_since=self.lastModified.encode())
        self.assertEqual(response.status, 200)

    def test_ifModifiedSince(self):
        """
        If-Modified-Since at or after the blob's time is 304; before, or
        not a date, the blob.
        """
        later = b"Wed, 15 Nov 2023 00:00:00 GMT"
        earlier = b"Mon, 13 Nov 2023 00:00:00 GMT"
        cases = [(self.lastModified.encode(), 304), (later, 304), (earlier, 200),
                 (b"yesterday", 200), (b"", 200), (b"Sun, 99 Foo 2023 00:00:00 GMT", 200)]
        for value, status in cases:
            response = self.server.get(path("a", DIGEST), if_modified_since=value)
            self.assertEqual(response.status, status, value)

    def test_ifRange(self):
        """
        If-Range with this blob's ETag or exact date lets the Range apply
        (206); anything else gives the whole blob (200).
        """
        cases = [
            (self.etag.encode(), 206),
            (self.lastModified.encode(), 206),
            (b'"sha256:other"', 200),
            (b"W/" + self.etag.encode(), 200),
            (b"Mon, 13 Nov 2023 00:00:00 GMT", 200),
            (b"garbage", 200),
        ]
        for value, status in cases:
            response = self.server.get(path("a", DIGEST), range=b"bytes=0-9", if_range=value)
            self.assertEqual(response.status, status, value)
            self.assertEqual(response.body, BLOB[:10] if status == 206 else BLOB)


class ResponseHeadTests(SynchronousTestCase):
    """
    What every response carries, whatever answers it, and requests that
    never reach the router.
    """

    def setUp(self):
        self.server = InMemoryServer(makeBlobDir(self, [BLOB]))

    def test_serverAndDate(self):
        """
        Blob answers, errors and the version check carry Server (Twisted's)
        and Date, the time of the answer to the second.
        """
        from email.utils import parsedate_to_datetime
        from time import time

        from twisted.web.server import version

        for response in (
            self.server.get(path("a", DIGEST), range=b"bytes=0-9"),
            self.server.get(path("a", "sha256:" + "0" * 64)),
            self.server.get(b"/v2/"),
        ):
            self.assertEqual(response.header("server"), version.decode())
            self.assertEqual(len(response.headers["date"]), 1)
            sent = parsedate_to_datetime(response.header("date")).timestamp()
            self.assertLessEqual(abs(sent - time()), 2)

    def test_dateFormattedOnceASecond(self):
        """
        The Date value is made once a second, and is the RFC 9110 date of
        that second.
        """
        from nydusproxy.httpdate import HTTPDate

        now = [784111777.25]
        date = HTTPDate(lambda: now[0])
        first = date()
        self.assertEqual(first, b"Sun, 06 Nov 1994 08:49:37 GMT")
        now[0] = 784111777.99
        self.assertIs(date(), first)
        now[0] = 784111778.0
        self.assertEqual(date(), b"Sun, 06 Nov 1994 08:49:38 GMT")

    def test_asterisk(self):
        """
        C{OPTIONS *} is answered 200 with no body, and another method on
        C{*} 405 allowing OPTIONS, as Twisted answers them.
        """
        [options, get] = self.server.exchange((b"OPTIONS", b"*", {}), (b"GET", b"*", {}))
        self.assertEqual((options.status, options.header("content-length")), (200, "0"))
        self.assertEqual((get.status, get.header("allow")), (405, "OPTIONS"))

    def test_rootWithChildren(self):
        """
        A site whose root is not a leaf still walks the tree to the
        resource, as Twisted does.
        """
        from twisted.internet.testing import MemoryReactorClock, StringTransport
        from twisted.web.resource import Resource
        from twisted.web.static import Data

        from nydusproxy.site import BlobSite

        root = Resource()
        root.putChild(b"child", Data(b"hello", "text/plain"))
        site = BlobSite(root, accessLog=False, reactor=MemoryReactorClock())
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /child HTTP/1.1\r\nHost: x\r\n\r\n")
        [response] = parseResponses(transport.value(), [b"GET"])
        self.assertEqual((response.status, response.body), (200, b"hello"))

    def test_addressesAskedOncePerConnection(self):
        """
        The channel asks the transport for the addresses of both ends once
        per connection, not once per request.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        asked = []

        class CountingTransport(StringTransport):
            def getPeer(self):
                asked.append("peer")
                return super().getPeer()

            def getHost(self):
                asked.append("host")
                return super().getHost()

        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        protocol = self.server.site.buildProtocol(peer)
        transport = CountingTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        afterOne = sorted(asked)
        for _ in range(3):
            protocol.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 4)
        self.assertIn("peer", afterOne)
        self.assertIn("host", afterOne)
        self.assertEqual(sorted(asked), afterOne)
        self.assertEqual(protocol.getPeer(), peer)

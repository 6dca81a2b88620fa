"""
The HTTP face of the blob directory: one leaf resource that routes every
path, and the blob responses it hands out.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from . import errors, grammar
from .conditional import notModified, rangeApplies
from .httpdate import lastModified
from .producer import FileProducer, Part, SendfileProducer, sendfileTransport
from .ranges import parseRange
from .store import BlobStore

if TYPE_CHECKING:
    from .auth import Authenticator

_NAME_COMPONENT = grammar.forBytes(grammar.NAME_COMPONENT)
_NAME_MAX = grammar.NAME_MAX
_DIGEST = grammar.forBytes(grammar.DIGEST)
# nydusd's http-proxy backend asks for the bare id, without "sha256:".
_BARE_ID = re.compile(rb"[a-f0-9]{64}\Z")
_REFERENCE_MAX = len(b"sha512:") + 128

_READ_METHODS = (b"GET", b"HEAD")
_OCTET_STREAM = b"application/octet-stream"
_JSON = b"application/json"
_EMPTY_JSON = b"{}"
# The request headers of conditional requests, as Headers names them.
_CONDITIONAL = frozenset({b"If-None-Match", b"If-Modified-Since", b"If-Range"})
# Blobs are content-addressed: what a digest names never changes.
_IMMUTABLE = b"public, max-age=31536000, immutable"


class BlobResource:
    """
    Answers for one blob: its headers, the whole file, one range, several
    ranges as multipart/byteranges, or 416.
    """

    log = Logger()
    # With --verify-digest, a verify.DigestVerifier that answers only for
    # blobs whose bytes match their digest.
    verifier = None

    # A body smaller than this is read at once and returned from render:
    # cheaper than a producer, and than waiting for the headers to drain
    # before sendfile(2).  Larger ones stream.
    smallBody = 64 * 1024

    def __init__(
        self,
        store: BlobStore | None,
        clock: IReactorTime,
        maxRanges: int,
        useSendfile: bool = True,
        sendTimeout: float = 60.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.maxRanges = maxRanges
        self.useSendfile = useSendfile
        self.sendTimeout = sendTimeout

    def render(
        self, request: IRequest, algorithm: str, hexdigest: str, digest: bytes, store=None
    ) -> bytes | int:
        """
        Answer for the blob from C{store}, or from the blob directory.
        """
        if store is None:
            store = self.store
        try:
            found = store.open(algorithm, hexdigest)
        except PermissionError:
            self.log.warn("Blob {digest} cannot be read: permission denied",
                          digest=digest.decode("ascii"))
            return errors.writeError(request, errors.DENIED, {"digest": digest.decode("ascii")})
        if found is None:
            return errors.writeError(
                request, errors.BLOB_UNKNOWN, {"digest": digest.decode("ascii")}
            )
        fd, status = found
        if self.verifier is not None:
            return self.verifier.serve(
                request, algorithm, hexdigest, digest, fd, status, self._respond
            )
        return self._respond(request, fd, status, digest)

    def _respond(
        self, request: IRequest, fd: int, status: os.stat_result, digest: bytes
    ) -> bytes | int:
        """
        Answer for the blob open at C{fd}.  From here on C{fd} is closed
        exactly once, whatever happens: here, or by the producer it is
        handed to.
        """
        try:
            plan = self._plan(request, status, digest)
        except BaseException:
            os.close(fd)
            raise
        if not isinstance(plan, tuple):
            os.close(fd)
            return plan
        parts, length = plan
        if len(parts) == 1 and length < self.smallBody:
            return self._readSmall(request, fd, parts[0])
        if self.useSendfile and len(parts) == 1:
            transport = sendfileTransport(request)
            if transport is not None:
                SendfileProducer(
                    request, fd, parts[0], self.clock, transport, status, self.sendTimeout
                ).start()
                return NOT_DONE_YET
        FileProducer(request, fd, parts, self.clock, self.sendTimeout).start()
        return NOT_DONE_YET

    def _plan(
        self, request: IRequest, status: os.stat_result, digest: bytes
    ) -> tuple[list[Part], int] | bytes | int:
        """
        Set the status and headers of the answer.

        @return: the parts of the file to send and their length with
            whatever goes between them, or, for an answer that sends
            nothing of the file (304, 416, HEAD, an empty blob), what
            C{render} returns.
        """
        size = status.st_size
        modified = int(status.st_mtime)
        etag = b'"%s"' % (digest,)
        # Every value here is built from a validated digest and numbers, so
        # it is stored as it is, under its canonical name: Headers'
        # setRawHeaders would encode and sanitize each of the nine again.
        headers = request.responseHeaders._rawHeaders
        headers[b"Docker-Content-Digest"] = [digest]
        headers[b"ETag"] = [etag]
        headers[b"Cache-Control"] = [_IMMUTABLE]
        headers[b"Last-Modified"] = [lastModified(modified)]
        headers[b"Accept-Ranges"] = [b"bytes"]
        # One pass over the request's few headers instead of a look-up for
        # each of the four that matter here, three of them rarely sent.
        rangeHeader = None
        conditional = False
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name == b"Range":
                rangeHeader = values[-1]
            elif name in _CONDITIONAL:
                conditional = True
        if conditional and notModified(request, etag, modified):
            # Finished here: returning b"" from render would add a
            # "Content-Length: 0", which a 304 must not claim (RFC 9110 8.6).
            request.setResponseCode(304)
            request.finish()
            return NOT_DONE_YET
        if (
            request.method == b"HEAD"
            or rangeHeader is None
            or (conditional and not rangeApplies(request, etag, modified))
        ):
            ranges = None
        else:
            ranges = parseRange(rangeHeader, size, self.maxRanges)
        if ranges is None:
            parts: list[Part] = [(b"", 0, size)]
            length = size
            headers[b"Content-Type"] = [_OCTET_STREAM]
        elif not ranges:
            headers[b"Content-Range"] = [b"bytes */%d" % (size,)]
            return errors.writeError(request, errors.RANGE_INVALID, {"size": size})
        elif len(ranges) == 1:
            [(offset, length)] = ranges
            parts = [(b"", offset, length)]
            request.setResponseCode(206)
            headers[b"Content-Type"] = [_OCTET_STREAM]
            headers[b"Content-Range"] = [
                b"bytes %d-%d/%d" % (offset, offset + length - 1, size)
            ]
        else:
            parts, length, contentType = _multipart(ranges, size)
            request.setResponseCode(206)
            headers[b"Content-Type"] = [contentType]
        headers[b"Content-Length"] = [b"%d" % (length,)]
        if request.method == b"HEAD" or length == 0:
            return b""
        return parts, length

    def _readSmall(self, request: IRequest, fd: int, part: Part) -> bytes | int:
        _, offset, length = part
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            self.log.warn(
                "Blob ended {missing} bytes early (truncated?); closing the connection",
                missing=length - len(data),
            )
            request.loseConnection()
            return NOT_DONE_YET
        return data


def _multipart(ranges: list[tuple[int, int]], size: int) -> tuple[list[Part], int, bytes]:
    boundary = os.urandom(12).hex().encode("ascii")
    parts: list[Part] = []
    length = 0
    for offset, partLength in ranges:
        head = (
            b"\r\n--%s\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Range: bytes %d-%d/%d\r\n\r\n"
            % (boundary, offset, offset + partLength - 1, size)
        )
        parts.append((head, offset, partLength))
        length += len(head) + partLength
    tail = b"\r\n--%s--\r\n" % (boundary,)
    parts.append((tail, 0, 0))
    length += len(tail)
    return parts, length, b"multipart/byteranges; boundary=" + boundary


class RegistryResource(Resource):
    """
    The root of the server, a leaf that routes every path itself:

      - C{/v2/}: the API version check (and nydusd's proxy ping);
      - C{/v2/<name>/blobs/<digest>}: a blob, C{<name>} of one or more
        components;
      - C{/<name>/blobs/<digest>}: the same, without C{/v2}, as the upstream
        proxy serves it;
      - either form with a bare 64-hex id in place of the digest, as
        nydusd's http-proxy backend asks.

    Everything else is a JSON error.  C{pages} adds one-segment paths
    answered before any of this, and without credentials: C{/healthz},
    C{/metrics}.  With an C{auth}, the registry routes need credentials
    (see L{nydusproxy.auth}).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        blobs: BlobResource,
        pages: dict | None = None,
        images=None,
        auth: Authenticator | None = None,
    ) -> None:
        """
        @param pages: resources answering one-segment paths, by segment.
        @param images: the routes of C{--images}
            (L{nydusproxy.registry.ImageRegistry}), if given.
        @param auth: the check of C{--htpasswd} and C{--token-file}, if
            given.
        """
        super().__init__()
        self.blobs = blobs
        self.pages = pages or {}
        self.images = images
        self.auth = auth

    def render(self, request: IRequest) -> bytes | int:
        request.setHeader(errors.API_VERSION_HEADER, errors.API_VERSION)
        try:
            return self._route(request)
        except Exception:
            self.log.failure(
                "Unexpected failure answering {method} {uri}",
                method=request.method.decode("ascii", "replace"),
                uri=request.uri.decode("ascii", "replace"),
            )
            if request.startedWriting:
                request.loseConnection()
                return NOT_DONE_YET
            return errors.writeError(request, errors.UNKNOWN)

    def _route(self, request: IRequest) -> bytes | int:
        segments = request.postpath
        # /healthz (and /metrics, when on this site) come first and stay
        # outside any auth check: probes and scrapers carry no credentials.
        if len(segments) == 1 and segments[0] in self.pages:
            return self.pages[segments[0]].render(request)
        if self.auth is not None:
            answer = self.auth.guard(request, self.render)
            if answer is not None:
                return answer
        underV2 = bool(segments) and segments[0] == b"v2"
        path = segments[1:] if underV2 else segments
        readMethod = request.method in _READ_METHODS
        if underV2 and (not path or path == [b""]):
            if not readMethod:
                return errors.writeError(request, errors.UNSUPPORTED)
            request.setHeader(b"Content-Type", _JSON)
            request.setHeader(b"Content-Length", b"%d" % (len(_EMPTY_JSON),))
            return b"" if request.method == b"HEAD" else _EMPTY_JSON
        if len(path) >= 3 and path[-2] == b"blobs":
            if not readMethod:
                return errors.writeError(request, errors.UNSUPPORTED)
            return self._blob(request, path[:-2], path[-1])
        if underV2 and not readMethod:
            return errors.writeError(request, errors.UNSUPPORTED)
        if underV2 and self.images is not None:
            answer = self.images.render(request, path)
            if answer is not None:
                return answer
        if underV2 and len(path) >= 3 and path[-2] == b"manifests":
            return errors.writeError(request, errors.MANIFEST_UNKNOWN)
        return errors.writeError(request, errors.NAME_UNKNOWN)

    def _blob(self, request: IRequest, name: list[bytes], reference: bytes) -> bytes | int:
        if sum(map(len, name)) + len(name) - 1 > _NAME_MAX:
            return errors.writeError(request, errors.NAME_INVALID)
        if len(reference) > _REFERENCE_MAX:
            return errors.writeError(request, errors.DIGEST_INVALID)
        parsed = _blobReference(tuple(name), reference)
        if isinstance(parsed, errors.ErrorCode):
            return errors.writeError(request, parsed)
        algorithm, hexdigest, digest = parsed
        store = self.blobs.store
        if self.images is not None:
            # The layout of that name first, then the blob directory.
            store = self.images.blobStore(name, store)
            if store is None:
                return errors.writeError(
                    request, errors.NAME_UNKNOWN, {"name": b"/".join(name).decode("ascii")}
                )
        return self.blobs.render(request, algorithm, hexdigest, digest, store)


# Clients read the same few blobs over and over: their paths are checked
# once each.  Both parts are of bounded length when they get here, and so is
# the cache.
@lru_cache(maxsize=1024)
def _blobReference(
    name: tuple[bytes, ...], reference: bytes
) -> tuple[str, str, bytes] | errors.ErrorCode:
    """
    Check the repository name and the digest of a blob path.

    @return: the digest's algorithm and hex, and the digest as the
        C{Docker-Content-Digest} header gives it; or the error to answer.
    """
    if not all(map(_NAME_COMPONENT.match, name)):
        return errors.NAME_INVALID
    match = _DIGEST.match(reference)
    if match is not None:
        algorithm, hexdigest = match.group(1, 2) if match.group(1) else match.group(3, 4)
        digest = reference
    elif _BARE_ID.match(reference):
        algorithm, hexdigest = b"sha256", reference
        digest = b"sha256:" + reference
    else:
        return errors.DIGEST_INVALID
    return algorithm.decode("ascii"), hexdigest.decode("ascii"), digest

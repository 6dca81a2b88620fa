"""
The HTTP face of the blob directory: one leaf resource that routes every
path, and the blob responses it hands out.
"""

from __future__ import annotations

import os
import re

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from . import errors
from .producer import FileProducer, Part
from .ranges import parseRange
from .store import BlobStore

# The OCI distribution spec's grammar for one component of a repository name.
_NAME_COMPONENT = re.compile(rb"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
_NAME_MAX = 255
_DIGEST = re.compile(rb"(sha256):([a-f0-9]{64})\Z|(sha512):([a-f0-9]{128})\Z")
# nydusd's http-proxy backend asks for the bare id, without "sha256:".
_BARE_ID = re.compile(rb"[a-f0-9]{64}\Z")

_READ_METHODS = (b"GET", b"HEAD")
_OCTET_STREAM = b"application/octet-stream"
_JSON = b"application/json"
_EMPTY_JSON = b"{}"


class BlobResource:
    """
    Answers for one blob: its headers, the whole file, one range, several
    ranges as multipart/byteranges, or 416.
    """

    log = Logger()
    # With --verify-digest, a verify.DigestVerifier that answers only for
    # blobs whose bytes match their digest.
    verifier = None

    def __init__(self, store: BlobStore, clock: IReactorTime, maxRanges: int) -> None:
        self.store = store
        self.clock = clock
        self.maxRanges = maxRanges

    def render(
        self, request: IRequest, algorithm: str, hexdigest: str, digest: bytes
    ) -> bytes | int:
        try:
            found = self.store.open(algorithm, hexdigest)
        except PermissionError:
            self.log.warn("Blob {digest} cannot be read: permission denied",
                          digest=digest.decode("ascii"))
            return errors.writeError(request, errors.DENIED, {"digest": digest.decode("ascii")})
        if found is None:
            return errors.writeError(
                request, errors.BLOB_UNKNOWN, {"digest": digest.decode("ascii")}
            )
        fd, status = found
        try:
            if self.verifier is not None:
                return self.verifier.serve(
                    request, algorithm, hexdigest, digest, fd, status, self._respond
                )
            return self._respond(request, fd, status.st_size, digest)
        except BaseException:
            os.close(fd)
            raise

    def _respond(self, request: IRequest, fd: int, size: int, digest: bytes) -> bytes | int:
        request.setHeader(b"Docker-Content-Digest", digest)
        request.setHeader(b"ETag", b'"%s"' % (digest,))
        request.setHeader(b"Accept-Ranges", b"bytes")
        rangeHeader = request.getHeader(b"range")
        if request.method == b"HEAD" or rangeHeader is None:
            ranges = None
        else:
            ranges = parseRange(rangeHeader, size, self.maxRanges)
        if ranges is None:
            parts: list[Part] = [(b"", 0, size)]
            length = size
            request.setHeader(b"Content-Type", _OCTET_STREAM)
        elif not ranges:
            os.close(fd)
            request.setHeader(b"Content-Range", b"bytes */%d" % (size,))
            return errors.writeError(request, errors.RANGE_INVALID, {"size": size})
        elif len(ranges) == 1:
            [(offset, length)] = ranges
            parts = [(b"", offset, length)]
            request.setResponseCode(206)
            request.setHeader(b"Content-Type", _OCTET_STREAM)
            request.setHeader(
                b"Content-Range",
                b"bytes %d-%d/%d" % (offset, offset + length - 1, size),
            )
        else:
            parts, length, contentType = _multipart(ranges, size)
            request.setResponseCode(206)
            request.setHeader(b"Content-Type", contentType)
        request.setHeader(b"Content-Length", b"%d" % (length,))
        if request.method == b"HEAD" or length == 0:
            os.close(fd)
            return b""
        FileProducer(request, fd, parts, self.clock).start()
        return NOT_DONE_YET


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

    Everything else is a JSON error.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, blobs: BlobResource) -> None:
        super().__init__()
        self.blobs = blobs

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
        if underV2 and len(path) >= 3 and path[-2] == b"manifests":
            return errors.writeError(request, errors.MANIFEST_UNKNOWN)
        return errors.writeError(request, errors.NAME_UNKNOWN)

    def _blob(self, request: IRequest, name: list[bytes], reference: bytes) -> bytes | int:
        if sum(map(len, name)) + len(name) - 1 > _NAME_MAX or not all(
            map(_NAME_COMPONENT.match, name)
        ):
            return errors.writeError(request, errors.NAME_INVALID)
        match = _DIGEST.match(reference)
        if match is not None:
            algorithm, hexdigest = match.group(1, 2) if match.group(1) else match.group(3, 4)
            digest = reference
        elif _BARE_ID.match(reference):
            algorithm, hexdigest = b"sha256", reference
            digest = b"sha256:" + reference
        else:
            return errors.writeError(request, errors.DIGEST_INVALID)
        return self.blobs.render(
            request, algorithm.decode("ascii"), hexdigest.decode("ascii"), digest
        )

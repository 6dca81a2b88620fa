"""
The read-only registry API over a directory of image layouts: manifests,
tags, referrers and the catalog, as the OCI distribution spec's pull and
content-discovery parts lay them out.  Blobs stay with L{web.BlobResource};
this module only says which store holds a name's blobs.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlencode

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from . import errors
from .grammar import DIGEST, NAME_COMPONENT, TAG
from .images import OCI_INDEX, ImageRoot, Layout, isValidName
from .store import BlobStore

_JSON = b"application/json"
_OCI_INDEX = OCI_INDEX.encode("ascii")
_MAX_PAGE_DIGITS = 9


def _name(segments: list[bytes]) -> str | None:
    """
    The name that the (percent-decoded) path segments spell, or L{None}
    if one of them is not a component of the grammar.
    """
    try:
        components = [segment.decode("ascii") for segment in segments]
    except UnicodeDecodeError:
        return None
    if not all(NAME_COMPONENT.match(component) for component in components):
        return None
    name = "/".join(components)
    return name if isValidName(name) else None


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace")


def accepts(request: IRequest, mediaType: str) -> bool:
    """
    Whether the request's C{Accept} headers (every line, each a comma
    list, parameters such as C{q} ignored) take C{mediaType}.  No
    C{Accept} header, or C{*/*}, takes anything.
    """
    lines = request.requestHeaders.getRawHeaders(b"accept") or []
    wanted = mediaType.lower().encode("ascii")
    major = wanted.partition(b"/")[0] + b"/*"
    seen = False
    for line in lines:
        for item in line.split(b","):
            token = item.partition(b";")[0].strip().lower()
            if not token:
                continue
            seen = True
            if token in (wanted, b"*/*", major):
                return True
    return not seen


class _LayoutThenStore:
    """
    A layout's blobs, then those of the blob directory (if any).
    """

    def __init__(self, layout: Layout, fallback: BlobStore | None) -> None:
        self.layout = layout
        self.fallback = fallback

    def open(self, algorithm: str, hexdigest: str) -> tuple[int, os.stat_result] | None:
        found = self.layout.open(algorithm, hexdigest)
        if found is None and self.fallback is not None:
            found = self.fallback.open(algorithm, hexdigest)
        return found


class ImageRegistry:
    """
    The routes of C{--images}: C{/v2/_catalog}, C{/v2/<name>/tags/list},
    C{/v2/<name>/manifests/<reference>} and
    C{/v2/<name>/referrers/<digest>}, for GET and HEAD.
    """

    log = Logger()

    def __init__(self, root: ImageRoot) -> None:
        self.root = root

    def blobStore(self, segments: list[bytes], fallback: BlobStore | None) -> Any:
        """
        Where the blobs of the (valid) name C{segments} are: the layout of
        that name and then C{fallback}, or C{fallback} alone when no layout
        has the name.
        """
        layout = self.root.layout(b"/".join(segments).decode("ascii"))
        if layout is None:
            return fallback
        return _LayoutThenStore(layout, fallback)

    def render(self, request: IRequest, path: list[bytes]) -> bytes | None:
        """
        Answer a GET or HEAD of C{/v2/<path>}, or return L{None} when the
        path is none of these routes.
        """
        if path == [b"_catalog"]:
            return self._catalog(request)
        if len(path) < 3:
            return None
        if path[-2:] == [b"tags", b"list"]:
            return self._tags(request, path[:-2])
        if path[-2] == b"manifests":
            return self._manifest(request, path[:-2], path[-1])
        if path[-2] == b"referrers":
            return self._referrers(request, path[:-2], path[-1])
        return None

    def _layout(self, request: IRequest, segments: list[bytes]) -> Layout | bytes:
        name = _name(segments)
        if name is None:
            return errors.writeError(request, errors.NAME_INVALID)
        layout = self.root.layout(name)
        if layout is None:
            return errors.writeError(request, errors.NAME_UNKNOWN, {"name": name})
        return layout

    def _manifest(self, request: IRequest, segments: list[bytes], reference: bytes) -> bytes:
        layout = self._layout(request, segments)
        if isinstance(layout, bytes):
            return layout
        ref = _text(reference)
        detail = {"name": layout.name, "reference": ref}
        if not TAG.match(ref) and not DIGEST.match(ref):
            if ":" in ref:
                return errors.writeError(request, errors.DIGEST_INVALID, {"digest": ref})
            return errors.writeError(request, errors.MANIFEST_UNKNOWN, detail)
        try:
            manifest = layout.resolve(ref)
        except PermissionError:
            self.log.warn("Image {name}: manifest {reference} cannot be read: permission denied",
                          name=layout.name, reference=ref)
            return errors.writeError(request, errors.DENIED, detail)
        if manifest is None:
            return errors.writeError(request, errors.MANIFEST_UNKNOWN, detail)
        if not accepts(request, manifest.mediaType):
            detail["mediaType"] = manifest.mediaType
            return errors.writeError(request, errors.MANIFEST_UNKNOWN, detail)
        digest = manifest.digest.encode("ascii")
        request.setHeader(b"Content-Type", manifest.mediaType.encode("ascii"))
        request.setHeader(b"Docker-Content-Digest", digest)
        request.setHeader(b"ETag", b'"%s"' % (digest,))
        request.setHeader(b"Content-Length", b"%d" % (len(manifest.content),))
        return b"" if request.method == b"HEAD" else manifest.content

    def _tags(self, request: IRequest, segments: list[bytes]) -> bytes:
        layout = self._layout(request, segments)
        if isinstance(layout, bytes):
            return layout
        return self._page(
            request, sorted(layout.tags), "tags", {"name": layout.name},
            f"/v2/{layout.name}/tags/list",
        )

    def _catalog(self, request: IRequest) -> bytes:
        return self._page(request, self.root.catalog(), "repositories", {}, "/v2/_catalog")

    def _page(
        self, request: IRequest, items: list[str], key: str, document: dict[str, Any], path: str
    ) -> bytes:
        """
        One page of a sorted list, after C{last} and at most C{n} long,
        with a C{Link} to the next page when there is one.
        """
        args = request.args or {}
        n = None
        if b"n" in args:
            value = args[b"n"][0]
            if not value.isdigit() or len(value) > _MAX_PAGE_DIGITS:
                return errors.writeError(
                    request, errors.PAGINATION_NUMBER_INVALID, {"n": _text(value)}
                )
            n = int(value)
        if b"last" in args:
            last = args[b"last"][0].decode("latin-1")
            items = [item for item in items if item > last]
        if n is not None and len(items) > n:
            items = items[:n]
            if items:
                query = urlencode({"n": n, "last": items[-1]})
                request.setHeader(b"Link", f'<{path}?{query}>; rel="next"'.encode("ascii"))
        return self._json(request, {**document, key: items}, _JSON)

    def _referrers(self, request: IRequest, segments: list[bytes], reference: bytes) -> bytes:
        layout = self._layout(request, segments)
        if isinstance(layout, bytes):
            return layout
        subject = _text(reference)
        if not DIGEST.match(subject):
            return errors.writeError(request, errors.DIGEST_INVALID, {"digest": subject})
        descriptors = layout.referrers(subject)
        wanted = (request.args or {}).get(b"artifactType")
        if wanted:
            types = {value.decode("latin-1") for value in wanted}
            descriptors = [d for d in descriptors if d.get("artifactType") in types]
            request.setHeader(b"OCI-Filters-Applied", b"artifactType")
        document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        return self._json(request, document, _OCI_INDEX)

    def _json(self, request: IRequest, document: dict[str, Any], contentType: bytes) -> bytes:
        body = json.dumps(document, separators=(",", ":")).encode("ascii")
        request.setHeader(b"Content-Type", contentType)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return b"" if request.method == b"HEAD" else body

"""
OCI image layouts under one root directory, read for a read-only registry.

A layout is a directory holding C{oci-layout} and C{index.json}; its path
below the root is its repository name (C{ROOT/library/ubuntu} is
C{library/ubuntu}).  Nothing is scanned at start: a name is looked up when a
client asks for it, and its C{index.json} is parsed again only when the
file's inode, size or modification time changes, so layouts added, changed
or removed while the server runs are seen at the next request.

Manifests are read from the layout's C{blobs/<algorithm>/<hex>} and checked
against their digest.  No path outside the root is ever followed.

Nothing here knows about HTTP.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from .grammar import DIGEST, NAME_COMPONENT, NAME_MAX, TAG
from .store import BlobStore

# RFC 6838 type/subtype, as a media type may appear in a header.
MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z"
)

REF_NAME = "org.opencontainers.image.ref.name"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_ABSENT = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ENXIO, errno.ENODEV, errno.ELOOP, errno.EOPNOTSUPP}
)


def isValidName(name: str) -> bool:
    """
    Whether C{name} is a repository name of the distribution grammar:
    components joined by C{/}, at most 255 characters.
    """
    return len(name) <= NAME_MAX and all(
        NAME_COMPONENT.match(component) for component in name.split("/")
    )


def parseDigest(value: Any) -> tuple[str, str] | None:
    """
    The algorithm and hex of a digest this server can serve, or L{None}.
    """
    if not isinstance(value, str):
        return None
    match = DIGEST.match(value)
    if match is None:
        return None
    return match.group(1, 2) if match.group(1) else match.group(3, 4)


def _stringMap(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _mediaType(value: Any) -> str | None:
    if isinstance(value, str) and MEDIA_TYPE.match(value):
        return value
    return None


@dataclass(frozen=True)
class Descriptor:
    """
    A content descriptor of a manifest, as an index lists it.
    """

    digest: str
    size: int
    mediaType: str | None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fromJSON(cls, value: Any) -> Descriptor | None:
        """
        The descriptor in a decoded JSON value, or L{None} if it is not one
        this server can serve (no digest of a supported algorithm, no size).
        """
        if not isinstance(value, dict) or parseDigest(value.get("digest")) is None:
            return None
        size = value.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return None
        return cls(
            value["digest"],
            size,
            _mediaType(value.get("mediaType")),
            _stringMap(value.get("annotations")),
        )


@dataclass(frozen=True)
class Manifest:
    """
    A manifest's exact stored bytes, its digest and its media type.
    """

    digest: str
    mediaType: str
    content: bytes = field(repr=False)
    document: dict[str, Any] = field(repr=False)


def _readAll(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        data = os.pread(fd, size - offset, offset)
        if not data:
            break
        chunks.append(data)
        offset += len(data)
    return b"".join(chunks)


def _isRegular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class Layout:
    """
    One OCI image layout, as its C{index.json} was when parsed.

    The tags are read at once; the manifests reachable through nested
    indexes, and the referrers, are worked out on first use and kept
    with this object, which is dropped when C{index.json} changes.
    """

    log = Logger()
    maxManifestBytes = 4 * 1024 * 1024
    maxManifests = 10000
    maxDepth = 8

    def __init__(self, name: str, path: str, root: str, document: dict[str, Any]) -> None:
        self.name = name
        self.path = path
        self._root = root
        self.descriptors: list[Descriptor] = []
        self.tags: dict[str, Descriptor] = {}
        for entry in document.get("manifests") or []:
            descriptor = Descriptor.fromJSON(entry)
            if descriptor is None:
                continue
            self.descriptors.append(descriptor)
            tag = descriptor.annotations.get(REF_NAME)
            if tag is not None and TAG.match(tag) and tag not in self.tags:
                self.tags[tag] = descriptor
        self._reachable: dict[str, Descriptor] | None = None
        self._referrers: dict[str, list[dict[str, Any]]] | None = None

    def blobStore(self, algorithm: str) -> BlobStore | None:
        """
        The layout's C{blobs/<algorithm>} directory, if it resolves inside
        the root.  Links in it are followed only inside the root.
        """
        real = os.path.realpath(os.path.join(self.path, "blobs", algorithm))
        if not real.startswith(self._root + os.sep):
            return None
        return BlobStore(real, boundary=self._root)

    def open(self, algorithm: str, hexdigest: str) -> tuple[int, os.stat_result] | None:
        """
        Open a blob of this layout, as L{BlobStore.open} does.
        """
        store = self.blobStore(algorithm)
        if store is None:
            return None
        return store.open(algorithm, hexdigest)

    def readManifest(self, descriptor: Descriptor) -> Manifest | None:
        """
        Read the manifest a descriptor names, or L{None} if the layout does
        not hold it, it is too large, it does not match its digest, or it
        is not a JSON object.

        @raise OSError: it is there but cannot be read.
        """
        algorithm, hexdigest = parseDigest(descriptor.digest)  # type: ignore[misc]
        found = self.open(algorithm, hexdigest)
        if found is None:
            return None
        fd, status = found
        try:
            if status.st_size > self.maxManifestBytes:
                self.log.warn(
                    "Image {name}: manifest {digest} is larger than {limit} bytes; not served",
                    name=self.name, digest=descriptor.digest, limit=self.maxManifestBytes,
                )
                return None
            content = _readAll(fd, status.st_size)
        finally:
            os.close(fd)
        if hashlib.new(algorithm, content).hexdigest() != hexdigest:
            self.log.warn(
                "Image {name}: manifest {digest} does not match its digest; not served",
                name=self.name, digest=descriptor.digest,
            )
            return None
        try:
            document = json.loads(content)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            self.log.warn(
                "Image {name}: manifest {digest} is not a JSON object; not served",
                name=self.name, digest=descriptor.digest,
            )
            return None
        mediaType = (
            descriptor.mediaType
            or _mediaType(document.get("mediaType"))
            or (OCI_INDEX if "manifests" in document else OCI_MANIFEST)
        )
        return Manifest(descriptor.digest, mediaType, content, document)

    def _readQuietly(self, descriptor: Descriptor) -> Manifest | None:
        try:
            return self.readManifest(descriptor)
        except OSError as e:
            self.log.warn(
                "Image {name}: manifest {digest} cannot be read: {error}",
                name=self.name, digest=descriptor.digest, error=e,
            )
            return None

    def resolve(self, reference: str) -> Manifest | None:
        """
        The manifest that a tag, or the digest of a manifest this layout
        holds (in C{index.json} or reachable through an index in it),
        names.

        @raise OSError: it is there but cannot be read.
        """
        if TAG.match(reference):
            descriptor = self.tags.get(reference)
        else:
            descriptor = self.reachable().get(reference)
        if descriptor is None:
            return None
        return self.readManifest(descriptor)

    def reachable(self) -> dict[str, Descriptor]:
        """
        Every manifest of the layout by digest: those of C{index.json} and,
        breadth first, those of the indexes among them, at most
        C{maxManifests} of them, C{maxDepth} indexes deep.
        """
        if self._reachable is None:
            found: dict[str, Descriptor] = {}
            queue = deque((descriptor, 0) for descriptor in self.descriptors)
            while queue and len(found) < self.maxManifests:
                descriptor, depth = queue.popleft()
                if descriptor.digest in found:
                    continue
                found[descriptor.digest] = descriptor
                if depth >= self.maxDepth or descriptor.mediaType not in (*INDEX_TYPES, None):
                    continue
                manifest = self._readQuietly(descriptor)
                if manifest is None or manifest.mediaType not in INDEX_TYPES:
                    continue
                for entry in manifest.document.get("manifests") or []:
                    child = Descriptor.fromJSON(entry)
                    if child is not None:
                        queue.append((child, depth + 1))
            if queue:
                self.log.warn(
                    "Image {name}: more than {limit} manifests; the rest are not served",
                    name=self.name, limit=self.maxManifests,
                )
            self._reachable = found
        return self._reachable

    def referrers(self, subject: str) -> list[dict[str, Any]]:
        """
        The descriptors of the layout's manifests whose C{subject} is
        C{subject}, as the referrers API lists them: media type, digest,
        size, artifact type (the manifest's, else its config's media type)
        and annotations.
        """
        if self._referrers is None:
            table: dict[str, list[dict[str, Any]]] = {}
            for descriptor in self.reachable().values():
                manifest = self._readQuietly(descriptor)
                if manifest is None:
                    continue
                document = manifest.document
                target = document.get("subject")
                if not isinstance(target, dict) or parseDigest(target.get("digest")) is None:
                    continue
                entry: dict[str, Any] = {
                    "mediaType": manifest.mediaType,
                    "digest": manifest.digest,
                    "size": len(manifest.content),
                }
                artifactType = document.get("artifactType")
                if not isinstance(artifactType, str) or not artifactType:
                    config = document.get("config")
                    artifactType = config.get("mediaType") if isinstance(config, dict) else None
                if isinstance(artifactType, str) and artifactType:
                    entry["artifactType"] = artifactType
                annotations = _stringMap(document.get("annotations"))
                if annotations:
                    entry["annotations"] = annotations
                table.setdefault(target["digest"], []).append(entry)
            self._referrers = table
        return self._referrers.get(subject, [])


class ImageRoot:
    """
    The directory of image layouts given to C{--images}.
    """

    log = Logger()
    maxCached = 1024
    maxIndexBytes = 16 * 1024 * 1024
    maxCatalogEntries = 100000

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._realPath = os.path.realpath(self.path)
        self._cache: OrderedDict[str, tuple[tuple, Layout | None]] = OrderedDict()

    def _inside(self, realPath: str) -> bool:
        return realPath.startswith(self._realPath + os.sep)

    def layout(self, name: str) -> Layout | None:
        """
        The layout named C{name}, or L{None} if there is none (or its
        C{index.json} cannot be read or parsed).
        """
        if not isValidName(name):
            return None
        real = os.path.realpath(os.path.join(self._realPath, *name.split("/")))
        if not self._inside(real) or not _isRegular(os.path.join(real, "oci-layout")):
            return None
        try:
            fd = os.open(os.path.join(real, "index.json"), _OPEN_FLAGS)
        except OSError as e:
            if e.errno not in _ABSENT:
                self.log.warn(
                    "Image {name}: index.json cannot be opened: {error}", name=name, error=e
                )
            return None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                return None
            key = (real, status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                self._cache.move_to_end(name)
                return cached[1]
            layout = self._parse(name, real, fd, status.st_size)
        finally:
            os.close(fd)
        self._cache[name] = (key, layout)
        self._cache.move_to_end(name)
        while len(self._cache) > self.maxCached:
            self._cache.popitem(last=False)
        return layout

    def _parse(self, name: str, real: str, fd: int, size: int) -> Layout | None:
        problem = None
        if size > self.maxIndexBytes:
            problem = f"larger than {self.maxIndexBytes} bytes"
        else:
            try:
                document = json.loads(_readAll(fd, size))
            except (OSError, ValueError) as e:
                problem = str(e)
            else:
                if not isinstance(document, dict) or not isinstance(
                    document.get("manifests", []), list
                ):
                    problem = "not an image index"
        if problem is not None:
            self.log.warn(
                "Image {name}: index.json is not served: {problem}", name=name, problem=problem
            )
            return None
        return Layout(name, real, self._realPath, document)

    def _isLayoutDirectory(self, path: str) -> bool:
        return _isRegular(os.path.join(path, "oci-layout")) and _isRegular(
            os.path.join(path, "index.json")
        )

    def catalog(self) -> list[str]:
        """
        The names of the layouts under the root, sorted.

        A walk of the directories, done on each call and bounded to
        C{maxCatalogEntries} directory entries.  A layout's C{blobs}
        directory is not walked; a symbolic link is listed when it leads to
        a layout inside the root, and never walked into.
        """
        names = []
        budget = self.maxCatalogEntries
        stack = [("", self.path)]
        while stack and budget > 0:
            prefix, directory = stack.pop()
            try:
                with os.scandir(directory) as scan:
                    entries = []
                    for entry in scan:
                        entries.append(entry)
                        budget -= 1
                        if budget <= 0:
                            break
            except OSError:
                continue
            found = {entry.name for entry in entries if entry.is_file(follow_symlinks=False)}
            isLayout = bool(prefix) and {"oci-layout", "index.json"} <= found
            if isLayout:
                names.append(prefix)
            for entry in entries:
                if not NAME_COMPONENT.match(entry.name) or (isLayout and entry.name == "blobs"):
                    continue
                name = f"{prefix}/{entry.name}" if prefix else entry.name
                if len(name) > NAME_MAX:
                    continue
                try:
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if self._inside(target) and self._isLayoutDirectory(target):
                            names.append(name)
                    elif entry.is_dir(follow_symlinks=False):
                        stack.append((name, entry.path))
                except OSError:
                    continue
        if budget <= 0:
            self.log.warn(
                "The catalog lists only the layouts found in the first {limit} "
                "directory entries under {root}",
                limit=self.maxCatalogEntries, root=self.path,
            )
        return sorted(names)

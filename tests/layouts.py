"""
A small writer of OCI image layouts for the tests: images with real tar.gz
layers, multi-platform indexes, artifacts with a subject, and nydus images
made of the fixtures' real blobs and bootstraps.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from nydusproxy import tap

from .support import FIXTURES, InMemoryServer

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

# What nydusify writes for a nydus image (containerd nydus converter).
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
NYDUS_BLOB_ANNOTATION = "containerd.io/snapshot/nydus-blob"
NYDUS_BOOTSTRAP_ANNOTATION = "containerd.io/snapshot/nydus-bootstrap"
NYDUS_FS_VERSION_ANNOTATION = "containerd.io/snapshot/nydus-fs-version"
UNCOMPRESSED_ANNOTATION = "containerd.io/uncompressed"
NYDUS_BOOTSTRAP_PATH = "image/image.boot"

# The RAFS v5 bootstrap of the fixtures and the one blob it references
# (named by its sha256).
NYDUS_V5_BOOTSTRAP = "sha256-nocompress-repeatable.boot"
NYDUS_V5_BLOB = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"


def digestOf(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode("utf-8")


def tarGz(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """
    A reproducible gzip'd tar of C{files} (path: content), and the tar
    itself.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size = len(files[path])
            info.mode = 0o644
            info.mtime = 0
            archive.addfile(info, io.BytesIO(files[path]))
    tar = raw.getvalue()
    return gzip.compress(tar, mtime=0), tar


class LayoutWriter:
    """
    Writes one OCI image layout: C{oci-layout}, C{index.json} and
    C{blobs/sha256/<hex>}.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        self.manifests: list[dict[str, Any]] = []
        self.save()

    def blobPath(self, digest: str) -> str:
        algorithm, _, hexdigest = digest.partition(":")
        return os.path.join(self.path, "blobs", algorithm, hexdigest)

    def blob(self, data: bytes, mediaType: str, **annotations: str) -> dict[str, Any]:
        """
        Store C{data} and return its descriptor.
        """
        descriptor: dict[str, Any] = {
            "mediaType": mediaType,
            "digest": digestOf(data),
            "size": len(data),
        }
        if annotations:
            descriptor["annotations"] = dict(annotations)
        with open(self.blobPath(descriptor["digest"]), "wb") as f:
            f.write(data)
        return descriptor

    def blobFile(self, source: str, mediaType: str, **annotations: str) -> dict[str, Any]:
        """
        Store a copy of the file C{source} (by its sha256) and return its
        descriptor.
        """
        with open(source, "rb") as f:
            return self.blob(f.read(), mediaType, **annotations)

    def image(
        self,
        layers: list[dict[str, Any]],
        architecture: str = "amd64",
        subject: dict[str, Any] | None = None,
        annotations: dict[str, str] | None = None,
        withMediaType: bool = True,
    ) -> tuple[dict[str, Any], bytes]:
        """
        Store an image manifest (and its config) over C{layers}; return its
        descriptor and its bytes.
        """
        config = {
            "architecture": architecture,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [
                layer["annotations"][UNCOMPRESSED_ANNOTATION] for layer in layers
            ]},
            "history": [{"created_by": "tests/layouts.py"} for _ in layers],
        }
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "config": self.blob(canonical(config), OCI_CONFIG),
            "layers": layers,
        }
        if withMediaType:
            document["mediaType"] = OCI_MANIFEST
        if subject is not None:
            document["subject"] = subject
        if annotations:
            document["annotations"] = annotations
        return self._manifest(document, OCI_MANIFEST)

    def tarLayer(self, files: dict[str, bytes]) -> dict[str, Any]:
        """
        Store a gzip'd tar layer of C{files}.
        """
        compressed, tar = tarGz(files)
        return self.blob(compressed, OCI_LAYER_GZIP, **{UNCOMPRESSED_ANNOTATION: digestOf(tar)})

    def simpleImage(self, text: bytes, architecture: str = "amd64") -> tuple[dict[str, Any], bytes]:
        """
        An image of one layer holding C{etc/motd} = C{text}.
        """
        return self.image([self.tarLayer({"etc/motd": text})], architecture)

    def index(self, children: list[dict[str, Any]]) -> tuple[dict[str, Any], bytes]:
        """
        Store an image index of C{children}, each a descriptor with a
        platform.
        """
        document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
        return self._manifest(document, OCI_INDEX)

    def artifact(
        self,
        artifactType: str,
        payload: bytes,
        subject: dict[str, Any],
        annotations: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """
        Store an artifact manifest (OCI 1.1: empty config, an
        C{artifactType}) whose subject is C{subject}.
        """
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifactType,
            "config": self.blob(b"{}", OCI_EMPTY),
            "layers": [self.blob(payload, "application/octet-stream")],
            "subject": {k: subject[k] for k in ("mediaType", "digest", "size")},
        }
        if annotations:
            document["annotations"] = annotations
        return self._manifest(document, OCI_MANIFEST)

    def nydusImage(self, workdir: str) -> tuple[dict[str, Any], bytes]:
        """
        A nydus image as nydusify writes it: the fixtures' RAFS v5 blob as a
        nydus blob layer, then the bootstrap layer (a tar.gz holding
        C{image/image.boot}).  C{workdir} receives copies of the fixtures.
        """
        blobSource = FIXTURES / "blobs" / NYDUS_V5_BLOB
        bootSource = FIXTURES / "bootstrap" / NYDUS_V5_BOOTSTRAP
        blobCopy = os.path.join(workdir, NYDUS_V5_BLOB)
        shutil.copyfile(blobSource, blobCopy)
        with open(bootSource, "rb") as f:
            bootstrap = f.read()
        blob = self.blobFile(
            blobCopy,
            NYDUS_BLOB,
            **{UNCOMPRESSED_ANNOTATION: "sha256:" + NYDUS_V5_BLOB, NYDUS_BLOB_ANNOTATION: "true"},
        )
        compressed, tar = tarGz({NYDUS_BOOTSTRAP_PATH: bootstrap})
        boot = self.blob(
            compressed,
            OCI_LAYER_GZIP,
            **{
                UNCOMPRESSED_ANNOTATION: digestOf(tar),
                NYDUS_FS_VERSION_ANNOTATION: "5",
                NYDUS_BOOTSTRAP_ANNOTATION: "true",
            },
        )
        return self.image([blob, boot])

    def _manifest(self, document: dict[str, Any], mediaType: str) -> tuple[dict[str, Any], bytes]:
        content = canonical(document)
        return self.blob(content, mediaType), content

    def add(self, descriptor: dict[str, Any], tag: str | None = None, **extra: Any) -> None:
        """
        List a manifest in C{index.json}, tagged if C{tag} is given.
        """
        entry = {**descriptor, **extra}
        if tag is not None:
            entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: tag}
        self.manifests.append(entry)
        self.save()

    def save(self) -> None:
        """
        Write C{index.json} by rename, as layout writers do.
        """
        document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.manifests}
        temporary = os.path.join(self.path, "index.json.tmp")
        with open(temporary, "wb") as f:
            f.write(canonical(document))
        os.rename(temporary, os.path.join(self.path, "index.json"))


class ImageServer(InMemoryServer):
    """
    L{InMemoryServer} with any command line (C{--images ROOT}, with or
    without C{--blobsdir}).
    """

    def __init__(self, *arguments: str) -> None:
        self.clock = MemoryReactorClock()
        options = tap.Options()
        options.parseOptions(list(arguments))
        self.site = tap.buildSite(options, self.clock)
        self.site.startFactory()

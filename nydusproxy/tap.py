"""
The twistd plugin's command line and service: C{twistd nydus-proxy}.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service, strports
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from .images import ImageRoot
from .registry import ImageRegistry
from .site import BlobSite
from .store import BlobStore
from .web import BlobResource, RegistryResource

DEFAULT_LISTEN = "tcp:8000"


class Options(usage.Options):
    synopsis = "--blobsdir DIR | --images ROOT [--listen ENDPOINT ...] [options]"
    longdesc = (
        "Serve the blob files in DIR to nydusd: HEAD and ranged GET on "
        "/v2/<name>/blobs/sha256:<hex> (and /<name>/blobs/<hex>), as a "
        "read-only OCI registry would.  With --images, also serve every OCI "
        "image layout under ROOT as the repository named by its path: "
        "manifests, tags, referrers, catalog and blobs."
    )
    optParameters = [
        ["blobsdir", "b", None, "Directory of blob files, named by their 64-hex id."],
        ["images", "i", None, "Directory of OCI image layouts, each served read-only "
         "as the repository named by its path below ROOT."],
        ["max-ranges", None, 16, "Most ranges served from one request; a "
         "Range header with more is ignored (whole blob).", int],
    ]
    optFlags = [
        ["no-access-log", None, "Do not log a line per request."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Twisted endpoint to listen on (repeatable; default tcp:8000).
        """
        from twisted.internet import endpoints, reactor

        try:
            endpoints.serverFromString(reactor, description)
        except Exception as e:
            raise usage.UsageError(f"--listen {description!r}: {e}")
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["blobsdir"] and not self["images"]:
            raise usage.UsageError("--blobsdir DIR or --images ROOT is required")
        for key in ("blobsdir", "images"):
            if self[key]:
                self[key] = os.path.abspath(self[key])
        if self["max-ranges"] < 1:
            raise usage.UsageError("--max-ranges must be at least 1")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]


class StartupError(Exception):
    """
    The server cannot start, for a reason the message gives in one line.

    twistd lets an exception from C{makeService} or C{startService} reach
    the interpreter, which would print a traceback: this one is reported as
    its message alone, on standard error.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        previousHook = sys.excepthook

        def reportWithoutTraceback(kind, value, traceback):
            if isinstance(value, StartupError):
                stderr = sys.__stderr__ or sys.stderr
                stderr.write(f"nydus-proxy: {value}\n")
            else:
                previousHook(kind, value, traceback)

        sys.excepthook = reportWithoutTraceback


def checkDirectory(path: str, what: str = "blob directory") -> None:
    if not os.path.exists(path):
        raise StartupError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise StartupError(f"{what} {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise StartupError(f"{what} {path} cannot be read")


def openBlobStore(path: str) -> BlobStore:
    checkDirectory(path)
    return BlobStore(path)


def openImages(path: str) -> ImageRegistry:
    checkDirectory(path, "image directory")
    return ImageRegistry(ImageRoot(path))


class ListeningService(service.MultiService):
    """
    The endpoint services, started together.  A port that cannot be
    listened on fails the start with one line that names it, on standard
    error and in the log.
    """

    log = Logger()

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = f"cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}"
            self.log.critical("nydus-proxy cannot start: {reason}", reason=reason)
            raise StartupError(reason) from None


def buildSite(options: Options, reactor: IReactorTime | None = None) -> BlobSite:
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    store = openBlobStore(options["blobsdir"]) if options["blobsdir"] else None
    images = openImages(options["images"]) if options["images"] else None
    blobs = BlobResource(store, reactor, options["max-ranges"])
    return BlobSite(
        RegistryResource(blobs, images),
        accessLog=not options["no-access-log"],
        reactor=reactor,
    )


def makeService(options: Options, reactor=None) -> service.IService:
    site = buildSite(options, reactor)
    listening = ListeningService()
    for description in options["listen"]:
        strports.service(description, site, reactor=reactor).setServiceParent(listening)
    return listening

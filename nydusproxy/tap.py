"""
The twistd plugin's command line and service: C{twistd nydus-proxy}.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service, strports
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from .images import ImageRoot
from .registry import ImageRegistry
from .site import BlobSite
from .store import BlobStore
from .web import BlobResource, RegistryResource
from .workers import WorkerSupervisor, tcpAddress

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
        ["send-timeout", None, 60.0, "Seconds a client may read nothing of a "
         "response before it is disconnected.", float],
    ]
    optFlags = [
        ["no-access-log", None, "Do not log a line per request."],
        ["no-sendfile", None, "Send blobs through the transport's buffer "
         "instead of sendfile(2)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.arguments: list[str] = []

    def parseOptions(self, options=None) -> None:
        # Kept so that worker processes can be given the same command line.
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_workers(self, value: str) -> None:
        """
        Worker processes serving the TCP ports, or "auto": one per core
        when every --listen is tcp: or tcp6:, else one.  [default: auto]
        """
        if value != "auto":
            try:
                value = int(value)
            except ValueError:
                raise usage.UsageError(f"--workers takes a number or auto, not {value!r}")
            if value < 1:
                raise usage.UsageError("--workers must be at least 1")
        self["workers"] = value

    def opt_listen(self, description: str) -> None:
        """
        Twisted endpoint to listen on (repeatable; default tcp:8000).
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["blobsdir"] and not self["images"]:
            raise usage.UsageError("--blobsdir DIR or --images ROOT is required")
        for key in ("blobsdir", "images"):
            if self[key]:
                self[key] = os.path.abspath(self[key])
        if self["max-ranges"] < 1:
            raise usage.UsageError("--max-ranges must be at least 1")
        if self["send-timeout"] <= 0:
            raise usage.UsageError("--send-timeout must be positive")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        allTCP = all(tcpAddress(description) for description in self["listen"])
        workers = self.get("workers", "auto")
        if workers == "auto":
            workers = (os.cpu_count() or 1) if allTCP else 1
        elif workers > 1 and not allTCP:
            raise usage.UsageError("--workers above 1 needs tcp: or tcp6: --listen endpoints")
        self["workers"] = workers


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
    blobs = BlobResource(
        store,
        reactor,
        options["max-ranges"],
        useSendfile=not options["no-sendfile"],
        sendTimeout=options["send-timeout"],
    )
    return BlobSite(
        RegistryResource(blobs, images),
        accessLog=not options["no-access-log"],
        reactor=reactor,
    )


def listeningServices(services) -> ListeningService:
    listening = ListeningService()
    for child in services:
        child.setServiceParent(listening)
    return listening


def checkEndpoints(descriptions: list[str], reactor) -> None:
    """
    Parse each endpoint description now (which also loads TLS keys and
    certificates), so that a wrong one stops the start with one line.
    """
    if reactor is None:
        from twisted.internet import reactor
    for description in descriptions:
        try:
            endpoints.serverFromString(reactor, description)
        except Exception as e:
            raise StartupError(f"--listen {description!r}: {e}") from None


def makeService(options: Options, reactor=None) -> service.IService:
    checkEndpoints(options["listen"], reactor)
    # Built here in every case, so that a bad directory stops the start.
    site = buildSite(options, reactor)
    if options["workers"] > 1:
        return WorkerSupervisor(options, reactor)
    return listeningServices(
        strports.service(description, site, reactor=reactor)
        for description in options["listen"]
    )

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

from . import limits
from .shutdown import GracefulShutdown
from .site import BlobSite
from .store import BlobStore
from .verify import DigestVerifier
from .web import BlobResource, RegistryResource

DEFAULT_LISTEN = "tcp:8000"


class Options(usage.Options):
    synopsis = "--blobsdir DIR [--listen ENDPOINT ...] [options]"
    longdesc = (
        "Serve the blob files in DIR to nydusd: HEAD and ranged GET on "
        "/v2/<name>/blobs/sha256:<hex> (and /<name>/blobs/<hex>), as a "
        "read-only OCI registry would."
    )
    optParameters = [
        ["blobsdir", "b", None, "Directory of blob files, named by their 64-hex id."],
        ["max-ranges", None, 16, "Most ranges served from one request; a "
         "Range header with more is ignored (whole blob).", int],
        *limits.optParameters,
    ]
    optFlags = [
        ["no-access-log", None, "Do not log a line per request."],
        ["verify-digest", None, "Serve a blob only if its bytes hash to its "
         "digest (hashed once per file, off the reactor thread)."],
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
        if not self["blobsdir"]:
            raise usage.UsageError("--blobsdir DIR is required")
        self["blobsdir"] = os.path.abspath(self["blobsdir"])
        if self["max-ranges"] < 1:
            raise usage.UsageError("--max-ranges must be at least 1")
        limits.checkOptions(self)
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


def openBlobStore(path: str) -> BlobStore:
    if not os.path.exists(path):
        raise StartupError(f"blob directory {path} does not exist")
    if not os.path.isdir(path):
        raise StartupError(f"blob directory {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise StartupError(f"blob directory {path} cannot be read")
    return BlobStore(path)


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
    store = openBlobStore(options["blobsdir"])
    blobs = BlobResource(store, reactor, options["max-ranges"])
    if options["verify-digest"]:
        blobs.verifier = DigestVerifier(reactor)
    site = BlobSite(
        RegistryResource(blobs), accessLog=not options["no-access-log"], reactor=reactor
    )
    site.connections = limits.install(site, limits.fromOptions(options))
    return site


def makeService(options: Options, reactor=None) -> service.IService:
    site = buildSite(options, reactor)
    limits.raiseFileLimit(site.connections.limits)
    listening = ListeningService()
    # First in, last stopped: the ports stop accepting before the drain.
    GracefulShutdown(site.connections, options["shutdown-timeout"]).setServiceParent(listening)
    for description in options["listen"]:
        strports.service(description, site, reactor=reactor).setServiceParent(listening)
    return listening

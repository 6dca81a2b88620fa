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

from . import limits
from .accesslog import formatOption
from .auth import Authenticator, CredentialsError, threadRunner
from .health import HealthResource
from .images import ImageRoot
from .registry import ImageRegistry
from .shutdown import GracefulShutdown
from .site import BlobSite
from .store import BlobStore
from .verify import DigestVerifier
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
        ["htpasswd", None, None, "Apache htpasswd file (bcrypt or SHA-crypt "
         "hashes): blobs and /v2/ need HTTP Basic credentials from it."],
        ["token-file", None, None, "File of bearer tokens, one a line: blobs "
         "and /v2/ need one of them (nydusd's registry_token)."],
        ["access-log", None, None, "Append access lines to this file instead "
         "of twistd's log (cheaper; every worker writes to it)."],
        ["access-log-format", None, "combined", "Access log lines: combined "
         "(the combined log format) or json (one JSON object a line).",
         formatOption],
        *limits.optParameters,
    ]
    optFlags = [
        ["no-access-log", None, "Do not log a line per request."],
        ["no-sendfile", None, "Send blobs through the transport's buffer "
         "instead of sendfile(2)."],
        ["metrics", None, "Serve Prometheus metrics at /metrics (needs "
         "the prometheus_client package)."],
        ["verify-digest", None, "Serve a blob only if its bytes hash to its "
         "digest (hashed once per file, off the reactor thread)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["metrics-listen"] = None
        self.arguments: list[str] = []

    def parseOptions(self, options=None) -> None:
        # Kept so that worker processes can be given the same command line.
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_workers(self, value: str) -> None:
        """
        Worker processes, or auto (one per core for TCP).  [default: auto]
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

    def opt_metrics_listen(self, description: str) -> None:
        """
        Serve /metrics on this endpoint only (implies --metrics).
        """
        self["metrics-listen"] = description
        self["metrics"] = 1

    def opt_version(self) -> None:
        """
        Print the versions of nydus-proxy, Twisted and Python, and exit.
        """
        from importlib.metadata import version

        from twisted import version as twistedVersion

        sys.stdout.write(
            f"nydus-proxy {version('nydus-proxy')} (Twisted {twistedVersion.short()}, "
            f"Python {sys.version.split()[0]})\n"
        )
        sys.exit(0)

    def postOptions(self) -> None:
        if not self["blobsdir"] and not self["images"]:
            raise usage.UsageError("--blobsdir DIR or --images ROOT is required")
        for key in ("blobsdir", "images"):
            if self[key]:
                self[key] = os.path.abspath(self[key])
        if self["max-ranges"] < 1:
            raise usage.UsageError("--max-ranges must be at least 1")
        limits.checkOptions(self)
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        allTCP = all(tcpAddress(description) for description in self["listen"])
        workers = self.get("workers", "auto")
        if workers == "auto":
            workers = (os.cpu_count() or 1) if allTCP and not self["metrics"] else 1
        elif workers > 1 and not allTCP:
            raise usage.UsageError("--workers above 1 needs tcp: or tcp6: --listen endpoints")
        elif workers > 1 and self["metrics"]:
            # Each worker would count only the requests it served.
            raise usage.UsageError("--metrics needs --workers 1")
        self["workers"] = workers
        for name in ("htpasswd", "token-file", "access-log"):
            if self[name] is not None:
                self[name] = os.path.abspath(self[name])


class StartupError(Exception):
    """
    The server cannot start, for a reason the message gives in one line.

    twistd lets an exception from C{makeService} or C{startService} reach
    the interpreter, which would print a traceback: this one is reported as
    its message alone, on standard error.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        if not getattr(sys.excepthook, "reportsStartupErrors", False):
            sys.excepthook = _reportingStartupErrors(sys.excepthook)


def _reportingStartupErrors(previousHook):
    def reportWithoutTraceback(kind, value, traceback):
        if isinstance(value, StartupError):
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(f"nydus-proxy: {value}\n")
        else:
            previousHook(kind, value, traceback)

    reportWithoutTraceback.reportsStartupErrors = True
    return reportWithoutTraceback


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


def openAuthenticator(options: Options, reactor) -> Authenticator | None:
    htpasswd, tokens = options["htpasswd"], options["token-file"]
    if htpasswd is None and tokens is None:
        return None
    try:
        return Authenticator.fromFiles(htpasswd, tokens, threadRunner(reactor))
    except CredentialsError as e:
        raise StartupError(str(e)) from None


class CredentialFilesCheck(service.Service):
    """
    Reads the credentials files once more as the server starts, after
    twistd's C{--uid}/C{--gid} took effect: they are read again as that user
    whenever they change, so files it cannot read stop the start.
    """

    log = Logger()

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def startService(self) -> None:
        super().startService()
        try:
            self.auth.load()
        except CredentialsError as e:
            reason = f"{e} (as uid {os.getuid()})"
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
        sendTimeout=options["idle-timeout"],
    )
    if options["verify-digest"]:
        blobs.verifier = DigestVerifier(reactor)
    auth = openAuthenticator(options, reactor)
    pages = {b"healthz": HealthResource(store or BlobStore(options["images"]))}
    metrics = None
    if options["metrics"]:
        metrics = loadMetrics()
        if not options["metrics-listen"]:
            from .metrics import MetricsResource

            pages[b"metrics"] = MetricsResource(metrics)
    site = BlobSite(
        RegistryResource(blobs, pages, images, auth),
        accessLog=not options["no-access-log"],
        accessLogFormat=options["access-log-format"],
        accessLogPath=options["access-log"],
        metrics=metrics,
        limits=limits.fromOptions(options),
        reactor=reactor,
    )
    return site


def loadMetrics():
    """
    A new L{nydusproxy.metrics.Metrics}, or a L{StartupError} when
    prometheus_client is not installed.
    """
    try:
        from .metrics import Metrics
    except ImportError as e:
        raise StartupError(
            f"--metrics needs the prometheus_client package ({e}): "
            "pip install 'nydus-proxy[metrics]'"
        ) from None
    return Metrics()


def listeningServices(
    site: BlobSite, services, shutdownTimeout: float
) -> ListeningService:
    listening = ListeningService()
    if site.resource.auth is not None:
        CredentialFilesCheck(site.resource.auth).setServiceParent(listening)
    # First in, last stopped: the ports stop accepting before the drain.
    GracefulShutdown(site.connections, shutdownTimeout).setServiceParent(listening)
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
        except ImportError as e:
            if description.partition(":")[0].lower() == "ssl":
                raise StartupError(
                    f"--listen {description!r}: TLS needs pyOpenSSL ({e}): "
                    "pip install 'nydus-proxy[tls]'"
                ) from None
            raise StartupError(f"--listen {description!r}: {e}") from None
        except Exception as e:
            raise StartupError(f"endpoint {description!r}: {e}") from None


def makeService(options: Options, reactor=None) -> service.IService:
    metricsListen = [options["metrics-listen"]] if options["metrics-listen"] else []
    checkEndpoints(options["listen"] + metricsListen, reactor)
    if options["access-log"] is not None:
        try:
            os.close(os.open(options["access-log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as e:
            raise StartupError(f"access log {options['access-log']}: {e.strerror}") from None
    # Built here in every case, so that a bad directory stops the start.
    site = buildSite(options, reactor)
    limits.raiseFileLimit(site.connections.limits)
    if options["workers"] > 1:
        return listeningServices(
            site, [WorkerSupervisor(options, reactor)], options["shutdown-timeout"]
        )
    services = [
        strports.service(description, site, reactor=reactor)
        for description in options["listen"]
    ]
    if options["metrics-listen"]:
        from .metrics import metricsSite

        services.append(
            strports.service(
                options["metrics-listen"], metricsSite(site.metrics, reactor), reactor=reactor
            )
        )
    return listeningServices(site, services, options["shutdown-timeout"])

"""
Several worker processes serving the same TCP ports: C{--workers N}.

The supervisor (the twistd process, which owns the pid file) opens one
listening socket per worker and port with SO_REUSEPORT, so that the kernel
spreads new connections over the workers (one socket shared by all of them
was seen to leave one worker idle).  It opens them before twistd sheds
privileges, keeps them for the workers it restarts, and never accepts on
them itself.  Each worker is C{python -m nydusproxy.workers}: it adopts its
sockets and serves them with the same site as a single process would.

The workers are started before twistd sheds privileges (C{--uid},
C{--gid}) and shed them themselves once they hold their sockets; a worker
that dies is started again (as the supervisor's user by then); SIGTERM to
the supervisor stops them all.  Workers send their log events to the supervisor, which writes them
to twistd's log, and they stop when the supervisor's end of their standard
input closes, so none outlives it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, protocol
from twisted.internet.error import ReactorNotRunning
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

RESTART_DELAY = 1.0
STOP_MARGIN = 10.0

_FAMILIES = {"tcp": socket.AF_INET, "tcp6": socket.AF_INET6}


def tcpAddress(description: str) -> tuple[int, str, int, int] | None:
    """
    The address family, interface, port and backlog of a C{tcp:} or
    C{tcp6:} endpoint description, or L{None} for any other kind (or one
    that does not parse).
    """
    kind, *arguments = re.split(r"(?<!\\):", description)
    if kind not in _FAMILIES:
        return None
    positional, named = [], {}
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if equals:
            named[name] = value.replace("\\:", ":")
        else:
            positional.append(argument.replace("\\:", ":"))
    values = dict(zip(("port", "interface", "backlog"), positional)) | named
    try:
        return (
            _FAMILIES[kind],
            values.get("interface", "::" if kind == "tcp6" else ""),
            int(values["port"]),
            int(values.get("backlog", 50)),
        )
    except (KeyError, ValueError):
        return None


def freePort(family: int, interface: str, port: int) -> int:
    """
    Check that nothing listens on the port (port 0: pick one), with a
    socket that does not share: with SO_REUSEPORT alone, the workers'
    sockets would join those of another server started as the same user,
    and the two would split the connections between them.

    @return: the port.
    @raise OSError: the port is taken.
    """
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((interface, port))
        return probe.getsockname()[1]


def listeningSocket(family: int, interface: str, port: int, backlog: int) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((interface, port))
        listener.listen(backlog)
    except BaseException:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.supervisor.relay(self.index, line)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            self.supervisor.log.error("worker {index}: {line}", index=self.index, line=line)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.workerEnded(self, reason)


class WorkerSupervisor(service.Service):
    """
    Starts, restarts and stops the worker processes.
    """

    log = Logger()

    def __init__(self, options, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.reactor = reactor
        self.count = options["workers"]
        # Workers drain their transfers for --shutdown-timeout when stopped.
        self.stopTimeout = options["shutdown-timeout"] + STOP_MARGIN
        self.arguments = [*options.arguments, "--workers", "1"]
        self.addresses = [tcpAddress(d) for d in options["listen"]]
        self.identity = _shedIdentity(getattr(options, "parent", None))
        self.sockets: list[list[socket.socket]] = []
        self.workers: dict[int, _WorkerProtocol] = {}

    def privilegedStartService(self) -> None:
        from .tap import StartupError

        super().privilegedStartService()
        self.sockets = [[] for _ in range(self.count)]
        for family, interface, port, backlog in self.addresses:
            try:
                port = freePort(family, interface, port)
                for sockets in self.sockets:
                    sockets.append(listeningSocket(family, interface, port, backlog))
            except OSError as e:
                self._closeSockets()
                reason = f"cannot listen on {interface or '*'}:{port}: {e}"
                self.log.critical("nydus-proxy cannot start: {reason}", reason=reason)
                raise StartupError(reason) from None
            self.log.info(
                "Listening on {interface}:{port} with {count} workers",
                interface=interface or "*",
                port=port,
                count=self.count,
            )
        for index in range(self.count):
            self._spawn(index)

    def startService(self) -> None:
        if not self.sockets:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        # Refuse new connections at once: the workers' ports close as they
        # stop, and these sockets would keep queueing connections.
        self._closeSockets()
        workers = list(self.workers.values())
        for worker in workers:
            self._signal(worker, signal.SIGTERM)
        ended = defer.gatherResults([w.ended for w in workers], consumeErrors=True)
        killer = self.reactor.callLater(
            self.stopTimeout, lambda: [self._signal(w, signal.SIGKILL) for w in workers]
        )

        def stopped(result):
            if killer.active():
                killer.cancel()
            return None

        return ended.addBoth(stopped)

    def relay(self, index: int, line: bytes) -> None:
        """
        Publish a worker's log event in this process, as if logged here:
        twistd's log, and any --logger observer, see all its fields.
        """
        try:
            event = _eventFromLine(line)
        except (ValueError, InvalidLogLevelError):
            self.log.info("worker {index}: {line}", index=index, line=line.decode("utf-8", "replace"))
            return
        event["worker"] = index
        globalLogPublisher(event)

    def workerEnded(self, worker: _WorkerProtocol, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.running and self.sockets:
            self.log.error(
                "Worker {index} ended ({reason}); starting it again in {delay} s",
                index=worker.index,
                reason=reason.getErrorMessage(),
                delay=RESTART_DELAY,
            )
            self.reactor.callLater(RESTART_DELAY, self._restart, worker.index)

    def _restart(self, index: int) -> None:
        if self.running and index not in self.workers:
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        worker = _WorkerProtocol(self, index)
        childFDs: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        families = []
        for offset, listener in enumerate(self.sockets[index]):
            childFDs[3 + offset] = listener.fileno()
            families.append(listener.family)
        argv = [
            sys.executable,
            # -P: not the working directory first on sys.path, so that a
            # checkout there does not stand in for the installed package.
            "-P",
            "-m",
            "nydusproxy.workers",
            json.dumps(
                {"families": families, "arguments": self.arguments, "identity": self.identity}
            ),
        ]
        self.reactor.spawnProcess(worker, sys.executable, argv, env=os.environ, childFDs=childFDs)
        self.workers[index] = worker

    def _signal(self, worker: _WorkerProtocol, number: int) -> None:
        try:
            worker.transport.signalProcess(number)
        except Exception:
            pass

    def _closeSockets(self) -> None:
        for sockets in self.sockets:
            for listener in sockets:
                listener.close()
        self.sockets = []


def _shedIdentity(twistdOptions) -> tuple[int, int] | None:
    """
    The user and group that twistd will switch to, from its C{--uid} and
    C{--gid}, as its own C{startApplication} works them out.
    """
    if twistdOptions is None or os.getuid() != 0:
        return None
    uid, gid = twistdOptions.get("uid"), twistdOptions.get("gid")
    if uid is None:
        return None
    if gid is None:
        import pwd

        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


def _stopOnce(reactor) -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _stopOnSignals(reactor) -> None:
    def stop(number, frame):
        reactor.callFromThread(_stopOnce, reactor)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


class _SupervisorLink(protocol.Protocol):
    """
    A worker's standard input: it closes when the supervisor goes away.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Failure) -> None:
        _stopOnce(self.reactor)


_PLAIN = (str, int, float, bool, type(None))
# Objects of the logging machinery itself, meaningless in another process.
_LOCAL = frozenset({"log_logger", "log_source", "log_observer", "log_trace"})


def _eventAsLine(event: dict) -> str:
    """
    A log event as one line of JSON for the supervisor: plain values as
    they are, the level by name, a failure as its traceback, anything else
    (an access line among them) as its text.  Cheaper than Twisted's
    eventAsJSON, which flattens every format string.
    """
    out = {}
    for key, value in event.items():
        if key in _LOCAL:
            continue
        if key == "log_level":
            value = value.name
        elif key == "log_failure":
            key, value = "log_traceback", value.getTraceback()
        elif not isinstance(value, _PLAIN):
            value = str(value)
        out[key] = value
    return json.dumps(out)


def _eventFromLine(line: bytes) -> dict:
    event = json.loads(line)
    event["log_level"] = LogLevel.levelWithName(event.get("log_level", "info"))
    if "log_traceback" in event:
        event["log_format"] = (event.get("log_format") or "") + "\n{log_traceback}"
    return event


def _lineObserver(output):
    def observe(event: dict) -> None:
        output.write(_eventAsLine(event) + "\n")
        output.flush()

    return observe


def main() -> None:
    """
    A worker: serve the sockets inherited from the supervisor.
    """
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner
    from twisted.python.util import switchUID

    from .tap import Options, buildSite, listeningServices

    config = json.loads(sys.argv[1])
    globalLogBeginner.beginLoggingTo([_lineObserver(sys.stdout)], redirectStandardIO=False)
    options = Options()
    options.parseOptions(config["arguments"])
    site = buildSite(options, reactor)
    services = [
        StreamServerEndpointService(
            AdoptedStreamServerEndpoint(reactor, 3 + offset, family), site
        )
        for offset, family in enumerate(config["families"])
    ]
    top = listeningServices(site, services, options["shutdown-timeout"])
    stdio.StandardIO(_SupervisorLink(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))
    top.privilegedStartService()
    if config["identity"] is not None:
        switchUID(*config["identity"])
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    # The supervisor decides when workers stop.  A signal sent to the
    # whole process group (Ctrl-C in a terminal, a kill of the group)
    # reaches them too: stop once, however many arrive.
    reactor.callWhenRunning(_stopOnSignals, reactor)
    reactor.run()


if __name__ == "__main__":
    main()

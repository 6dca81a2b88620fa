"""
Stopping without cutting transfers short: on SIGTERM twistd stops the
services; the listening ports close first, then this service lets the
responses in flight finish, for up to C{--shutdown-timeout} seconds.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet.defer import Deferred

from .limits import Connections


class GracefulShutdown(service.Service):
    """
    A service that, when stopped, waits for the site's connections to end:
    idle ones are closed at once, busy ones once their response is sent,
    and any still open after C{timeout} seconds are closed.

    Add it to the parent service before the listening ports: a
    L{service.MultiService} stops its children in reverse order, so the
    ports stop accepting first.  twistd waits for the L{Deferred} that
    C{stopService} returns before the reactor stops.
    """

    name = "graceful-shutdown"

    def __init__(self, connections: Connections, timeout: float) -> None:
        self.connections = connections
        self.timeout = timeout

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.connections.drain(self.timeout)

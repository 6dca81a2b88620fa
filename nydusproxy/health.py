"""
C{GET /healthz}: whether the server can serve blobs, for load balancers,
orchestrators and nydusd's ping.
"""

from __future__ import annotations

import json

from twisted.web.iweb import IRequest

from . import errors
from .store import BlobStore

_HEALTHY = json.dumps({"status": "ok"}).encode("ascii")


class HealthResource:
    """
    200 and C{{"status": "ok"}} while the blob directory can be read; 503
    C{UNAVAILABLE} (OCI JSON) when it cannot, for instance when its disk
    went away or its mount vanished.
    """

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return errors.writeError(request, errors.UNSUPPORTED)
        request.setHeader(b"Cache-Control", b"no-store")
        if not self.store.readable():
            return errors.writeError(
                request, errors.UNAVAILABLE, {"reason": "the blob directory cannot be read"}
            )
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % (len(_HEALTHY),))
        return b"" if request.method == b"HEAD" else _HEALTHY

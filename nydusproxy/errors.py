"""
The OCI distribution error codes this server answers with, and the one
function that writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.web.iweb import IRequest

API_VERSION_HEADER = b"Docker-Distribution-API-Version"
API_VERSION = b"registry/2.0"
ALLOW = b"GET, HEAD"


@dataclass(frozen=True)
class ErrorCode:
    value: str
    message: str
    status: int


BLOB_UNKNOWN = ErrorCode("BLOB_UNKNOWN", "blob unknown to registry", 404)
DIGEST_INVALID = ErrorCode("DIGEST_INVALID", "invalid or unsupported digest", 400)
NAME_INVALID = ErrorCode("NAME_INVALID", "invalid repository name", 400)
NAME_UNKNOWN = ErrorCode("NAME_UNKNOWN", "repository name not known to registry", 404)
MANIFEST_UNKNOWN = ErrorCode("MANIFEST_UNKNOWN", "manifest unknown", 404)
PAGINATION_NUMBER_INVALID = ErrorCode(
    "PAGINATION_NUMBER_INVALID", "invalid number of results requested", 400
)
RANGE_INVALID = ErrorCode("RANGE_INVALID", "requested range not satisfiable", 416)
UNSUPPORTED = ErrorCode("UNSUPPORTED", "the operation is unsupported", 405)
UNAUTHORIZED = ErrorCode("UNAUTHORIZED", "authentication required", 401)
DENIED = ErrorCode("DENIED", "requested access to the resource is denied", 403)
UNAVAILABLE = ErrorCode("UNAVAILABLE", "service unavailable", 503)
UNKNOWN = ErrorCode("UNKNOWN", "unknown error", 500)


def errorBody(code: ErrorCode, detail: Any = None) -> bytes:
    """
    The JSON document of one error, as the distribution spec lays it out.
    """
    entry = {"code": code.value, "message": code.message, "detail": detail}
    return json.dumps({"errors": [entry]}, separators=(",", ":")).encode("ascii")


def writeError(request: IRequest, code: ErrorCode, detail: Any = None) -> bytes:
    """
    Set the status and headers of an error response and return its body,
    which is empty for a HEAD request.  The caller returns the result from
    C{render}.
    """
    body = errorBody(code, detail)
    # For the access log and the metrics (site.py).
    request.ociError = code.value
    request.setResponseCode(code.status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    if code is UNSUPPORTED:
        request.setHeader(b"Allow", ALLOW)
    if request.method == b"HEAD":
        return b""
    return body

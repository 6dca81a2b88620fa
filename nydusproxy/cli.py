"""
C{nydus-backend-proxy}: the upstream Rust proxy's command line
(C{--blobsdir DIR}, C{-b DIR}) plus C{--listen}, running the same service
in the foreground under twistd, logging to standard output.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    if argv is None:
        argv = sys.argv[1:]
    sys.argv = ["nydus-backend-proxy", "--nodaemon", "--pidfile=", "nydus-proxy", *argv]
    run()

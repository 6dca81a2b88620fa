#!/usr/bin/env python3
"""
RSS of nydus-proxy with many blobs and many idle connections.

    python bench/idle_rss.py [--python PY] [--files 100000] [--connections 1000]

Starts one nydus-proxy process (--workers 1) on a free 127.0.0.1 port over
a blob directory, and prints its resident memory: at start; after a
thousand HEADs spread over a directory of --files blobs (each file is a
few bytes; nothing is scanned, so the count should not show); and with
--connections idle keep-alive connections open.  Loopback only; every
process it starts is stopped.
"""

from __future__ import annotations

import argparse
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TWISTD = "from twisted.scripts.twistd import run; run()"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nydus-proxy-rss-") as work:
        blobs = Path(work, "blobs")
        blobs.mkdir()
        names = [f"{n:064x}" for n in range(args.files)]
        for name in names:
            (blobs / name).write_bytes(name[:8].encode())
        log = Path(work, "log")
        server = subprocess.Popen(
            [args.python, "-c", TWISTD, "-n", "--pidfile=", "--logfile", str(log),
             "nydus-proxy", "--blobsdir", str(blobs), "--workers", "1", "--no-access-log",
             "--listen", "tcp:0:interface=127.0.0.1",
             # All from one address: above the default limits.
             "--max-connections", str(args.connections + 16),
             "--max-connections-per-client", str(args.connections + 16)],
            cwd=work,
        )
        try:
            deadline = time.monotonic() + 30
            while not (log.exists() and "starting on" in log.read_text()):
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit(f"nydus-proxy did not start:\n{log.read_text() if log.exists() else ''}")
                time.sleep(0.05)
            port = int(re.search(r"starting on (\d+)", log.read_text()).group(1))
            print(f"at start, {args.files} files in the directory: {rss(server.pid)} MiB")

            connection = socket.create_connection(("127.0.0.1", port))
            for name in random.sample(names, min(1000, len(names))):
                connection.sendall(
                    f"HEAD /v2/a/blobs/sha256:{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                )
                answer = connection.recv(4096)
                assert answer.startswith(b"HTTP/1.1 200"), answer[:40]
            connection.close()
            print(f"after 1000 HEADs over them: {rss(server.pid)} MiB")

            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.connections)]
            idle[-1].sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle[-1].recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(1)
            print(f"with {args.connections} idle connections: {rss(server.pid)} MiB")
            for s in idle:
                s.close()
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""
Soak test: mixed load against a nydus-proxy this script starts itself.

    python bench/soak.py                 # 10 minutes
    python bench/soak.py --minutes 1

It starts ``twistd -n nydus-proxy`` on an ephemeral 127.0.0.1 port over a
temporary directory of random blobs, then runs worker threads until the
time is up: single and multiple ranges, whole blobs, HEAD, misses, hostile
paths, keep-alive runs, downloads aborted halfway, idle sockets, clients
dripping their request a byte at a time, oversized heads.  Every answer is
checked: status, headers and each byte.  At the end it stops the server
with SIGTERM and prints requests, unexpected errors (which must be 0: a
5xx, a wrong status or byte, a hang, a traceback in the server's log) and
the server's resident memory over the run.

Loopback only; every socket has a timeout, every loop ends at the
deadline.  Exit status 0 when there was no unexpected error.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1024 * 1024
SIZES = (0, 1, 4096, 65539, MiB, 4 * MiB, 16 * MiB)
HANG = 30.0  # seconds without progress that count as a hang

HOSTILE = [
    b"/v2/../../etc/passwd/blobs/sha256:" + b"0" * 64,
    b"/v2/a/%2e%2e/blobs/sha256:" + b"0" * 64,
    b"/v2/a%2Fb/blobs/sha256:" + b"0" * 64,
    b"/v2/A/blobs/sha256:" + b"0" * 64,
    b"/v2/a/blobs/sha256:" + b"G" * 64,
    b"/v2/a/blobs/sha256:..",
    b"/v2/a/blobs/" + b"0" * 63,
    b"/v2/" + b"a/" * 200 + b"blobs/sha256:" + b"0" * 64,
    b"/v2/a/manifests/latest",
    b"/v2/a/tags/list",
    b"/",
    b"/favicon.ico",
    b"//v2//a//blobs//x",
    b"/v2/a/blobs/sha256:%00",
    b"/%ff%fe/blobs/x",
]


class Failed(Exception):
    """
    An unexpected answer: counted as an error of its kind.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = collections.Counter()
        self.errors = collections.Counter()
        self.examples: dict[str, str] = {}
        self.bytes = 0

    def count(self, action: str, n: int = 1, received: int = 0) -> None:
        with self.lock:
            self.requests[action] += n
            self.bytes += received

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            self.examples.setdefault(kind, detail)


# A small HTTP/1.1 client on raw sockets, strict about what it reads.

def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG)
    sock.settimeout(HANG)
    return sock


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def fill(self) -> bool:
        try:
            data = self.sock.recv(256 * 1024)
        except socket.timeout:
            raise Failed("hang", "no data for %d s" % HANG)
        self.buffer += data
        return bool(data)

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            if not self.fill():
                raise Failed("closed", f"connection closed before a response head: {self.buffer[:100]!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status.split()[1]), headers

    def body(self, length: int) -> bytes:
        while len(self.buffer) < length:
            if not self.fill():
                raise Failed("short", f"body of {len(self.buffer)} bytes, {length} promised")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    def response(self, method: bytes = b"GET") -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        length = int(headers.get("content-length", "0"))
        body = b"" if method == b"HEAD" else self.body(length)
        if status >= 500:
            raise Failed("5xx", f"{status} {body[:200]!r}")
        return status, headers, body

    def closed(self) -> bool:
        try:
            return not self.fill()
        except (ConnectionResetError, BrokenPipeError):
            return True


def requestBytes(method: bytes, path: bytes, close: bool = True, **headers: str) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: soak"]
    if close:
        lines.append(b"Connection: close")
    lines += [f"{name.replace('_', '-')}: {value}".encode() for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def blobPath(hexdigest: str) -> bytes:
    name = random.choice(["sealer", "library/ubuntu", "a/b/c"])
    if random.random() < 0.2:
        return f"/{name}/blobs/{hexdigest}".encode()
    return f"/v2/{name}/blobs/sha256:{hexdigest}".encode()


def expect(condition: bool, kind: str, detail: str) -> None:
    if not condition:
        raise Failed(kind, detail)


class Load:
    """
    The actions of the workers, each one request or one socket's life.
    """

    def __init__(
        self, port: int, blobs: dict[str, bytes], stats: Stats, deadline: float, idleTimeout: float
    ) -> None:
        self.port = port
        self.blobs = blobs
        self.names = sorted(blobs, key=lambda name: len(blobs[name]))
        self.stats = stats
        self.deadline = deadline
        self.idle: collections.deque[tuple[float, socket.socket]] = collections.deque()
        self.idleTimeout = idleTimeout
        self.idleLock = threading.Lock()

    def pick(self, maxSize: int = 4 * MiB) -> tuple[str, bytes]:
        name = random.choice([n for n in self.names if len(self.blobs[n]) <= maxSize])
        return name, self.blobs[name]

    def exchange(self, method: bytes, path: bytes, **headers: str):
        with connect(self.port) as sock:
            sock.sendall(requestBytes(method, path, **headers))
            return Reader(sock).response(method)

    def singleRange(self) -> None:
        name, blob = self.pick(16 * MiB)
        if not blob:
            status, headers, _ = self.exchange(b"GET", blobPath(name), range="bytes=0-0")
            expect(status == 416, "status", f"range of an empty blob: {status}")
            return
        first = random.randrange(len(blob))
        last = min(first + random.choice([4096, 65536, MiB]) - 1, len(blob) + 10)
        status, headers, body = self.exchange(b"GET", blobPath(name), range=f"bytes={first}-{last}")
        expect(status == 206, "status", f"range {first}-{last} of {len(blob)}: {status}")
        expect(body == blob[first : last + 1], "bytes", f"range {first}-{last} of {name}")
        end = min(last, len(blob) - 1)
        expect(headers.get("content-range") == f"bytes {first}-{end}/{len(blob)}", "header",
               f"content-range {headers.get('content-range')}")
        self.stats.count("range", received=len(body))

    def multiRange(self) -> None:
        name, blob = self.pick()
        if len(blob) < 100:
            return
        cuts = sorted(random.sample(range(len(blob)), 4))
        spec = f"bytes={cuts[0]}-{cuts[1]},{cuts[2] + 1}-{cuts[3]}"
        status, headers, body = self.exchange(b"GET", blobPath(name), range=spec)
        expect(status == 206, "status", f"multirange: {status}")
        boundary = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", headers.get("content-type", ""))
        expect(boundary is not None, "header", f"multipart type {headers.get('content-type')}")
        parts = body.split(b"\r\n--" + boundary.group(1).encode())
        # Two ranges that neither touch nor overlap: two parts.
        expected = [(cuts[0], cuts[1]), (cuts[2] + 1, cuts[3])]
        got = []
        for part in parts[1:-1]:
            head, _, data = part.partition(b"\r\n\r\n")
            first, last = map(int, re.search(rb"Content-Range: bytes (\d+)-(\d+)/", head).groups())
            expect(data == blob[first : last + 1], "bytes", f"multipart part {first}-{last}")
            got.append((first, last))
        expect(got == expected, "bytes", f"parts {got} != {expected}")
        self.stats.count("multirange", received=len(body))

    def whole(self) -> None:
        name, blob = self.pick(16 * MiB if random.random() < 0.1 else 4 * MiB)
        status, headers, body = self.exchange(b"GET", blobPath(name))
        expect(status == 200, "status", f"whole blob: {status}")
        expect(body == blob, "bytes", f"whole blob {name}")
        expect(headers.get("docker-content-digest") == f"sha256:{name}", "header", "digest header")
        self.stats.count("whole", received=len(body))

    def head(self) -> None:
        name, blob = self.pick(16 * MiB)
        status, headers, _ = self.exchange(b"HEAD", blobPath(name))
        expect(status == 200, "status", f"HEAD: {status}")
        expect(headers.get("content-length") == str(len(blob)), "header", "HEAD content-length")
        self.stats.count("head")

    def miss(self) -> None:
        missing = hashlib.sha256(os.urandom(8)).hexdigest()
        status, headers, body = self.exchange(random.choice([b"GET", b"HEAD"]), blobPath(missing))
        expect(status == 404, "status", f"miss: {status}")
        self.stats.count("miss")

    def hostile(self) -> None:
        method = random.choice([b"GET", b"GET", b"HEAD", b"POST", b"DELETE", b"PUT", b"OPTIONS"])
        status, headers, body = self.exchange(method, random.choice(HOSTILE))
        expect(status in (400, 404, 405), "status", f"hostile path: {status}")
        expect(headers.get("content-type") == "application/json", "header", "error type")
        self.stats.count("hostile")

    def keepAlive(self) -> None:
        with connect(self.port) as sock:
            reader = Reader(sock)
            for i in range(random.randint(2, 20)):
                name, blob = self.pick(MiB)
                if not blob:
                    continue
                first = random.randrange(len(blob))
                last = min(len(blob) - 1, first + 4095)
                sock.sendall(requestBytes(b"GET", blobPath(name), close=False, range=f"bytes={first}-{last}"))
                status, headers, body = reader.response()
                expect(status == 206 and body == blob[first : last + 1], "bytes", "keep-alive range")
                self.stats.count("keepalive", received=len(body))

    def aborted(self) -> None:
        name, blob = self.pick(16 * MiB)
        with connect(self.port) as sock:
            sock.sendall(requestBytes(b"GET", blobPath(name)))
            reader = Reader(sock)
            status, headers = reader.head()
            expect(status == 200, "status", f"aborted download: {status}")
            want = random.randrange(max(len(blob), 1))
            while len(reader.buffer) < want and reader.fill():
                pass
            got = reader.buffer[:want]
            expect(got == blob[: len(got)], "bytes", "start of an aborted download")
            if random.random() < 0.5:
                # Reset rather than close.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stats.count("aborted", received=want)

    def idleSocket(self) -> None:
        """
        Keep up to 20 sockets open that send nothing: the server must
        close each once --idle-timeout has passed.
        """
        now = time.monotonic()
        with self.idleLock:
            while self.idle and now - self.idle[0][0] > self.idleTimeout + 5:
                opened, sock = self.idle.popleft()
                sock.setblocking(False)
                try:
                    closed = sock.recv(1) == b""
                except BlockingIOError:
                    closed = False
                except ConnectionResetError:
                    closed = True
                sock.close()
                if not closed:
                    raise Failed("hang", f"idle socket open after {now - opened:.0f} s")
                self.stats.count("idle-closed")
            if len(self.idle) >= 20:
                return
            self.idle.append((now, connect(self.port)))
        self.stats.count("idle")

    def drip(self) -> None:
        """
        Send a request a byte every half second: the server must answer
        408 at its --header-timeout and close.
        """
        with connect(self.port) as sock:
            data = requestBytes(b"GET", blobPath(self.names[-1]))
            reader = Reader(sock)
            for byte in data:
                try:
                    sock.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                ready = selectReadable(sock, 0.5)
                if ready:
                    break
            status, headers = reader.head()
            expect(status == 408, "status", f"dripping client: {status}")
            expect(reader.closed(), "hang", "dripping client not closed")
        self.stats.count("drip")

    def oversized(self) -> None:
        data = b"GET /v2/ HTTP/1.1\r\n" + b"X-Filler: " + b"f" * 40000 + b"\r\n\r\n"
        with connect(self.port) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            status, headers = Reader(sock).head()
            expect(status == 431, "status", f"oversized head: {status}")
        self.stats.count("oversized")

    ACTIONS = [
        ("singleRange", 40),
        ("multiRange", 5),
        ("whole", 8),
        ("head", 15),
        ("miss", 8),
        ("hostile", 8),
        ("keepAlive", 6),
        ("aborted", 5),
        ("idleSocket", 1),
        ("oversized", 1),
    ]

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        names = [name for name, weight in self.ACTIONS for _ in range(weight)]
        while time.monotonic() < self.deadline:
            action = rng.choice(names)
            try:
                getattr(self, action)()
            except Failed as e:
                self.stats.error(e.kind, f"{action}: {e}")
            except (OSError, ValueError, AttributeError) as e:
                self.stats.error("client", f"{action}: {e!r}")

    def dripper(self) -> None:
        while time.monotonic() < self.deadline:
            try:
                self.drip()
            except Failed as e:
                self.stats.error(e.kind, f"drip: {e}")
            except OSError as e:
                self.stats.error("client", f"drip: {e!r}")

    def closeIdle(self) -> None:
        with self.idleLock:
            for _, sock in self.idle:
                sock.close()
            self.idle.clear()


def selectReadable(sock: socket.socket, timeout: float) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


def processTree(pid: int) -> list[int]:
    """
    The server and its worker processes.
    """
    pids = [pid]
    for each in pids:
        try:
            with open(f"/proc/{each}/task/{each}/children") as f:
                pids.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return pids


def rss(pid: int) -> int:
    """
    The resident memory of the server and its workers, summed, in bytes.
    """
    total = 0
    for each in processTree(pid):
        try:
            with open(f"/proc/{each}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def openFiles(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{each}/fd")) for each in processTree(pid))


def makeBlobs(directory: str) -> dict[str, bytes]:
    blobs = {}
    for size in SIZES:
        data = os.urandom(size)
        name = hashlib.sha256(data).hexdigest()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
        blobs[name] = data
    return blobs


def startServer(blobsdir: str, workdir: str, options: list[str]) -> tuple[subprocess.Popen, int, str]:
    logfile = os.path.join(workdir, "server.log")
    process = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "--logfile", logfile, "nydus-proxy", "--blobsdir", blobsdir,
         "--listen", "tcp:0:interface=127.0.0.1", *options],
        cwd=workdir,
    )
    for _ in range(600):
        if os.path.exists(logfile):
            with open(logfile) as f:
                found = re.search(r"BlobSite starting on (\d+)", f.read())
            if found:
                return process, int(found.group(1)), logfile
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        time.sleep(0.05)
    process.kill()
    raise SystemExit("the server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--workers", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server log)")
    parser.add_argument("server_options", nargs="*", default=["--header-timeout", "3", "--idle-timeout", "10"],
                        help="options for nydus-proxy (after --; default: --header-timeout 3 --idle-timeout 10)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    random.seed(seed)

    workdir = tempfile.mkdtemp(prefix="nydus-proxy-soak-")
    blobsdir = os.path.join(workdir, "blobs")
    os.mkdir(blobsdir)
    blobs = makeBlobs(blobsdir)
    process, port, logfile = startServer(blobsdir, workdir, args.server_options)
    stats = Stats()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    rssSeries = [(0.0, rss(process.pid))]
    filesAtStart = openFiles(process.pid)
    print(f"server pid {process.pid} on 127.0.0.1:{port}, RSS {rssSeries[0][1] / MiB:.1f} MiB, "
          f"{args.workers} workers + 1 dripper for {args.minutes:g} min, seed {seed}", flush=True)

    options = args.server_options
    idleTimeout = float(options[options.index("--idle-timeout") + 1]) if "--idle-timeout" in options else 60.0
    load = Load(port, blobs, stats, deadline, idleTimeout)
    threads = [threading.Thread(target=load.worker, args=(seed + i,), daemon=True) for i in range(args.workers)]
    threads.append(threading.Thread(target=load.dripper, daemon=True))
    for thread in threads:
        thread.start()
    nextReport = started + 60
    while any(thread.is_alive() for thread in threads):
        time.sleep(1)
        now = time.monotonic()
        if now >= nextReport:
            rssSeries.append((now - started, rss(process.pid)))
            with stats.lock:
                total, errors = sum(stats.requests.values()), sum(stats.errors.values())
            print(f"{(now - started) / 60:5.1f} min: {total} requests, {errors} unexpected, "
                  f"RSS {rssSeries[-1][1] / MiB:.1f} MiB", flush=True)
            nextReport += 60
        if now > deadline + 2 * HANG:
            stats.error("hang", "a worker did not finish")
            break
    elapsed = time.monotonic() - started
    load.closeIdle()
    time.sleep(1)
    rssSeries.append((elapsed, rss(process.pid)))
    filesAtEnd = openFiles(process.pid)

    process.send_signal(signal.SIGTERM)
    try:
        exitStatus = process.wait(60)
    except subprocess.TimeoutExpired:
        stats.error("hang", "the server did not stop on SIGTERM")
        process.kill()
        exitStatus = process.wait()
    log = ""
    for name in sorted(os.listdir(workdir)):
        if name.startswith("server.log"):
            with open(os.path.join(workdir, name), errors="replace") as f:
                log += f.read()
    for marker in ("Traceback", "Unhandled", "#critical", "#error"):
        if marker in log:
            stats.error("server-log", f"{marker} in the server log")

    total = sum(stats.requests.values())
    figures = {
        "minutes": round(elapsed / 60, 2),
        "seed": seed,
        "workers": args.workers,
        "requests": total,
        "requests_per_second": round(total / elapsed, 1),
        "by_action": dict(sorted(stats.requests.items())),
        "megabytes_received": round(stats.bytes / MiB, 1),
        "unexpected_errors": sum(stats.errors.values()),
        "errors_by_kind": dict(stats.errors),
        "error_examples": stats.examples,
        "rss_mib": [[round(t / 60, 1), round(r / MiB, 1)] for t, r in rssSeries],
        "open_files_start_end": [filesAtStart, filesAtEnd],
        "server_exit_status": exitStatus,
        "server_log_lines": log.count("\n"),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if args.keep:
        print(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if figures["unexpected_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

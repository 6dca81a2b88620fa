#!/usr/bin/env python3
"""
Benchmark nydus-proxy against its peers, back to back, on loopback.

Run, with a Python whose environment has nydus-proxy (and so Twisted)
installed, e.g. the venv made by
C{python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install .}:

    /tmp/benchvenv/bin/python bench/run.py [--quick] [--servers LIST]
        [--nydus-proxy-args ARGS] [--python PYTHON] [--duration S] [--runs N]

It lays random blobs (4 KiB, 1 MiB, 64 MiB, 1 GiB; --quick skips 1 GiB) in
a temporary directory, starts each server on a free 127.0.0.1 port and
checks its answers with curl, then measures them with wrk and curl, one
run of each load on each server in turn, so that noise from the rest of
the machine falls on all alike.  Servers: nydus-proxy, nginx (2 workers,
sendfile), plain C{twistd web --path}, docker-registry; a peer that is not
installed is skipped with a printed line.  Each load runs --runs times
(default 3) for about --duration seconds (default 3; 1 with --quick) and
the median is reported.  The table, with each figure's ratio to nginx's,
is printed and written with the raw numbers to
bench/results/<timestamp>.txt and .json.  Every server is stopped at the
end, also on Ctrl-C or SIGTERM, and the temporary directory removed.

--nydus-proxy-args replaces the default "--no-access-log" (nginx runs with
access_log off), e.g. --nydus-proxy-args="--no-access-log --workers 2" (write it with "="
when the value is a single option).
The server runs from a temporary working directory, so it is the
nydus-proxy installed in --python's environment that is measured, not the
checkout: reinstall after changing the code.

Requires wrk and curl.  Python standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
REPO = "library/bench"
SERVERS = ["nydus-proxy", "nginx", "twistd-web", "docker-registry"]
TWISTD = "from twisted.scripts.twistd import run; run()"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROBLEM = re.compile(r"traceback|unhandled|error|crit|alert|emerg|fatal|warn", re.I)


# --- blobs -----------------------------------------------------------------

@dataclass
class Blob:
    hex: str
    size: int
    path: Path


def makeBlobs(root: Path, sizes: list[int]) -> dict[int, Blob]:
    """
    Write one blob of random bytes per size, flat as C{root/flat/<hex>},
    and hard-link each into a docker-registry filesystem layout under
    C{root/registry}, with a layer link in repository L{REPO}.
    """
    flat = root / "flat"
    flat.mkdir()
    v2 = root / "registry" / "docker" / "registry" / "v2"
    blobs = {}
    for size in sizes:
        digest = hashlib.sha256()
        partial = flat / "partial"
        with partial.open("wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 4 * MIB))
                digest.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        hexdigest = digest.hexdigest()
        path = flat / hexdigest
        partial.rename(path)
        data = v2 / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"
        data.parent.mkdir(parents=True)
        os.link(path, data)
        link = v2 / "repositories" / REPO / "_layers" / "sha256" / hexdigest / "link"
        link.parent.mkdir(parents=True)
        link.write_text(f"sha256:{hexdigest}")
        blobs[size] = Blob(hexdigest, size, path)
    return blobs


# --- processes -------------------------------------------------------------

def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readStat(pid: int) -> list[str] | None:
    """
    The fields of /proc/PID/stat after the command name (field 3 on).
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def processTree(root: int) -> list[int]:
    """
    C{root} and its live descendants.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = readStat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpuSeconds(pids: list[int]) -> float:
    """
    User plus system CPU time of these processes, all threads.
    """
    ticks = 0
    for pid in pids:
        fields = readStat(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def peakRss(pid: int) -> int:
    """
    VmHWM of one process, in bytes.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KIB
    return 0


@dataclass
class Server:
    """
    One server under test: how to start it and the URL of a blob.
    """

    name: str
    argv: list[str]
    port: int
    urlPath: Callable[[Blob], str]
    cwd: Path
    process: subprocess.Popen | None = None
    log: Path | None = None
    rssSkipsRoot: bool = False  # nginx: the master only supervises

    def url(self, blob: Blob) -> str:
        return f"http://127.0.0.1:{self.port}{self.urlPath(blob)}"

    def start(self) -> None:
        self.log = self.cwd / f"{self.name}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {self.logTail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"not listening after 30 s: {self.logTail()}")

    def logTail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:])

    def problems(self) -> list[str]:
        """
        Lines of the server's output that look like errors or warnings.
        """
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if PROBLEM.search(line)]

    def pids(self) -> list[int]:
        return processTree(self.process.pid)

    def peakRss(self) -> tuple[int, int]:
        """
        The peak RSS of the serving processes: summed, and the largest.
        """
        pids = self.pids()
        if self.rssSkipsRoot and len(pids) > 1:
            pids = pids[1:]
        peaks = [peakRss(pid) for pid in pids]
        return sum(peaks), max(peaks)

    def stop(self) -> None:
        """
        SIGTERM the server, then SIGKILL whatever of its tree is left.
        """
        if self.process is None or self.process.poll() is not None:
            return
        tree = self.pids()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


def nydusProxy(opts, root: Path) -> Server:
    port = freePort()
    argv = [opts.python, "-c", TWISTD, "-n", "--pidfile=", "nydus-proxy",
            "--blobsdir", str(root / "flat"),
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            *shlex.split(opts.nydus_proxy_args)]
    return Server("nydus-proxy", argv, port,
                  lambda b: f"/v2/{REPO}/blobs/sha256:{b.hex}", root)


def twistdWeb(opts, root: Path) -> Server:
    port = freePort()
    argv = [opts.python, "-c", TWISTD, "-n", "--pidfile=", "web",
            "--path", str(root / "flat"),
            "--listen", f"tcp:{port}:interface=127.0.0.1"]
    return Server("twistd-web", argv, port, lambda b: f"/{b.hex}", root)


def nginx(opts, root: Path) -> Server | str:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        return "nginx is not installed"
    port = freePort()
    prefix = root / "nginx"
    prefix.mkdir()
    # Temporary directories of the modules this build has, in our prefix
    # rather than in the system's.
    built = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    temps = "".join(
        f"    {kind}_temp_path {prefix / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if f"--http-{kind.replace('client_', '')}-temp-path" in built
    )
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
daemon off;
worker_processes 2;
pid {prefix / 'nginx.pid'};
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
{temps}    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location ~ "^/v2/(?:[a-z0-9._-]+/)*[a-z0-9._-]+/blobs/sha256:([0-9a-f]{{64}})$" {{
            default_type application/octet-stream;
            alias {root / 'flat'}/$1;
        }}
    }}
}}
""")
    argv = [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"]
    return Server("nginx", argv, port, lambda b: f"/v2/{REPO}/blobs/sha256:{b.hex}",
                  root, rssSkipsRoot=True)


def dockerRegistry(opts, root: Path) -> Server | str:
    binary = shutil.which("docker-registry")
    if binary is None:
        return "docker-registry is not installed"
    port = freePort()
    config = root / "registry.yml"
    config.write_text(f"""\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root / 'registry'}
  maintenance:
    uploadpurging:
      enabled: false
  redirect:
    disable: true
http:
  addr: 127.0.0.1:{port}
  secret: bench
""")
    argv = [binary, "serve", str(config)]
    return Server("docker-registry", argv, port,
                  lambda b: f"/v2/{REPO}/blobs/sha256:{b.hex}", root)


BUILDERS = {"nydus-proxy": nydusProxy, "nginx": nginx, "twistd-web": twistdWeb,
            "docker-registry": dockerRegistry}


# --- checks ----------------------------------------------------------------

def curl(*args: str) -> bytes:
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args],
                          capture_output=True, check=True).stdout


def verify(server: Server, blobs: dict[int, Blob]) -> None:
    """
    HEAD gives 200 and the size as Content-Length; a range gives 206 and
    exactly the bytes of the file.
    """
    for blob in blobs.values():
        url = server.url(blob)
        head = curl("-I", url).decode("latin-1").lower().splitlines()
        status = head[0].split()[1] if head else "?"
        length = [line.split(":", 1)[1].strip() for line in head
                  if line.startswith("content-length:")]
        if status != "200" or length != [str(blob.size)]:
            raise RuntimeError(f"HEAD {url}: status {status}, Content-Length {length}")
        first = blob.size // 3
        last = min(blob.size - 1, first + 4 * KIB - 1)
        out = curl("-w", "\n%{http_code}", "-r", f"{first}-{last}", url)
        body, _, status = out.rpartition(b"\n")
        with blob.path.open("rb") as f:
            f.seek(first)
            expected = f.read(last - first + 1)
        if status != b"206" or body != expected:
            raise RuntimeError(f"GET {url} bytes {first}-{last}: status "
                               f"{status.decode()}, {len(body)} bytes, "
                               f"{'same' if body == expected else 'different'}")


# --- loads -----------------------------------------------------------------

# A wrk script: `request` and `response` (optional) are spliced in; `done`
# prints one JSON line that wrk() reads.
WRK_SCRIPT = """\
-- generated by bench/run.py
wrong = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) math.randomseed(os.time() + %(seed)d) end
%(body)s
function done(summary, latency, requests)
  local w = 0
  for _, t in ipairs(threads) do w = w + t:get("wrong") end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %%d, "seconds": %%f, "bytes": %%d, "wrong": %%d, ' ..
    '"socket_errors": %%d, "timeouts": %%d, "status_4xx_5xx": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration / 1e6, summary.bytes, w,
    e.connect + e.read + e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""

# Random offsets, anywhere in the blob.  Status checks cost wrk time, so
# for large ranges measure() checks the bytes per request instead.
RANGE_BODY = """\
local size, len = %(size)d, %(len)d
function request()
  local first = math.random(0, size - len)
  return wrk.format(nil, nil, {Range = "bytes=" .. first .. "-" .. (first + len - 1)})
end
"""
RANGE_CHECK = 'function response(status) if status ~= 206 then wrong = wrong + 1 end end\n'


def wrk(server: Server, script: Path, url: str, connections: int, seconds: float) -> dict:
    before = cpuSeconds(server.pids())
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
         "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    cpu = cpuSeconds(server.pids()) - before
    for line in out.splitlines():
        if line.startswith("BENCH "):
            result = json.loads(line[6:])
            result["server_cpu_s"] = cpu
            return result
    raise RuntimeError(f"no result from wrk: {out}")


def heads(server: Server, blob: Blob, connections: int, count: int, config: Path) -> dict:
    """
    C{count} HEAD requests on C{connections} kept-alive connections, with
    curl: wrk cannot send HEAD, as it waits for a body of Content-Length
    bytes after the headers.  Every answer must be 200 with the blob's
    size as Content-Length.
    """
    config.write_text(f'url = "{server.url(blob)}"\noutput = "/dev/null"\n' * count)
    before = cpuSeconds(server.pids())
    started = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sI", "--no-progress-meter", "--parallel", "--parallel-max",
         str(connections), "-w", "%{http_code} %header{content-length} %{num_connects}\n",
         "-K", str(config)],
        capture_output=True, text=True,
    ).stdout
    seconds = time.perf_counter() - started
    cpu = cpuSeconds(server.pids()) - before
    answers = [line.split() for line in out.splitlines()]
    good = sum(answer[:2] == ["200", str(blob.size)] for answer in answers)
    return {"requests": count, "seconds": seconds, "wrong": count - good,
            "connects": sum(int(answer[-1]) for answer in answers if answer),
            "server_cpu_s": cpu}


def download(server: Server, blob: Blob, count: int) -> dict:
    """
    C{count} parallel whole-blob downloads with curl.
    """
    before = cpuSeconds(server.pids())
    started = time.perf_counter()
    clients = [subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
         server.url(blob)], stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        answers = [client.communicate()[0].split() for client in clients]
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    seconds = time.perf_counter() - started
    cpu = cpuSeconds(server.pids()) - before
    total = count * blob.size
    wrong = sum(answer != ["200", str(blob.size)] for answer in answers)
    return {"seconds": seconds, "bytes": total, "wrong": wrong, "server_cpu_s": cpu,
            "mib_s": total / MIB / seconds, "cpu_s_per_gib": cpu / (total / GIB)}


# --- one server ------------------------------------------------------------

# (key, label) in the order of the table's rows.
METRICS = [
    ("head_rps", "HEAD req/s, c=16 (curl)"),
    ("r4k16_rps", "4 KiB ranges req/s, c=16"),
    ("r4k16_p50_ms", "  p50 latency ms"),
    ("r4k16_p99_ms", "  p99 latency ms"),
    ("r4k64_rps", "4 KiB ranges req/s, c=64"),
    ("r4k64_p50_ms", "  p50 latency ms"),
    ("r4k64_p99_ms", "  p99 latency ms"),
    ("r1m16_mib_s", "1 MiB ranges MiB/s, c=16"),
    ("cpu_us_per_req", "server CPU us/request (4 KiB, c=16)"),
    ("get1g_mib_s", "1 GiB download MiB/s"),
    ("get1g_cpu_s_gib", "  server CPU s/GiB"),
    ("get4x64m_mib_s", "4 x 64 MiB downloads MiB/s"),
    ("get4x64m_cpu_s_gib", "  server CPU s/GiB"),
    ("peak_rss_mib", "peak RSS MiB, all processes"),
    ("peak_rss_max_mib", "  largest process"),
    ("wrong", "wrong answers + socket errors (sum)"),
]


def measureAll(servers: list[Server], blobs: dict[int, Blob], opts, workdir: Path) -> dict:
    """
    Every load, C{opts.runs} times, each run going round all the servers so
    that whatever else the machine does falls on all of them alike: the
    raw results of each server and its figures (medians).
    """
    rangeBlob = blobs[64 * MIB]
    r4k = workdir / "r4k.lua"
    r4k.write_text(WRK_SCRIPT % {"seed": os.getpid(), "body": RANGE_BODY % {
        "size": rangeBlob.size, "len": 4 * KIB} + RANGE_CHECK})
    r1m = workdir / "r1m.lua"
    r1m.write_text(WRK_SCRIPT % {"seed": os.getpid(), "body": RANGE_BODY % {
        "size": rangeBlob.size, "len": MIB}})
    # Enough HEAD requests for about --duration seconds, from a probe.
    headCount = {}
    for server in servers:
        probe = heads(server, blobs[MIB], 16, 2000, workdir / "heads.curl")
        rate = probe["requests"] / probe["seconds"]
        headCount[server.name] = max(2000, int(rate * opts.duration))

    loads = [
        ("head", lambda s: heads(s, blobs[MIB], 16, headCount[s.name],
                                 workdir / "heads.curl")),
        ("r4k16", lambda s: wrk(s, r4k, s.url(rangeBlob), 16, opts.duration)),
        ("r4k64", lambda s: wrk(s, r4k, s.url(rangeBlob), 64, opts.duration)),
        ("r1m16", lambda s: wrk(s, r1m, s.url(rangeBlob), 16, opts.duration)),
    ]
    if GIB in blobs:
        loads.append(("get1g", lambda s: download(s, blobs[GIB], 1)))
    loads.append(("get4x64m", lambda s: download(s, blobs[64 * MIB], 4)))
    raw: dict[str, dict[str, list[dict]]] = {server.name: {} for server in servers}
    for key, load in loads:
        for _ in range(opts.runs):
            for server in servers:
                raw[server.name].setdefault(key, []).append(load(server))
        for server in servers:
            progress(server.name, key, raw[server.name][key])
    return {
        server.name: {"figures": figures(raw[server.name], server.peakRss()),
                      "raw": raw[server.name]}
        for server in servers
    }


def figures(raw: dict[str, list[dict]], peakRss: tuple[int, int]) -> dict[str, float]:
    med = lambda key, f: statistics.median(f(r) for r in raw[key])
    rps = lambda r: r["requests"] / r["seconds"]
    found = {
        "head_rps": med("head", rps),
        "r4k16_rps": med("r4k16", rps),
        "r4k16_p50_ms": med("r4k16", lambda r: r["p50_us"] / 1000),
        "r4k16_p99_ms": med("r4k16", lambda r: r["p99_us"] / 1000),
        "r4k64_rps": med("r4k64", rps),
        "r4k64_p50_ms": med("r4k64", lambda r: r["p50_us"] / 1000),
        "r4k64_p99_ms": med("r4k64", lambda r: r["p99_us"] / 1000),
        "r1m16_mib_s": med("r1m16", rps),  # 1 MiB each
        "cpu_us_per_req": med("r4k16", lambda r: r["server_cpu_s"] / r["requests"] * 1e6),
        "get4x64m_mib_s": med("get4x64m", lambda r: r["mib_s"]),
        "get4x64m_cpu_s_gib": med("get4x64m", lambda r: r["cpu_s_per_gib"]),
        "peak_rss_mib": peakRss[0] / MIB,
        "peak_rss_max_mib": peakRss[1] / MIB,
    }
    if "get1g" in raw:
        found["get1g_mib_s"] = med("get1g", lambda r: r["mib_s"])
        found["get1g_cpu_s_gib"] = med("get1g", lambda r: r["cpu_s_per_gib"])
    # 1 MiB ranges are not status-checked by wrk: a short body shows here.
    short = sum(r["requests"] for r in raw["r1m16"] if r["bytes"] < r["requests"] * MIB)
    found["wrong"] = short + sum(
        r.get("wrong", 0) + r.get("socket_errors", 0) + r.get("timeouts", 0)
        + r.get("status_4xx_5xx", 0) for runs in raw.values() for r in runs)
    return found


def progress(name: str, key: str, runs: list[dict]) -> None:
    if "mib_s" in runs[0]:
        shown = ", ".join(f"{r['mib_s']:.0f} MiB/s" for r in runs)
    else:
        shown = ", ".join(f"{r['requests'] / r['seconds']:.0f} req/s" for r in runs)
    bad = sum(r.get("wrong", 0) + r.get("socket_errors", 0) + r.get("status_4xx_5xx", 0)
              for r in runs)
    print(f"  {name:16} {key:9} {shown}" + (f"  ({bad} wrong/errors)" if bad else ""),
          flush=True)


# --- report ----------------------------------------------------------------

def number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(results: dict[str, dict]) -> str:
    names = list(results)
    base = results.get("nginx", {}).get("figures")
    rows = [["metric", *names]]
    for key, label in METRICS:
        row = [label]
        for name in names:
            value = results[name]["figures"].get(key)
            if value is None:
                row.append("-")
                continue
            cell = number(value)
            if base and base.get(key) and key != "wrong":
                ratio = value / base[key]
                cell += f" ({ratio:.2f}x)" if ratio >= 0.1 else f" ({ratio:.2g}x)"
            row.append(cell)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(names) + 1)]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if base:
        lines.append("(x) = figure / nginx's figure; for latency, CPU and RSS "
                     "lower is better.")
    return "\n".join(lines)


def versions(opts) -> dict:
    found = {}
    probe = ("import twisted, nydusproxy; print(twisted.__version__, "
             "nydusproxy.__file__)")
    done = subprocess.run([opts.python, "-c", probe], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    found["python"] = opts.python
    found["twisted, nydusproxy"] = done.stdout.strip() or done.stderr.strip()[-200:]
    for name, argv in [("nginx", ["nginx", "-v"]), ("wrk", ["wrk", "-v"]),
                       ("docker-registry", ["docker-registry", "--version"])]:
        try:
            done = subprocess.run(argv, capture_output=True, text=True)
            found[name] = (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            found[name] = None
    try:
        found["commit"] = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return found


# --- main ------------------------------------------------------------------

def parseArgs(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated, from {','.join(SERVERS)}")
    parser.add_argument("--quick", action="store_true",
                        help="1 s loads, no 1 GiB blob")
    parser.add_argument("--duration", type=int, help="seconds per run (3)")
    parser.add_argument("--runs", type=int, default=3, help="runs per load (3)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter with nydus-proxy installed (this one)")
    parser.add_argument("--nydus-proxy-args", default="--no-access-log",
                        help='extra nydus-proxy options (default "--no-access-log")')
    opts = parser.parse_args(argv)
    opts.servers = [name for name in opts.servers.split(",") if name]
    unknown = set(opts.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    if opts.duration is None:
        opts.duration = 1 if opts.quick else 3
    return opts


def interrupt(signum, frame):
    """
    SIGINT and SIGTERM unwind through the finally blocks that stop the
    servers.
    """
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    opts = parseArgs(argv)
    for tool in ("wrk", "curl"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is required and not installed", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, interrupt)
    # Even where a shell started us with SIGINT ignored (in the background).
    signal.signal(signal.SIGINT, interrupt)
    started = time.monotonic()
    loadBefore = os.getloadavg()[0]
    info = versions(opts)
    for key, value in info.items():
        print(f"{key}: {value}")
    root = Path(tempfile.mkdtemp(prefix="nydus-bench-"))
    root.chmod(0o755)  # nginx workers run as another user when we are root
    servers: list[Server] = []
    skipped: dict[str, str] = {}
    problems: dict[str, list[str]] = {}
    try:
        sizes = [4 * KIB, MIB, 64 * MIB] + ([] if opts.quick else [GIB])
        print(f"writing blobs in {root} ...", flush=True)
        blobs = makeBlobs(root, sizes)
        for name in opts.servers:
            server = BUILDERS[name](opts, root)
            if isinstance(server, str):
                print(f"skipping {name}: {server}")
                skipped[name] = server
                continue
            print(f"{name}: {shlex.join(server.argv)}", flush=True)
            servers.append(server)
            try:
                server.start()
                verify(server, blobs)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", None) or ""
                print(f"skipping {name}: {e} {detail}".strip())
                skipped[name] = str(e)
                server.stop()
                servers.remove(server)
        results = measureAll(servers, blobs, opts, root)
        for server in servers:
            lines = server.problems()
            if lines:
                problems[server.name] = lines
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except subprocess.CalledProcessError as e:
        print(f"bench: {shlex.join(e.cmd)} failed ({e.returncode}): "
              f"{e.stderr or e.stdout}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)

    elapsed = time.monotonic() - started
    text = (
        f"{table(results)}\n\n"
        f"wall time {elapsed:.0f} s on {os.cpu_count()} CPUs; medians of {opts.runs} runs; "
        f"wrk -t1 for {opts.duration:g} s (ranges), curl --parallel for about as "
        f"long (HEAD), curl (downloads)\n"
        f"load average (1 min) {loadBefore:.2f} at start, {os.getloadavg()[0]:.2f} "
        f"at end: anything else running skews the figures\n"
        f"nydus-proxy options: {opts.nydus_proxy_args or '(none)'}\n"
    )
    for name, reason in skipped.items():
        text += f"skipped {name}: {reason}\n"
    for name, lines in problems.items():
        text += f"{name} logged {len(lines)} error/warning lines, e.g.: {lines[0]}\n"
    print()
    print(text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.txt").write_text(text)
    (out / f"{stamp}.json").write_text(json.dumps({
        "argv": sys.argv, "options": vars(opts), "versions": info,
        "wall_seconds": elapsed, "skipped": skipped, "problems": problems, "results": results,
    }, indent=1))
    print(f"written to {out / stamp}.txt and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""
C{--verify-digest}: serve a blob only if its bytes hash to the digest it is
asked for.

Off by default, because a nydus blob id is not always the sha256 of the
file.  When on, the first request for a file has it hashed once, in a
thread of the reactor's pool, never on the reactor thread.  That request
waits for the verdict for at most C{waitTime} seconds (a small blob is
hashed well within it); past that it is answered 503 C{UNAVAILABLE} with a
C{Retry-After}, and the hashing goes on for the requests that follow.
Unverified bytes are never sent.

Verdicts are kept for the last C{cacheSize} files, by device, inode, size,
modification and change times: a blob modified after its verification is
hashed again.  A blob whose bytes do not match is answered 404
C{BLOB_UNKNOWN}, as if it were not there, and logged once per verdict.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from . import errors

# The BlobResource's answer for a blob: (request, fd, status, digest) -> body;
# it owns the descriptor from then on, and closes it even when it raises.
Respond = Callable[[IRequest, int, int, bytes], Any]
# (device, inode, size, mtime, ctime) of a file, then the algorithm and hex.
Key = tuple[int, int, int, int, int, str, str]

_READ_SIZE = 1024 * 1024
# A conservative hashing rate, for the Retry-After of a 503.
_BYTES_PER_SECOND = 200 * 1024 * 1024


def _identity(status: os.stat_result) -> tuple[int, int, int, int, int]:
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


def hashFile(fd: int, algorithm: str) -> tuple[str, tuple[int, int, int, int, int]]:
    """
    Hash the file open at C{fd}, then close it.  Runs in a thread.

    @return: the hex digest, and the file's identity once read: a file
        changed while it was being read has another one.
    """
    try:
        digest = hashlib.new(algorithm)
        offset = 0
        while True:
            data = os.pread(fd, _READ_SIZE, offset)
            if not data:
                break
            digest.update(data)
            offset += len(data)
        return digest.hexdigest(), _identity(os.fstat(fd))
    finally:
        os.close(fd)


class DigestVerifier:
    """
    The verdicts on blob files, and the requests waiting for one.

    @ivar runInThread: C{f(*args) -> Deferred}, running C{f} off the
        reactor thread; by default in the reactor's thread pool.
    """

    cacheSize = 4096
    waitTime = 1.0
    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        runInThread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.clock = reactor
        self._runInThread = runInThread
        self.verdicts: OrderedDict[Key, bool] = OrderedDict()
        self.pending: dict[Key, list[_Waiter]] = {}

    def runInThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._runInThread is None:
            reactor: Any = self.clock
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        return self._runInThread(f, *args)

    def serve(
        self,
        request: IRequest,
        algorithm: str,
        hexdigest: str,
        digest: bytes,
        fd: int,
        status: os.stat_result,
        respond: Respond,
    ) -> bytes | int:
        """
        Answer for the blob open at C{fd} through C{respond} once it is
        known to match C{hexdigest}; take over C{fd} (close it) otherwise.
        """
        key: Key = (*_identity(status), algorithm, hexdigest)
        verdict = self.verdicts.get(key)
        if verdict is not None:
            self.verdicts.move_to_end(key)
            if verdict:
                return respond(request, fd, status, digest)
            os.close(fd)
            return errors.writeError(
                request, errors.BLOB_UNKNOWN, {"digest": digest.decode("ascii")}
            )
        waiters = self.pending.get(key)
        if waiters is None:
            copy = os.dup(fd)
            waiters = self.pending[key] = []
            try:
                hashing = self.runInThread(hashFile, copy, algorithm)
            except BaseException:
                del self.pending[key]
                os.close(copy)
                raise
        else:
            hashing = None
        waiter = _Waiter(self, request, fd, status, digest, respond)
        waiters.append(waiter)
        if hashing is not None:
            hashing.addBoth(self._hashed, key, digest)
        return NOT_DONE_YET

    def _hashed(self, result: Any, key: Key, digest: bytes) -> None:
        waiters = self.pending.pop(key, [])
        name = digest.decode("ascii")
        answer: bool | errors.ErrorCode
        if isinstance(result, Failure):
            self.log.failure("Hashing blob {digest} failed", result, digest=name)
            answer = errors.UNKNOWN
        else:
            actual, identity = result
            if identity != key[:5]:
                self.log.info(
                    "Blob {digest} changed while it was being hashed", digest=name
                )
                answer = errors.UNAVAILABLE
            else:
                answer = actual == key[6]
                self.verdicts[key] = answer
                while len(self.verdicts) > self.cacheSize:
                    self.verdicts.popitem(last=False)
                if not answer:
                    self.log.warn(
                        "Blob {digest} does not match its content ({algorithm} "
                        "{actual}); not served",
                        digest=name,
                        algorithm=key[5],
                        actual=actual,
                    )
        for waiter in waiters:
            waiter.resolve(answer)


class _Waiter:
    """
    One request waiting for a verdict, which owns its blob's descriptor
    until it is answered.
    """

    def __init__(
        self,
        verifier: DigestVerifier,
        request: IRequest,
        fd: int,
        status: os.stat_result,
        digest: bytes,
        respond: Respond,
    ) -> None:
        self.request = request
        self.fd: int | None = fd
        self.status = status
        self.digest = digest
        self.respond = respond
        self.timer: IDelayedCall | None = verifier.clock.callLater(
            verifier.waitTime, self._timedOut
        )
        request.notifyFinish().addErrback(self._gone)

    def _release(self) -> int | None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        fd, self.fd = self.fd, None
        return fd

    def _gone(self, reason: Failure) -> None:
        fd = self._release()
        if fd is not None:
            os.close(fd)

    def _timedOut(self) -> None:
        self.timer = None
        self._answerError(errors.UNAVAILABLE, retryAfter=True)

    def _answerError(self, code: errors.ErrorCode, retryAfter: bool = False) -> None:
        fd = self._release()
        if fd is None:
            return
        os.close(fd)
        if retryAfter:
            seconds = max(1, math.ceil(self.status.st_size / _BYTES_PER_SECOND))
            self.request.setHeader(b"Retry-After", b"%d" % (seconds,))
        detail = {"digest": self.digest.decode("ascii")}
        self._finish(errors.writeError(self.request, code, detail))

    def resolve(self, answer: bool | errors.ErrorCode) -> None:
        """
        Answer with the blob if C{answer} is true, 404 if it is false, or
        else the error it names.
        """
        if self.fd is None:
            return
        if isinstance(answer, errors.ErrorCode):
            self._answerError(answer, retryAfter=answer is errors.UNAVAILABLE)
            return
        if not answer:
            self._answerError(errors.BLOB_UNKNOWN)
            return
        fd = self._release()
        try:
            body = self.respond(self.request, fd, self.status, self.digest)
        except Exception:
            DigestVerifier.log.failure("Answering for a verified blob failed")
            if self.request.startedWriting:
                self.request.loseConnection()
                return
            body = errors.writeError(self.request, errors.UNKNOWN)
        if body is not NOT_DONE_YET:
            self._finish(body)

    def _finish(self, body: bytes) -> None:
        self.request.write(body)
        self.request.finish()

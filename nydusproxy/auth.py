"""
Who may read blobs: HTTP Basic checked against an Apache htpasswd file, and
static Bearer tokens, both as nydusd sends them.

nydusd's registry backend sends a configured C{registry_token} as
C{Authorization: Bearer <token>} from the first request on.  With C{auth}
configured instead, it sends its first request bare and retries with
C{Authorization: Basic <auth>} after a 401 whose C{WWW-Authenticate} it can
parse; it matches the scheme C{Basic} case-sensitively, so the challenge is
exactly C{Basic realm="nydus-proxy"}.

Password hashes: bcrypt (C{$2y$}, C{$2b$}, C{$2a$}, what C{htpasswd -B}
writes), checked with the C{bcrypt} package; SHA-crypt (C{$5$}, C{$6$}, what
C{htpasswd -2} and C{-5} write), checked with C{libpass}, the maintained
fork of passlib.  Both come with the C{auth} extra.  MD5 (C{$apr1$},
htpasswd's default), SHA-1 (C{{SHA}}), DES crypt and plain text are refused.

Costs: a bcrypt check takes 50 to 300 ms at the usual costs, and nydusd
sends thousands of chunk reads with the same header.  A successful check is
remembered for the exact header value (under an HMAC with a key drawn when
the process starts, so the memory holds no password) until the file
changes; only the first request of a client, or a wrong password, pays for
a check, and the check runs in the reactor's thread pool, so the server
keeps serving meanwhile.  Concurrent requests with the same header share one
check.

Both files are watched: each protected request C{stat}s them (a cheap
system call) and re-reads one whose size, times or inode changed, so new
credentials work and removed ones stop working on the next request.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from . import errors

REALM = "nydus-proxy"
CHALLENGE = b'Basic realm="' + REALM.encode("ascii") + b'"'

_AUTHORIZATION = b"authorization"
_BCRYPT = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")
_SHA_CRYPT = re.compile(rb"\$([56])\$(?:rounds=([0-9]{1,9})\$)?[^$:\s]{0,16}\$[./0-9A-Za-z]+\Z")
# RFC 6750's b64token: what can follow "Bearer " in a header.
_TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z")
# bcrypt reads at most 72 bytes of a password (so does htpasswd's); the
# bcrypt package refuses longer ones instead of ignoring the rest.
_BCRYPT_MAX = 72
_EXTRA = "pip install 'nydus-proxy[auth]'"

# A check: (password, hash) -> whether they match.  Runs in a thread.
Verifier = Callable[[bytes, bytes], bool]
# Runs a verifier off the reactor thread: (verifier, password, hash) -> Deferred[bool].
Runner = Callable[..., Deferred]


class CredentialsError(Exception):
    """
    A credentials file cannot be used; the message says why, in one line.
    """


def protects(postpath: Sequence[bytes]) -> bool:
    """
    Whether a path needs credentials: everything under C{/v2} and every
    blob route.  Other paths (a health check, the 404 of an unknown path)
    answer without.
    """
    if postpath and postpath[0] == b"v2":
        return True
    return len(postpath) >= 3 and postpath[-2] == b"blobs"


def _verifyBcrypt(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    return bcrypt.checkpw(password[:_BCRYPT_MAX], hashed)


def _verifyShaCrypt(password: bytes, hashed: bytes) -> bool:
    from passlib import exc
    from passlib.hash import sha256_crypt, sha512_crypt

    handler = sha256_crypt if hashed.startswith(b"$5$") else sha512_crypt
    try:
        return handler.verify(password, hashed)
    except exc.PasswordSizeError:
        return False


def _verifierFor(hashed: bytes) -> Verifier:
    """
    The check for one hash of an htpasswd line.

    @raise ValueError: the hash is of a kind not accepted, or malformed,
        or its checker is not installed; the message says which.
    """
    if hashed.startswith((b"$2y$", b"$2b$", b"$2a$")):
        if not _BCRYPT.match(hashed):
            raise ValueError("malformed bcrypt hash")
        try:
            import bcrypt  # noqa: F401
        except ImportError:
            raise ValueError(f"bcrypt hashes need the bcrypt package: {_EXTRA}") from None
        return _verifyBcrypt
    if hashed.startswith((b"$5$", b"$6$")):
        match = _SHA_CRYPT.match(hashed)
        if not match:
            raise ValueError("malformed SHA-crypt hash")
        if match.group(2) is not None and not 1000 <= int(match.group(2)) <= 999999999:
            raise ValueError("SHA-crypt rounds must be between 1000 and 999999999")
        try:
            from passlib.hash import sha256_crypt, sha512_crypt
        except ImportError:
            raise ValueError(f"SHA-crypt hashes need the libpass package: {_EXTRA}") from None
        handler = sha256_crypt if match.group(1) == b"5" else sha512_crypt
        try:
            handler.from_string(hashed)
        except ValueError:
            raise ValueError("malformed SHA-crypt hash") from None
        return _verifyShaCrypt
    if hashed.startswith(b"$apr1$"):
        reason = "MD5 ($apr1$, htpasswd's default) hashes are not accepted"
    elif hashed.startswith(b"{SHA}"):
        reason = "SHA-1 ({SHA}) hashes are not accepted"
    elif hashed.startswith(b"$1$"):
        reason = "MD5-crypt ($1$) hashes are not accepted"
    else:
        reason = "unknown hash format (plain text or DES crypt?) not accepted"
    raise ValueError(f"{reason}; make bcrypt ones with htpasswd -B")


@dataclass(frozen=True)
class _Entry:
    verify: Verifier
    hashed: bytes


@dataclass
class Htpasswd:
    """
    The users of an htpasswd file.  C{dummy} is the entry an unknown user's
    password is checked against, so that an unknown user costs as much as
    a wrong password.
    """

    users: dict[bytes, _Entry] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def dummy(self) -> _Entry | None:
        return next(iter(self.users.values()), None)


@dataclass
class Tokens:
    """
    The sha256 digests of the tokens of a token file.
    """

    digests: tuple[bytes, ...] = ()

    def __len__(self) -> int:
        return len(self.digests)


def parseHtpasswd(data: bytes, source: str) -> tuple[Htpasswd, list[str]]:
    """
    Read an Apache htpasswd file: C{user:hash} lines; blank lines and lines
    starting with C{#} are skipped.  A bad line, or a user named again, is
    left out and named in the problems returned (never with its hash).
    """
    table = Htpasswd()
    problems = []
    for number, line in enumerate(data.split(b"\n"), 1):
        line = line.rstrip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        where = f"{source} line {number}"
        if not sep or not user or not hashed:
            problems.append(f"{where}: not a user:hash line")
            continue
        name = user.decode("utf-8", "backslashreplace")
        try:
            verify = _verifierFor(hashed)
        except ValueError as e:
            problems.append(f"{where} (user {name}): {e}")
            continue
        if user in table.users:
            problems.append(f"{where}: user {name} appears again; the first line counts")
            continue
        table.users[user] = _Entry(verify, hashed)
    return table, problems


def parseTokens(data: bytes, source: str) -> tuple[Tokens, list[str]]:
    """
    Read a token file: one bearer token per line, surrounding white space
    ignored; blank lines and lines starting with C{#} are skipped.  A line
    that cannot be a bearer token is left out and named (by number only).
    """
    digests = []
    problems = []
    for number, line in enumerate(data.split(b"\n"), 1):
        token = line.strip()
        if not token or token.startswith(b"#"):
            continue
        if not _TOKEN.match(token):
            problems.append(
                f"{source} line {number}: not a bearer token "
                "(letters, digits and -._~+/, then optional =)"
            )
            continue
        digests.append(hashlib.sha256(token).digest())
    return Tokens(tuple(dict.fromkeys(digests))), problems


class WatchedFile:
    """
    A credentials file, parsed, and parsed again when it changes.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        kind: str,
        parse: Callable[[bytes, str], tuple[Any, list[str]]],
    ) -> None:
        self.path = path
        self.kind = kind
        self._parse = parse
        self._signature: tuple | None = None
        self._failure: tuple | None = None
        self.value: Any = None

    def load(self) -> None:
        """
        Read the file now, strictly: at start, and once more after twistd
        has dropped its privileges.

        @raise CredentialsError: it cannot be read, has a bad line, or
            holds no credentials.
        """
        try:
            signature, data = self._read()
        except OSError as e:
            raise CredentialsError(f"{self.kind} {self.path}: {e.strerror}") from None
        value, problems = self._parse(data, self.path)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CredentialsError(problems[0] + more)
        if not len(value):
            raise CredentialsError(f"{self.kind} {self.path} holds no credentials")
        self._signature, self.value = signature, value

    def refresh(self) -> bool:
        """
        Read the file again if it changed since it was last read.  A file
        that cannot be read any more grants nothing until it can; a bad
        line is left out.  Both are logged, once per change.

        @return: whether the file was read again.
        """
        try:
            status = os.stat(self.path)
            signature: tuple = _signature(status)
        except OSError as e:
            signature = ("error", e.errno)
        if signature == self._signature:
            return False
        try:
            signature, data = self._read()
        except OSError as e:
            # Tried again on each request (the cause may pass), logged
            # once per file state and error.
            failure = (signature, e.errno)
            if failure != self._failure:
                self._failure = failure
                self.log.error(
                    "Cannot read {kind} {path} ({reason}): refusing its credentials "
                    "until it can be read",
                    kind=self.kind, path=self.path, reason=e.strerror,
                )
            self._signature = None
            self.value = self._parse(b"", self.path)[0]
            return True
        self._failure = None
        value, problems = self._parse(data, self.path)
        for problem in problems:
            self.log.warn("{problem}: line ignored", problem=problem)
        self._signature, self.value = signature, value
        self.log.info(
            "Read {kind} {path}: {count} entries", kind=self.kind, path=self.path,
            count=len(value),
        )
        return True

    def _read(self) -> tuple[tuple, bytes]:
        with open(self.path, "rb") as f:
            # Taken before reading: a write during the read changes it
            # again, and the next request reads the file once more.
            signature = _signature(os.fstat(f.fileno()))
            return signature, f.read()


def _signature(status: os.stat_result) -> tuple:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
            status.st_ctime_ns)


def threadRunner(reactor) -> Runner:
    """
    Run checks in C{reactor}'s thread pool.
    """

    def run(f: Callable, *args: Any) -> Deferred:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def _decodeBasic(credentials: bytes) -> tuple[bytes, bytes] | None:
    try:
        decoded = binascii.a2b_base64(credentials, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


class Authenticator:
    """
    The check in front of the registry routes: L{guard} lets a request
    through, answers it 401, or holds it while a password is checked.
    """

    log = Logger()
    # Successful Basic checks remembered at most; all are forgotten when
    # there would be more (legitimate clients are few).
    cacheSize = 1024

    def __init__(
        self,
        htpasswd: WatchedFile | None,
        tokens: WatchedFile | None,
        runner: Runner,
    ) -> None:
        self.htpasswd = htpasswd
        self.tokens = tokens
        self.runner = runner
        self._key = os.urandom(32)
        self._verified: set[bytes] = set()
        self._pending: dict[bytes, list[Callable[[bool], None]]] = {}

    @classmethod
    def fromFiles(
        cls, htpasswdPath: str | None, tokenPath: str | None, runner: Runner
    ) -> Authenticator:
        """
        Read the files given, strictly (see L{WatchedFile.load}).
        """
        htpasswd = tokens = None
        if htpasswdPath is not None:
            htpasswd = WatchedFile(htpasswdPath, "htpasswd file", parseHtpasswd)
            htpasswd.load()
        if tokenPath is not None:
            tokens = WatchedFile(tokenPath, "token file", parseTokens)
            tokens.load()
        return cls(htpasswd, tokens, runner)

    def load(self) -> None:
        """
        Read the files again, strictly.
        """
        for watched in (self.htpasswd, self.tokens):
            if watched is not None:
                watched.load()
        self._verified.clear()

    def guard(
        self, request: IRequest, resume: Callable[[IRequest], bytes | int]
    ) -> bytes | int | None:
        """
        Check a request's credentials.

        @param resume: renders the request once a held request's check has
            succeeded (the router's C{render}, which calls this again and
            then finds the check remembered).
        @return: L{None} to serve the request; otherwise what C{render}
            returns: a 401 body, or C{NOT_DONE_YET} while a check runs.
        """
        if not protects(request.postpath):
            return None
        headers = request.requestHeaders.getRawHeaders(_AUTHORIZATION)
        if headers is None:
            # nydusd's first request with Basic credentials: not a failure.
            return self._refuse(request)
        if len(headers) != 1:
            return self._refuse(request, "several Authorization headers")
        [header] = headers
        scheme, _, credentials = header.partition(b" ")
        scheme = scheme.lower()
        credentials = credentials.strip(b" \t")
        if scheme == b"bearer" and self.tokens is not None:
            if self._tokenKnown(credentials):
                return None
            return self._refuse(request, "unknown bearer token")
        if scheme == b"basic" and self.htpasswd is not None:
            return self._basic(request, header, credentials, resume)
        return self._refuse(request, "credentials of a scheme not accepted")

    def _tokenKnown(self, token: bytes) -> bool:
        assert self.tokens is not None
        self.tokens.refresh()
        digest = hashlib.sha256(token).digest()
        known = False
        for candidate in self.tokens.value.digests:
            # Every candidate is compared: no early exit.
            known |= hmac.compare_digest(candidate, digest)
        return known

    def _basic(
        self,
        request: IRequest,
        header: bytes,
        credentials: bytes,
        resume: Callable[[IRequest], bytes | int],
    ) -> bytes | int | None:
        assert self.htpasswd is not None
        if self.htpasswd.refresh():
            self._verified.clear()
        key = hmac.digest(self._key, header, "sha256")
        if key in self._verified:
            return None
        decoded = _decodeBasic(credentials)
        if decoded is None:
            return self._refuse(request, "malformed Basic credentials")
        user, password = decoded
        table = self.htpasswd.value
        entry = table.users.get(user)
        known = entry is not None
        if entry is None:
            entry = table.dummy
            if entry is None:
                return self._refuse(request, "no users")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda reason: gone.append(True))
        waiter = lambda allowed: self._answerHeld(request, allowed, resume, gone)  # noqa: E731
        waiters = self._pending.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return NOT_DONE_YET
        self._pending[key] = [waiter]
        checking = maybeDeferred(self.runner, entry.verify, password, entry.hashed)
        checking.addCallbacks(lambda matched: matched is True and known, self._checkFailed)
        checking.addCallback(self._checked, key, table)
        return NOT_DONE_YET

    def _checkFailed(self, reason: Failure) -> bool:
        self.log.failure("Checking a password failed", reason)
        return False

    def _checked(self, allowed: bool, key: bytes, table: Htpasswd) -> None:
        waiters = self._pending.pop(key, [])
        # A check against a file that has changed meanwhile is not kept:
        # the held requests are checked again against the new one.
        if allowed and self.htpasswd is not None and table is self.htpasswd.value:
            if len(self._verified) >= self.cacheSize:
                self._verified.clear()
            self._verified.add(key)
        for waiter in waiters:
            try:
                waiter(allowed)
            except Exception:
                self.log.failure("Answering a request held for a password check failed")

    def _answerHeld(
        self,
        request: IRequest,
        allowed: bool,
        resume: Callable[[IRequest], bytes | int],
        gone: list[bool],
    ) -> None:
        if gone:
            return
        body = resume(request) if allowed else self._refuse(request, "wrong user or password")
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def _refuse(self, request: IRequest, reason: str | None = None) -> bytes:
        if reason is not None:
            address = request.getClientAddress()
            self.log.info(
                "Refused {client}: {reason}",
                client=getattr(address, "host", "-"), reason=reason,
            )
        request.setHeader(b"WWW-Authenticate", CHALLENGE)
        return errors.writeError(request, errors.UNAUTHORIZED)

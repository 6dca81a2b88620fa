"""
Authentication as nydusd meets it: Basic after a 401, a static Bearer token,
htpasswd and token files read at start and again when they change.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import shutil
import subprocess
import sys
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from nydusproxy import auth, tap

from .clientsupport import makeAgent, readAll
from .support import InMemoryServer, assertErrorCode, makeBlobDir, parseResponses, sha256

try:
    import bcrypt
    from passlib.hash import sha256_crypt, sha512_crypt
except ImportError:  # pragma: no cover - the test extra installs them
    bcrypt = None

BLOB = bytes(range(256)) * 64 + b"end"
DIGEST = "sha256:" + sha256(BLOB)
BLOB_PATH = f"/v2/library/ubuntu/blobs/{DIGEST}".encode()
CHALLENGE = 'Basic realm="nydus-proxy"'
TOKEN = "tK3n-._~+/abcdefghijklmnop=="


def basic(user: str | bytes, password: str | bytes) -> bytes:
    if isinstance(user, str):
        user = user.encode()
    if isinstance(password, str):
        password = password.encode()
    return b"Basic " + base64.b64encode(user + b":" + password)


def bcryptHash(password: str | bytes, prefix: bytes = b"$2b$") -> str:
    if isinstance(password, str):
        password = password.encode()
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(4))
    return (prefix + hashed[4:]).decode("ascii")


def writeFile(testCase, text: str | bytes, path: str | None = None) -> str:
    if path is None:
        path = os.path.abspath(testCase.mktemp())
    data = text.encode() if isinstance(text, str) else text
    # Written to a new file and renamed, as editors and htpasswd do: the
    # watcher must notice even when size and mtime happen to repeat.
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)
    return path


def synchronous(verify, password, hashed):
    return succeed(verify(password, hashed))


class RecordingRunner:
    """
    Runs checks when the test says so, and records them.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, verify, password, hashed):
        done = Deferred()
        self.calls.append((verify, password, hashed, done))
        return done

    def runAll(self):
        calls, self.calls = self.calls, []
        for verify, password, hashed, done in calls:
            done.callback(verify(password, hashed))
        return len(calls)


class CountingRunner:
    def __init__(self):
        self.hashes = []

    def __call__(self, verify, password, hashed):
        self.hashes.append(hashed)
        return succeed(verify(password, hashed))


class AuthTestCase(SynchronousTestCase):
    if bcrypt is None:
        skip = "bcrypt and libpass are not installed (pip install '.[test]')"

    def setUp(self):
        self.blobsdir = makeBlobDir(self, [BLOB])
        self.htpasswd = writeFile(
            self,
            f"# users\nalice:{bcryptHash('wonderland')}\n\n"
            f"bob:{sha512_crypt.using(rounds=1000).hash('builder')}\n"
            f"carol:{sha256_crypt.using(rounds=1000).hash('caro:l')}\n",
        )
        self.tokens = writeFile(self, f"# nydusd registry_token\n{TOKEN}\n  second-token  \n")

    def makeServer(self, *options, runner=synchronous) -> InMemoryServer:
        server = InMemoryServer(self.blobsdir, *options)
        server.site.resource.auth.runner = runner
        return server

    def assertRefused(self, response, head=False):
        """
        The one 401 answer, whatever was wrong.
        """
        self.assertEqual(response.status, 401, response.body)
        self.assertEqual(response.headers.get("www-authenticate"), [CHALLENGE])
        if head:
            self.assertEqual(response.body, b"")
        else:
            assertErrorCode(self, response, 401, "UNAUTHORIZED")
            self.assertEqual(
                json.loads(response.body),
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required",
                             "detail": None}]},
            )


class NydusdFlowTests(AuthTestCase):
    def test_basicAfterChallenge(self):
        """
        As nydusd with C{auth}: the bare HEAD gets 401 with exactly
        C{WWW-Authenticate: Basic realm="nydus-proxy"} and no body; the
        retry with Basic credentials gets the size, and chunk reads their
        exact bytes, on one connection.
        """
        server = self.makeServer("--htpasswd", self.htpasswd)
        [bare] = server.exchange((b"HEAD", BLOB_PATH, {}))
        self.assertRefused(bare, head=True)
        self.assertIn(b'\r\nWWW-Authenticate: Basic realm="nydus-proxy"\r\n', bare.raw + b"\r\n")
        self.assertEqual(bare.header("content-type"), "application/json")
        credentials = {b"Authorization": basic("alice", "wonderland")}
        responses = server.exchange(
            (b"HEAD", BLOB_PATH, credentials),
            (b"GET", BLOB_PATH, {**credentials, b"Range": b"bytes=0-4095"}),
            (b"GET", BLOB_PATH, {**credentials, b"Range": b"bytes=4096-"}),
            (b"GET", b"/v2/", credentials),
        )
        self.assertEqual([r.status for r in responses], [200, 206, 206, 200])
        self.assertEqual(responses[0].header("content-length"), str(len(BLOB)))
        self.assertEqual(responses[1].header("content-range"), f"bytes 0-4095/{len(BLOB)}")
        self.assertEqual(responses[1].body + responses[2].body, BLOB)
        self.assertIsNone(responses[1].header("www-authenticate"))

    def test_getWithoutCredentials(self):
        """
        A GET without credentials gets the 401 with an UNAUTHORIZED body.
        """
        server = self.makeServer("--htpasswd", self.htpasswd)
        self.assertRefused(server.get(BLOB_PATH, range=b"bytes=0-9"))

    def test_shaCryptUsers(self):
        """
        SHA-512 and SHA-256 crypt users are accepted; a colon in the
        password is part of the password.
        """
        server = self.makeServer("--htpasswd", self.htpasswd)
        for user, password in (("bob", "builder"), ("carol", "caro:l")):
            response = server.get(BLOB_PATH, range=b"bytes=1-2", authorization=basic(user, password))
            self.assertEqual((response.status, response.body), (206, BLOB[1:3]), user)

    def test_bearerToken(self):
        """
        As nydusd with C{registry_token}: the token as Bearer from the first
        request on.
        """
        server = self.makeServer("--token-file", self.tokens)
        for token in (TOKEN, "second-token"):
            response = server.get(BLOB_PATH, range=b"bytes=0-15",
                                  authorization=b"Bearer " + token.encode())
            self.assertEqual((response.status, response.body), (206, BLOB[:16]), token)

    def test_bothFiles(self):
        """
        With both files, either kind of credentials is enough.
        """
        server = self.makeServer("--htpasswd", self.htpasswd, "--token-file", self.tokens)
        for header in (basic("alice", "wonderland"), b"Bearer " + TOKEN.encode()):
            self.assertEqual(server.get(BLOB_PATH, authorization=header).body, BLOB)

    def test_schemeCaseInsensitive(self):
        """
        The scheme is matched without regard to case, as RFC 9110 says.
        """
        server = self.makeServer("--htpasswd", self.htpasswd, "--token-file", self.tokens)
        for header in (b"basic " + basic("alice", "wonderland")[6:], b"BEARER " + TOKEN.encode()):
            self.assertEqual(server.get(BLOB_PATH, authorization=header).status, 200, header)

    def test_protectedRoutes(self):
        """
        Every registry route needs credentials: /v2/, both blob forms, the
        bare id, other methods (401 before 405), unknown /v2 paths.
        """
        server = self.makeServer("--token-file", self.tokens)
        hexdigest = DIGEST[7:]
        for method, url in (
            (b"GET", b"/v2/"),
            (b"GET", b"/v2"),
            (b"GET", f"/ns/repo/blobs/{DIGEST}".encode()),
            (b"GET", f"/ns/repo/blobs/{hexdigest}".encode()),
            (b"GET", f"/v2/a/blobs/{hexdigest}".encode()),
            (b"GET", b"/v2/a/blobs/sha256:bad"),
            (b"PUT", BLOB_PATH),
            (b"GET", b"/v2/a/manifests/latest"),
        ):
            self.assertRefused(server.get(url, method=method))

    def test_otherPathsOpen(self):
        """
        Paths that are no registry route answer as without auth: the
        health check, and the 404 of an unknown path.
        """
        server = self.makeServer("--token-file", self.tokens)
        for url, status in ((b"/", 404), (b"/healthz", 200), (b"/favicon.ico", 404)):
            response = server.get(url)
            self.assertEqual(response.status, status, url)
            self.assertIsNone(response.header("www-authenticate"), url)
        self.assertFalse(auth.protects([b"healthz"]))
        self.assertFalse(auth.protects([]))
        self.assertTrue(auth.protects([b"v2", b""]))
        self.assertTrue(auth.protects([b"ns", b"repo", b"blobs", b"x"]))

    def test_noAuthByDefault(self):
        """
        Without either option, nothing asks for credentials.
        """
        server = InMemoryServer(self.blobsdir)
        self.assertIsNone(server.site.resource.auth)
        self.assertEqual(server.get(BLOB_PATH).body, BLOB)


class RefusalTests(AuthTestCase):
    def setUp(self):
        super().setUp()
        self.server = self.makeServer("--htpasswd", self.htpasswd, "--token-file", self.tokens)

    def test_wrongCredentials(self):
        """
        Wrong user, wrong password, unknown token, a password of another
        user: all the same 401, byte for byte.
        """
        answers = set()
        for header in (
            basic("mallory", "wonderland"),
            basic("alice", "Wonderland"),
            basic("alice", ""),
            basic("alice", "wonderland" + "x" * 100),
            basic("bob", "wonderland"),
            basic("", ""),
            b"Bearer " + TOKEN.encode() + b"x",
            b"Bearer " + TOKEN.lower().encode(),
        ):
            response = self.server.get(BLOB_PATH, authorization=header)
            self.assertRefused(response)
            answers.add((response.body, tuple(response.headers["www-authenticate"])))
        self.assertEqual(len(answers), 1)

    def test_malformedHeaders(self):
        """
        Malformed Authorization headers are 401, never 500.
        """
        for header in (
            b"Basic !!!",
            b"Basic",
            b"Basic ",
            b"Basic " + base64.b64encode(b"alicewonderland"),
            b"Basic " + base64.b64encode(b"alice:wonderland")[:-2],
            b"Basic " + base64.b64encode(b"alice:wonderland") + b" extra",
            b"Basic \xff\xfe\xfd",
            b"Basic " + base64.b64encode("al\u00efce:w\u00f6nderland".encode()),
            b"Basic " + base64.b64encode(b"\xff:\xfe"),
            b"Bearer",
            b"Bearer ",
            b"Bearer \xe2\x82\xac",
            b"Bearer a b",
            b"Digest username=alice",
            b"Negotiate abc",
            b"wonderland",
            b"\xff",
            b"",
        ):
            response = self.server.get(BLOB_PATH, authorization=header)
            self.assertRefused(response)

    def test_severalAuthorizationHeaders(self):
        """
        Two Authorization headers are refused, even if one is good.
        """
        protocol, transport = self.server.connect()
        protocol.dataReceived(
            b"GET " + BLOB_PATH + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: " + basic("alice", "wonderland") + b"\r\n"
            b"Authorization: Bearer nope\r\n\r\n"
        )
        [response] = parseResponses(transport.value(), [b"GET"])
        self.assertRefused(response)

    def test_scheme(self):
        """
        Basic credentials are refused when only tokens are configured, and
        Bearer tokens when only an htpasswd file is.
        """
        tokensOnly = self.makeServer("--token-file", self.tokens)
        self.assertRefused(tokensOnly.get(BLOB_PATH, authorization=basic("alice", "wonderland")))
        usersOnly = self.makeServer("--htpasswd", self.htpasswd)
        self.assertRefused(usersOnly.get(BLOB_PATH, authorization=b"Bearer " + TOKEN.encode()))

    def test_longPassword(self):
        """
        bcrypt reads 72 bytes of a password, as htpasswd does: a longer one
        matching in those 72 bytes is accepted; a long one for SHA-crypt
        is compared whole.
        """
        long = "p" * 72
        writeFile(self, f"dora:{bcryptHash(long)}\n"
                        f"eve:{sha512_crypt.using(rounds=1000).hash(long)}\n", self.htpasswd)
        self.assertEqual(self.server.get(BLOB_PATH, authorization=basic("dora", long + "xyz")).status, 200)
        self.assertRefused(self.server.get(BLOB_PATH, authorization=basic("dora", long[:-1])))
        self.assertEqual(self.server.get(BLOB_PATH, authorization=basic("eve", long)).status, 200)
        self.assertRefused(self.server.get(BLOB_PATH, authorization=basic("eve", long + "x")))
        self.assertRefused(self.server.get(BLOB_PATH, authorization=basic("eve", "x" * 8000)))


class CostTests(AuthTestCase):
    def test_unknownUserCostsACheck(self):
        """
        An unknown user's password is checked against a real hash, as a
        wrong password is, and refused even if it matched that hash.
        """
        runner = CountingRunner()
        server = self.makeServer("--htpasswd", self.htpasswd, runner=runner)
        self.assertRefused(server.get(BLOB_PATH, authorization=basic("mallory", "wonderland")))
        self.assertRefused(server.get(BLOB_PATH, authorization=basic("alice", "guess")))
        self.assertEqual(len(runner.hashes), 2)
        self.assertEqual(runner.hashes[0], runner.hashes[1])
        self.assertTrue(runner.hashes[0].startswith(b"$2b$04$"))

    def test_successRemembered(self):
        """
        Thousands of chunk reads with the same header pay for one check;
        wrong passwords are checked every time.
        """
        runner = CountingRunner()
        server = self.makeServer("--htpasswd", self.htpasswd, runner=runner)
        credentials = {b"Authorization": basic("alice", "wonderland")}
        requests = [(b"GET", BLOB_PATH, {**credentials, b"Range": b"bytes=%d-%d" % (i, i)})
                    for i in range(200)]
        responses = server.exchange(*requests)
        self.assertEqual(b"".join(r.body for r in responses), BLOB[:200])
        self.assertEqual(len(runner.hashes), 1)
        for _ in range(3):
            self.assertRefused(server.get(BLOB_PATH, authorization=basic("alice", "nope")))
        self.assertEqual(len(runner.hashes), 4)

    def test_cacheBounded(self):
        """
        The memory of successful checks is bounded.
        """
        runner = CountingRunner()
        server = self.makeServer("--htpasswd", self.htpasswd, runner=runner)
        authenticator = server.site.resource.auth
        authenticator.cacheSize = 3
        # The scheme's case makes distinct headers for the same user.
        encoded = basic("alice", "wonderland")[6:]
        headers = [scheme + b" " + encoded for scheme in (b"Basic", b"basic", b"BASIC", b"bAsic", b"baSic")]
        for header in headers:
            self.assertEqual(server.get(BLOB_PATH, authorization=header).status, 200)
        self.assertLessEqual(len(authenticator._verified), 3)
        self.assertEqual(len(runner.hashes), 5)

    def test_cacheHoldsNoSecret(self):
        """
        What is remembered is an HMAC of the header under a key of this
        process, not the header or the password.
        """
        server = self.makeServer("--htpasswd", self.htpasswd)
        header = basic("alice", "wonderland")
        server.get(BLOB_PATH, authorization=header)
        authenticator = server.site.resource.auth
        self.assertEqual(authenticator._verified,
                         {hmac.digest(authenticator._key, header, "sha256")})
        other = self.makeServer("--htpasswd", self.htpasswd).site.resource.auth
        self.assertNotEqual(other._key, authenticator._key)

    def test_tokensComparedInFull(self):
        """
        A token is compared with every configured token in constant time,
        even when the first matches.
        """
        calls = []
        original = hmac.compare_digest

        def counting(a, b):
            calls.append((len(a), len(b)))
            return original(a, b)

        self.patch(auth.hmac, "compare_digest", counting)
        server = self.makeServer("--token-file", self.tokens)
        self.assertEqual(server.get(BLOB_PATH, authorization=b"Bearer " + TOKEN.encode()).status, 200)
        # Two tokens, each a 32-byte digest.
        self.assertEqual(calls, [(32, 32), (32, 32)])


class HeldRequestTests(AuthTestCase):
    """
    Requests waiting for a password check in the thread pool.
    """

    def setUp(self):
        super().setUp()
        self.runner = RecordingRunner()
        self.server = self.makeServer("--htpasswd", self.htpasswd, runner=self.runner)

    def send(self, header, path=BLOB_PATH, method=b"GET", extra=b""):
        protocol, transport = self.server.connect()
        protocol.dataReceived(
            method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + header
            + b"\r\n" + extra + b"\r\n"
        )
        return protocol, transport

    def finish(self, transport, method=b"GET"):
        clock = self.server.clock
        while clock.getDelayedCalls() and any(c.getTime() <= clock.seconds()
                                              for c in clock.getDelayedCalls()):
            clock.advance(0)
        [response] = parseResponses(transport.value(), [method])
        return response

    def test_heldUntilChecked(self):
        """
        Nothing is written until the check is done; then the answer.
        """
        _, transport = self.send(basic("alice", "wonderland"), extra=b"Range: bytes=5-9\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.runner.runAll(), 1)
        response = self.finish(transport)
        self.assertEqual((response.status, response.body), (206, BLOB[5:10]))

    def test_headHeld(self):
        """
        A held HEAD answers headers only, and a refused one no body.
        """
        _, good = self.send(basic("alice", "wonderland"), method=b"HEAD")
        _, bad = self.send(basic("alice", "bad"), method=b"HEAD")
        self.assertEqual(self.runner.runAll(), 2)
        response = self.finish(good, b"HEAD")
        self.assertEqual((response.status, response.header("content-length")), (200, str(len(BLOB))))
        self.assertRefused(self.finish(bad, b"HEAD"), head=True)

    def test_concurrentShareOneCheck(self):
        """
        Requests that arrive with the same header while it is checked wait
        for that one check.
        """
        transports = [self.send(basic("alice", "wonderland"))[1] for _ in range(3)]
        _, other = self.send(basic("bob", "builder"))
        self.assertEqual(len(self.runner.calls), 2)
        self.runner.runAll()
        for transport in transports:
            self.assertEqual(self.finish(transport).body, BLOB)
        self.assertEqual(self.finish(other).body, BLOB)
        self.assertEqual(self.runner.calls, [])

    def test_clientGoneWhileChecking(self):
        """
        A client that leaves while its check runs is forgotten quietly; the
        others with the same header are answered.
        """
        protocol, transport = self.send(basic("alice", "wonderland"))
        _, stays = self.send(basic("alice", "wonderland"))
        protocol.connectionLost(Failure(ConnectionError("gone")))
        self.runner.runAll()
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.finish(stays).body, BLOB)

    def test_fileChangedWhileChecking(self):
        """
        A check against a file that changed meanwhile is done again against
        the new file: a user removed meanwhile is refused.
        """
        _, transport = self.send(basic("alice", "wonderland"))
        writeFile(self, f"bob:{sha512_crypt.using(rounds=1000).hash('builder')}\n", self.htpasswd)
        self.runner.runAll()
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.runner.runAll(), 1)
        self.assertRefused(self.finish(transport))

    def test_checkFails(self):
        """
        A check that raises is logged and refused, never a 500.
        """
        _, transport = self.send(basic("alice", "wonderland"))
        [(verify, password, hashed, done)] = self.runner.calls
        done.errback(RuntimeError("thread pool trouble"))
        self.assertRefused(self.finish(transport))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_runnerRaises(self):
        """
        A runner that fails at once does not leave later requests waiting.
        """

        def broken(*args):
            raise RuntimeError("no thread pool")

        self.server.site.resource.auth.runner = broken
        self.assertRefused(self.server.get(BLOB_PATH, authorization=basic("alice", "wonderland")))
        self.assertRefused(self.server.get(BLOB_PATH, authorization=basic("alice", "wonderland")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class ReloadTests(AuthTestCase):
    def setUp(self):
        super().setUp()
        self.server = self.makeServer("--htpasswd", self.htpasswd, "--token-file", self.tokens)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def status(self, header):
        return self.server.get(BLOB_PATH, method=b"HEAD", authorization=header).status

    def messages(self):
        return [formatEvent(event) for event in self.events]

    def test_htpasswdChanged(self):
        """
        A user added while the server runs is accepted; one removed, or
        whose password changed, is refused at once, even though its check
        was remembered.
        """
        alice, dave = basic("alice", "wonderland"), basic("dave", "diver")
        self.assertEqual((self.status(alice), self.status(dave)), (200, 401))
        writeFile(self, f"dave:{bcryptHash('diver')}\n", self.htpasswd)
        self.assertEqual((self.status(alice), self.status(dave)), (401, 200))
        writeFile(self, f"dave:{bcryptHash('deeper')}\n", self.htpasswd)
        self.assertEqual(self.status(dave), 401)
        self.assertEqual(self.status(basic("dave", "deeper")), 200)

    def test_rewrittenInPlace(self):
        """
        A file rewritten in place (same inode) is read again too.
        """
        dave = basic("dave", "diver")
        self.assertEqual(self.status(dave), 401)
        with open(self.htpasswd, "ab") as f:
            f.write(f"dave:{bcryptHash('diver')}\n".encode())
        self.assertEqual(self.status(dave), 200)

    def test_tokensChanged(self):
        """
        A token added is accepted, a token removed refused.
        """
        old, new = b"Bearer " + TOKEN.encode(), b"Bearer fresh-token"
        self.assertEqual((self.status(old), self.status(new)), (200, 401))
        writeFile(self, "fresh-token\n", self.tokens)
        self.assertEqual((self.status(old), self.status(new)), (401, 200))

    def test_fileRemoved(self):
        """
        While a file cannot be read its credentials are refused, logged
        once; when it is back, they work again.
        """
        alice = basic("alice", "wonderland")
        self.assertEqual(self.status(alice), 200)
        os.rename(self.htpasswd, self.htpasswd + ".away")
        self.assertEqual(self.status(alice), 401)
        self.assertEqual(self.status(alice), 401)
        errors = [m for m in self.messages() if m.startswith("Cannot read htpasswd file")]
        self.assertEqual(errors, [
            f"Cannot read htpasswd file {self.htpasswd} (No such file or directory): "
            "refusing its credentials until it can be read"
        ])
        self.assertEqual(self.status(b"Bearer " + TOKEN.encode()), 200)
        os.rename(self.htpasswd + ".away", self.htpasswd)
        self.assertEqual(self.status(alice), 200)

    def test_unreadableAtRuntime(self):
        """
        A file that is there but cannot be read (here a directory in its
        place) is tried again on each request and logged once; readable
        again, it works again.
        """
        alice = basic("alice", "wonderland")
        os.rename(self.htpasswd, self.htpasswd + ".away")
        os.mkdir(self.htpasswd)
        for _ in range(3):
            self.assertEqual(self.status(alice), 401)
        errors = [m for m in self.messages() if m.startswith("Cannot read htpasswd file")]
        self.assertEqual(errors, [
            f"Cannot read htpasswd file {self.htpasswd} (Is a directory): "
            "refusing its credentials until it can be read"
        ])
        os.rmdir(self.htpasswd)
        os.rename(self.htpasswd + ".away", self.htpasswd)
        self.assertEqual(self.status(alice), 200)

    def test_badLineAtRuntime(self):
        """
        A bad line written while the server runs is left out with a warning
        (naming its line, never its hash); the other lines work.
        """
        writeFile(self, f"dave:$apr1$abcdefgh$0123456789012345678901\n"
                        f"erin:{bcryptHash('e')}\n", self.htpasswd)
        self.assertEqual(self.status(basic("erin", "e")), 200)
        self.assertEqual(self.status(basic("dave", "x")), 401)
        warnings = [m for m in self.messages() if "line ignored" in m]
        self.assertEqual(len(warnings), 1)
        self.assertIn(f"{self.htpasswd} line 1 (user dave): MD5", warnings[0])
        self.assertNotIn("0123456789", warnings[0])


class SecretsNotLoggedTests(AuthTestCase):
    def test_logsHoldNoSecrets(self):
        """
        Neither the access log nor any other line holds an Authorization
        header, a password or a token, for requests served or refused.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        server = self.makeServer("--htpasswd", self.htpasswd, "--token-file", self.tokens)
        headers = [basic("alice", "wonderland"), basic("alice", "wonderlanx"),
                   b"Bearer " + TOKEN.encode(), b"Bearer " + TOKEN.encode() + b"Q",
                   b"Basic !!wonderland!!"]
        for header in headers:
            server.get(BLOB_PATH, range=b"bytes=0-0", authorization=header)
        accessLines = [formatEvent(e) for e in events
                       if e.get("log_namespace") == "nydusproxy.access"]
        self.assertEqual(len(accessLines), len(headers))
        everything = "\n".join(formatEvent(e) + repr(e) for e in events)
        for secret in ("wonderland", "wonderlanx", TOKEN, base64.b64encode(b"alice:").decode()[:6]):
            self.assertNotIn(secret, everything)
        self.assertIn("Refused 127.0.0.1: wrong user or password", everything)


class StartupTests(AuthTestCase):
    """
    The files are read at start: problems stop it with one line.
    """

    def setUp(self):
        super().setUp()
        self.addCleanup(setattr, sys, "excepthook", sys.excepthook)

    def check(self, *options) -> str:
        self.options = tap.Options()
        self.options.parseOptions(["--blobsdir", self.blobsdir, *options])
        error = self.assertRaises(tap.StartupError, tap.makeService, self.options, MemoryReactor())
        return str(error)

    def test_missingFiles(self):
        """
        A missing file is named.
        """
        missing = os.path.abspath("nowhere")
        self.assertEqual(self.check("--htpasswd", "nowhere"),
                         f"htpasswd file {missing}: No such file or directory")
        self.assertEqual(self.check("--token-file", "nowhere"),
                         f"token file {missing}: No such file or directory")

    def test_directory(self):
        """
        A directory is not a credentials file.
        """
        self.assertEqual(self.check("--htpasswd", self.blobsdir),
                         f"htpasswd file {self.blobsdir}: Is a directory")

    def test_empty(self):
        """
        A file with no credentials in it (only comments) stops the start.
        """
        empty = writeFile(self, "# nobody yet\n\n")
        self.assertEqual(self.check("--htpasswd", empty), f"htpasswd file {empty} holds no credentials")
        self.assertEqual(self.check("--token-file", empty), f"token file {empty} holds no credentials")

    def test_refusedFormats(self):
        """
        Hash formats not accepted are named with their line and user, and
        the way to make good ones; the hash itself is never shown.
        """
        for line, reason in (
            ("dave:$apr1$OEvwzrGG$JrypEi9BP3fiX/FmnCFCf/", "MD5 ($apr1$, htpasswd's default) hashes are not accepted"),
            ("dave:{SHA}GpHWL3ymc5liWkNopqtdSjuqYHM=", "SHA-1 ({SHA}) hashes are not accepted"),
            ("dave:$1$abcdefgh$GpHWL3ymc5liWkNopqtdSj", "MD5-crypt ($1$) hashes are not accepted"),
            ("dave:uCulH3U7md54.", "unknown hash format (plain text or DES crypt?) not accepted"),
            ("dave:plainpassword", "unknown hash format (plain text or DES crypt?) not accepted"),
        ):
            path = writeFile(self, f"alice:{bcryptHash('x')}\n{line}\n")
            message = self.check("--htpasswd", path)
            self.assertEqual(message, f"{path} line 2 (user dave): {reason}; "
                                      "make bcrypt ones with htpasswd -B")
            self.assertNotIn(line.partition(":")[2][6:], message)

    def test_malformedLines(self):
        """
        Lines that are no user:hash, malformed hashes, rounds out of range,
        and a user named twice stop the start, naming the first and
        counting the others.
        """
        good = bcryptHash("x")
        for text, message in (
            ("no colon here\n", "line 1: not a user:hash line"),
            (":" + good + "\n", "line 1: not a user:hash line"),
            ("dave:\n", "line 1: not a user:hash line"),
            ("dave:" + good[:-1] + "\n", "line 1 (user dave): malformed bcrypt hash"),
            ("dave:$2y$99$" + good[7:] + "\n", "line 1 (user dave): malformed bcrypt hash"),
            ("dave:$6$salt$short\n", "line 1 (user dave): malformed SHA-crypt hash"),
            ("dave:$5$rounds=999$salt$" + "a" * 43 + "\n",
             "line 1 (user dave): SHA-crypt rounds must be between 1000 and 999999999"),
            (f"dave:{good}\ndave:{good}\n", "line 2: user dave appears again; the first line counts"),
            ("a\nb\nc\n", "line 1: not a user:hash line (and 2 more)"),
        ):
            path = writeFile(self, text)
            self.assertEqual(self.check("--htpasswd", path), f"{path} {message}")

    def test_badTokens(self):
        """
        A token file line that cannot be a bearer token stops the start,
        named by its number only.
        """
        for line in ("two words", "caf\u00e9", "a=b", "quote\"d"):
            path = writeFile(self, f"good-token\n{line}\n")
            message = self.check("--token-file", path)
            self.assertEqual(message, f"{path} line 2: not a bearer token "
                                      "(letters, digits and -._~+/, then optional =)")
            self.assertNotIn(line, message)

    def test_missingPackage(self):
        """
        bcrypt lines without the bcrypt package (SHA-crypt ones without
        libpass) say which extra to install.
        """
        for module, line, name in (
            ("bcrypt", f"alice:{bcryptHash('x')}", "bcrypt hashes need the bcrypt package"),
            ("passlib.hash", f"bob:{sha256_crypt.using(rounds=1000).hash('x')}",
             "SHA-crypt hashes need the libpass package"),
        ):
            saved = sys.modules.get(module)
            sys.modules[module] = None
            try:
                path = writeFile(self, line + "\n")
                message = self.check("--htpasswd", path)
            finally:
                sys.modules[module] = saved
            self.assertEqual(message, f"{path} line 1 (user {line.partition(':')[0]}): "
                                      f"{name}: pip install 'nydus-proxy[auth]'")

    def test_readAgainAfterStart(self):
        """
        The files are read once more when the service starts (after
        twistd's --uid/--gid): one that cannot be read then stops it.
        """
        options = tap.Options()
        options.parseOptions(["--blobsdir", self.blobsdir, "--htpasswd", self.htpasswd,
                              "--listen", "tcp:0:interface=127.0.0.1", "--workers", "1"])
        service = tap.makeService(options, MemoryReactor())
        service.privilegedStartService()
        os.remove(self.htpasswd)
        os.mkdir(self.htpasswd)
        error = self.assertRaises(tap.StartupError, service.startService)
        self.assertEqual(str(error), f"htpasswd file {self.htpasswd}: Is a directory "
                                     f"(as uid {os.getuid()})")

    def test_acceptedFormats(self):
        """
        bcrypt's three prefixes and both SHA-crypts, with comments, blank
        lines and CRLF line ends, are read.
        """
        text = (
            f"# comment\r\na:{bcryptHash('1', b'$2y$')}\r\n\r\nb:{bcryptHash('2', b'$2a$')}\n"
            f"c:{bcryptHash('3')}\nd:{sha256_crypt.using(rounds=1000).hash('4')}\n"
            f"e:{sha512_crypt.hash('5')}\n"
        )
        table, problems = auth.parseHtpasswd(text.encode(), "f")
        self.assertEqual(problems, [])
        self.assertEqual(sorted(table.users), [b"a", b"b", b"c", b"d", b"e"])
        for user, password in zip("abcde", "12345"):
            entry = table.users[user.encode()]
            self.assertTrue(entry.verify(password.encode(), entry.hashed), user)
            self.assertFalse(entry.verify(b"x", entry.hashed), user)


class HtpasswdToolTests(AuthTestCase):
    """
    Files written by Apache's own htpasswd tool.
    """

    def setUp(self):
        super().setUp()
        self.tool = shutil.which("htpasswd")
        if self.tool is None:
            raise SkipTest("htpasswd is not installed (apt-get install apache2-utils)")

    def line(self, *flags, user="user", password="pass word:1"):
        result = subprocess.run([self.tool, "-nb", *flags, user, password],
                                capture_output=True, text=True, check=True, timeout=60)
        return result.stdout.strip()

    def test_secureFormatsAccepted(self):
        """
        htpasswd's bcrypt (-B), SHA-256 (-2) and SHA-512 (-5) lines are
        accepted with their password and no other.
        """
        lines = [self.line("-B", "-C", "4", user="b"), self.line("-2", user="s2"),
                 self.line("-5", "-r", "1000", user="s5")]
        path = writeFile(self, "\n".join(lines) + "\n")
        server = self.makeServer("--htpasswd", path)
        for user in ("b", "s2", "s5"):
            self.assertEqual(server.get(BLOB_PATH, authorization=basic(user, "pass word:1")).body,
                             BLOB, user)
            self.assertRefused(server.get(BLOB_PATH, authorization=basic(user, "pass word:2")))

    def test_weakFormatsRefused(self):
        """
        htpasswd's default MD5, -s SHA-1, -d crypt and -p plain text lines
        stop the start.
        """
        for flag, reason in (("-m", "MD5 ($apr1$"), ("-s", "SHA-1 ({SHA})"),
                             ("-d", "unknown hash format"), ("-p", "unknown hash format")):
            path = writeFile(self, self.line(flag, user="weak", password="pw") + "\n")
            options = tap.Options()
            options.parseOptions(["--blobsdir", self.blobsdir, "--htpasswd", path])
            self.addCleanup(setattr, sys, "excepthook", sys.excepthook)
            error = self.assertRaises(tap.StartupError, tap.makeService, options, MemoryReactor())
            self.assertIn(f"line 1 (user weak): {reason}", str(error))


class ThreadTests(TestCase):
    """
    Over a real loopback socket with the real reactor: the checks run in
    the reactor's thread pool.
    """

    if bcrypt is None:
        skip = "bcrypt and libpass are not installed (pip install '.[test]')"

    async def test_nydusdOverLoopback(self):
        """
        A client doing what nydusd does (bare request, 401, retry with
        Basic) reads exact ranges; the check ran off the reactor thread.
        """
        blobsdir = makeBlobDir(self, [BLOB])
        htpasswd = writeFile(self, f"alice:{bcryptHash('wonderland')}\n")
        options = tap.Options()
        options.parseOptions(["--blobsdir", blobsdir, "--htpasswd", htpasswd])
        site = tap.buildSite(options, reactor)
        threads = []
        authenticator = site.resource.auth
        entry = authenticator.htpasswd.value.users[b"alice"]

        def recordingVerify(password, hashed):
            threads.append(threading.get_ident())
            return auth._verifyBcrypt(password, hashed)

        authenticator.htpasswd.value.users[b"alice"] = auth._Entry(recordingVerify, entry.hashed)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        agent = makeAgent(reactor)
        url = b"http://127.0.0.1:%d%s" % (port.getHost().port, BLOB_PATH)

        first = await agent.request(b"HEAD", url)
        self.assertEqual(first.code, 401)
        self.assertEqual(first.headers.getRawHeaders(b"www-authenticate"), [CHALLENGE.encode()])
        await readAll(first)
        credentials = Headers({b"Authorization": [basic("alice", "wonderland")]})
        head = await agent.request(b"HEAD", url, credentials)
        self.assertEqual(head.headers.getRawHeaders(b"content-length"), [b"%d" % len(BLOB)])
        await readAll(head)
        for first, last in ((0, 4095), (4096, 8191), (8192, len(BLOB) - 1)):
            headers = credentials.copy()
            headers.addRawHeader(b"Range", b"bytes=%d-%d" % (first, last))
            response = await agent.request(b"GET", url, headers)
            self.assertEqual(response.code, 206)
            self.assertEqual(response.headers.getRawHeaders(b"content-range"),
                             [b"bytes %d-%d/%d" % (first, last, len(BLOB))])
            self.assertEqual(await readAll(response), BLOB[first:last + 1])
        self.assertEqual(len(threads), 1)
        self.assertNotEqual(threads[0], threading.get_ident())

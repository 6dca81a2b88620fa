"""
GET /healthz: 200 while the blob directory can be read, 503 when it cannot.
"""

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from .support import InMemoryServer, assertErrorCode, makeBlobDir


class HealthTests(SynchronousTestCase):
    def setUp(self):
        self.blobsdir = makeBlobDir(self, [b"blob"])
        self.server = InMemoryServer(self.blobsdir)

    def test_healthy(self):
        """
        200 with a JSON status, never cached.
        """
        response = self.server.get(b"/healthz")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.header("cache-control"), "no-store")
        self.assertEqual(json.loads(response.body), {"status": "ok"})

    def test_head(self):
        """
        HEAD answers the same status with no body.
        """
        response = self.server.get(b"/healthz", method=b"HEAD")
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(response.header("content-length"), str(len(b'{"status": "ok"}')))

    def test_directoryGone(self):
        """
        While the blob directory cannot be read (here: moved away), 503
        UNAVAILABLE as OCI JSON; once it is back, 200 again.
        """
        moved = self.blobsdir + ".moved"
        os.rename(self.blobsdir, moved)
        try:
            response = self.server.get(b"/healthz")
            error = assertErrorCode(self, response, 503, "UNAVAILABLE")
            self.assertEqual(error["detail"], {"reason": "the blob directory cannot be read"})
            self.assertEqual(self.server.get(b"/healthz", method=b"HEAD").status, 503)
        finally:
            os.rename(moved, self.blobsdir)
        self.assertEqual(self.server.get(b"/healthz").status, 200)

    def test_directoryUnreadable(self):
        """
        A blob directory without read permission is unhealthy.
        """
        if os.getuid() == 0:
            self.skipTest("root reads every directory")
        os.chmod(self.blobsdir, 0)
        self.addCleanup(os.chmod, self.blobsdir, 0o755)
        assertErrorCode(self, self.server.get(b"/healthz"), 503, "UNAVAILABLE")

    def test_otherMethods(self):
        """
        Only GET and HEAD.
        """
        response = self.server.get(b"/healthz", method=b"POST")
        assertErrorCode(self, response, 405, "UNSUPPORTED")
        self.assertEqual(response.header("allow"), "GET, HEAD")

    def test_onlyTheExactPath(self):
        """
        /healthz/ and /v2/healthz are not the health check.
        """
        assertErrorCode(self, self.server.get(b"/healthz/"), 404, "NAME_UNKNOWN")
        assertErrorCode(self, self.server.get(b"/v2/healthz"), 404, "NAME_UNKNOWN")

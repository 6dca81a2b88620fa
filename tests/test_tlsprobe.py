"""
A TLS handshake sent to the plain-HTTP port is answered at once, so that
registry clients that try https first fall back to http without waiting.
"""

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase


from .support import InMemoryServer, makeBlobDir, sha256

# The start of a TLS 1.3 ClientHello as Go sends it: a handshake record
# (0x16), then bytes with no line end in them.
CLIENT_HELLO = bytes.fromhex("160301010901000105030377") + bytes(range(14, 200))


class TLSProbeTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        self.server = InMemoryServer(makeBlobDir(self, [b"blob"]))
        self.server.site.accessLogger = Logger(observer=self.events.append)

    def test_handshakeAnswered(self):
        """
        A connection opening with a TLS handshake record gets a 400 and is
        closed, with nothing in the access log.
        """
        self.assertNotIn(b"\n", CLIENT_HELLO)
        protocol, transport = self.server.connect()
        protocol.dataReceived(CLIENT_HELLO)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.assertEqual(self.events, [])

    def test_plainRequestsUnchanged(self):
        """
        A plain request on a new connection is served as before, even
        when its bytes arrive one by one.
        """
        protocol, transport = self.server.connect()
        for byte in b"GET /v2/a/blobs/sha256:":
            protocol.dataReceived(bytes([byte]))
        protocol.dataReceived(sha256(b"blob").encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(transport.value().endswith(b"\r\n\r\nblob"))
        self.assertFalse(transport.disconnecting)
        protocol.connectionLost(None)

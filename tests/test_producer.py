"""
The file producer: back-pressure, the end of a response, and files that
change under it.
"""

import os

from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nydusproxy.producer import FileProducer


@implementer(IConsumer)
class FakeRequest:
    """
    The parts of a request the producer uses.  Like a TCP transport, it
    pauses the producer once more than C{bufferSize} bytes are buffered.
    """

    def __init__(self, bufferSize=None):
        self.bufferSize = bufferSize
        self.buffered = 0
        self.written = []
        self.producer = None
        self.finished = False
        self.connectionLost = False
        self._finish = Deferred()

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.written.append(data)
        self.buffered += len(data)
        if self.bufferSize is not None and self.buffered > self.bufferSize:
            self.producer.pauseProducing()

    def drain(self):
        """
        The transport sent all it had and resumes the producer.
        """
        self.buffered = 0
        if self.producer is not None:
            self.producer.resumeProducing()

    def finish(self):
        self.finished = True
        self._finish.callback(None)

    def loseConnection(self):
        self.connectionLost = True

    def notifyFinish(self):
        return self._finish

    def disconnect(self):
        self._finish.errback(Failure(ConnectionError("gone")))

    def body(self):
        return b"".join(self.written)


class FileProducerTests(SynchronousTestCase):
    def setUp(self):
        self.data = os.urandom(3 * 1024 * 1024 + 17)
        self.path = self.mktemp()
        with open(self.path, "wb") as f:
            f.write(self.data)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(self.closeIfOpen)
        self.clock = Clock()

    def closeIfOpen(self):
        try:
            os.close(self.fd)
        except OSError:
            pass

    def assertClosed(self):
        self.assertRaises(OSError, os.fstat, self.fd)

    def test_backPressure(self):
        """
        A paused producer writes nothing until resumed, and never writes
        more than one chunk past the consumer's buffer limit.
        """
        request = FakeRequest(bufferSize=64 * 1024)
        producer = FileProducer(request, self.fd, [(b"", 0, len(self.data))], self.clock)
        producer.start()
        self.assertEqual(len(request.written), 1)
        self.assertLessEqual(request.buffered, FileProducer.chunkSize)
        self.clock.advance(0)
        self.assertEqual(len(request.written), 1)
        drains = 0
        while not request.finished:
            request.drain()
            drains += 1
            self.assertLessEqual(request.buffered, FileProducer.chunkSize)
        self.assertEqual(drains, len(self.data) // FileProducer.chunkSize)
        self.assertEqual(request.body(), self.data)
        self.assertClosed()

    def test_neverPausingConsumer(self):
        """
        A consumer that never pauses gets at most C{turnLimit} bytes per
        reactor turn; the rest comes on later turns.
        """
        request = FakeRequest()
        producer = FileProducer(request, self.fd, [(b"", 0, len(self.data))], self.clock)
        producer.start()
        self.assertEqual(len(request.body()), FileProducer.turnLimit)
        self.assertFalse(request.finished)
        while self.clock.getDelayedCalls():
            self.clock.advance(0)
        self.assertTrue(request.finished)
        self.assertEqual(request.body(), self.data)

    def test_parts(self):
        """
        Parts are written in order, each prefix before its slice.
        """
        request = FakeRequest()
        parts = [(b"<a>", 10, 5), (b"<b>", 0, 3), (b"<end>", 0, 0)]
        FileProducer(request, self.fd, parts, self.clock).start()
        self.assertEqual(
            request.body(), b"<a>" + self.data[10:15] + b"<b>" + self.data[:3] + b"<end>"
        )
        self.assertTrue(request.finished)

    def test_disconnectClosesFile(self):
        """
        A client that goes away stops the reading and closes the file.
        """
        request = FakeRequest(bufferSize=64 * 1024)
        FileProducer(request, self.fd, [(b"", 0, len(self.data))], self.clock).start()
        request.disconnect()
        self.assertClosed()
        written = len(request.body())
        request.drain()
        self.assertEqual(len(request.body()), written)

    def test_truncatedWhileSending(self):
        """
        A file that ends before the promised length ends the response by
        closing the connection, without finishing it, and logs why.
        """
        request = FakeRequest(bufferSize=64 * 1024)
        FileProducer(request, self.fd, [(b"", 0, len(self.data))], self.clock).start()
        os.truncate(self.path, 300 * 1024)
        while not request.connectionLost:
            request.drain()
        self.assertFalse(request.finished)
        self.assertEqual(request.body(), self.data[: 300 * 1024])
        self.assertClosed()

    def test_replacedByRename(self):
        """
        A blob replaced by rename while being sent keeps sending the old
        file's bytes: the open descriptor still names it.
        """
        request = FakeRequest(bufferSize=64 * 1024)
        FileProducer(request, self.fd, [(b"", 0, len(self.data))], self.clock).start()
        replacement = self.path + ".new"
        with open(replacement, "wb") as f:
            f.write(b"x" * len(self.data))
        os.rename(replacement, self.path)
        while not request.finished:
            request.drain()
        self.assertEqual(request.body(), self.data)

    def test_readError(self):
        """
        A read error ends the response by closing the connection, closes
        the file, and is logged.
        """
        request = FakeRequest(bufferSize=64 * 1024)
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        FileProducer(request, directory, [(b"", 0, 10)], self.clock).start()
        self.assertTrue(request.connectionLost)
        self.assertFalse(request.finished)
        self.assertEqual(request.body(), b"")
        self.assertRaises(OSError, os.fstat, directory)
        self.assertEqual(len(self.flushLoggedErrors(IsADirectoryError)), 1)

    def test_stopProducingClosesFile(self):
        """
        C{stopProducing} closes the file and cancels a pending turn.
        """
        request = FakeRequest()
        producer = FileProducer(request, self.fd, [(b"", 0, len(self.data))], self.clock)
        producer.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        producer.stopProducing()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertClosed()

"""
The DATA stream: dot-stuffing and streaming the message body.

Owns: L{DotStuffer}, which turns message bytes into the DATA stream chunk
by chunk with its state kept across chunks, and L{BodyProducer}, which
streams the spool file through it into the transport as a push producer.

Why this is its own module: it is what keeps outbound mail smuggling-proof.
C{twisted.mail.smtp.SMTPClient} dot-stuffs each 16 KiB file chunk on its
own, so a C{"."} line that starts exactly at a chunk boundary goes out
unstuffed and ends the message early (truncation / smuggling).  Here the
stuffer remembers whether the next byte starts a line and whether a CR was
held back at the end of the last chunk; bare CR and bare LF are both turned
into CRLF (so a lenient receiver that treats either as a line end sees the
same lines, and the same stuffing, as a strict one).  The body is streamed
in L{CHUNK_SIZE} reads that respect the transport's backpressure, so a
100 MB message never sits in memory.

Must not touch: SMTP replies and timers (the client protocol passes in
what to call on progress, on a read error and on a lost connection), the
message's content (nothing here parses it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer

__all__ = ["CHUNK_SIZE", "MAX_BURST", "DotStuffer", "stuff", "BodyProducer"]

#: Spool file read size when streaming the body.
CHUNK_SIZE = 64 * 1024
#: Bytes written in one go before yielding to the reactor even if the
#: transport has not asked us to pause (keeps other connections served).
MAX_BURST = 1024 * 1024


class DotStuffer:
    """
    Turns message bytes into the DATA stream, chunk by chunk, with state
    kept across chunks: bare CR and bare LF become CRLF, a line starting
    with C{"."} gets a second dot (RFC 5321 4.5.2) even when it starts
    exactly at a chunk boundary, and L{finish} ends the last line with CRLF
    and adds the C{".\\r\\n"} terminator.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            # Could be the first half of a CRLF split across chunks.
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        data = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\r\n")
        return data

    def finish(self) -> bytes:
        out = b""
        if self._held_cr:
            self._held_cr = False
            out = b"\r\n"
            self._at_line_start = True
        if not self._at_line_start:
            out += b"\r\n"
        return out + b".\r\n"


def stuff(data: bytes) -> bytes:
    """The whole DATA stream for C{data} (tests and small messages)."""
    s = DotStuffer()
    return s.feed(data) + s.finish()


@implementer(IPushProducer)
class BodyProducer:
    """
    Streams C{file} through a L{DotStuffer} into C{transport}.  A push
    producer: the transport pauses us when its buffer fills and resumes us
    when it drains.  L{done} fires with None when the terminator has been
    written, or with the error given to L{fail} (never errbacks).

    @param progress: called at the start and after every write (the client
        re-arms its data_xfer timer).
    @param read_error: called with the C{OSError} of a failed read; it is
        expected to drop the connection (and so to call L{fail}).
    @param lost: makes the error L{done} fires with when the transport
        stops us (the connection was lost).
    """

    def __init__(
        self,
        transport: Any,
        clock: IReactorTime,
        file: IO[bytes],
        *,
        progress: Callable[[], None],
        read_error: Callable[[OSError], None],
        lost: Callable[[], Exception],
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.file = file
        self.stuffer = DotStuffer()
        self.done: Deferred[Exception | None] = Deferred()
        self.paused = False
        self.finished = False
        self._progress = progress
        self._read_error = read_error
        self._lost = lost
        self._later: Any = None

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._progress()
        self._pump()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused and not self.finished:
            self.paused = False
            self._progress()
            self._pump()

    def stopProducing(self) -> None:
        self.fail(self._lost())

    def fail(self, err: Exception) -> None:
        if self.finished:
            return
        self.finished = True
        if self._later is not None and self._later.active():
            self._later.cancel()
        self.done.callback(err)

    def _pump(self) -> None:
        self._later = None
        burst = 0
        while not self.paused and not self.finished:
            try:
                chunk = self.file.read(CHUNK_SIZE)
            except OSError as e:
                self._read_error(e)
                return
            if not chunk:
                tail = self.stuffer.finish()
                self.finished = True
                self.transport.write(tail)
                self.transport.unregisterProducer()
                self.done.callback(None)
                return
            out = self.stuffer.feed(chunk)
            if out:
                self.transport.write(out)
                self._progress()
            burst += len(chunk)
            if burst >= MAX_BURST and not self.paused and not self.finished:
                self._later = self.clock.callLater(0, self._pump)
                return

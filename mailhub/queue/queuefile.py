"""
The queue file: the on-disk form of one queued message, and queue ids.

Owns: the format (see docs/spool.rst) -- the message bytes exactly as
received, then the envelope as it was at the commit (one JSON line:
text on disk, never pickles), then a fixed-size footer giving both
lengths -- and its reading and validation: L{open_message} (a reader that
stops where the message ends: nothing may read a queue file to its end),
L{read_queued_envelope} and L{parse_envelope} (an envelope whose
C{queue_id} is not its file's name is refused).  Also the queue id: how
one is made (L{new_queue_id}: sorts by arrival) and recognised
(L{is_queue_id}: refuses path tricks).

Must not touch: the reactor, clocks, the network, the spool's
directories (where a queue file lives, how it is made durable and when it
goes are L{mailhub.queue.spool}'s).  Everything here reads or builds
bytes of one file.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import time

from mailhub.envelope import Envelope, EnvelopeFormatError

__all__ = [
    "new_queue_id", "is_queue_id", "QueueFileError", "queue_file_trailer", "queue_file_bytes", "read_trailer",
    "read_queued_envelope", "parse_envelope", "MessageFile", "open_message", "FOOTER_SIZE", "CHUNK",
]

_ID_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTVWXYZ"


def new_queue_id(now: float | None = None) -> str:
    """
    A new queue id: 11 characters of microseconds since the epoch (so ids
    sort by arrival) and 6 random ones, from an alphabet that is safe in a
    file name and unambiguous to read aloud.
    """
    micro = int((time.time() if now is None else now) * 1_000_000)
    head = []
    for _ in range(11):
        micro, digit = divmod(micro, len(_ID_ALPHABET))
        head.append(_ID_ALPHABET[digit])
    # One getrandom() call, not six (secrets.choice asks the kernel each
    # time, and this runs on the reactor thread).  The bias of 64 random
    # bits reduced mod 33**6 is below 2**-33: irrelevant for uniqueness.
    rand = int.from_bytes(secrets.token_bytes(8), "big")
    tail = []
    for _ in range(6):
        rand, digit = divmod(rand, len(_ID_ALPHABET))
        tail.append(_ID_ALPHABET[digit])
    return "".join(reversed(head)) + "".join(tail)


#: 8 to 64 characters of the alphabet (a regular expression: called three
#: times per envelope at startup, where a character loop cost seconds for
#: 100 000 queued messages).
_QUEUE_ID = re.compile("[" + re.escape(_ID_ALPHABET) + "]{8,64}")


def is_queue_id(text: str) -> bool:
    """Whether C{text} could be a queue id (used to refuse path tricks)."""
    return _QUEUE_ID.fullmatch(text) is not None



#: The footer that ends every queue file: the message's length and the
#: envelope's, in hexadecimal, so a reader finds both with one read from
#: the end.  Fixed size (FOOTER_SIZE bytes).
_FOOTER = b"\n#mailhub-queue 2 %016x %08x\n"
_FOOTER_RE = re.compile(rb"\n#mailhub-queue 2 ([0-9a-f]{16}) ([0-9a-f]{8})\n")
FOOTER_SIZE = len(_FOOTER % (0, 0))

#: Bytes read from the end of a queue file to find its envelope in one
#: read (an envelope with a handful of recipients is well under this).
_TAIL_READ = 8192


class QueueFileError(ValueError):
    """A file in queue/ that is not a complete queue file."""


def queue_file_trailer(message_length: int, envelope: Envelope) -> bytes:
    """
    What follows the message in its queue file: the envelope and the
    footer.  (Public for tools that build a queue by hand: the benchmark's
    backlog, tests.)
    """
    env = envelope.to_json()
    return env + _FOOTER % (message_length, len(env))


def queue_file_bytes(message: bytes, envelope: Envelope) -> bytes:
    """A whole queue file for C{message} (tools and tests that build one by hand)."""
    return message + queue_file_trailer(len(message), envelope)


def read_trailer(fd: int, size: int) -> tuple[int, bytes]:
    """
    The message length and the envelope bytes of the open queue file
    C{fd} of C{size} bytes.

    @raise QueueFileError: no valid footer, or lengths that do not add up.
    """
    if size < FOOTER_SIZE:
        raise QueueFileError(f"{size} bytes, shorter than a footer")
    start = max(0, size - _TAIL_READ)
    tail = os.pread(fd, size - start, start)
    m = _FOOTER_RE.fullmatch(tail, len(tail) - FOOTER_SIZE)
    if m is None:
        raise QueueFileError("no queue file footer")
    length, env_length = int(m.group(1), 16), int(m.group(2), 16)
    if length + env_length + FOOTER_SIZE != size:
        raise QueueFileError(f"lengths {length}+{env_length} do not match the file size {size}")
    env_start = length - start  # in tail
    if env_start >= 0:
        return length, tail[env_start : len(tail) - FOOTER_SIZE]
    return length, os.pread(fd, env_length, length)


class _MessageSlice(io.RawIOBase):
    """The first C{length} bytes of an open queue file, as a raw stream."""

    def __init__(self, fd: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:want]], self._pos)
        self._pos += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class MessageFile(io.BufferedReader):
    """
    A queued message opened for reading (L{open_message}): a buffered
    binary file that ends where the message ends.

    @ivar length: the message's size in bytes (what C{fstat} would say of
        a file holding only the message).
    """

    length: int


def open_message(path: str) -> MessageFile:
    """
    Open the queue file at C{path} for reading its message.

    @raise OSError: it cannot be opened (e.g. FileNotFoundError: removed).
    @raise QueueFileError: it is not a complete queue file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        length, _ = read_trailer(fd, os.fstat(fd).st_size)
    except BaseException:
        os.close(fd)
        raise
    f = MessageFile(_MessageSlice(fd, length), CHUNK)
    f.length = length
    return f


#: Read buffer of L{open_message} files.
CHUNK = 64 * 1024



def read_queued_envelope(path: str) -> bytes:
    """
    The envelope bytes in the queue file at C{path}.

    @raise FileNotFoundError: no such file.
    @raise EnvelopeFormatError: not a complete queue file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return read_trailer(fd, os.fstat(fd).st_size)[1]
    except QueueFileError as e:
        raise EnvelopeFormatError(f"bad queue file: {e}")
    finally:
        os.close(fd)


def parse_envelope(raw: bytes, queue_id: str) -> Envelope:
    """
    The envelope C{raw} of the message C{queue_id}, validated.

    @raise EnvelopeFormatError: not a valid envelope, or one of another message.
    """
    env = Envelope.from_json(raw)
    if env.queue_id != queue_id:
        raise EnvelopeFormatError("queue_id does not match the file name")
    return env

"""
mailhub.eagerwrite.write_to_child over a real pipe, the reactor in memory:
a line goes out at once when the pipe is idle, lines keep their order
through partial writes and a full pipe, a reader that went away is
reported by the writer and never raised, and write errors are values.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random

import pytest
from twisted.internet import process
from twisted.internet.testing import MemoryReactor

from mailhub.eagerwrite import write_to_child


class _Proc:
    """The parts of twisted's Process that ProcessWriter and write_to_child use."""

    def __init__(self) -> None:
        self.pipes: dict = {}
        self.lost: list = []

    def write(self, data: bytes) -> None:  # Process.write
        if 0 in self.pipes:
            self.pipes[0].write(data)

    def childConnectionLost(self, fd, reason) -> None:
        self.lost.append((fd, reason))
        self.pipes.pop(fd, None)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # one page: easy to fill
    proc = _Proc()
    writer = process.ProcessWriter(MemoryReactor(), proc, 0, w)
    proc.pipes[0] = writer
    yield proc, writer, r
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def _drain(r: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(r, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _flush(writer, r: int) -> bytes:
    """Alternately empty the pipe and let the writer send its buffer, as the reactor would."""
    got = b""
    for _ in range(1000):
        got += _drain(r)
        if not writer.dataBuffer and not writer._tempDataLen:
            break
        assert writer.doWrite() is None
    return got + _drain(r)


def test_idle_pipe_gets_the_line_at_once(pipe):
    proc, writer, r = pipe
    write_to_child(proc, b"line 1\n")
    assert _drain(r) == b"line 1\n"  # no reactor iteration was needed
    assert not writer.dataBuffer and not writer._tempDataLen


def test_partial_write_and_later_lines_keep_their_order(pipe):
    proc, writer, r = pipe
    big = bytes(range(256)) * 40  # 10240 bytes: more than the 4096-byte pipe takes
    write_to_child(proc, big)
    assert writer._tempDataLen or writer.dataBuffer  # the rest is buffered
    write_to_child(proc, b"second\n")  # must not overtake the buffered rest
    write_to_child(proc, b"third\n")
    assert _flush(writer, r) == big + b"second\nthird\n"
    write_to_child(proc, b"fourth\n")  # idle again: straight to the pipe
    assert _drain(r) == b"fourth\n"


def test_full_pipe_writes_nothing_now_and_everything_later_in_order(pipe):
    proc, writer, r = pipe
    filler = b""
    while True:  # fill the pipe behind Twisted's back
        try:
            filler += b"f" * os.write(writer.fd, b"f" * 512)
        except BlockingIOError:
            break
    lines = [f"request {i}\n".encode() for i in range(50)]
    for line in lines:
        write_to_child(proc, line)
    assert _drain(r) == filler
    assert _flush(writer, r) == b"".join(lines)


def test_many_random_sizes_never_reorder(pipe):
    proc, writer, r = pipe
    rnd = random.Random(4)
    sent, got = [], b""
    for i in range(400):
        data = f"{i}:".encode() + b"x" * rnd.choice([1, 10, 100, 1000, 5000])
        sent.append(data)
        write_to_child(proc, data)
        if rnd.random() < 0.3:
            got += _drain(r)
        if rnd.random() < 0.3 and (writer.dataBuffer or writer._tempDataLen):
            got += _drain(r)
            writer.doWrite()
    got += _flush(writer, r)
    assert got == b"".join(sent)


def test_reader_gone_raises_nothing_and_the_loss_is_reported_by_the_writer(pipe):
    proc, writer, r = pipe
    os.close(r)
    write_to_child(proc, b"to nobody\n")  # EPIPE: no exception into the caller
    assert writer.dataBuffer or writer._tempDataLen  # handed to transport.write
    write_to_child(proc, b"again\n")
    why = writer.doWrite()  # the reactor's next write: the loss is reported the usual way
    assert isinstance(why, Exception)
    writer.connectionLost(why)
    assert [fd for fd, _ in proc.lost] == [0] and 0 not in proc.pipes
    write_to_child(proc, b"after the loss\n")  # no pipe 0 any more: Process.write drops it


def test_after_close_stdin_the_line_goes_through_the_buffer(pipe):
    proc, writer, r = pipe
    writer.loseConnection()  # Process.closeStdin
    assert writer.disconnecting
    write_to_child(proc, b"late\n")
    assert _drain(r) == b""  # not written behind the close's back
    assert writer._tempDataLen == len(b"late\n")  # buffered by the transport, as transport.write does


def test_other_transports_are_left_to_their_write():
    class T:
        def __init__(self):
            self.written = []

        def write(self, data):
            self.written.append(data)

    t = T()
    write_to_child(t, b"x\n")  # no pipes at all (a test transport)
    t.pipes = {0: object()}
    write_to_child(t, b"y\n")  # not a ProcessWriter
    assert t.written == [b"x\n", b"y\n"]


def test_write_some_data_errors_are_values_not_exceptions(monkeypatch, pipe):
    """fdesc.writeToFD turns every OSError into 0 or CONNECTION_LOST: nothing can escape into the scheduler."""
    proc, writer, r = pipe
    for err in (errno.EINTR, errno.EAGAIN, errno.EBADF, errno.EPIPE, errno.EIO):
        def boom(fd, data, err=err):
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(os, "write", boom)
        write_to_child(proc, b"x\n")
    monkeypatch.undo()

"""
Writing a short reply to a TCP connection at once, when nothing is waiting.

Owns: L{write_now}, which both SMTP protocols (the server's replies, the
client's commands) use instead of C{transport.write}, and
L{write_to_child}, its twin for the local delivery processes' request
pipe.

Why: C{FileDescriptor.write} only buffers; it registers the socket for
writability (C{epoll_ctl}), the reactor wakes up on the next loop, sends,
and unregisters it (C{epoll_ctl} again).  An SMTP session is a strict
ping-pong of short replies, so that costs two system calls and a reactor
iteration per reply, seven replies per message.  Measured with
C{smtp-source}, one session x 2000 messages of 4 KB: about 0.4 ms of CPU
less per message and 12-20% more messages per second (docs/performance.rst).
Postfix's smtpd writes its replies with a plain C{write} as well.  The
server still sends the replies to a group of pipelined commands together
(L{mailhub.smtp.server.SMTPServer.send} holds them back until its input is
drained), so a pipelining client costs one send per group, not per reply.

The shortcut is taken only where it is safe, and everything else goes to
C{transport.write} as before:

- only a plain TCP connection (L{twisted.internet.tcp.Connection}), not
  one that has started TLS (whose bytes must go through the TLS layer),
  nor TLS listeners, nor test transports;
- only when the transport's own buffer is empty, so the order of bytes on
  the wire is kept;
- only while the connection is open and not being closed.

What the socket did not take (a full send buffer, an error) is handed to
C{transport.write}, which buffers it, sends it when the socket is writable
and reports a lost connection the usual way, with the producer pausing
that the server relies on for flow control.

Must not touch: the reply's content, the protocol's state.  It reads
attributes of Twisted's C{FileDescriptor} (C{dataBuffer},
C{_tempDataLen}); if a Twisted release ever renames them, the shortcut
turns itself off (the L{getattr} defaults) and nothing else changes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import process, tcp

__all__ = ["write_now", "write_to_child"]


def write_now(transport: Any, data: bytes) -> None:
    """
    Send C{data} now if C{transport} is a plain TCP connection with nothing
    buffered; otherwise, or for what the socket does not accept, use
    C{transport.write}.
    """
    if (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", True)
        and _idle(transport)
    ):
        _write(transport, transport, data)
    else:
        transport.write(data)


def write_to_child(transport: Any, data: bytes) -> None:
    """
    Write C{data} to a child process's standard input (C{childFDs} 0 is
    C{"w"}) at once if nothing is buffered for it, else through
    C{transport.write}.

    The local delivery processes get one request line per delivery; the
    buffered path cost two C{epoll_ctl} calls and a reactor iteration
    before the line left, on the way to the next SMTP reply.
    """
    pipe = getattr(transport, "pipes", {}).get(0)
    if isinstance(pipe, process.ProcessWriter) and _idle(pipe):
        _write(pipe, transport, data)
    else:
        transport.write(data)


def _write(fd: Any, transport: Any, data: bytes) -> None:
    """
    Send through C{fd}'s own C{writeSomeData} (EINTR retried; an int of
    bytes taken, or an exception object for a lost connection or a closed
    pipe); what it did not take goes to C{transport.write}, which buffers
    it and reports a loss the usual way.
    """
    sent = fd.writeSomeData(data)
    if isinstance(sent, int) and sent >= 0:
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _idle(fd: Any) -> bool:
    """An open descriptor with nothing in Twisted's buffer for it."""
    return bool(
        fd.connected
        and not fd.disconnecting
        and not getattr(fd, "_writeDisconnected", True)
        and not getattr(fd, "dataBuffer", True)
        and not getattr(fd, "_tempDataLen", True)
    )

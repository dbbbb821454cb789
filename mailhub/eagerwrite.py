"""
Writing a short reply to a TCP connection at once, when nothing is waiting.

Owns: one function, L{write_now}, that both SMTP protocols (the server's
replies, the client's commands) use instead of C{transport.write}.

Why: C{FileDescriptor.write} only buffers; it registers the socket for
writability (C{epoll_ctl}), the reactor wakes up on the next loop, sends,
and unregisters it (C{epoll_ctl} again).  An SMTP session is a strict
ping-pong of short replies, so that costs two system calls and a reactor
iteration per reply, seven replies per message.  Measured with
C{smtp-source}, one session x 2000 messages of 4 KB: about 0.4 ms of CPU
less per message and 12-20% more messages per second (docs/performance.rst).
Postfix's smtpd writes its replies with a plain C{write} as well.  The
server still sends the replies to a group of pipelined commands together
(L{mailhub.smtpd.SMTPServer._send} holds them back until its input is
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

from twisted.internet import tcp

__all__ = ["write_now"]


def write_now(transport: Any, data: bytes) -> None:
    """
    Send C{data} now if C{transport} is a plain TCP connection with nothing
    buffered; otherwise, or for what the socket does not accept, use
    C{transport.write}.
    """
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "TLS", True)
        and not getattr(transport, "_writeDisconnected", True)
        and not getattr(transport, "dataBuffer", True)
        and not getattr(transport, "_tempDataLen", True)
    ):
        # writeSomeData: the transport's own send (EINTR retried, at most
        # SEND_LIMIT bytes); an int of bytes taken, or an exception object
        # for a lost connection.
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent >= 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)

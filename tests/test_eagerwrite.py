"""
mailhub.eagerwrite: replies go straight to the socket only when that is
safe, on real loopback connections (the shortcut exists only for them).
"""

from __future__ import annotations

import shutil
import socket
import ssl

import pytest
from conftest import in_reactor
from twisted.internet import defer, protocol
from twisted.internet.testing import StringTransport

from mailhub.eagerwrite import write_now, write_to_child
from mailhub.tls import ServerTLS, make_self_signed


class _Server(protocol.Protocol):
    """Keeps its transport for the test, and runs one command per line."""

    def connectionMade(self) -> None:
        self.factory.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"STARTTLS"):
            self.transport.write(b"220 go ahead\r\n")
            self.transport.startTLS(self.factory.tls.options())
            self.seen = []
        elif data.startswith(b"HELLO"):
            write_now(self.transport, b"250 hello over tls\r\n")


def _listen(reactor, tls=None):
    factory = protocol.ServerFactory()
    factory.protocol = _Server
    factory.made = defer.Deferred()
    factory.tls = tls
    port = in_reactor(reactor, reactor.listenTCP, 0, factory, interface="127.0.0.1")
    return factory, port


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


@pytest.fixture
def connected(reactor):
    """A plain TCP connection on loopback: (the test's socket, the server protocol)."""
    factory, port = _listen(reactor)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        yield client, in_reactor(reactor, lambda: factory.made)
    finally:
        client.close()
        in_reactor(reactor, port.stopListening)


def test_plain_tcp_sends_at_once_without_registering_a_writer(reactor, connected):
    client, server = connected

    def write_and_look():
        write_now(server.transport, b"250 ok\r\n")
        return (server.transport.dataBuffer, server.transport._tempDataLen, server.transport in reactor.getWriters())

    buffered, pending, registered = in_reactor(reactor, write_and_look)
    assert (buffered, pending, registered) == (b"", 0, False)
    assert _recv_exactly(client, 8) == b"250 ok\r\n"


def test_buffered_bytes_keep_their_order(reactor, connected):
    """With something already buffered, the reply queues behind it."""
    client, server = connected

    def write_both():
        server.transport.write(b"first\r\n")
        write_now(server.transport, b"second\r\n")
        return server.transport._tempDataLen

    assert in_reactor(reactor, write_both) == len(b"first\r\nsecond\r\n")
    assert _recv_exactly(client, 15) == b"first\r\nsecond\r\n"


def test_more_than_the_socket_takes_is_buffered_in_order(reactor, connected):
    """A reply bigger than the socket buffer: the rest goes to the transport."""
    client, server = connected
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    big = bytes(range(256)) * (8 * 1024)  # 2 MiB, more than loopback buffers hold

    def write_big():
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        write_now(server.transport, big)
        write_now(server.transport, b"tail")
        return server.transport._tempDataLen + len(server.transport.dataBuffer)

    assert in_reactor(reactor, write_big) > 0  # the socket did not take it all
    assert _recv_exactly(client, len(big) + 4) == big + b"tail"


def test_after_starttls_replies_go_through_tls(reactor, tmp_path):
    """The TCP transport is still a tcp.Connection after startTLS; its bytes must be encrypted."""
    make_self_signed("mx.example", str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    tls = ServerTLS(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    factory, port = _listen(reactor, tls)
    raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        raw.sendall(b"STARTTLS\r\n")
        assert _recv_exactly(raw, 14) == b"220 go ahead\r\n"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        wrapped = context.wrap_socket(raw, server_hostname="mx.example")
        wrapped.sendall(b"HELLO\r\n")
        assert _recv_exactly(wrapped, 20) == b"250 hello over tls\r\n"
        wrapped.close()
    finally:
        raw.close()
        in_reactor(reactor, port.stopListening)


def test_closing_transport_is_left_to_transport_write(reactor, connected):
    client, server = connected

    def close_then_write():
        server.transport.write(b"bye\r\n")
        server.transport.loseConnection()
        write_now(server.transport, b"late\r\n")  # must not jump ahead of "bye"

    in_reactor(reactor, close_then_write)
    data = b""
    while chunk := client.recv(100):
        data += chunk
    # transport.write still sends after loseConnection; what matters is the order
    assert data == b"bye\r\nlate\r\n"


def test_other_transports_use_their_write():
    transport = StringTransport()
    write_now(transport, b"250 ok\r\n")
    assert transport.value() == b"250 ok\r\n"


# -- a child process's standard input (the local delivery processes' requests) ----------------


class _Cat(protocol.ProcessProtocol):
    """C{cat}: what it is sent comes back on its stdout."""

    def __init__(self) -> None:
        self.started: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self.out = b""

    def connectionMade(self) -> None:
        self.started.callback(self)

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def outConnectionLost(self) -> None:
        self.ended.callback(self.out)


@pytest.fixture
def cat(reactor):
    """A running C{cat} whose stdin is the pipe under test."""
    path = shutil.which("cat")
    assert path is not None
    child = _Cat()
    in_reactor(reactor, reactor.spawnProcess, child, path, [path], env={}, childFDs={0: "w", 1: "r"})
    in_reactor(reactor, lambda: child.started)
    yield child
    in_reactor(reactor, lambda: child.transport.closeStdin() if child.transport.pipes.get(0) else None)


def test_child_pipe_is_written_at_once_without_registering_a_writer(reactor, cat):
    def write_and_look():
        pipe = cat.transport.pipes[0]
        write_to_child(cat.transport, b"request 1\n")
        return (pipe.dataBuffer, pipe._tempDataLen, pipe in reactor.getWriters())

    assert in_reactor(reactor, write_and_look) == (b"", 0, False)
    in_reactor(reactor, cat.transport.closeStdin)
    assert in_reactor(reactor, lambda: cat.ended) == b"request 1\n"


def test_child_pipe_keeps_the_order_of_buffered_bytes(reactor, cat):
    def write_both():
        cat.transport.write(b"first\n")  # buffered by Twisted
        write_to_child(cat.transport, b"second\n")
        return cat.transport.pipes[0]._tempDataLen

    assert in_reactor(reactor, write_both) == len(b"first\nsecond\n")
    in_reactor(reactor, cat.transport.closeStdin)
    assert in_reactor(reactor, lambda: cat.ended) == b"first\nsecond\n"


def test_child_pipe_after_close_goes_to_transport_write(reactor, cat):
    """After closeStdin the shortcut stays away: Twisted's own write decides, bytes in order."""

    def close_then_write():
        cat.transport.write(b"only\n")
        cat.transport.closeStdin()
        write_to_child(cat.transport, b"late\n")

    in_reactor(reactor, close_then_write)
    assert in_reactor(reactor, lambda: cat.ended) == b"only\nlate\n"

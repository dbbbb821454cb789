"""
The TLS handshake deadline of mailhub.smtp.server (starttls_timeout, Postfix
smtpd_starttls_timeout) and the idle timeout while a handshake is under
way: in memory (task.Clock; a recording startTLS transport for STARTTLS,
a real TLSMemoryBIOProtocol over a StringTransport for smtps) and on
loopback sockets with the real reactor, a client that answers the 220
with nothing or with half a ClientHello.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest
from conftest import in_reactor
from peers import wait_for
from smtpharness import FOREIGN, GREETING, HOST, Client
from smtpharness import Harness as _Harness
from tlsauthharness import READY, ehlo_reply
from tlsauthharness import TLSAuthHarness as TLSHarness
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailhub import tls
from mailhub.config import ServerConfig
from mailhub.delivery.directory import Directory
from mailhub.queue.spool import Spool
from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
from mailhub.smtp.policy import Policy


def tls_harness(tmp_path, timeout: float, starttls_timeout: float) -> TLSHarness:
    h = TLSHarness(tmp_path, users=False, starttls_timeout=starttls_timeout)
    h.factory.config = dataclasses.replace(h.factory.config, timeout=timeout)
    return h


def starttls_pending(h) -> Client:
    c = h.connect()
    assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True, auth_=False)
    assert c.send("STARTTLS\r\n") == READY
    assert c.transport.tls_started
    return c


@pytest.mark.parametrize(
    "timeout, starttls_timeout, closes_after",
    [(300, 10, 10), (300, 300, 300), (30, 300, 30)],
    ids=["handshake deadline first", "both at once", "idle timeout first"],
)
def test_starttls_handshake_never_completing_is_aborted(tmp_path, timeout, starttls_timeout, closes_after):
    """STARTTLS answered, then nothing: aborted at min(timeout, starttls_timeout), no reply written, slot freed."""
    h = tls_harness(tmp_path, timeout, starttls_timeout)
    c = starttls_pending(h)
    h.clock.advance(closes_after - 0.5)
    assert not c.closed
    h.clock.advance(0.5)
    assert c.closed and c.transport.disconnected  # aborted: loseConnection would wait for the handshake
    assert c.read() == ""  # nothing in clear text after the 220, nothing to the TLS layer
    assert h.factory.per_ip == {FOREIGN: 1}
    c.lose()
    assert h.factory.per_ip == {} and h.factory.connections == 0
    assert h.clock.getDelayedCalls() == []


def test_completed_handshake_ends_its_deadline_and_restarts_the_idle_timeout(tmp_path):
    h = tls_harness(tmp_path, 300, 10)
    c = starttls_pending(h)
    h.clock.advance(9)
    c.proto.handshakeCompleted()
    h.clock.advance(299)
    assert not c.closed
    assert c.send("EHLO client.test\r\n") == ehlo_reply()
    h.clock.advance(300)
    assert c.read() == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n" and c.closed
    assert not c.transport.disconnected  # an ordinary close once TLS is up


def test_starttls_timeout_configuration_key_default():
    assert ServerConfig(hostname=HOST).starttls_timeout == 300.0


# -- smtps: a real TLS layer in memory -----------------------------------------------------------


@pytest.fixture
def certificate(tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    tls.make_self_signed("127.0.0.1", cert, key)
    return cert, key


@pytest.mark.parametrize("timeout, starttls_timeout, closes_after", [(300, 10, 10), (30, 300, 30)])
def test_smtps_handshake_never_completing_is_aborted(tmp_path, certificate, timeout, starttls_timeout, closes_after):
    h = _Harness(tmp_path, timeout=timeout, starttls_timeout=starttls_timeout)
    factory = h.serve("smtps")
    wrapped = TLSMemoryBIOFactory(tls.ServerTLS(*certificate), False, factory)
    proto = wrapped.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", FOREIGN, 4000))
    proto.makeConnection(transport)
    assert factory.per_ip == {FOREIGN: 1}
    proto.dataReceived(b"\x16\x03\x01\x00\xc8\x01\x00\x00")  # half a ClientHello
    h.clock.advance(closes_after - 0.5)
    assert not transport.disconnecting
    h.clock.advance(0.5)
    assert transport.disconnected
    proto.connectionLost(None)
    assert factory.per_ip == {} and h.clock.getDelayedCalls() == []


# -- loopback sockets, real reactor ----------------------------------------------------------------


def _serve(reactor, tmp_path, certificate, listener: str, timeout: float = 30, starttls_timeout: float = 1):
    cfg = ServerConfig(hostname=HOST, timeout=timeout, starttls_timeout=starttls_timeout, max_connections_per_ip=1)
    policy = Policy(Directory(["example.com"], str(tmp_path / "mailboxes"), users=["alice"]), cfg.trusted_networks)
    server_tls = tls.ServerTLS(*certificate)
    factory = SMTPServerFactory(
        SMTPSettings(cfg, listener), Spool(str(tmp_path / "spool"), fsync=False), lambda env: None, policy, reactor,
        tls=server_tls,
    )
    if listener == "smtps":
        endpoint = tls.implicit_tls_endpoint(reactor, "tcp:0:interface=127.0.0.1", server_tls)
    else:
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    port = in_reactor(reactor, endpoint.listen, factory)
    return factory, port, ("127.0.0.1", port.getHost().port)


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("send", [b"", b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03"], ids=["nothing", "half ClientHello"])
@pytest.mark.parametrize("timeout, starttls_timeout", [(30, 1), (1, 300)], ids=["handshake deadline", "idle timeout"])
def test_starttls_stalled_on_loopback_is_closed_and_frees_the_slot(
    reactor, tmp_path, certificate, send, timeout, starttls_timeout
):
    factory, port, address = _serve(reactor, tmp_path, certificate, "smtp", timeout, starttls_timeout)
    try:
        sock = socket.create_connection(address, timeout=10)
        f = sock.makefile("rb", buffering=0)
        assert f.readline() == GREETING.encode()
        sock.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
        while f.readline().startswith(b"250-"):
            pass
        assert f.readline() == READY.encode()
        sock.sendall(send)
        sock.settimeout(0.2)
        wait_for(lambda: _closed_by_server(sock), 15, "the server to close the stalled handshake")
        sock.close()
        wait_for(lambda: factory.per_ip == {}, 10, "the per-IP slot to be freed")
        # max_connections_per_ip = 1: a new session from the same address is admitted.
        with socket.create_connection(address, timeout=10) as again:
            assert again.makefile("rb").readline() == GREETING.encode()
    finally:
        in_reactor(reactor, port.stopListening)


def test_smtps_stalled_handshake_on_loopback_is_closed(reactor, tmp_path, certificate):
    factory, port, address = _serve(reactor, tmp_path, certificate, "smtps")
    try:
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(b"\x16\x03\x01\x00\xc8\x01\x00\x00")
        sock.settimeout(0.2)
        wait_for(lambda: _closed_by_server(sock), 15, "the server to close the stalled handshake")
        sock.close()
        wait_for(lambda: factory.per_ip == {}, 10, "the per-IP slot to be freed")
    finally:
        in_reactor(reactor, port.stopListening)

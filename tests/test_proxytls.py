"""
The PROXY header beneath implicit TLS (smtps), in memory: the header is
read from the raw connection before anything reaches the TLS layer, which
is then built with the client's address and gets the bytes after the
header; a real TLS handshake and SMTP session behind it see the client;
missing, malformed and late headers close the connection with the same
log line as on plain listeners; a PROXY signature from a peer that is no
proxy is refused; TLS bytes from it pass untouched.  With a real HAProxy:
tests/test_e2e_proxy.py::test_smtps_through_haproxy.
"""

from __future__ import annotations

import pytest
from proxyheaders import PROXY_IP, V2_SIG, v2, v2_ipv6
from smtpharness import GREETING, Harness
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import FakeTransport, connect

from mailhub.maillog import mail_publisher
from mailhub.smtp.proxyheader import ProxyGate
from mailhub.smtp.proxytls import ProxyBeneathTLSFactory
from mailhub.tls import ServerTLS, make_self_signed


class Recorder(Protocol):
    """The layer above (TLS, in the daemon): what it was given."""

    def __init__(self, addr) -> None:
        self.addr = addr
        self.data = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class Recording(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr):
        p = Recorder(addr)
        self.built.append(p)
        return p


@pytest.fixture
def events():
    seen: list[dict] = []
    mail_publisher.addObserver(seen.append)
    yield seen
    mail_publisher.removeObserver(seen.append)


@pytest.fixture
def clock():
    return task.Clock()


def wrapper(clock, inner):
    return ProxyBeneathTLSFactory(inner, ProxyGate(["10.0.0.0/24"], 10.0, clock), "smtps")


def connect_raw(factory, ip: str = PROXY_IP):
    proto = factory.buildProtocol(IPv4Address("TCP", ip, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
    proto.makeConnection(transport)
    return proto, transport


HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # the start of a TLS ClientHello


@pytest.mark.parametrize("header", [b"PROXY TCP4 203.0.113.9 192.0.2.25 50000 465\r\n", v2("203.0.113.9")],
                         ids=["v1", "v2"])
def test_layer_above_starts_after_the_header(clock, header):
    inner = Recording()
    proto, transport = connect_raw(wrapper(clock, inner))
    proto.dataReceived(header[:10])
    assert inner.built == []  # nothing above before the header is complete
    proto.dataReceived(header[10:] + HELLO)
    [above] = inner.built
    assert (above.peer.host, above.addr.host) == ("203.0.113.9", "203.0.113.9")
    assert proto.proxied_by == PROXY_IP
    assert above.data == HELLO  # the bytes after the header, unchanged
    proto.dataReceived(b"more")
    assert above.data == HELLO + b"more"
    assert clock.getDelayedCalls() == []
    proto.connectionLost(None)
    assert above.lost


def test_ipv6_client(clock):
    inner = Recording()
    proto, _ = connect_raw(wrapper(clock, inner))
    proto.dataReceived(v2_ipv6("2001:db8::9"))
    [above] = inner.built
    assert (type(above.peer).__name__, above.peer.host) == ("IPv6Address", "2001:db8::9")


def test_local_header_keeps_the_proxy_address(clock):
    inner = Recording()
    proto, _ = connect_raw(wrapper(clock, inner))
    proto.dataReceived(v2("203.0.113.9", command=0))
    [above] = inner.built
    assert above.peer.host == PROXY_IP and proto.proxied_by == PROXY_IP


@pytest.mark.parametrize("data, why", [
    (HELLO, "the connection does not start with a PROXY header"),
    (b"PROXY TCP4 203.0.113.999 192.0.2.25 50000 25\r\n", "malformed PROXY header"),
    (b"PROXY TCP4 " + b"1" * 120, "PROXY v1 header longer than 107 octets"),
    (V2_SIG + b"\x21\x11\x00\x02\x00\x00", "malformed PROXY header"),
], ids=["tls-hello", "bad-ip", "long-v1", "short-v2"])
def test_bad_header_closes_with_a_log_line(clock, events, data, why):
    inner = Recording()
    proto, transport = connect_raw(wrapper(clock, inner))
    proto.dataReceived(data)
    assert transport.disconnecting and transport.value() == b""
    assert inner.built == []
    proto.connectionLost(None)
    rejected = [e for e in events if e.get("mail_event") == "reject"]
    assert [(e["reason"], e["why"], e["client"], e["listener"]) for e in rejected] == [
        ("proxy_header", why, PROXY_IP, "smtps")
    ]
    assert "NOQUEUE: reject: CONNECT from proxy [10.0.0.5]: " in rejected[0]["log_format"]


def test_late_header_closes(clock, events):
    inner = Recording()
    proto, transport = connect_raw(wrapper(clock, inner))
    proto.dataReceived(b"PROXY TCP4 203.0.113.9 ")
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and inner.built == []
    assert [e["why"] for e in events if e.get("mail_event") == "reject"] == ["no PROXY header in time"]


def test_connection_lost_before_the_header(clock):
    inner = Recording()
    proto, _ = connect_raw(wrapper(clock, inner))
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == [] and inner.built == []


def test_others_pass_through_at_once(clock):
    inner = Recording()
    proto, transport = connect_raw(wrapper(clock, inner), "192.0.2.77")
    [above] = inner.built  # served at once, with its own address
    assert above.peer.host == "192.0.2.77" and proto.proxied_by is None
    proto.dataReceived(HELLO[:1])
    proto.dataReceived(HELLO[1:] + b"PROXY ")
    assert above.data == HELLO + b"PROXY " and not transport.disconnecting


@pytest.mark.parametrize("data", [
    [b"PROXY TCP4 203.0.113.9 192.0.2.25 50000 465\r\n"],
    [b"PRO", b"XY TCP4 1.2.3.4"],
    [V2_SIG[:5], V2_SIG[5:] + b"\x21"],
], ids=["v1", "v1-split", "v2-split"])
def test_proxy_header_from_others_refused(clock, events, data):
    inner = Recording()
    proto, transport = connect_raw(wrapper(clock, inner), "192.0.2.77")
    [above] = inner.built
    for chunk in data:
        proto.dataReceived(chunk)
    assert transport.disconnecting and above.data == b""
    rejected = [e for e in events if e.get("mail_event") == "reject"]
    assert [(e["reason"], e["client"]) for e in rejected] == [("proxy_refused", "192.0.2.77")]


def test_almost_a_signature_passes(clock):
    inner = Recording()
    proto, transport = connect_raw(wrapper(clock, inner), "192.0.2.77")
    proto.dataReceived(b"PROXX")
    assert inner.built[0].data == b"PROXX" and not transport.disconnecting


# -- a real TLS layer and SMTP session above it ----------------------------------------------------


def flush(pump, clock) -> None:
    """Move the bytes both ways, letting the TLS layers' small-write timers run."""
    for _ in range(10):
        pump.flush()
        clock.advance(0)


def test_tls_session_behind_the_header(tmp_path, events):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    make_self_signed("mx.example.com", cert, key)
    h = Harness(tmp_path, trusted_networks=("10.0.0.0/8",))
    gate = ProxyGate(["10.0.0.5/32"], 10.0, h.clock)
    smtp = h.serve("smtps", proxy=gate)
    server_factory = ProxyBeneathTLSFactory(TLSMemoryBIOFactory(ServerTLS(cert, key), False, smtp, h.clock), gate)

    received: list[bytes] = []

    class Reader(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    client_factory = TLSMemoryBIOFactory(
        CertificateOptions(verify=False), True, Factory.forProtocol(Reader), h.clock
    )
    proxy_addr = IPv4Address("TCP", PROXY_IP, 40000)
    server = server_factory.buildProtocol(proxy_addr)
    client = client_factory.buildProtocol(None)
    server_transport = FakeTransport(server, True, peerAddress=proxy_addr)
    client_transport = FakeTransport(client, False)

    pump = connect(server, server_transport, client, client_transport, greet=False)
    # what HAProxy does: the header in clear, then the client's TLS bytes
    server.dataReceived(v2("203.0.113.9"))
    flush(pump, h.clock)
    assert b"".join(received) == GREETING.encode()
    session = server.wrappedProtocol.wrappedProtocol
    assert session.session.client_ip == "203.0.113.9" and session.session.tls
    client.write(b"EHLO client.example\r\n")
    flush(pump, h.clock)
    assert b"".join(received).startswith(GREETING.encode() + b"250-mx.example.com\r\n")
    connect_event = [e for e in events if e.get("mail_event") == "connection"]
    assert (connect_event[0]["client"], connect_event[0]["proxy"], connect_event[0]["listener"]) == (
        "203.0.113.9", PROXY_IP, "smtps"
    )

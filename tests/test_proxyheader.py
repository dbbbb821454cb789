"""
The PROXY protocol in front of the SMTP server, in memory: v1 and v2
headers (whole, split, with pipelined SMTP after them), the address the
session then uses (connection limits, Received, relay decision), malformed
and late headers closing a proxy's connection, and a PROXY line from a
client that is no proxy refused.  With a real HAProxy: tests/test_e2e_proxy.py.
"""

from __future__ import annotations

import pytest
from proxyheaders import PROXY_IP, V2_SIG, v2, v2_ipv6
from smtpharness import EHLO, GREETING, MAIL_OK, Client, Harness
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailhub.maillog import mail_publisher
from mailhub.smtp.proxyheader import MAX_V2, ProxyGate, ProxyHeaderReader


class ProxyClient(Client):
    """A connection from the proxy: nothing is read at connect (no greeting before the header)."""

    def __init__(self, factory, ip: str = PROXY_IP) -> None:
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        self.proto.makeConnection(self.transport)
        self.greeting = self.read()


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path, trusted_networks=("10.0.0.0/8",), max_connections_per_ip=1)
    h.serve(proxy=ProxyGate(["10.0.0.5/32"], 10.0, h.clock))
    return h


@pytest.fixture
def events():
    seen: list[dict] = []
    mail_publisher.addObserver(seen.append)
    yield seen
    mail_publisher.removeObserver(seen.append)


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 203.0.113.9 192.0.2.25 50000 25\r\n",
    v2("203.0.113.9"),
], ids=["v1", "v2"])
def test_header_names_the_client(harness, header, events):
    c = ProxyClient(harness.factory)
    assert c.greeting == ""  # no greeting before the header
    # the header and a pipelined EHLO in one segment
    assert c.send(header + b"EHLO client.example\r\n") == GREETING + EHLO
    assert c.proto.session.client_ip == "203.0.113.9"
    assert harness.factory.per_ip == {"203.0.113.9": 1}
    # the proxy's own network is trusted, the client behind it is not: no relay
    assert c.send("MAIL FROM:<x@client.example>\r\n") == MAIL_OK
    assert c.send("RCPT TO:<someone@elsewhere.example>\r\n").startswith("554 5.7.1 ")
    connect = [e for e in events if e.get("mail_event") == "connection"]
    assert connect[0]["client"] == "203.0.113.9" and connect[0]["proxy"] == PROXY_IP


def test_header_split_across_reads_and_received(harness):
    c = ProxyClient(harness.factory)
    header = v2("203.0.113.9")
    for i in range(len(header)):
        assert c.send(header[i : i + 1]) == ("" if i < len(header) - 1 else GREETING)
    c.send("EHLO client.example\r\nMAIL FROM:<x@client.example>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    reply = c.send("Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    raw = harness.message(reply.split()[-1])
    assert b"[203.0.113.9]" in raw.split(b"\r\n\t", 2)[0] + raw.split(b"\r\n", 2)[1]
    assert PROXY_IP.encode() not in raw


def test_ipv6_and_local_headers(harness):
    c = ProxyClient(harness.factory)
    assert c.send(v2_ipv6("2001:db8::9")) == GREETING
    assert c.proto.session.client_ip == "2001:db8::9"
    c.lose()
    # LOCAL (the proxy's health check) and v1 UNKNOWN: the proxy's own address
    c = ProxyClient(harness.factory)
    assert c.send(v2("203.0.113.9", command=0)) == GREETING
    assert c.proto.session.client_ip == PROXY_IP
    c.lose()
    c = ProxyClient(harness.factory)
    assert c.send(b"PROXY UNKNOWN\r\n") == GREETING
    assert c.proto.session.client_ip == PROXY_IP


@pytest.mark.parametrize("data, why", [
    (b"EHLO client.example\r\n", "the connection does not start with a PROXY header"),
    (b"PROXY TCP4 203.0.113.9 192.0.2.25 50000\r\n", "malformed PROXY header"),
    (b"PROXY TCP4 203.0.113.999 192.0.2.25 50000 25\r\n", "malformed PROXY header"),
    (b"PROXY TCP4 203.0.113.9 192.0.2.25 fifty 25\r\n", "malformed PROXY header"),
    (b"PROXY TCP4 \xff\xfe 192.0.2.25 1 25\r\n", "malformed PROXY header"),
    (b"PROXY TCP4 " + b"1" * 120, "PROXY v1 header longer than 107 octets"),
    (V2_SIG + b"\x21\x11\xff\xff", f"PROXY v2 header of 65551 octets (at most {16 + MAX_V2})"),
    (V2_SIG + b"\x31\x11\x00\x0c" + b"\x00" * 12, "malformed PROXY header"),
    (V2_SIG + b"\x21\x11\x00\x02\x00\x00", "malformed PROXY header"),
    (b"PROXY TCP6 fe80::1%e\x1bx<y> 2001:db8::25 1 25\r\n", "malformed PROXY header"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::25 1 25\r\n", "malformed PROXY header"),
    (b"PROXY TCP4 2001:db8::9 192.0.2.25 1 25\r\n", "malformed PROXY header"),
    (b"PROXY TCP6 203.0.113.9 2001:db8::25 1 25\r\n", "malformed PROXY header"),
], ids=["smtp", "short", "bad-ip", "bad-port", "binary", "long-v1", "long-v2", "version3", "short-v2",
        "scope-escape", "scope", "tcp4-v6", "tcp6-v4"])
def test_bad_header_closes_with_a_log_line(harness, events, data, why):
    c = ProxyClient(harness.factory)
    assert c.send(data) == ""
    assert c.closed
    c.lose()
    assert harness.factory.connections == 0
    rejected = [e for e in events if e.get("mail_event") == "reject"]
    assert [(e["reason"], e["why"], e["client"]) for e in rejected] == [("proxy_header", why, PROXY_IP)]


def test_an_ipv4_mapped_client_is_its_ipv4_address(harness):
    # HAProxy on a dual-stack socket names IPv4 clients as ::ffff:a.b.c.d
    c = ProxyClient(harness.factory)
    assert c.send(b"PROXY TCP6 ::ffff:203.0.113.9 2001:db8::25 50000 25\r\n") == GREETING
    assert c.proto.session.client_ip == "203.0.113.9"
    c.lose()
    c = ProxyClient(harness.factory)
    assert c.send(v2_ipv6("::ffff:203.0.113.10")) == GREETING
    assert c.proto.session.client_ip == "203.0.113.10"


def test_late_header_closes(harness, events):
    c = ProxyClient(harness.factory)
    c.send(b"PROXY TCP4 203.0.113.9 ")
    harness.clock.advance(9.9)
    assert not c.closed
    harness.clock.advance(0.1)
    assert c.closed
    assert [e["why"] for e in events if e.get("mail_event") == "reject"] == ["no PROXY header in time"]


def test_connection_lost_before_the_header_cancels_the_timer(harness):
    c = ProxyClient(harness.factory)
    c.lose()
    assert harness.clock.getDelayedCalls() == []


def test_proxy_header_from_others_refused(harness, events):
    c = harness.connect("192.0.2.77")
    assert c.greeting == GREETING
    assert c.send("PROXY TCP4 203.0.113.9 192.0.2.25 50000 25\r\n") == (
        "554 5.7.1 Error: PROXY header not accepted from your address\r\n"
    )
    assert c.closed
    assert c.proto.session.client_ip == "192.0.2.77"
    assert [e["reason"] for e in events if e.get("mail_event") == "reject"] == ["proxy_refused"]


def test_gate_matches_networks_and_mapped_addresses():
    from twisted.internet import task

    gate = ProxyGate(["10.0.0.0/8", "2001:db8::/32"], 5.0, task.Clock())
    assert gate.expects("10.1.2.3") and gate.expects("::ffff:10.1.2.3") and gate.expects("2001:db8::1")
    assert not gate.expects("192.0.2.1") and not gate.expects("") and not gate.expects("/tmp/sock")
    assert not ProxyGate([], 5.0, task.Clock())


def test_reader_after_failure_ignores_more_bytes():
    from twisted.internet import task

    failed: list[str] = []
    reader = ProxyHeaderReader("10.0.0.5", task.Clock(), 5.0, lambda *a: failed.append("done"), failed.append)
    reader.feed(b"HELO x\r\n")
    reader.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert failed == ["the connection does not start with a PROXY header"]


class Gate:
    """The anvil's gate seen from an acceptor process: each admission waits for the test to answer it."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, defer.Deferred]] = []
        self.released: list[str] = []

    def admit(self, name: str, ip: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.asked.append((name, ip, d))
        return d

    def release(self, name: str, ip: str) -> None:
        self.released.append(ip)


@pytest.mark.parametrize("answer", ["", "max_connections_per_ip"])
def test_header_then_an_admission_counted_elsewhere(tmp_path, answer):
    h = Harness(tmp_path, trusted_networks=("10.0.0.0/8",))
    gate = Gate()
    h.serve(proxy=ProxyGate(["10.0.0.5/32"], 10.0, h.clock), gate=gate, gate_name="tcp:25")
    c = ProxyClient(h.factory)
    # the header and a pipelined EHLO in one segment: nothing is answered before the admission
    assert c.send(b"PROXY TCP4 203.0.113.9 192.0.2.25 50000 25\r\nEHLO client.example\r\n") == ""
    ((name, ip, d),) = gate.asked
    assert (name, ip) == ("tcp:25", "203.0.113.9")  # the client, not the proxy
    d.callback(answer)
    if answer:
        assert c.read().startswith("421 4.7.0 ")
        assert h.factory.per_ip == {}
    else:
        assert c.read() == GREETING + EHLO
        assert h.factory.per_ip == {"203.0.113.9": 1}
        c.send("QUIT\r\n")
        c.proto.connectionLost(None)
        assert gate.released == ["203.0.113.9"]

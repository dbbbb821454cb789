"""
End to end: RemoteDelivery with real DNS, real sockets and real receivers.

- DNS: a twisted.names server (DNSServerFactory over UDP on 127.0.0.1)
  serving the in-memory zone C{e2e.test}: MX records at several
  preferences, a null MX, an A-only domain, a CNAME'd MX host, a SERVFAIL
  name and a dead first MX (its address, 127.0.0.2, has nothing listening
  on the port).
- Receivers: Postfix's smtp-sink capturing each transaction to a file, and
  a mailhub SMTP server (smtpd.py) queueing into its own spool.
- Client: the real mailhub.relay.client.connect.

MX records here point at loopback, so the agent is built with
C{loopback_is_self=False}; loop detection is then tested through
C{local_addresses} (127.0.0.9), and once with the default.
"""

from __future__ import annotations

import glob
import os
import subprocess

import pytest
from conftest import in_reactor, require_tool
from dnszone import AAAA, CNAME, MX, A, Zone
from peers import free_port, wait_for, wait_listening
from twisted.internet import protocol
from twisted.logger import formatEvent
from twisted.names import dns, server
from twisted.protocols.basic import LineReceiver

from mailhub.envelope import Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes
from mailhub.relay import client as smtpclient
from mailhub.relay.agent import RemoteDelivery

MESSAGE = (
    b"From: sender@example.org\r\n"
    b"To: someone@multi.e2e.test\r\n"
    b"Subject: relay test\r\n"
    b"Message-ID: <relay-e2e@example.org>\r\n"
    b"\r\n"
    b"Hello over the relay.\r\n"
    b".a line starting with a dot\r\n"
    b"\r\n"
    b"last line\r\n"
)

ZONE = {
    "multi.e2e.test": [MX(30, "worst.e2e.test"), MX(10, "deadmx.e2e.test"), MX(20, "sink.e2e.test")],
    "deadmx.e2e.test": [A("127.0.0.2")],
    "sink.e2e.test": [A("127.0.0.1")],
    "worst.e2e.test": [A("127.0.0.3")],
    "null.e2e.test": [MX(0, ".")],
    "aonly.e2e.test": [A("127.0.0.1")],
    "cname.e2e.test": [MX(10, "alias.e2e.test")],
    "alias.e2e.test": [CNAME("sink.e2e.test")],
    "dead.e2e.test": [MX(10, "deadmx.e2e.test"), MX(20, "dead6.e2e.test")],
    "dead6.e2e.test": [AAAA("::1")],
    "loop.e2e.test": [MX(10, "me.e2e.test")],
    "me.e2e.test": [A("127.0.0.9")],
    "lo.e2e.test": [MX(10, "sink.e2e.test")],
}


@pytest.fixture
def sink(tmp_path):
    """smtp-sink on 127.0.0.1:port dumping each transaction to tmp_path/sink/msg.*"""
    binary = require_tool("smtp-sink")
    port = free_port()
    out = tmp_path / "sink"
    out.mkdir()
    args = [binary, "-d", f"{out}/msg.", f"127.0.0.1:{port}", "100"]
    if os.geteuid() == 0:
        args[1:1] = ["-u", "root"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def dns_server(reactor):
    zone = Zone("e2e.test", ZONE, servfail=("broken.e2e.test",), failure=RuntimeError)

    def start():
        factory = server.DNSServerFactory(authorities=[zone])
        return reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")

    port = in_reactor(reactor, start)
    yield f"127.0.0.1:{port.getHost().port}", zone
    in_reactor(reactor, port.stopListening)


class Counting:
    """The real smtpclient.connect, counting calls per address."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, reactor, endpoint, options, remote_name, remote_ip="", port=25):
        self.calls.append((remote_ip, port))
        return smtpclient.connect(reactor, endpoint, options, remote_name, remote_ip, port)


def make_agent(reactor, dns_addr: str, port: int, **kw) -> tuple[RemoteDelivery, Counting]:
    counting = Counting()
    kw.setdefault("loopback_is_self", False)
    kw.setdefault("local_addresses", ["127.0.0.9"])

    def build():
        agent = RemoteDelivery(
            reactor, "relay.example.org", dns_servers=[dns_addr], port=port, tls="may",
            connect=counting, client_options={"connect_timeout": 10.0, "command_timeout": 20.0,
                                               "greeting_timeout": 20.0}, **kw,
        )
        agent.startService()
        return agent

    return in_reactor(reactor, build), counting


def deliver(reactor, agent: RemoteDelivery, tmp_path, *rcpts: str, qid: str = "E2E0000001"):
    path = tmp_path / qid  # a queue file, as the spool hands it to agents
    env = Envelope(qid, "sender@example.org", [Recipient(r) for r in rcpts], 0.0)
    path.write_bytes(queue_file_bytes(MESSAGE, env))
    return in_reactor(reactor, lambda: agent.deliver(env, env.recipients, str(path), report=lambda outcomes: None))


def stop(reactor, agent: RemoteDelivery) -> None:
    in_reactor(reactor, agent.stopService)


def dumps(out, n: int) -> list[bytes]:
    """The n capture files smtp-sink wrote, oldest first (waits for them to be complete)."""

    def complete() -> list[bytes] | None:  # smtp-sink writes its files in its own process
        files = sorted(glob.glob(f"{out}/msg.*"), key=os.path.getmtime)
        if len(files) >= n:
            data = [open(f, "rb").read() for f in files]
            if all(d.endswith(b"last line\n\n") for d in data):
                return data
        return None

    try:
        return wait_for(complete, 10, f"{n} capture files in {out}", interval=0.05)
    except AssertionError:
        raise AssertionError(f"expected {n} capture files in {out}: {os.listdir(out)}") from None


def body_of(dump: bytes) -> bytes:
    """Message part of an smtp-sink dump: after its 3-line Received header."""
    lines = dump.split(b"\n")
    start = next(i for i, l in enumerate(lines) if l.startswith(b"Received: from "))
    return b"\n".join(lines[start + 3 :])


def test_mx_order_dead_first_mx_and_exact_bytes(reactor, sink, dns_server, tmp_path) -> None:
    port, out = sink
    dns_addr, zone = dns_server
    agent, counting = make_agent(reactor, dns_addr, port)
    try:
        outcomes = deliver(reactor, agent, tmp_path, "someone@multi.e2e.test", "other@Multi.E2E.test")
    finally:
        stop(reactor, agent)
    assert [(o.recipient, o.kind, o.code, o.remote_mta) for o in outcomes] == [
        ("someone@multi.e2e.test", "delivered", 250, f"sink.e2e.test[127.0.0.1]:{port}"),
        ("other@Multi.E2E.test", "delivered", 250, f"sink.e2e.test[127.0.0.1]:{port}"),
    ]
    # Preference 10 (dead) first, then 20, never 30.
    assert counting.calls == [("127.0.0.2", port), ("127.0.0.1", port)]
    (dump,) = dumps(out, 1)
    head = dump.split(b"Received: ")[0]
    assert head == (
        b"X-Client-Addr: 127.0.0.1\n"
        b"X-Client-Proto: ESMTP\n"
        b"X-Helo-Args: relay.example.org\n"
        b"X-Mail-Args: <sender@example.org>\n"
        b"X-Rcpt-Args: <someone@multi.e2e.test>\n"
        b"X-Rcpt-Args: <other@Multi.E2E.test>\n"
    )
    # smtp-sink stores lines with LF and adds one empty line at the end;
    # the dot-stuffed line arrives unstuffed.
    assert body_of(dump) == MESSAGE.replace(b"\r\n", b"\n") + b"\n"


def test_connection_reused_for_second_message(reactor, sink, dns_server, tmp_path) -> None:
    port, out = sink
    dns_addr, _ = dns_server
    agent, counting = make_agent(reactor, dns_addr, port)
    try:
        first = deliver(reactor, agent, tmp_path, "a@aonly.e2e.test", qid="E2E0000001")
        second = deliver(reactor, agent, tmp_path, "b@aonly.e2e.test", qid="E2E0000002")
        assert in_reactor(reactor, lambda: agent._pool.total) == 1  # one idle connection kept
    finally:
        stop(reactor, agent)
    assert [o.kind for o in first + second] == ["delivered", "delivered"]
    assert counting.calls == [("127.0.0.1", port)]  # one connection, two transactions
    d1, d2 = dumps(out, 2)
    assert b"X-Rcpt-Args: <a@aonly.e2e.test>\n" in d1
    assert b"X-Rcpt-Args: <b@aonly.e2e.test>\n" in d2
    assert body_of(d2) == MESSAGE.replace(b"\r\n", b"\n") + b"\n"


def test_cname_mx_host(reactor, sink, dns_server, tmp_path) -> None:
    port, out = sink
    dns_addr, _ = dns_server
    agent, counting = make_agent(reactor, dns_addr, port)
    try:
        (o,) = deliver(reactor, agent, tmp_path, "c@cname.e2e.test")
    finally:
        stop(reactor, agent)
    assert (o.kind, o.remote_mta) == ("delivered", f"alias.e2e.test[127.0.0.1]:{port}")
    dumps(out, 1)


def test_dns_and_connect_failures(reactor, sink, dns_server, tmp_path) -> None:
    port, out = sink
    dns_addr, _ = dns_server
    agent, counting = make_agent(reactor, dns_addr, port)
    try:
        outcomes = deliver(reactor, agent, tmp_path, "n@null.e2e.test", "x@nxdomain.e2e.test",
                           "s@broken.e2e.test", "d@dead.e2e.test", "l@loop.e2e.test")
    finally:
        stop(reactor, agent)
    got = {o.recipient: (o.kind, o.code, o.status, o.text) for o in outcomes}
    assert got == {
        "n@null.e2e.test": ("permanent", 0, "5.1.10", "Domain null.e2e.test does not accept mail (null MX)"),
        "x@nxdomain.e2e.test": (
            "permanent", 0, "5.1.2",
            "Host or domain name not found. Name service error for name=nxdomain.e2e.test type=MX: Host not found"),
        "s@broken.e2e.test": (
            "temporary", 0, "4.4.3",
            "Host or domain name not found. Name service error for name=broken.e2e.test type=MX: "
            "Host not found, try again"),
        "d@dead.e2e.test": ("temporary", 0, "4.4.1", f"connect to dead6.e2e.test[::1]:{port}: Connection refused"),
        "l@loop.e2e.test": ("permanent", 0, "5.4.6", "mail for loop.e2e.test loops back to myself"),
    }
    assert sorted(counting.calls) == [("127.0.0.2", port), ("::1", port)]
    assert os.listdir(out) == []


def test_loopback_mx_is_a_loop_by_default(reactor, sink, dns_server, tmp_path) -> None:
    port, out = sink
    dns_addr, _ = dns_server
    agent, counting = make_agent(reactor, dns_addr, port, loopback_is_self=True)
    try:
        (o,) = deliver(reactor, agent, tmp_path, "u@lo.e2e.test")
    finally:
        stop(reactor, agent)
    assert (o.kind, o.code, o.status) == ("permanent", 0, "5.4.6")
    assert counting.calls == []


def test_route_to_mailhub_server(reactor, sink, dns_server, tmp_path) -> None:
    """A bracketed route to a second mailhub (smtpd.py) on loopback; its spool gets the bytes."""
    from twisted.internet import task  # noqa: F401  (the server uses the real reactor as clock)

    from mailhub.config import ServerConfig
    from mailhub.delivery.directory import Directory
    from mailhub.queue.spool import Spool
    from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
    from mailhub.smtp.policy import Policy

    port, out = sink
    dns_addr, _ = dns_server
    spool = Spool(str(tmp_path / "remote-spool"), fsync=False)
    queued: list = []
    directory = Directory(["example.com"], str(tmp_path / "mailboxes"), users=["alice"])
    config = ServerConfig(hostname="mx.example.com")
    policy = Policy(directory, config.trusted_networks)

    def listen():
        factory = SMTPServerFactory(SMTPSettings(config), spool, queued.append, policy, reactor)
        return reactor.listenTCP(0, factory, interface="127.0.0.1")

    listener = in_reactor(reactor, listen)
    mh_port = listener.getHost().port
    agent, counting = make_agent(reactor, dns_addr, port, routes={"example.com": f"[127.0.0.1]:{mh_port}"},
                                 smarthost=f"[127.0.0.1]:{port}")
    try:
        outcomes = deliver(reactor, agent, tmp_path, "alice@example.com", "nobody@example.com",
                           "x@elsewhere.example")
    finally:
        stop(reactor, agent)
        in_reactor(reactor, listener.stopListening)
    got = {o.recipient: (o.kind, o.code, o.status) for o in outcomes}
    assert got == {
        "alice@example.com": ("delivered", 250, "2.0.0"),
        "nobody@example.com": ("permanent", 550, "5.1.1"),
        "x@elsewhere.example": ("delivered", 250, "2.0.0"),  # via the smarthost (smtp-sink)
    }
    assert len(queued) == 1
    env = queued[0]
    assert env.sender == "sender@example.org"
    assert [r.address for r in env.recipients] == ["alice@example.com"]
    with spool.open_message(env.queue_id) as f:
        data = f.read()
    assert data.startswith(b"Received: ")
    assert data.endswith(MESSAGE)
    (dump,) = dumps(out, 1)
    assert b"X-Rcpt-Args: <x@elsewhere.example>\n" in dump


class _BrokenTLSServer(LineReceiver):
    """
    Offers STARTTLS, says 220 to it, then answers the TLS ClientHello with
    plain text and hangs up: a failed handshake.  Without STARTTLS it takes
    the message.
    """

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.factory.sessions += 1
        self.lines: list[bytes] | None = None
        self.sendLine(b"220 broken-tls.example ESMTP")

    def rawDataReceived(self, data: bytes) -> None:
        self.transport.write(b"this is not TLS\r\n")
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if self.lines is not None:
            if line == b".":
                self.factory.messages.append(b"".join(l + b"\r\n" for l in self.lines))
                self.lines = None
                self.sendLine(b"250 2.0.0 Ok: queued")
            else:
                self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        cmd = line.split(b" ")[0].upper()
        self.factory.commands.append(line)
        if cmd == b"EHLO":
            self.sendLine(b"250-broken-tls.example")
            self.sendLine(b"250-ENHANCEDSTATUSCODES")
            self.sendLine(b"250 STARTTLS")
        elif cmd == b"STARTTLS":
            self.sendLine(b"220 2.0.0 Ready to start TLS")
            self.setRawMode()
        elif cmd in (b"MAIL", b"RCPT", b"RSET"):
            self.sendLine(b"250 2.0.0 Ok")
        elif cmd == b"DATA":
            self.lines = []
            self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
        elif cmd == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 Error: command not recognized")


def test_tls_handshake_failure_under_may_retries_in_plain_text(reactor, dns_server, tmp_path) -> None:
    dns_addr, _ = dns_server
    factory = protocol.ServerFactory.forProtocol(_BrokenTLSServer)
    factory.sessions, factory.messages, factory.commands = 0, [], []
    listener = in_reactor(reactor, lambda: reactor.listenTCP(0, factory, interface="127.0.0.1"))
    port = listener.getHost().port
    options: list[str] = []

    agent, counting = make_agent(reactor, dns_addr, 25, routes={"tls.e2e.test": f"[127.0.0.1]:{port}"})
    real = agent._connect

    def recording(reactor_, endpoint, opts, *a):
        options.append(opts.tls)
        return real(reactor_, endpoint, opts, *a)

    agent._connect = recording
    try:
        (o,) = deliver(reactor, agent, tmp_path, "u@tls.e2e.test")
    finally:
        stop(reactor, agent)
        in_reactor(reactor, listener.stopListening)
    assert (o.kind, o.code, o.remote_mta) == ("delivered", 250, f"127.0.0.1[127.0.0.1]:{port}")
    assert options == ["may", "none"]
    assert factory.sessions == 2
    assert factory.commands[:2] == [b"EHLO relay.example.org", b"STARTTLS"]
    assert b"STARTTLS" not in factory.commands[2:]
    assert factory.messages == [MESSAGE]


def test_relay_delivery_logs_no_factory_lines(reactor, dns_server, tmp_path, events) -> None:
    """An outbound connection does not log Twisted's "Starting factory <...>" / "Stopping factory"."""
    dns_addr, _ = dns_server
    factory = protocol.ServerFactory.forProtocol(_BrokenTLSServer)
    factory.noisy = False  # the test's own listener
    factory.sessions, factory.messages, factory.commands = 0, [], []
    listener = in_reactor(reactor, lambda: reactor.listenTCP(0, factory, interface="127.0.0.1"))
    port = listener.getHost().port
    agent, _ = make_agent(reactor, dns_addr, 25, routes={"plain.e2e.test": f"[127.0.0.1]:{port}"})
    try:
        (o,) = deliver(reactor, agent, tmp_path, "u@plain.e2e.test")
    finally:
        stop(reactor, agent)
        in_reactor(reactor, listener.stopListening)
    assert o.kind == "delivered"
    texts = [formatEvent(e) for e in events]
    assert any(f"connected to 127.0.0.1[127.0.0.1]:{port}" in t for t in texts)
    assert not [t for t in texts if "Starting factory" in t or "Stopping factory" in t]

"""
End-to-end tests of the SMTP server on real loopback sockets: smtplib as the
client, raw sockets for pipelining in one write, smuggling and BDAT.  The
spooled bytes must equal what was sent (after dot-unstuffing, minus the
Received header).
"""

from __future__ import annotations

import re
import smtplib
import socket
import threading

import pytest
from conftest import in_reactor
from peers import wait_for
from twisted.internet import threads
from twisted.internet.endpoints import serverFromString

from mailhub.config import ServerConfig
from mailhub.delivery.directory import Directory
from mailhub.queue.spool import Spool
from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
from mailhub.smtp.policy import Policy

HOST = "mx.example.com"


class Server:
    def __init__(self, reactor, tmp_path, run=None, **config) -> None:
        self.reactor = reactor
        self.spool = Spool(str(tmp_path / "spool"), fsync=True)
        self.queued: list = []
        directory = Directory(["example.com"], str(tmp_path / "mailboxes"), users=["alice", "bob"])
        cfg = ServerConfig(hostname=HOST, **config)
        factory = SMTPServerFactory(
            SMTPSettings(cfg), self.spool, self.queued.append, Policy(directory, cfg.trusted_networks), reactor
        )
        if run is not None:
            factory.run = run
        self.factory = factory
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.port = in_reactor(reactor, endpoint.listen, factory)
        self.address = ("127.0.0.1", self.port.getHost().port)

    def stop(self) -> None:
        in_reactor(self.reactor, self.port.stopListening)

    def stored(self, qid: str) -> bytes:
        with self.spool.open_message(qid) as f:
            raw = f.read()
        m = re.match(rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*", raw)
        assert m is not None, raw[:200]
        return raw[m.end() :]

    def raw_session(self, data: bytes) -> str:
        """Send C{data} in one write (it should end with QUIT) and read every reply until the server closes."""
        with socket.create_connection(self.address, timeout=10) as s:
            banner = s.recv(1000)
            assert banner == f"220 {HOST} ESMTP mailhub\r\n".encode()
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode("utf-8")


@pytest.fixture(params=["reactor-thread", "deferToThread"])
def server(request, reactor, tmp_path):
    """Each test runs with the commit in the reactor thread and in a worker thread."""
    srv = Server(reactor, tmp_path, run=threads.deferToThread if request.param == "deferToThread" else None)
    yield srv
    srv.stop()


def test_smtplib_message_round_trip(server):
    lines = [b"From: a@example.net", b"To: alice@example.com", b"Subject: e2e", b""]
    lines += [b".starts with a dot", b"..two dots", b".", b"x" * 998, b"caf\xc3\xa9 8bit"]
    lines += [b"line %d " % i + b"y" * 200 for i in range(20000)]  # ~4 MB, many reads
    message = b"\r\n".join(lines) + b"\r\n"
    with smtplib.SMTP(*server.address, timeout=30) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        for ext in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8", "chunking", "dsn"):
            assert client.has_extn(ext), ext
        assert client.esmtp_features["size"] == "10240000"
        refused = client.sendmail("a@example.net", ["alice@example.com", "bob@example.com"], message,
                                  mail_options=["BODY=8BITMIME"])
        assert refused == {}
        code, text = client.noop()
        assert (code, text) == (250, b"2.0.0 Ok")
    [env] = server.queued
    assert [r.address for r in env.recipients] == ["alice@example.com", "bob@example.com"]
    assert env.client["addr"] == "127.0.0.1" and env.client["protocol"] == "ESMTP"
    assert server.stored(env.queue_id) == message


def test_smtplib_smtputf8(server):
    message = "Subject: grüße\r\n\r\nhällo\r\n".encode()
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        client.sendmail("jörg@bücher.example", ["alice@example.com"], message, mail_options=["SMTPUTF8"])
    [env] = server.queued
    assert env.sender == "jörg@bücher.example" and env.esmtp["smtputf8"] is True
    assert server.stored(env.queue_id) == message


def test_smtplib_errors(server):
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            client.sendmail("a@example.net", ["nobody@example.com"], b"x\r\n")
        assert e.value.recipients == {
            "nobody@example.com": (550, b"5.1.1 User unknown in local recipient table")}
        assert client.vrfy("alice") == (252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
        assert client.docmd("EXPN", "list") == (502, b"5.5.1 Error: EXPN command is disabled")
    assert server.queued == []


def test_relay_denied_for_untrusted(reactor, tmp_path):
    srv = Server(reactor, tmp_path, trusted_networks=())
    try:
        with smtplib.SMTP(*srv.address, timeout=10) as client:
            client.ehlo("client.test")
            with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
                client.sendmail("a@example.net", ["victim@elsewhere.test"], b"x\r\n")
            assert e.value.recipients["victim@elsewhere.test"][0] == 554
    finally:
        srv.stop()
    assert srv.queued == []


def test_pipelining_in_one_write(server):
    out = server.raw_session(
        b"EHLO client.test\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.com>\r\n"
        b"RCPT TO:<nobody@example.com>\r\nDATA\r\nSubject: p\r\n\r\n..body\r\n.\r\n"
        b"RSET\r\nNOOP\r\nQUIT\r\n"
    )
    qid = server.queued[0].queue_id
    assert out.endswith(
        "250 DSN\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 User unknown in local recipient table\r\n"
        f"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as {qid}\r\n"
        "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    )
    assert server.stored(qid) == b"Subject: p\r\n\r\n.body\r\n"


@pytest.mark.parametrize("seq", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n"])
def test_smuggling_rejected(server, seq):
    out = server.raw_session(
        b"EHLO client.test\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
        b"Subject: s\r\n\r\nhello" + seq
        + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n"
        b"RCPT TO:<bob@example.com>\r\nQUIT\r\n"
    )
    assert out.endswith(
        "354 End data with <CR><LF>.<CR><LF>\r\n"
        "550 5.6.0 Message contains bare CR or LF; lines must end with CRLF\r\n"
        "503 5.5.1 Error: need MAIL command\r\n221 2.0.0 Bye\r\n"
    )
    assert server.queued == [] and server.spool.queue_ids() == []


def test_bdat(server):
    body = b"Subject: b\r\n\r\n.\r\nno stuffing\r\n"
    out = server.raw_session(
        b"EHLO client.test\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\n"
        b"BDAT 10\r\n" + body[:10] + b"BDAT %d LAST\r\n" % (len(body) - 10) + body[10:] + b"QUIT\r\n"
    )
    qid = server.queued[0].queue_id
    assert out.endswith(
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: 10 octets received\r\n"
        f"250 2.0.0 Ok: queued as {qid}\r\n221 2.0.0 Bye\r\n"
    )
    assert server.stored(qid) == body


def test_postfix_smtp_source(server):
    """Postfix's smtp-source as a real peer: 20 messages of 20 kB over 4 parallel sessions."""
    import subprocess

    from conftest import require_tool

    tool = require_tool("smtp-source")
    done = subprocess.run(
        [tool, "-m", "20", "-s", "4", "-l", "20000", "-f", "a@example.net", "-t", "alice@example.com",
         "%s:%d" % server.address],
        timeout=60, capture_output=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(server.queued) == 20
    for env in server.queued:
        body = server.stored(env.queue_id)
        assert body.endswith(b"\r\n") and len(body) >= 20000


def _read_all(sock: socket.socket, into: list[bytes]) -> None:
    while chunk := sock.recv(1 << 20):
        into.append(chunk)


def test_client_that_never_reads_replies(reactor, tmp_path):
    """
    A client pipelines 4 MB of NOOP and reads nothing.  The server must
    stop executing (and reading) while its replies are not being read,
    so its user-space buffers stay small: the unsent output (the
    transport's write buffer) and the unparsed input are sampled after
    every reply.  Then the client reads everything: one reply per NOOP.
    """
    srv = Server(reactor, tmp_path)
    peak = {"out": 0, "in": 0}
    build = srv.factory.buildProtocol

    def build_tracking(addr):
        proto = build(addr)
        write = proto.write

        def tracking_write(*args):
            write(*args)
            t = proto.transport  # twisted.internet.tcp.Server: a FileDescriptor's write buffer
            peak["out"] = max(peak["out"], len(t.dataBuffer) - t.offset + t._tempDataLen)
            peak["in"] = max(peak["in"], len(proto._buf) - getattr(proto, "_pos", 0))

        proto.write = tracking_write
        return proto

    srv.factory.buildProtocol = build_tracking
    n = 4 * 2**20 // 6
    data = b"NOOP\r\n" * n
    replies: list[bytes] = []
    try:
        with socket.socket() as s:
            # Small client buffers: the replies back up into the server quickly.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            s.connect(srv.address)
            s.settimeout(10)
            assert s.recv(1000) == f"220 {HOST} ESMTP mailhub\r\n".encode()
            s.settimeout(1.0)
            sent = 0
            while sent < len(data):
                try:
                    sent += s.send(data[sent : sent + 65536])
                except TimeoutError:
                    break  # the server stopped reading: it is waiting for us
            s.settimeout(30)
            reader = threading.Thread(target=_read_all, args=(s, replies))
            reader.start()
            s.sendall(data[sent:] + b"QUIT\r\n")
            reader.join(60)
            assert not reader.is_alive()
    finally:
        srv.stop()
    assert peak["out"] < 2**20, peak  # without flow control: megabytes
    assert peak["in"] < 2**20, peak
    out = b"".join(replies)
    assert out == b"250 2.0.0 Ok\r\n" * n + b"221 2.0.0 Bye\r\n"


@pytest.mark.parametrize("quit", [True, False])
def test_half_close_gets_every_reply(server, quit):
    """
    A client sends a whole pipelined transaction, then shutdown(SHUT_WR):
    it still gets every reply (else it would retry and the message would
    arrive twice), and the server closes after the last one.
    """
    script = (
        b"EHLO client.test\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
        b"Subject: half\r\n\r\nclosed\r\n.\r\nNOOP\r\n" + (b"QUIT\r\n" if quit else b"")
    )
    with socket.create_connection(server.address, timeout=10) as s:
        assert s.recv(1000) == f"220 {HOST} ESMTP mailhub\r\n".encode()
        s.sendall(script)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    [env] = server.queued
    assert out.decode().endswith(
        "250 DSN\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        f"250 2.0.0 Ok: queued as {env.queue_id}\r\n250 2.0.0 Ok\r\n" + ("221 2.0.0 Bye\r\n" if quit else "")
    )
    assert server.stored(env.queue_id) == b"Subject: half\r\n\r\nclosed\r\n"


def test_starttls_and_connection_events(reactor, tmp_path):
    """The real TLS layer calls handshakeCompleted: one "starttls" mail event per handshake."""
    import ssl

    from twisted.logger import globalLogPublisher

    from mailhub import tls

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    tls.make_self_signed("127.0.0.1", cert, key)
    srv = Server(reactor, tmp_path)
    srv.factory.tls = tls.ServerTLS(cert, key)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)

    def mail_events() -> list[dict]:
        return [e for e in events if "mail_event" in e]

    try:
        context = ssl.create_default_context(cafile=cert)
        context.check_hostname = False
        with smtplib.SMTP(*srv.address, timeout=10) as client:
            client.starttls(context=context)
            assert client.noop() == (250, b"2.0.0 Ok")
        # QUIT was sent on leaving the block: the session's last event is
        # written in the reactor thread, whenever the server closes.
        wait_for(lambda: any(e["mail_event"] == "disconnect" for e in mail_events()), 10, "the disconnect event")
    finally:
        globalLogPublisher.removeObserver(events.append)
        srv.stop()
    assert [e["mail_event"] for e in mail_events()] == ["connection", "starttls", "disconnect"]
    assert [e["listener"] for e in mail_events()] == ["smtp", "smtp", "smtp"]


def test_smtps_quit_closes_the_connection(reactor, tmp_path):
    """
    Over implicit TLS the server itself ends the session after 221 (a TLS
    transport does not shut down while a producer is registered on it).
    """
    import ssl

    from twisted.internet import endpoints

    from mailhub import tls

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    tls.make_self_signed("127.0.0.1", cert, key)
    srv = Server(reactor, tmp_path)
    srv.factory.listener = "smtps"
    endpoint = endpoints.wrapServerTLS(tls.ServerTLS(cert, key), serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    port = in_reactor(reactor, endpoint.listen, srv.factory)
    try:
        context = ssl.create_default_context(cafile=cert)
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw:
            with context.wrap_socket(raw) as s:
                assert s.recv(1000) == f"220 {HOST} ESMTP mailhub\r\n".encode()
                s.sendall(b"NOOP\r\nQUIT\r\n")
                out = b""
                while chunk := s.recv(1000):  # ends only when the server closes
                    out += chunk
        assert out == b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    finally:
        in_reactor(reactor, port.stopListening)
        srv.stop()

"""
mailhub.relay.client on real sockets (127.0.0.1 only):

(a) Postfix's smtp-sink receives messages (a 1 MB one with "." lines at
    every 64 KiB read boundary) and dumps what it got; the dump must equal
    the message we sent, byte for byte after its LF conversion; with -8 (no
    8BITMIME) it must get 7-bit data that decodes to the original, and
    without SMTPUTF8 it must still get ASCII mail flagged SMTPUTF8.
(b) a small in-test Twisted responder answers 250/451/550 per recipient,
    records the exact DATA bytes, and offers STARTTLS with a certificate
    made here by a test CA, for tls="may", "verify" (right and wrong name).
"""

from __future__ import annotations

import datetime
import email
import email.policy
import os

import pytest
from conftest import in_reactor
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from peers import Sink, free_port, sink_message
from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from mailhub.envelope import DELIVERED_OUTCOME, PERMANENT, TEMPORARY, Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes
from mailhub.relay.client import ClientOptions, connect
from mailhub.relay.dotstuff import CHUNK_SIZE, stuff
from mailhub.relay.reply import SessionError

pytestmark = pytest.mark.timeout(60)


def boundary_message(blocks: int) -> bytes:
    """
    A message whose every CHUNK_SIZE-th byte starts a dot line: ".",
    "..", ".x" in turn, plus a bare-LF line, so each read boundary of the
    client falls exactly before a line that must be stuffed.
    """
    dots = [b".\r\n", b"..\r\n", b".x dot at boundary\r\n"]
    out = []
    for k in range(blocks):
        block = dots[k % 3] + b"bare LF line\n"
        while len(block) < CHUNK_SIZE - 80:
            block += b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod %05d\r\n" % k
        pad = CHUNK_SIZE - len(block) - 2
        block += b"p" * pad + b"\r\n"
        assert len(block) == CHUNK_SIZE
        out.append(block)
    return b"Subject: big\r\n" + b"".join(out)[len(b"Subject: big\r\n"):] + b"end\r\n"


def deliver(reactor, port, options, env, path, name="peer.test"):
    """connect + send + quit, in the reactor thread; returns (outcomes, conn)."""

    async def run():
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        conn = await connect(reactor, ep, options, name, "127.0.0.1", port)
        outcomes = await conn.send(env, env.recipients, path)
        tls = conn.tls
        await conn.quit()
        return outcomes, tls

    return in_reactor(reactor, lambda: Deferred.fromCoroutine(run()))


def env_for(*rcpts: str, **esmtp) -> Envelope:
    return Envelope("Q1", "sender@client.test", [Recipient(r) for r in rcpts], arrival=0.0, esmtp=esmtp)


def write_queue_file(path, raw: bytes, env: Envelope | None = None) -> None:
    """
    Write C{raw} as the spool hands it to agents: a queue file (message,
    envelope, footer), of which the client must send only the message.
    """
    path.write_bytes(queue_file_bytes(raw, env or env_for("a@dest.test")))


# -- (a) smtp-sink -----------------------------------------------------------------------


@pytest.fixture
def sink(tmp_path):
    """start(*smtp-sink options) -> (port, dump directory); all share tmp_path/dump."""
    sinks = []

    def start(*args: str):
        s = Sink(tmp_path / "dump", free_port(), *args)
        sinks.append(s)
        return s.port, s.dump

    yield start
    for s in sinks:
        s.stop()


def sink_dumps(dump) -> list[tuple[dict, bytes]]:
    """(smtp-sink headers, message body with LF line ends) per dump file."""
    result = []
    for name in sorted(os.listdir(dump)):
        headers, body = sink_message((dump / name).read_bytes())
        assert body.endswith(b"\n")  # smtp-sink appends an empty line
        result.append((headers, body[:-1]))
    return result


def test_sink_receives_1mb_with_dot_lines_at_chunk_boundaries(reactor, sink, tmp_path):
    port, dump = sink()
    raw = boundary_message(16)
    assert len(raw) >= 1024 * 1024
    path = tmp_path / "msg"
    write_queue_file(path, raw)
    outcomes, tls = deliver(
        reactor, port, ClientOptions("client.test", tls="may"), env_for("a@dest.test", "b@dest.test"), str(path)
    )
    assert [o.kind for o in outcomes] == [DELIVERED_OUTCOME, DELIVERED_OUTCOME]
    assert outcomes[0].remote_mta == f"peer.test[127.0.0.1]:{port}"
    assert tls is False  # smtp-sink offers no STARTTLS; "may" goes on in clear
    (headers, body), = sink_dumps(dump)
    assert headers["X-Mail-Args"] == ["<sender@client.test>"]
    assert headers["X-Rcpt-Args"] == ["<a@dest.test>", "<b@dest.test>"]
    assert headers["X-Helo-Args"] == ["client.test"]
    expected = raw.replace(b"\r\n", b"\n")
    assert body == expected


def test_sink_small_messages_and_8bitmime(reactor, sink, tmp_path):
    port, dump = sink()
    cases = [b"", b".", b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\nbare\nlf\r\nno newline at end"]
    for n, raw in enumerate(cases):
        path = tmp_path / f"m{n}"
        write_queue_file(path, raw)
        outcomes, _ = deliver(
            reactor, port, ClientOptions("client.test", tls="none"), env_for("a@dest.test", body="8BITMIME"), str(path)
        )
        assert outcomes[0].kind == DELIVERED_OUTCOME, outcomes
    dumps = sink_dumps(dump)
    assert len(dumps) == len(cases)
    got = sorted(body for _, body in dumps)
    want = sorted((raw.replace(b"\r\n", b"\n") + (b"\n" if raw and not raw.endswith(b"\n") else b"")) for raw in cases)
    assert got == want
    assert all(h["X-Mail-Args"] == ["<sender@client.test> BODY=8BITMIME"] for h, _ in dumps)


def test_sink_soft_and_hard_rcpt_rejects(reactor, sink, tmp_path):
    path = tmp_path / "m"
    write_queue_file(path, b"Subject: x\r\n\r\nhi\r\n")
    port, dump = sink("-r", "RCPT")  # also turns PIPELINING off: the one-at-a-time path
    outcomes, _ = deliver(reactor, port, ClientOptions("client.test", tls="none"), env_for("a@d.test"), str(path))
    assert [(o.kind, o.code, o.status) for o in outcomes] == [(TEMPORARY, 450, "4.3.0")]
    port, _ = sink("-f", "RCPT")
    outcomes, _ = deliver(reactor, port, ClientOptions("client.test", tls="none"), env_for("a@d.test"), str(path))
    assert [(o.kind, o.code, o.status) for o in outcomes] == [(PERMANENT, 500, "5.3.0")]
    assert os.listdir(dump) == []  # no DATA was sent in either case


EIGHT_BIT_MULTIPART = (
    b"From: a@client.test\r\nSubject: 8-bit\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="=b="\r\n\r\n'
    b"--=b=\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Grüße aus Köln\r\n.\r\n".encode() + b"\r\n"
    b"--=b=\r\nContent-Type: application/octet-stream\r\n\r\n"
    + bytes(b for b in range(256) if b not in (10, 13)) + b"\r\n"
    b"--=b=--\r\n"
)


def test_sink_without_8bitmime_receives_7bit(reactor, sink, tmp_path):
    """RFC 6152 3: smtp-sink -8 offers no 8BITMIME; what it gets is 7-bit and decodes to the original."""
    port, dump = sink("-8")
    path = tmp_path / "m"
    write_queue_file(path, EIGHT_BIT_MULTIPART)
    outcomes, _ = deliver(
        reactor, port, ClientOptions("client.test", tls="none"), env_for("a@dest.test", body="8BITMIME"), str(path)
    )
    assert [(o.kind, o.code) for o in outcomes] == [(DELIVERED_OUTCOME, 250)]
    (headers, body), = sink_dumps(dump)
    assert headers["X-Mail-Args"] == ["<sender@client.test>"]  # no BODY=8BITMIME
    assert body.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable\n\nGr=C3=BC=C3=9Fe aus K=C3=B6ln\n=2E\n" in body
    got = email.message_from_bytes(body, policy=email.policy.default)
    want = email.message_from_bytes(EIGHT_BIT_MULTIPART, policy=email.policy.default)
    assert [p.get_content() for p in got.iter_parts()][0].replace("\n", "\r\n") == (
        [p.get_content() for p in want.iter_parts()][0])
    assert [p.get_content() for p in got.iter_parts()][1] == [p.get_content() for p in want.iter_parts()][1]
    assert got["Subject"] == "8-bit"


def test_sink_without_8bitmime_unconvertible_is_554_563_and_nothing_sent(reactor, sink, tmp_path):
    port, dump = sink("-8")
    path = tmp_path / "m"
    write_queue_file(path, "Subject: Grüße\r\n\r\nhi\r\n".encode())
    outcomes, _ = deliver(
        reactor, port, ClientOptions("client.test", tls="none"), env_for("a@dest.test", body="8BITMIME"), str(path)
    )
    assert [(o.kind, o.code, o.status) for o in outcomes] == [(PERMANENT, 0, "5.6.3")]
    assert outcomes[0].text.startswith("Conversion required but not supported: ")
    assert os.listdir(dump) == []


def test_sink_without_smtputf8_takes_ascii_mail_flagged_smtputf8(reactor, sink, tmp_path):
    """RFC 6531 3.2: SMTPUTF8 only matters when envelope or headers really are UTF-8 (smtp-sink offers none)."""
    port, dump = sink()
    ascii_path, utf8_path = tmp_path / "a", tmp_path / "u"
    write_queue_file(ascii_path, b"Subject: plain\r\n\r\nhi\r\n")
    write_queue_file(utf8_path, "Subject: Grüße\r\n\r\nhi\r\n".encode())
    options = ClientOptions("client.test", tls="none")
    outcomes, _ = deliver(reactor, port, options, env_for("a@dest.test", smtputf8=True), str(ascii_path))
    assert [(o.kind, o.code) for o in outcomes] == [(DELIVERED_OUTCOME, 250)]
    outcomes, _ = deliver(reactor, port, options, env_for("a@dest.test", smtputf8=True), str(utf8_path))
    assert [(o.kind, o.code, o.status) for o in outcomes] == [(PERMANENT, 0, "5.6.7")]
    (headers, body), = sink_dumps(dump)
    assert headers["X-Mail-Args"] == ["<sender@client.test>"]
    assert body == b"Subject: plain\n\nhi\n"


def test_sink_421_after_mail(reactor, sink, tmp_path):
    path = tmp_path / "m"
    write_queue_file(path, b"hi\r\n")
    port, _ = sink("-Q", "MAIL")
    outcomes, _ = deliver(reactor, port, ClientOptions("client.test", tls="none"), env_for("a@d.test"), str(path))
    assert [(o.kind, o.code) for o in outcomes] == [(TEMPORARY, 421)]


# -- (b) in-test responder ------------------------------------------------------------------


class Responder(Protocol):
    """
    A minimal ESMTP server: replies by recipient local part (ok* 250,
    tmp* 451, bad* 550), keeps each message's DATA bytes exactly as received.
    """

    def connectionMade(self):
        self.buf = b""
        self.data = None
        self.tls = False
        self.accepted = 0
        self.transport.write(b"220 responder.test ESMTP\r\n")

    def reply(self, text: str):
        self.transport.write(text.encode() + b"\r\n")

    def dataReceived(self, data):
        self.buf += data
        while True:
            if self.data is not None:
                self.data += self.buf
                self.buf = b""
                end = self.data.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.factory.messages.append(self.data[2 : end + 2])
                self.buf = self.data[end + 5 :]
                self.data = None
                self.reply("250 2.0.0 Ok: queued")
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                return
            self.buf = rest
            cmd = line.decode()
            self.factory.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "EHLO":
                caps = ["responder.test", "PIPELINING", "8BITMIME", "SIZE 10000000"]
                if self.factory.tls_options is not None and not self.tls:
                    caps.append("STARTTLS")
                caps.append("ENHANCEDSTATUSCODES")
                self.transport.write(
                    b"".join(f"250{'-' if i < len(caps) - 1 else ' '}{c}\r\n".encode() for i, c in enumerate(caps))
                )
            elif verb == "STARTTLS":
                self.reply("220 2.0.0 Ready to start TLS")
                self.transport.startTLS(self.factory.tls_options)
                self.tls = True
            elif verb == "MAIL":
                self.accepted = 0
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                local = cmd.split("<", 1)[1].split("@", 1)[0]
                if local.startswith("ok"):
                    self.accepted += 1
                    self.reply("250 2.1.5 Ok")
                elif local.startswith("tmp"):
                    self.reply("451 4.2.1 Mailbox busy, try later")
                else:
                    self.reply("550 5.1.1 <%s>: no such user" % cmd.split("<", 1)[1].split(">")[0])
            elif verb == "DATA":
                if self.accepted:
                    self.data = b"\r\n"
                    self.reply("354 End data with <CR><LF>.<CR><LF>")
                else:
                    self.reply("554 5.5.1 Error: no valid recipients")
            elif verb == "RSET":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                self.transport.loseConnection()
            else:
                self.reply("502 5.5.2 Error: command not recognized")


class ResponderFactory(Factory):
    protocol = Responder

    def __init__(self, tls_options=None):
        self.tls_options = tls_options
        self.commands: list[str] = []
        self.messages: list[bytes] = []


@pytest.fixture
def responder(reactor):
    ports = []

    def start(tls_options=None):
        f = ResponderFactory(tls_options)
        port = in_reactor(reactor, reactor.listenTCP, 0, f, interface="127.0.0.1")
        ports.append(port)
        return f, port.getHost().port

    yield start
    for p in ports:
        in_reactor(reactor, p.stopListening)


def test_responder_mixed_per_recipient_replies(reactor, responder, tmp_path):
    f, port = responder()
    raw = b"Subject: mixed\r\n\r\n.\r\nline\n..\r\n" + b"z" * 70000 + b"\r\n.end"
    path = tmp_path / "m"
    write_queue_file(path, raw)
    env = env_for("ok1@d.test", "tmp@d.test", "bad@d.test", "ok2@d.test")
    outcomes, tls = deliver(reactor, port, ClientOptions("client.test", tls="none"), env, str(path))
    assert [(o.recipient, o.kind, o.code, o.status) for o in outcomes] == [
        ("ok1@d.test", DELIVERED_OUTCOME, 250, "2.0.0"),
        ("tmp@d.test", TEMPORARY, 451, "4.2.1"),
        ("bad@d.test", PERMANENT, 550, "5.1.1"),
        ("ok2@d.test", DELIVERED_OUTCOME, 250, "2.0.0"),
    ]
    assert outcomes[2].text == (
        f"host peer.test[127.0.0.1]:{port} said: 550 5.1.1 <bad@d.test>: no such user (in reply to RCPT TO command)"
    )
    assert f.messages == [stuff(raw)[: -len(b".\r\n")]]
    assert f.commands == [
        "EHLO client.test",
        f"MAIL FROM:<sender@client.test> SIZE={len(raw)}",
        "RCPT TO:<ok1@d.test>", "RCPT TO:<tmp@d.test>", "RCPT TO:<bad@d.test>", "RCPT TO:<ok2@d.test>",
        "DATA", "QUIT",
    ]


def test_responder_all_rejected_rset_and_reuse(reactor, responder, tmp_path):
    f, port = responder()
    path = tmp_path / "m"
    write_queue_file(path, b"hi\r\n")

    async def run():
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        conn = await connect(reactor, ep, ClientOptions("client.test", tls="none"), "peer.test", "127.0.0.1", port)
        env1 = env_for("bad@d.test", "tmp@d.test")
        first = await conn.send(env1, env1.recipients, str(path))
        usable = conn.usable
        await conn.reset()
        env2 = env_for("ok@d.test")
        second = await conn.send(env2, env2.recipients, str(path))
        await conn.quit()
        return first, usable, second

    first, usable, second = in_reactor(reactor, lambda: Deferred.fromCoroutine(run()))
    assert [o.kind for o in first] == [PERMANENT, TEMPORARY]
    assert usable
    assert [o.kind for o in second] == [DELIVERED_OUTCOME]
    assert f.commands == [
        "EHLO client.test",
        "MAIL FROM:<sender@client.test> SIZE=4", "RCPT TO:<bad@d.test>", "RCPT TO:<tmp@d.test>", "DATA",
        "RSET",  # after the failed transaction
        "RSET",  # conn.reset() before reuse
        "MAIL FROM:<sender@client.test> SIZE=4", "RCPT TO:<ok@d.test>", "DATA",
        "QUIT",
    ]
    assert f.messages == [b"hi\r\n"]


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA and a server certificate for mx.test signed by it."""
    d = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("mailhub test CA")).issuer_name(name("mailhub test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("mx.test")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = d / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    server_pem = cert.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    server = ssl.PrivateCertificate.loadPEM(server_pem).options()
    return str(ca_file), server


def test_tls_may_encrypts_without_verification(reactor, responder, pki, tmp_path):
    _, server = pki
    f, port = responder(server)
    path = tmp_path / "m"
    raw = b"Subject: tls\r\n\r\n.\r\n" + boundary_message(5)  # streamed through TLS
    write_queue_file(path, raw)
    outcomes, tls = deliver(reactor, port, ClientOptions("client.test", tls="may"), env_for("ok@d.test"), str(path))
    assert tls is True
    assert [o.kind for o in outcomes] == [DELIVERED_OUTCOME]
    assert f.commands[:3] == ["EHLO client.test", "STARTTLS", "EHLO client.test"]
    assert f.messages == [stuff(raw)[: -len(b".\r\n")]]


def test_tls_verify_with_test_ca(reactor, responder, pki, tmp_path):
    ca_file, server = pki
    f, port = responder(server)
    path = tmp_path / "m"
    write_queue_file(path, b"hi\r\n")
    opts = ClientOptions("client.test", tls="verify", tls_hostname="mx.test", tls_ca_file=ca_file)
    outcomes, tls = deliver(reactor, port, opts, env_for("ok@d.test"), str(path))
    assert tls is True and [o.kind for o in outcomes] == [DELIVERED_OUTCOME]


def test_tls_verify_wrong_hostname_fails(reactor, responder, pki, tmp_path):
    ca_file, server = pki
    f, port = responder(server)
    path = tmp_path / "m"
    write_queue_file(path, b"hi\r\n")
    opts = ClientOptions("client.test", tls="verify", tls_hostname="other.test", tls_ca_file=ca_file)
    with pytest.raises(SessionError) as e:
        deliver(reactor, port, opts, env_for("ok@d.test"), str(path))
    assert e.value.tls_failed and not e.value.permanent
    assert f.messages == [] and "MAIL FROM:<sender@client.test> SIZE=4" not in f.commands


def test_tls_verify_untrusted_ca_fails(reactor, responder, pki, tmp_path):
    _, server = pki
    f, port = responder(server)
    opts = ClientOptions("client.test", tls="verify", tls_hostname="mx.test")  # platform trust: test CA unknown
    with pytest.raises(SessionError) as e:
        deliver(reactor, port, opts, env_for("ok@d.test"), str(tmp_path / "m"))
    assert e.value.tls_failed
    assert f.messages == []


def test_tls_required_not_offered(reactor, responder, tmp_path):
    f, port = responder(None)
    with pytest.raises(SessionError) as e:
        deliver(reactor, port, ClientOptions("client.test", tls="encrypt"), env_for("ok@d.test"), str(tmp_path / "m"))
    assert (e.value.enhanced, e.value.permanent) == ("4.7.4", False)
    assert f.commands[0] == "EHLO client.test"


def test_connection_refused(reactor, tmp_path):
    port = free_port()
    with pytest.raises(SessionError) as e:
        deliver(reactor, port, ClientOptions("client.test"), env_for("ok@d.test"), str(tmp_path / "m"))
    assert e.value.enhanced == "4.4.1" and not e.value.permanent


# -- TLS failures, said in words -----------------------------------------------------------


def _cert(subject: str, issuer_name: str, issuer_key, key, *, days: tuple[int, int] = (-1, 1), ca: bool = False):
    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    b = (
        x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0])).not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def bad_certs(tmp_path_factory):
    """Server TLS options for an expired and a self-signed certificate of mx.test, and the CA file."""
    d = tmp_path_factory.mktemp("badpki")
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("expiry test CA", "expiry test CA", ca_key, ca_key, days=(-30, 30), ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))

    def options(cert, key):
        raw = cert.public_bytes(pem) + key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
        return ssl.PrivateCertificate.loadPEM(raw).options()

    key = ec.generate_private_key(ec.SECP256R1())
    expired = options(_cert("mx.test", "expiry test CA", ca_key, key, days=(-10, -1)), key)
    own = ec.generate_private_key(ec.SECP256R1())
    self_signed = options(_cert("mx.test", "mx.test", own, own), own)
    return str(d / "ca.pem"), expired, self_signed


def tls_failure(reactor, port, tmp_path, **kw) -> SessionError:
    path = tmp_path / "m"
    write_queue_file(path, b"hi\r\n")
    with pytest.raises(SessionError) as e:
        deliver(reactor, port, ClientOptions("client.test", **kw), env_for("ok@d.test"), str(path))
    return e.value


def test_tls_failure_texts_name_mismatch(reactor, responder, pki, tmp_path):
    ca_file, server = pki
    f, port = responder(server)
    e = tls_failure(reactor, port, tmp_path, tls="verify", tls_hostname="other.test", tls_ca_file=ca_file)
    assert (e.code, e.enhanced, e.remote_mta, e.tls_failed) == (0, "4.7.5", f"peer.test[127.0.0.1]:{port}", True)
    assert e.text == "TLS: certificate of peer.test does not match its name (DNS name other.test)"
    e = tls_failure(reactor, port, tmp_path, tls="verify", tls_hostname="127.0.0.1", tls_ca_file=ca_file)
    assert e.text == "TLS: certificate of peer.test does not match its name (IP address 127.0.0.1)"
    assert not any(c.startswith("MAIL") for c in f.commands)


def test_tls_failure_text_unknown_ca(reactor, responder, pki, tmp_path):
    _, server = pki
    f, port = responder(server)
    e = tls_failure(reactor, port, tmp_path, tls="verify", tls_hostname="mx.test")  # platform trust
    assert (e.code, e.enhanced) == (0, "4.7.5")
    assert e.text == "TLS: certificate of peer.test is not trusted (unable to get local issuer certificate)"


def test_tls_failure_text_self_signed(reactor, responder, bad_certs, tmp_path):
    ca_file, _, self_signed = bad_certs
    f, port = responder(self_signed)
    e = tls_failure(reactor, port, tmp_path, tls="verify", tls_hostname="mx.test", tls_ca_file=ca_file)
    assert e.text == "TLS: certificate of peer.test is not trusted (self-signed certificate)"


def test_tls_failure_text_expired(reactor, responder, bad_certs, tmp_path):
    ca_file, expired, _ = bad_certs
    f, port = responder(expired)
    e = tls_failure(reactor, port, tmp_path, tls="verify", tls_hostname="mx.test", tls_ca_file=ca_file)
    assert e.text == "TLS: certificate of peer.test has expired"
    assert not any(c.startswith("MAIL") for c in f.commands)


class PlainAfterStartTLS(Responder):
    """Says yes to STARTTLS, then answers the TLS ClientHello in plain text: the handshake fails."""

    started = False

    def dataReceived(self, data):
        if self.started:
            self.reply("250 this is not TLS")
        elif data.upper().startswith(b"STARTTLS"):
            self.started = True
            self.reply("220 2.0.0 Ready to start TLS")
        else:
            super().dataReceived(data)


def test_tls_failure_text_handshake(reactor, tmp_path):
    f = ResponderFactory(tls_options=object())  # offers STARTTLS
    f.protocol = PlainAfterStartTLS
    listening = in_reactor(reactor, reactor.listenTCP, 0, f, interface="127.0.0.1")
    try:
        e = tls_failure(reactor, listening.getHost().port, tmp_path, tls="encrypt")
    finally:
        in_reactor(reactor, listening.stopListening)
    assert (e.code, e.enhanced, e.tls_failed) == (0, "4.7.5", True)
    assert e.text == "TLS: handshake with peer.test failed (wrong version number)"


def test_tls_required_not_offered_text(reactor, responder, tmp_path):
    f, port = responder(None)
    e = tls_failure(reactor, port, tmp_path, tls="encrypt")
    assert (e.code, e.enhanced, e.permanent) == (0, "4.7.4", False)
    assert e.text == f"TLS is required, but was not offered by host peer.test[127.0.0.1]:{port}"


def test_connection_refused_text(reactor, tmp_path):
    port = free_port()
    e = tls_failure(reactor, port, tmp_path)
    assert (e.code, e.enhanced, e.remote_mta) == (0, "4.4.1", "")
    assert e.text == f"connect to peer.test[127.0.0.1]:{port}: Connection refused"

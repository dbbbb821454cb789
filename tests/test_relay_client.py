"""
mailhub.relay.client in memory: a scripted server talks to the client through
a StringTransport; every timer is a task.Clock step.  Expected bytes and
outcomes are exact.
"""

from __future__ import annotations

import email
import email.policy
import random
import re

import pytest
from OpenSSL import SSL
from service_identity.hazmat import DNS_ID
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailhub.envelope import DELIVERED_OUTCOME, PERMANENT, TEMPORARY, Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes
from mailhub.relay import client, dotstuff, prepare
from mailhub.relay.client import MAX_LINE, ClientOptions, connect
from mailhub.relay.dotstuff import CHUNK_SIZE, DotStuffer, stuff
from mailhub.relay.reply import SessionError

MTA = "mx.example[192.0.2.1]:25"
EHLO_FULL = (
    b"250-mx.example hello\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 1000\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 SMTPUTF8\r\n"
)
EHLO_PLAIN = b"250-mx.example hello\r\n250 ENHANCEDSTATUSCODES\r\n"


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS instead of doing it."""

    tls_options = None

    def startTLS(self, options):  # noqa: N802
        self.tls_options = options


class FakeEndpoint:
    def __init__(self, result=None):
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 25))
        self.result = result
        self.proto = None

    def connect(self, factory):
        if self.result is not None:
            return self.result
        self.proto = factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        return succeed(self.proto)


def result_of(d: Deferred):
    """The result of a fired Deferred; left in place so it can be asked again."""
    out = []

    def seen(r):
        out.append(r)
        return r

    d.addBoth(seen)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        d.addErrback(lambda f: None)
        out[0].raiseException()
    return out[0]


def failure_of(d: Deferred, kind=SessionError):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    assert isinstance(out[0], Failure), out[0]
    assert out[0].check(kind), out[0]
    return out[0].value


def not_fired(d: Deferred) -> None:
    out = []

    def seen(r):
        out.append(r)
        return r

    d.addBoth(seen)
    assert not out, out


class Server:
    """The scripted peer: feeds replies, reads what the client wrote."""

    def __init__(self, options=None, greeting=b"220 mx.example ESMTP\r\n", ehlo=EHLO_FULL, clock=None):
        self.clock = clock or Clock()
        self.ep = FakeEndpoint()
        self.options = options or ClientOptions(helo_name="client.example", tls="none")
        self.d = connect(self.clock, self.ep, self.options, "mx.example", "192.0.2.1")
        self.proto = self.ep.proto
        self.t = self.ep.transport
        if greeting is not None:
            self.say(greeting)
        if ehlo is not None:
            assert self.take() == b"EHLO client.example\r\n"
            self.say(ehlo)

    def say(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def take(self) -> bytes:
        v = self.t.value()
        self.t.clear()
        return v

    @property
    def conn(self):
        return result_of(self.d)


def envelope(sender="sender@example.org", rcpts=("a@example.com",), **esmtp) -> Envelope:
    return Envelope("Q1", sender, [Recipient(r) for r in rcpts], arrival=0.0, esmtp=esmtp)


@pytest.fixture
def msg(tmp_path):
    # A queue file, as the spool hands it to agents: the message, then an
    # envelope and the footer; the client must send only the message.
    def make(data: bytes = b"Subject: hi\r\n\r\nbody\r\n", env: Envelope | None = None) -> str:
        p = tmp_path / "msg"
        p.write_bytes(queue_file_bytes(data, env or envelope()))
        return str(p)

    return make


def kinds(outcomes):
    return [(o.recipient, o.kind, o.code, o.status) for o in outcomes]


# -- session set-up ---------------------------------------------------------------


def test_ehlo_extensions_parsed():
    s = Server(ehlo=b"250-mx.example\r\n250-size 2000\r\n250-AUTH=LOGIN\r\n250-AUTH PLAIN LOGIN\r\n250 DSN\r\n")
    c = s.conn
    assert c.extensions == {"SIZE": "2000", "AUTH": "PLAIN LOGIN", "DSN": ""}
    assert c.remote_mta == MTA
    assert c.tls is False and c.usable is True


def test_remote_ip_from_peer_when_not_given():
    ep = FakeEndpoint()
    d = connect(Clock(), ep, ClientOptions("c.example", tls="none"), "mx.example")
    ep.proto.dataReceived(b"220 hi\r\n")
    ep.proto.dataReceived(b"250 ok\r\n")
    assert result_of(d).remote_mta == MTA


def test_helo_fallback_on_5xx_to_ehlo():
    s = Server(ehlo=b"502 5.5.2 EHLO not understood\r\n")
    assert s.take() == b"HELO client.example\r\n"
    s.say(b"250 mx.example\r\n")
    assert s.conn.extensions == {}


def test_helo_rejected():
    s = Server(ehlo=b"500 no\r\n")
    s.take()
    s.say(b"550 5.7.1 go away\r\n")
    e = failure_of(s.d)
    assert (e.code, e.enhanced, e.permanent) == (550, "5.7.1", True)
    assert s.take() == b"QUIT\r\n"


def test_ehlo_4xx_is_temporary_session_error():
    s = Server(ehlo=b"451 4.3.2 try later\r\n")
    e = failure_of(s.d)
    assert (e.code, e.enhanced, e.permanent, e.remote_mta) == (451, "4.3.2", False, MTA)
    assert "try later" in e.text


def test_greeting_554_permanent_and_quit():
    s = Server(greeting=b"554-mx.example no\r\n554 5.7.1 not for you\r\n", ehlo=None)
    e = failure_of(s.d)
    assert (e.code, e.enhanced, e.permanent) == (554, "5.7.1", True)
    assert e.text == f"host {MTA} said: 554 5.7.1 mx.example no not for you (in reply to initial server greeting)"
    assert s.take() == b"QUIT\r\n"


def test_greeting_421_temporary():
    s = Server(greeting=b"421 4.3.2 busy\r\n", ehlo=None)
    e = failure_of(s.d)
    assert (e.code, e.enhanced, e.permanent) == (421, "4.3.2", False)


def test_connect_refused():
    ep = FakeEndpoint(result=fail(ConnectionRefusedError()))
    e = failure_of(connect(Clock(), ep, ClientOptions("c"), "mx.example", "192.0.2.1"))
    assert (e.code, e.enhanced, e.permanent) == (0, "4.4.1", False)
    assert (e.text, e.remote_mta) == (f"connect to {MTA}: Connection refused", "")


def test_connect_timeout():
    clock = Clock()
    cancelled = []
    ep = FakeEndpoint(result=Deferred(lambda d: cancelled.append(True)))
    d = connect(clock, ep, ClientOptions("c", connect_timeout=30), "mx.example", "192.0.2.1")
    clock.advance(29.9)
    not_fired(d)
    clock.advance(0.2)
    e = failure_of(d)
    assert cancelled and e.enhanced == "4.4.1" and "timed out" in e.text


def test_greeting_timeout():
    s = Server(greeting=None, ehlo=None)
    s.clock.advance(299)
    not_fired(s.d)
    s.clock.advance(1)
    e = failure_of(s.d)
    assert (e.code, e.enhanced, e.permanent) == (0, "4.4.2", False)
    assert e.text == f"conversation with {MTA} timed out while receiving the initial server greeting"
    assert s.t.disconnecting


def test_ehlo_timeout():
    s = Server(ehlo=None)
    s.clock.advance(300)
    e = failure_of(s.d)
    assert "timed out while performing the EHLO handshake" in e.text


def test_starttls_required_but_not_offered():
    s = Server(ClientOptions("client.example", tls="encrypt"), ehlo=EHLO_PLAIN)
    e = failure_of(s.d)
    assert (e.code, e.enhanced, e.permanent) == (0, "4.7.4", False)
    assert e.text == f"TLS is required, but was not offered by host {MTA}"
    assert s.take() == b"QUIT\r\n"


def test_starttls_may_without_offer_goes_plain():
    s = Server(ClientOptions("client.example", tls="may"), ehlo=EHLO_PLAIN)
    assert s.conn.tls is False


STARTTLS_EHLO = b"250-mx.example\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"


def test_starttls_discards_ehlo_state_and_says_ehlo_again():
    s = Server(ClientOptions("client.example", tls="may"), ehlo=STARTTLS_EHLO)
    assert s.take() == b"STARTTLS\r\n"
    s.say(b"220 2.0.0 go ahead\r\n")
    assert s.t.tls_options is not None
    assert s.take() == b"EHLO client.example\r\n"
    s.say(b"250-mx.example\r\n250 PIPELINING\r\n")
    c = s.conn
    assert c.tls is True
    assert c.extensions == {"PIPELINING": ""}


def test_starttls_refused_under_may_continues_plain():
    s = Server(ClientOptions("client.example", tls="may"), ehlo=STARTTLS_EHLO)
    s.take()
    s.say(b"454 4.7.0 TLS not available\r\n")
    assert s.conn.tls is False and s.conn.extensions["STARTTLS"] == ""


def test_starttls_refused_under_encrypt_fails():
    s = Server(ClientOptions("client.example", tls="encrypt"), ehlo=STARTTLS_EHLO)
    s.take()
    s.say(b"454 4.7.0 TLS not available\r\n")
    e = failure_of(s.d)
    assert (e.enhanced, e.permanent) == ("4.7.4", False)


def test_plaintext_injected_after_starttls_reply():
    s = Server(ClientOptions("client.example", tls="may"), ehlo=STARTTLS_EHLO)
    s.take()
    s.say(b"220 go ahead\r\n250-evil\r\n250 AUTH PLAIN\r\n")
    e = failure_of(s.d)
    assert e.tls_failed and e.enhanced == "4.7.0"
    assert s.t.tls_options is None  # never started TLS on a tainted stream


def test_tls_handshake_failure_marks_tls_failed():
    s = Server(ClientOptions("client.example", tls="may"), ehlo=STARTTLS_EHLO)
    s.take()
    s.say(b"220 go ahead\r\n")
    s.proto.connectionLost(Failure(SSL.Error([("SSL routines", "", "sslv3 alert handshake failure")])))
    e = failure_of(s.d)
    assert e.tls_failed and not e.permanent and (e.code, e.enhanced) == (0, "4.7.5")
    assert e.text == "TLS: handshake with mx.example failed (sslv3 alert handshake failure)"


def test_connection_lost_during_tls_handshake_names_the_handshake():
    s = Server(ClientOptions("client.example", tls="may"), ehlo=STARTTLS_EHLO)
    s.take()
    s.say(b"220 go ahead\r\n")
    s.proto.connectionLost(Failure(ConnectionDone()))
    e = failure_of(s.d)
    assert e.tls_failed and (e.code, e.enhanced) == (0, "4.7.5")
    assert e.text == f"lost connection with {MTA} while performing the TLS handshake"


def test_tls_handshake_timeout_names_the_handshake():
    s = Server(ClientOptions("client.example", tls="may"), ehlo=STARTTLS_EHLO)
    s.take()
    s.say(b"220 go ahead\r\n")
    s.clock.advance(300)
    e = failure_of(s.d)
    assert e.tls_failed and e.text == f"conversation with {MTA} timed out while performing the TLS handshake"


def test_auth_refused_without_tls():
    s = Server(ClientOptions("client.example", tls="may", auth=("u", "p")), ehlo=b"250-mx\r\n250 AUTH PLAIN\r\n")
    e = failure_of(s.d)
    assert (e.enhanced, e.permanent) == ("4.7.4", False)
    assert s.take() == b"QUIT\r\n"  # and no credentials


def _tls_session(auth_ehlo: bytes, **kw):
    s = Server(ClientOptions("client.example", tls="encrypt", auth=("user", "pass"), **kw), ehlo=STARTTLS_EHLO)
    s.take()
    s.say(b"220 go\r\n")
    s.take()
    s.say(auth_ehlo)
    return s


def test_auth_plain_over_tls():
    s = _tls_session(b"250-mx\r\n250 AUTH LOGIN PLAIN\r\n")
    assert s.take() == b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n"
    s.say(b"235 2.7.0 ok\r\n")
    assert s.conn.tls


def test_auth_login_over_tls():
    s = _tls_session(b"250-mx\r\n250 AUTH LOGIN\r\n")
    assert s.take() == b"AUTH LOGIN\r\n"
    s.say(b"334 VXNlcm5hbWU6\r\n")
    assert s.take() == b"dXNlcg==\r\n"
    s.say(b"334 UGFzc3dvcmQ6\r\n")
    assert s.take() == b"cGFzcw==\r\n"
    s.say(b"235 2.7.0 ok\r\n")
    assert s.conn.usable


def test_auth_535_permanent_578():
    s = _tls_session(b"250-mx\r\n250 AUTH PLAIN\r\n")
    s.take()
    s.say(b"535 5.7.8 bad credentials\r\n")
    e = failure_of(s.d)
    assert (e.code, e.enhanced, e.permanent) == (535, "5.7.8", True)


def test_tls_options_verify_uses_hostname(tmp_path):
    s = Server(ClientOptions("client.example", tls="verify", tls_hostname="smtp.example.net"), ehlo=STARTTLS_EHLO)
    s.take()
    s.say(b"220 go\r\n")
    opts = s.t.tls_options
    assert (opts._ids, opts._sni) == ([DNS_ID("smtp.example.net")], b"smtp.example.net")


def test_bad_tls_level_rejected():
    with pytest.raises(ValueError):
        ClientOptions("c", tls="sometimes")


# -- transactions -------------------------------------------------------------------


def test_pipelined_batch_and_mixed_replies(msg):
    s = Server()
    env = envelope(rcpts=("a@x.com", "b@x.com", "c@x.com", "d@x.com"), body="8BITMIME")
    path = msg(b"Hi\r\n")
    d = s.conn.send(env, env.recipients, path)
    assert s.take() == (
        b"MAIL FROM:<sender@example.org> SIZE=4 BODY=8BITMIME\r\n"
        b"RCPT TO:<a@x.com>\r\nRCPT TO:<b@x.com>\r\nRCPT TO:<c@x.com>\r\nRCPT TO:<d@x.com>\r\n"
        b"DATA\r\n"
    )
    s.say(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n451 4.7.1 greylisted\r\n550-5.1.1 no such\r\n550 5.1.1 user\r\n")
    s.say(b"250 ok\r\n354 go\r\n")
    assert s.take() == b"Hi\r\n.\r\n"
    not_fired(d)
    s.say(b"250 2.0.0 queued as X\r\n")
    out = result_of(d)
    assert kinds(out) == [
        ("a@x.com", DELIVERED_OUTCOME, 250, "2.0.0"),
        ("b@x.com", TEMPORARY, 451, "4.7.1"),
        ("c@x.com", PERMANENT, 550, "5.1.1"),
        ("d@x.com", DELIVERED_OUTCOME, 250, "2.0.0"),
    ]
    # The server's own enhanced code stays in the text (as Postfix quotes it).
    assert out[1].text == f"host {MTA} said: 451 4.7.1 greylisted (in reply to RCPT TO command)"
    assert out[2].text == f"host {MTA} said: 550 5.1.1 no such user (in reply to RCPT TO command)"
    assert out[0].text == f"host {MTA} said: 250 2.0.0 queued as X (in reply to end of DATA command)"
    assert all(o.remote_mta == MTA for o in out)
    assert s.conn.usable


def test_without_pipelining_one_command_at_a_time(msg):
    s = Server(ehlo=b"250-mx\r\n250 8BITMIME\r\n")
    env = envelope(rcpts=("a@x.com", "b@x.com"), body="8BITMIME")
    d = s.conn.send(env, env.recipients, msg(b"x\r\n"))
    assert s.take() == b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n"
    s.say(b"250 ok\r\n")
    assert s.take() == b"RCPT TO:<a@x.com>\r\n"
    s.say(b"550 no\r\n")
    assert s.take() == b"RCPT TO:<b@x.com>\r\n"
    s.say(b"250 ok\r\n")
    assert s.take() == b"DATA\r\n"
    s.say(b"354 go\r\n")
    assert s.take() == b"x\r\n.\r\n"
    s.say(b"250 ok\r\n")
    assert kinds(result_of(d)) == [
        ("a@x.com", PERMANENT, 550, "5.0.0"),
        ("b@x.com", DELIVERED_OUTCOME, 250, "2.0.0"),
    ]


def test_all_rcpt_rejected_no_data_rset(msg):
    s = Server(ehlo=b"250-mx\r\n250 SIZE\r\n")
    env = envelope(rcpts=("a@x.com", "b@x.com"))
    d = s.conn.send(env, env.recipients, msg(b"x\r\n"))
    assert s.take() == b"MAIL FROM:<sender@example.org> SIZE=3\r\n"
    s.say(b"250 ok\r\n")
    s.take()
    s.say(b"550 5.1.1 no\r\n")
    s.take()
    s.say(b"450 4.2.0 later\r\n")
    assert s.take() == b"RSET\r\n"
    not_fired(d)
    s.say(b"250 ok\r\n")
    assert kinds(result_of(d)) == [("a@x.com", PERMANENT, 550, "5.1.1"), ("b@x.com", TEMPORARY, 450, "4.2.0")]
    assert s.conn.usable


def test_pipelined_all_rejected_data_refused_then_rset(msg):
    s = Server()
    env = envelope()
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n")
    assert s.take() == b"RSET\r\n"
    s.say(b"250 ok\r\n")
    assert kinds(result_of(d)) == [("a@example.com", PERMANENT, 550, "5.1.1")]


def test_pipelined_all_rejected_but_data_354_ends_empty(msg):
    s = Server()
    env = envelope()
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert s.take() == b".\r\n"
    s.say(b"554 no recipients\r\n")
    assert s.take() == b"RSET\r\n"
    s.say(b"250 ok\r\n")
    assert kinds(result_of(d)) == [("a@example.com", PERMANENT, 550, "5.1.1")]


def test_mail_rejected_all_recipients_get_it(msg):
    s = Server()
    env = envelope(rcpts=("a@x.com", "b@x.com"))
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"553 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert s.take() == b"RSET\r\n"
    s.say(b"250 ok\r\n")
    out = result_of(d)
    assert kinds(out) == [("a@x.com", PERMANENT, 553, "5.7.1"), ("b@x.com", PERMANENT, 553, "5.7.1")]
    assert out[0].text.endswith("(in reply to MAIL FROM command)")


def test_data_4xx_to_accepted(msg):
    s = Server()
    env = envelope()
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"250 ok\r\n250 ok\r\n451 4.3.0 no DATA now\r\n")
    assert s.take() == b"RSET\r\n"
    s.say(b"250 ok\r\n")
    assert kinds(result_of(d)) == [("a@example.com", TEMPORARY, 451, "4.3.0")]


def test_data_2xx_is_not_delivery(msg):
    s = Server()
    env = envelope()
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"250 ok\r\n250 ok\r\n250 sure\r\n")
    assert s.take() == b"RSET\r\n"
    s.say(b"250 ok\r\n")
    assert kinds(result_of(d)) == [("a@example.com", TEMPORARY, 0, "4.5.0")]


def test_end_of_data_5xx(msg):
    s = Server()
    env = envelope()
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    s.take()
    s.say(b"554 5.7.1 spam\r\n")
    assert kinds(result_of(d)) == [("a@example.com", PERMANENT, 554, "5.7.1")]
    assert s.conn.usable


def test_null_sender_and_reply_without_enhanced_code(msg):
    s = Server(ehlo=b"250 mx\r\n")
    env = envelope(sender="")
    d = s.conn.send(env, env.recipients, msg())
    assert s.take() == b"MAIL FROM:<>\r\n"
    s.say(b"452 too many\r\n")
    assert s.take() == b"RSET\r\n"
    s.say(b"250 ok\r\n")
    assert kinds(result_of(d)) == [("a@example.com", TEMPORARY, 452, "4.0.0")]


def test_enhanced_code_of_wrong_class_ignored(msg):
    s = Server(ehlo=b"250 mx\r\n")
    env = envelope()
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"550 4.1.1 odd\r\n")
    s.take()
    s.say(b"250 ok\r\n")
    out = result_of(d)
    assert kinds(out) == [("a@example.com", PERMANENT, 550, "5.0.0")]
    assert "550 4.1.1 odd" in out[0].text


def test_size_limit_exceeded_nothing_sent(msg):
    s = Server()  # SIZE 1000
    env = envelope(rcpts=("a@x.com", "b@x.com"))
    out = result_of(s.conn.send(env, env.recipients, msg(b"x" * 1001)))
    assert kinds(out) == [("a@x.com", PERMANENT, 0, "5.3.4"), ("b@x.com", PERMANENT, 0, "5.3.4")]
    assert out[0].text.startswith(f"message too large for {MTA}")
    assert s.take() == b""
    assert s.conn.usable


def test_size_exactly_at_limit_is_sent(msg):
    s = Server()
    env = envelope()
    s.conn.send(env, env.recipients, msg(b"x" * 1000))
    assert s.take().startswith(b"MAIL FROM:<sender@example.org> SIZE=1000\r\n")


def test_smtputf8_missing_is_550_567(msg):
    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    env = envelope(rcpts=("jöran@x.com", "b@x.com"))
    out = result_of(s.conn.send(env, env.recipients, msg()))
    assert kinds(out) == [("jöran@x.com", PERMANENT, 0, "5.6.7"), ("b@x.com", PERMANENT, 0, "5.6.7")]
    assert s.take() == b""
    # Flagged SMTPUTF8 and the headers really are UTF-8: still required.
    env = envelope(smtputf8=True)
    out = result_of(s.conn.send(env, env.recipients, msg("Subject: grüße\r\n\r\nbody\r\n".encode())))
    assert kinds(out) == [("a@example.com", PERMANENT, 0, "5.6.7")]
    assert out[0].text == f"SMTPUTF8 is required, but was not offered by host {MTA}"
    assert s.take() == b""


def test_smtputf8_flag_without_utf8_content_is_not_required(msg):
    """RFC 6531 3.2 / Postfix: an all-ASCII envelope and header section go out without SMTPUTF8."""
    s = Server(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    env = envelope(smtputf8=True)
    d = s.conn.send(env, env.recipients, msg("Subject: hi\r\n\r\nbody: grüße\r\n".encode()))
    assert s.take() == b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.take() == "Subject: hi\r\n\r\nbody: grüße\r\n.\r\n".encode()
    s.say(b"250 2.0.0 ok\r\n")
    assert kinds(result_of(d)) == [("a@example.com", DELIVERED_OUTCOME, 250, "2.0.0")]


def test_smtputf8_flag_kept_when_offered_even_if_ascii(msg):
    s = Server()
    env = envelope(smtputf8=True)
    s.conn.send(env, env.recipients, msg(b"Subject: hi\r\n\r\nx\r\n"))
    assert s.take().startswith(b"MAIL FROM:<sender@example.org> SIZE=18 SMTPUTF8\r\n")


@pytest.mark.parametrize("data, needs", [
    (b"Subject: hi\r\n\r\n", False),
    (b"Subject: hi\nX-Folded: a\n b\n\nbody \xc3\xa9\n", False),
    (b"Subject: hi", False),  # headers only, no line end
    (b"\r\nbody \xc3\xa9\r\n", False),  # no headers at all
    ("Subject: hi\r\nFrom: Jörg <j@x.org>\r\n\r\n".encode(), True),
    ("Subject: hi\r\n X-cont: ü\r\n\r\n".encode(), True),
    ("Subject: ü".encode(), True),  # headers only, 8-bit
    # no end of the header section within the scan limit: unknown, so required
    (b"Subject: hi\r\nX-Long: " + b"a" * (prepare.MAX_HEADER_SCAN + 10) + b"\r\n\r\n", True),
])
def test_smtputf8_need_read_from_the_header_section(msg, data, needs):
    s = Server(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    env = envelope(smtputf8=True)
    d = s.conn.send(env, env.recipients, msg(data))
    if needs:
        assert kinds(result_of(d)) == [("a@example.com", PERMANENT, 0, "5.6.7")]
        assert s.take() == b""
    else:
        assert s.take().startswith(b"MAIL FROM:<sender@example.org>\r\n")


def test_smtputf8_sent_when_needed_and_offered(msg):
    s = Server()
    env = envelope(sender="ümlaut@exämple.org", rcpts=("jöran@x.com",))
    s.conn.send(env, env.recipients, msg(b"x"))
    assert s.take() == (
        "MAIL FROM:<ümlaut@exämple.org> SIZE=1 SMTPUTF8\r\nRCPT TO:<jöran@x.com>\r\nDATA\r\n".encode()
    )


def test_8bitmime_not_offered_message_converted_to_7bit(msg):
    """RFC 6152 3 (Postfix disable_mime_output_conversion = no): quoted-printable, no 8-bit byte on the wire."""
    s = Server(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
    env = envelope(body="8BITMIME")
    text = "Grüße, \tçà va?\r\n.\r\nend\r\n"
    original = (b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\nX-After:  kept\r\n\r\n" + text.encode())
    expected = (b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"X-After:  kept\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                b"Gr=C3=BC=C3=9Fe, \t=C3=A7=C3=A0 va?\r\n=2E\r\nend\r\n")  # b2a_qp encodes a lone "."
    d = s.conn.send(env, env.recipients, msg(original))
    # SIZE is the size of what is sent; no BODY=8BITMIME to a peer without 8BITMIME
    assert s.take() == (f"MAIL FROM:<sender@example.org> SIZE={len(expected)}\r\n"
                        "RCPT TO:<a@example.com>\r\nDATA\r\n").encode()
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    data = s.take()
    assert data == stuff(expected)
    assert data.isascii()
    parsed = email.message_from_bytes(expected, policy=email.policy.default)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content() == text
    s.say(b"250 2.0.0 ok\r\n")
    assert kinds(result_of(d)) == [("a@example.com", DELIVERED_OUTCOME, 250, "2.0.0")]


def test_8bit_without_body_parameter_is_converted_too(msg):
    """The bytes decide, not the BODY= the client declared: a non-MIME 8-bit message gets MIME labels."""
    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    env = envelope()
    s.conn.send(env, env.recipients, msg("Subject: x\n\né\n".encode()))
    s.take()
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.take() == (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n.\r\n")


def test_8bitmime_offered_nothing_converted(msg):
    s = Server()
    env = envelope(body="8BITMIME")
    raw = "Subject: x\r\n\r\né\r\n".encode()
    s.conn.send(env, env.recipients, msg(raw))
    s.take()
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.take() == stuff(raw)


def test_8bitmime_not_offered_7bit_message_sent_unchanged(msg):
    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    env = envelope(body="8BITMIME")
    s.conn.send(env, env.recipients, msg(b"Subject: x\n\nplain\n"))
    assert s.take() == b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.take() == b"Subject: x\r\n\r\nplain\r\n.\r\n"


@pytest.mark.parametrize("data, why", [
    ("Subject: grüße\r\n\r\nbody\r\n".encode(), "8-bit data in a message header"),
    (b"Content-Type: message/partial; id=x\r\n\r\n\xff\r\n", "8-bit data in message/partial, which must not be encoded"),
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n\xff\r\n",
     "8-bit data in a part encoded as base64"),
])
def test_8bit_that_cannot_be_converted_is_554_563(msg, data, why):
    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    env = envelope(rcpts=("a@x.com", "b@x.com"), body="8BITMIME")
    out = result_of(s.conn.send(env, env.recipients, msg(data)))
    assert kinds(out) == [("a@x.com", PERMANENT, 0, "5.6.3"), ("b@x.com", PERMANENT, 0, "5.6.3")]
    assert out[0].text == (f"Conversion required but not supported: host {MTA} does not offer 8BITMIME "
                           f"and the message cannot be converted to 7 bit ({why})")
    assert s.take() == b""  # nothing sent
    assert s.conn.usable


def test_8bit_headers_fine_in_an_smtputf8_transaction(msg):
    """A peer offering SMTPUTF8 takes 8-bit data in it (RFC 6531 requires 8BITMIME too)."""
    s = Server(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
    env = envelope(smtputf8=True)
    raw = "Subject: grüße\r\n\r\nbody é\r\n".encode()
    s.conn.send(env, env.recipients, msg(raw))
    assert s.take() == b"MAIL FROM:<sender@example.org> SMTPUTF8\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.take() == stuff(raw)


def test_dsn_parameters_passed_when_offered(msg):
    s = Server(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 DSN\r\n")
    env = Envelope(
        "Q1", "s@x.org",
        [Recipient("a@x.com", notify=["success", "failure"], orcpt="rfc822;orig+1@x.com"), Recipient("b@x.com")],
        arrival=0, esmtp={"ret": "hdrs", "envid": "ID123"},
    )
    s.conn.send(env, env.recipients, msg())
    assert s.take() == (
        b"MAIL FROM:<s@x.org> RET=HDRS ENVID=ID123\r\n"
        b"RCPT TO:<a@x.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2B1@x.com\r\n"
        b"RCPT TO:<b@x.com>\r\nDATA\r\n"
    )


def test_missing_queue_file_temporary_connection_still_usable(tmp_path):
    s = Server()
    env = envelope()
    out = result_of(s.conn.send(env, env.recipients, str(tmp_path / "nope")))
    assert kinds(out) == [("a@example.com", TEMPORARY, 0, "4.3.0")]
    assert s.take() == b"" and s.conn.usable


# -- message body -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, wire",
    [
        (b"", b".\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"..\r\n", b"...\r\n.\r\n"),
        (b".x\r\n", b"..x\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),  # bare LF, no final newline
        (b"a\r.\rb\r", b"a\r\n..\r\nb\r\n.\r\n"),  # bare CR
        (b"a\r\n\r\n", b"a\r\n\r\n.\r\n"),
        (b"x.y\r\n .\r\n", b"x.y\r\n .\r\n.\r\n"),
    ],
)
def test_stuffing_table(raw, wire):
    assert stuff(raw) == wire


def test_stuffing_independent_of_chunking():
    rng = random.Random(5)
    alphabet = [b".", b"\r", b"\n", b"a", b"\r\n", b"\r\n.", b".."]
    for _ in range(300):
        raw = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        whole = stuff(raw)
        for cut in range(len(raw) + 1):
            s = DotStuffer()
            assert s.feed(raw[:cut]) + s.feed(raw[cut:]) + s.finish() == whole, (raw, cut)
        # and the receiver's unstuffing gives back the CRLF-normalised message
        body = whole[: -len(b".\r\n")]
        lines = body.split(b"\r\n")[:-1]
        assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)


def _send_body(s, path, env=None):
    env = env or envelope()
    d = s.conn.send(env, env.recipients, path)
    s.take()
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    for _ in range(1000):
        if s.proto._producer is None or s.proto._producer.finished:
            break
        s.clock.advance(0)
    return d


@pytest.mark.parametrize("boundary_line", [b".\r\n", b"..\r\n", b".x\r\n", b".\n"])
def test_dot_line_exactly_at_chunk_boundary(msg, boundary_line):
    head = b"Subject: t\r\n\r\n" + b"y" * (CHUNK_SIZE - 14 - 2) + b"\r\n"
    assert len(head) == CHUNK_SIZE
    raw = head + boundary_line + b"tail\r\n"
    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    d = _send_body(s, msg(raw))
    wire = s.take()
    assert wire == head + b"." + boundary_line.replace(b"\n", b"\r\n").replace(b"\r\r", b"\r") + b"tail\r\n.\r\n"
    s.say(b"250 ok\r\n")
    assert result_of(d)[0].kind == DELIVERED_OUTCOME


@pytest.mark.parametrize("boundary_line", [b".\r\n", b"..\r\n", b".x\r\n", b".\n", b".\r", b"\n.\r\n"])
def test_dot_line_at_every_read_and_burst_boundary(msg, boundary_line):
    """
    A line starting with "." begins at every CHUNK_SIZE read boundary of a
    message longer than MAX_BURST (so also at the boundaries where the
    producer yields to the reactor); on the wire every such line carries
    the second dot and the only terminator is the last line.
    """
    blocks = dotstuff.MAX_BURST // CHUNK_SIZE + 4
    raw = b""
    # "\n.\r\n": each chunk ends with the CR of a CRLF split by the boundary
    eol = b"\r" if boundary_line.startswith(b"\n") else b"\r\n"
    for i in range(blocks):
        filler = b"Subject: t\r\n\r\n" if i == 0 else boundary_line
        filler += b"z" * (CHUNK_SIZE - len(filler) - len(eol)) + eol
        raw += filler
        assert len(raw) == (i + 1) * CHUNK_SIZE
    raw += boundary_line + b"end\r\n"
    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    d = _send_body(s, msg(raw))
    wire = s.take()
    # The reference, line by line: CRLF line ends, a dot added to each line
    # that starts with one, the terminator after the last line.
    lines = re.sub(rb"\r\n|\r|\n", b"\r\n", raw).split(b"\r\n")
    assert lines[-1] == b""
    expected = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"
    assert sum(1 for line in lines if line.startswith(b".")) >= blocks
    # (compared by offset: a diff of megabytes would take minutes to print)
    differs = next((i for i, (a, b) in enumerate(zip(wire, expected, strict=False)) if a != b), None)
    assert (differs, len(wire)) == (None, len(expected))
    s.say(b"250 ok\r\n")
    assert result_of(d)[0].kind == DELIVERED_OUTCOME


def test_crlf_split_across_chunk_boundary(msg):
    raw = b"a" * (CHUNK_SIZE - 1) + b"\r\n.\r\n"
    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    _send_body(s, msg(raw))
    assert s.take() == b"a" * (CHUNK_SIZE - 1) + b"\r\n..\r\n.\r\n"


def test_large_body_streamed_in_bursts_and_backpressure(msg):
    raw = (b"line of text\r\n.\r\n" * 200_000)  # ~3.4 MB
    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    env = envelope()
    d = s.conn.send(env, env.recipients, msg(raw))
    s.take()
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    p = s.proto._producer
    assert s.t.producer is p and s.t.streaming
    first = len(s.take())
    assert 0 < first <= dotstuff.MAX_BURST + 2 * CHUNK_SIZE  # yields to the reactor
    p.pauseProducing()
    s.clock.advance(0)
    assert s.take() == b""  # paused: nothing written
    s.clock.advance(179)
    p.resumeProducing()  # progress re-arms the data_xfer timer
    s.clock.advance(179)
    total = first + len(s.take())
    for _ in range(100):
        s.clock.advance(0)
        total += len(s.take())
    assert total == len(stuff(raw))
    assert s.t.producer is None
    s.say(b"250 ok\r\n")
    assert result_of(d)[0].kind == DELIVERED_OUTCOME


# -- timeouts and broken connections --------------------------------------------------


def test_mail_timeout_gives_temporary_outcomes(msg):
    s = Server()
    env = envelope(rcpts=("a@x.com", "b@x.com"))
    d = s.conn.send(env, env.recipients, msg())
    s.clock.advance(299)
    s.say(b"250 ok\r\n")  # MAIL answered; the timer restarts for RCPT
    s.clock.advance(299)
    not_fired(d)
    s.clock.advance(1)
    out = result_of(d)
    assert kinds(out) == [("a@x.com", TEMPORARY, 0, "4.4.2"), ("b@x.com", TEMPORARY, 0, "4.4.2")]
    assert out[0].text == f"conversation with {MTA} timed out while sending RCPT TO"
    assert not s.conn.usable and s.t.disconnecting


def test_rcpt_outcome_kept_when_connection_lost_later(msg):
    s = Server()
    env = envelope(rcpts=("a@x.com", "b@x.com"))
    d = s.conn.send(env, env.recipients, msg())
    s.say(b"250 ok\r\n550 5.1.1 no\r\n")
    s.proto.connectionLost(Failure(Exception("reset")))
    out = result_of(d)
    assert kinds(out) == [("a@x.com", PERMANENT, 550, "5.1.1"), ("b@x.com", TEMPORARY, 0, "4.4.2")]
    assert out[1].text == f"lost connection with {MTA} while sending RCPT TO"
    # and the connection is not used again
    out = result_of(s.conn.send(env, env.recipients, msg()))
    assert [o.kind for o in out] == [TEMPORARY, TEMPORARY]


def test_421_in_reply_to_rcpt_ends_connection(msg):
    s = Server()
    env = envelope(rcpts=("a@x.com", "b@x.com"))
    d = s.conn.send(env, env.recipients, msg())
    s.say(b"250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n")
    out = result_of(d)
    assert kinds(out) == [("a@x.com", TEMPORARY, 421, "4.3.2"), ("b@x.com", TEMPORARY, 421, "4.3.2")]
    assert not s.conn.usable


def test_data_init_timeout(msg):
    s = Server(ehlo=b"250 mx\r\n")
    env = envelope()
    d = s.conn.send(env, env.recipients, msg())
    s.say(b"250 ok\r\n")
    s.say(b"250 ok\r\n")
    assert s.take().endswith(b"DATA\r\n")
    s.clock.advance(119)
    not_fired(d)
    s.clock.advance(1)
    assert "timed out while sending DATA command" in result_of(d)[0].text


def test_data_xfer_timeout(msg):
    s = Server()
    env = envelope()
    d = s.conn.send(env, env.recipients, msg(b"x" * 900))
    s.say(b"250 ok\r\n250 ok\r\n")
    # pause the transport before DATA is accepted, as a full socket buffer would
    orig = s.t.registerProducer

    def register(p, streaming):
        orig(p, streaming)
        p.pauseProducing()

    s.t.registerProducer = register
    s.take()
    s.say(b"354 go\r\n")
    # first chunk was written before the pause took effect? no: paused at registration
    s.clock.advance(179)
    not_fired(d)
    s.clock.advance(1)
    out = result_of(d)
    assert kinds(out) == [("a@example.com", TEMPORARY, 0, "4.4.2")]
    assert out[0].text == f"conversation with {MTA} timed out while sending message content"


def test_data_done_timeout(msg):
    s = Server()
    env = envelope()
    d = s.conn.send(env, env.recipients, msg())
    s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    s.clock.advance(599)
    not_fired(d)
    s.clock.advance(1)
    out = result_of(d)
    assert out[0].kind == TEMPORARY
    assert "timed out while sending end of data -- message may be sent more than once" in out[0].text


def test_endless_reply_line_aborts():
    s = Server(ehlo=None)
    s.say(b"250-" + b"x" * (MAX_LINE - 4))
    not_fired(s.d)
    s.say(b"x" * 10)
    e = failure_of(s.d)
    assert "too long" in e.text and not e.permanent
    assert s.t.disconnecting
    assert len(s.proto._buf) <= MAX_LINE + 10


def test_too_many_reply_lines_aborts():
    s = Server(ehlo=None)
    s.say(b"250-x\r\n" * (client.MAX_LINES + 1))
    assert "too many lines" in failure_of(s.d).text


def test_malformed_reply_aborts():
    s = Server(ehlo=None)
    s.say(b"hello there\r\n")
    assert "malformed reply" in failure_of(s.d).text


def test_unsolicited_replies_bounded():
    s = Server()
    conn = s.conn  # the session is up before the flood
    s.say(b"250 what\r\n" * (client.MAX_EARLY_REPLIES + 1))
    assert not conn.usable


# -- reset / quit ---------------------------------------------------------------------------


def test_reset_and_quit():
    s = Server()
    c = s.conn
    d = c.reset()
    assert s.take() == b"RSET\r\n"
    s.say(b"250 2.0.0 ok\r\n")
    assert result_of(d) is None and c.usable
    d = c.quit()
    assert s.take() == b"QUIT\r\n"
    s.say(b"221 2.0.0 bye\r\n")
    assert result_of(d) is None
    assert s.t.disconnecting and not c.usable


def test_reset_refused_makes_unusable():
    s = Server()
    d = s.conn.reset()
    s.say(b"500 what\r\n")
    result_of(d)
    assert not s.conn.usable


def test_reset_timeout_makes_unusable():
    s = Server()
    d = s.conn.reset()
    s.clock.advance(300)
    assert result_of(d) is None
    assert not s.conn.usable and s.t.disconnecting


def test_starttls_and_auth_timeouts():
    s = Server(ClientOptions("client.example", tls="may", command_timeout=20), ehlo=STARTTLS_EHLO)
    s.clock.advance(20)
    assert "timed out while sending STARTTLS" in failure_of(s.d).text
    s = _tls_session(b"250-mx\r\n250 AUTH PLAIN\r\n", command_timeout=20)
    s.take()
    s.clock.advance(20)
    e = failure_of(s.d)
    assert "timed out while sending AUTH" in e.text and not e.tls_failed


def test_quit_timeout_still_fires():
    s = Server()
    d = s.conn.quit()
    s.clock.advance(300)
    assert result_of(d) is None


def test_reuse_after_reset(msg):
    s = Server()
    env = envelope()
    for _ in range(2):
        d = s.conn.send(env, env.recipients, msg())
        s.take()
        s.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.take()
        s.say(b"250 ok\r\n")
        assert result_of(d)[0].kind == DELIVERED_OUTCOME
        r = s.conn.reset()
        assert s.take() == b"RSET\r\n"
        s.say(b"250 ok\r\n")
        result_of(r)
    assert s.conn.usable
    assert s.clock.getDelayedCalls() == []


@pytest.mark.parametrize("ehlo, passed", [
    (b"250-mx\r\n250-PIPELINING\r\n250 DSN\r\n", True),
    (b"250-mx\r\n250 PIPELINING\r\n", False),
])
def test_delivered_outcome_says_whether_dsn_was_passed_on(msg, ehlo, passed):
    """The scheduler sends a "relayed" success notice only when the next hop took no NOTIFY."""
    s = Server(ehlo=ehlo)
    env = Envelope("Q1", "s@x.org", [Recipient("a@x.com", notify=["SUCCESS"]), Recipient("b@x.com")], arrival=0)
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    s.take()
    s.say(b"250 2.0.0 queued\r\n")
    out = result_of(d)
    assert [(o.kind, o.dsn_passed) for o in out] == [(DELIVERED_OUTCOME, passed), (PERMANENT, False)]


@pytest.mark.parametrize(
    "stored, sent",
    [
        ("rfc822;bob+tag@x.com", "rfc822;bob+2Btag@x.com"),
        ("rfc822;a=b@x.com", "rfc822;a+3Db@x.com"),
        ("bob@x.com", "rfc822;bob@x.com"),
        ("rfc822;jörg@x.com", ""),
        ("", ""),
    ],
)
def test_orcpt_always_xtext_encoded(stored, sent):
    """The server stores ORCPT decoded; the client must encode it again."""
    from mailhub.relay.prepare import _orcpt

    assert _orcpt(Recipient("a@x.com", orcpt=stored)) == sent


def test_bounce_of_a_remote_reject_quotes_it_once_and_names_the_host(msg):
    """
    The outcome text keeps the server's enhanced code; the DSN built from it
    (bounce.py) must not repeat it, and Remote-MTA is the host name only.
    """
    from mailhub.queue.notices import make_dsn

    s = Server(ehlo=b"250-mx\r\n250 PIPELINING\r\n")
    env = envelope(rcpts=("a@x.com",))
    d = s.conn.send(env, env.recipients, msg())
    s.take()
    s.say(b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n250 2.0.0 ok\r\n")
    (o,) = result_of(d)
    assert o.text == f"host {MTA} said: 550 5.1.1 no such user (in reply to RCPT TO command)"
    r = env.apply(o, 1.0)
    dsn = email.message_from_bytes(make_dsn(env, [r], b"Subject: hi\r\n\r\n", "me.example", 2.0),
                                   policy=email.policy.default)
    human, status = dsn.get_payload()[0].get_content(), dsn.get_payload()[1]
    block = dict(status.get_payload()[1].items())
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert block["Remote-MTA"] == "dns; mx.example"
    assert f"<a@x.com>: host {MTA} said: 550 5.1.1 no such user (in reply to RCPT TO command)" in human.splitlines()

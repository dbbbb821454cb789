"""
Client input that ends up in replies, trace headers and envelopes
(mailhub.smtp.server, mailhub.smtp.proto): reply lines are US-ASCII unless the
transaction is SMTPUTF8 and at most 512 octets (RFC 5321 4.2, 4.5.3.1.5),
client text quoted in them is bounded; DSN parameters decode to
printable US-ASCII only (RFC 3461 4.2, 4.4); IPv6 clients are written as
[IPv6:...] address literals in Received: (RFC 5321 4.1.3).  In memory
(StringTransport, task.Clock) and over [::1] with the real reactor.
"""

from __future__ import annotations

import smtplib

import pytest
from conftest import in_reactor
from smtpharness import GO_AHEAD, GREETING, HOST, MAIL_OK, NOW, RCPT_OK, converse, queued_id, strip_received
from smtpharness import Harness as _Harness
from twisted.internet.endpoints import serverFromString

from mailhub.config import ServerConfig
from mailhub.delivery.directory import Directory
from mailhub.queue.spool import Spool
from mailhub.rfc5322 import address_literal
from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
from mailhub.smtp.policy import Policy
from mailhub.smtp.proto import (
    MAX_REPLY_LINE,
    CommandError,
    format_reply,
    parse_mail_params,
    parse_rcpt_params,
    received_header,
    xtext_decode,
)


class Harness(_Harness):
    def __init__(self, tmp_path, **config) -> None:
        super().__init__(tmp_path, **config)
        self.serve()

    def ehlo(self, ip: str = "198.51.100.7"):
        c = self.connect(ip)
        assert c.greeting == GREETING
        assert c.send("EHLO client.test\r\n").startswith(f"250-{HOST}\r\n")
        return c


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


# -- the reply formatter -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, utf8, wire",
    [
        ("Ok", False, b"250 2.0.0 Ok\r\n"),
        ("a\r\nb", False, b"250 2.0.0 a  b\r\n"),
        ("tab\tnul\x00del\x7f", False, b"250 2.0.0 tab\tnul\\x00del\\x7F\r\n"),  # HT is allowed
        ("j\u00f6rg", False, b"250 2.0.0 j\\xC3\\xB6rg\r\n"),
        ("j\u00f6rg", True, "250 2.0.0 j\u00f6rg\r\n".encode()),
        ("c1\x85 ls\u2028", True, b"250 2.0.0 c1\\xC2\\x85 ls\\xE2\\x80\\xA8\r\n"),
        ("x" * 600, False, b"250 2.0.0 " + b"x" * 497 + b"...\r\n"),
        ("\u00e9" * 300, True, b"250 2.0.0 " + "\u00e9".encode() * 248 + b"...\r\n"),
    ],
    ids=["plain", "crlf", "controls", "utf8 escaped", "utf8 kept", "c1 and separators", "cut", "cut utf8"],
)
def test_format_reply(text, utf8, wire):
    assert format_reply(250, "2.0.0", text, utf8) == wire
    assert len(wire.split(b"\r\n")[0]) + 2 <= MAX_REPLY_LINE


def test_format_reply_cuts_every_line_of_a_multiline_reply():
    out = format_reply(250, "", ["y" * 1000, "z" * 1000])
    first, second, end = out.split(b"\r\n")
    assert end == b"" and len(first) == len(second) == MAX_REPLY_LINE - 2
    assert first.startswith(b"250-yyy") and second.startswith(b"250 zzz") and first.endswith(b"...")


# -- replies quoting client input -------------------------------------------------------------------

LONG_KEY = "X" * 1900
LONG_VALUE = "Y" * 1900


@pytest.mark.parametrize(
    "command, reply",
    [
        (f"MAIL FROM:<a@elsewhere.test> {LONG_KEY}=1",
         f"555 5.5.4 Error: unsupported parameter: {'X' * 64}...\r\n"),
        (f"MAIL FROM:<a@elsewhere.test> {LONG_KEY}",
         f"555 5.5.4 Error: unsupported parameter: {'X' * 64}...\r\n"),
        (f"MAIL FROM:<a@elsewhere.test> ={LONG_VALUE}",
         f"501 5.5.4 Error: bad parameter syntax: ={'Y' * 63}...\r\n"),
        ("MAIL FROM:<a@elsewhere.test> \u00e9=1",
         "501 5.5.4 Error: bad parameter syntax: \\xC3\\xA9=1\r\n"),
        ("MAIL FROM:<a@elsewhere.test> SMTPUTF8 \u00e9\u00e9",
         "501 5.5.4 Error: bad parameter syntax: \\xC3\\xA9\\xC3\\xA9\r\n"),
        ("MAIL FROM:<a@elsewhere.test> SIZE=1 SIZE=2",
         "501 5.5.4 Error: duplicate parameter: SIZE\r\n"),
        (f"MAIL FROM:<a@elsewhere.test> {'K' * 80} {'K' * 80}",
         f"501 5.5.4 Error: duplicate parameter: {'K' * 64}...\r\n"),
        ("MAIL FROM:<j\u00f6rg@b\u00fccher.example>",
         "553 5.6.7 Error: bad sender address: non-ASCII address requires SMTPUTF8\r\n"),
    ],
    ids=["555 long key=value", "555 long key", "501 long value", "501 utf8", "501 utf8 with SMTPUTF8",
         "duplicate", "two long keys", "utf8 address"],
)
def test_replies_quote_client_input_bounded_and_ascii(h, command, reply):
    c = h.ehlo()
    out = c.send(command + "\r\n")
    assert out == reply
    assert out.isascii() and len(out.encode()) <= MAX_REPLY_LINE


def test_rcpt_reply_keeps_utf8_in_an_smtputf8_transaction(h):
    c = h.ehlo()
    converse(c, [("MAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8\r\n", MAIL_OK)])
    out = c.send("RCPT TO:<j\u00f6rg@elsewhere.test>\r\n")
    assert out == "554 5.7.1 <j\u00f6rg@elsewhere.test>: Relay access denied\r\n"
    assert c.send(f"RCPT TO:<a@b.example> {LONG_KEY}\r\n") == f"555 5.5.4 Error: unsupported parameter: {'X' * 64}...\r\n"


HOSTILE = [
    "MAIL FROM:<a@elsewhere.test> " + "X" * 1900,
    "MAIL FROM:<a@elsewhere.test> \u00e9" + "=1" * 10,
    "MAIL FROM:<a@elsewhere.test> " + " ".join(f"P{i}=\u00e9" for i in range(200)),
    "MAIL FROM:<" + "a" * 300 + "@elsewhere.test>",
    "MAIL FROM:<a@" + "\u00fc" * 200 + ".example> SMTPUTF8",
    "MAIL FROM:<a@[IPv6:" + "f" * 300 + "]>",
    "RCPT TO:<" + "b" * 60 + "@" + "c" * 190 + ".example>",
    "HELO " + "h" * 500,
    "EHLO " + "\u00e9" * 200,
    "AUTH " + "M" * 5000,
    "VRFY " + "\u00e9" * 200,
    "BDAT " + "9" * 400,
    "XYZZY " + "\u00e9" * 200,
    "NOOP \t\u00e9",
    "MAIL FROM:<a@elsewhere.test> ENVID=" + "+0A" * 300,
    "RCPT TO:<a@b.example> ORCPT=" + "x" * 1500 + ";y",
]


def test_no_reply_line_is_long_or_unescaped(h):
    """Every reply line to hostile commands (with and without a transaction) is ASCII and at most 512 octets."""
    c = h.ehlo()
    for command in HOSTILE + ["MAIL FROM:<a@elsewhere.test>"] + HOSTILE:
        out = c.send(command + "\r\n").encode("utf-8")
        for line in out.split(b"\r\n")[:-1]:
            assert len(line) + 2 <= MAX_REPLY_LINE and line.isascii(), (command[:40], line[:80])
        if c.closed:
            c = h.ehlo()


# -- DSN parameters (RFC 3461) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, reply",
    [
        ("ENVID=abc+2B1", MAIL_OK),
        ("ENVID=" + "+41" * 100, MAIL_OK),
        ("ENVID=a+20b", MAIL_OK),
        ("ENVID=a+0Db", "501 5.5.4 Error: bad ENVID parameter: printable US-ASCII only\r\n"),
        ("ENVID=a+00", "501 5.5.4 Error: bad ENVID parameter: printable US-ASCII only\r\n"),
        ("ENVID=a+7F", "501 5.5.4 Error: bad ENVID parameter: printable US-ASCII only\r\n"),
        ("ENVID=+C3+A9", "501 5.5.4 Error: bad ENVID parameter: printable US-ASCII only\r\n"),
        ("ENVID=\u00e9", "501 5.5.4 Error: bad ENVID parameter\r\n"),
        ("ENVID=a+2b", "501 5.5.4 Error: bad ENVID parameter\r\n"),
        ("ENVID=a+G0", "501 5.5.4 Error: bad ENVID parameter\r\n"),
        ("ENVID=a+4", "501 5.5.4 Error: bad ENVID parameter\r\n"),
        ("ENVID=a=b", "501 5.5.4 Error: bad ENVID parameter\r\n"),
        ("ENVID=" + "a" * 101, "501 5.5.4 Error: bad ENVID parameter\r\n"),
    ],
)
def test_envid(h, params, reply):
    c = h.ehlo()
    assert c.send(f"MAIL FROM:<a@elsewhere.test> {params}\r\n") == reply


@pytest.mark.parametrize(
    "params, reply",
    [
        ("ORCPT=rfc822;alice+2Bx@example.com", RCPT_OK),
        ("ORCPT=rfc822;a+20b@example.com", RCPT_OK),
        ("ORCPT=rfc822;" + "+41" * 150 + "@example.com", RCPT_OK),
        ("ORCPT=rfc822;a+0D+0ABcc:x@example.com", "501 5.5.4 Error: bad ORCPT parameter: printable US-ASCII only\r\n"),
        ("ORCPT=rfc822;a+09@example.com", "501 5.5.4 Error: bad ORCPT parameter: printable US-ASCII only\r\n"),
        ("ORCPT=rfc822;j+C3+B6rg@example.com", "501 5.5.4 Error: bad ORCPT parameter: printable US-ASCII only\r\n"),
        ("ORCPT=rfc822;j\u00f6rg@example.com", "501 5.5.4 Error: bad ORCPT parameter\r\n"),
        ("ORCPT=rfc822;a+zz@example.com", "501 5.5.4 Error: bad ORCPT parameter\r\n"),
        ("ORCPT=rfc822;a+2@example.com", "501 5.5.4 Error: bad ORCPT parameter\r\n"),
        ("ORCPT=rfc822;a=b@example.com", "501 5.5.4 Error: bad ORCPT parameter\r\n"),
        ("ORCPT=rfc822", "501 5.5.4 Error: bad ORCPT parameter\r\n"),
        ("ORCPT=;a@example.com", "501 5.5.4 Error: bad ORCPT parameter\r\n"),
        ("ORCPT=rfc 822;a@example.com", "501 5.5.4 Error: bad parameter syntax: 822;a@example.com\r\n"),
        ("ORCPT=rfc\u00e9;a@example.com", "501 5.5.4 Error: bad ORCPT parameter\r\n"),
        ("ORCPT=rfc822;" + "a" * 495 + "@x", "501 5.5.4 Error: bad ORCPT parameter\r\n"),
    ],
)
def test_orcpt(h, params, reply):
    c = h.ehlo()
    converse(c, [("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK)])
    assert c.send(f"RCPT TO:<alice@example.com> {params}\r\n") == reply


def test_dsn_values_stored_decoded(h):
    c = h.ehlo()
    converse(c, [
        ("MAIL FROM:<a@elsewhere.test> ENVID=Q+20Q+2B1\r\n", MAIL_OK),
        ("RCPT TO:<alice@example.com> ORCPT=rfc822;Alice+2Bx@example.com\r\n", RCPT_OK),
        ("DATA\r\n", GO_AHEAD),
    ])
    queued_id(c.send(b"x\r\n.\r\n"))
    [env] = h.queued
    assert env.esmtp["envid"] == "Q Q+1" and env.recipients[0].orcpt == "rfc822;Alice+x@example.com"


def test_dsn_helpers_raise_501():
    for call in (lambda: xtext_decode("a+zz", "ENVID"), lambda: parse_mail_params({"ENVID": "+01"}, 0),
                 lambda: parse_rcpt_params({"ORCPT": "rfc822;+7F"})):
        with pytest.raises(CommandError) as e:
            call()
        assert (e.value.reply.code, e.value.reply.enhanced) == (501, "5.5.4")


# -- IPv6 address literals in Received: ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip, literal",
    [("192.0.2.1", "[192.0.2.1]"), ("::1", "[IPv6:::1]"), ("2001:db8::7", "[IPv6:2001:db8::7]"),
     ("::ffff:192.0.2.1", "[IPv6:::ffff:192.0.2.1]"), ("fe80::1%eth0", "[IPv6:fe80::1]")],
)
def test_address_literal(ip, literal):
    assert address_literal(ip) == literal


def test_received_header_ipv6():
    raw = received_header("client.test", "2001:db8::7", HOST, "ESMTP", "QID", None, NOW)
    assert raw.startswith(b"Received: from client.test ([IPv6:2001:db8::7])\r\n\tby mx.example.com (mailhub)")


def test_ipv6_client_received_header_and_log(h):
    from twisted.logger import formatEvent, globalLogPublisher

    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = h.ehlo("2001:db8::7")
        converse(c, [
            ("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK),
            ("RCPT TO:<alice@example.com>\r\n", RCPT_OK),
            ("DATA\r\n", GO_AHEAD),
        ])
        qid = queued_id(c.send(b"x\r\n.\r\n"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    received, _ = strip_received(h.message(qid))
    assert received.startswith(b"Received: from client.test ([IPv6:2001:db8::7])\r\n")
    lines = [formatEvent(e) for e in events if e.get("mail_event") == "connection"]
    assert lines == ["connect from [2001:db8::7] listener=smtp tls=False"]  # Postfix-style log lines


def test_ipv6_loopback_end_to_end(reactor, tmp_path):
    """A real session over [::1] (bound to ::1 only): the stored Received: says [IPv6:::1]."""
    cfg = ServerConfig(hostname=HOST, trusted_networks=("::1/128",))
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    queued: list = []
    policy = Policy(Directory(["example.com"], str(tmp_path / "mailboxes"), users=["alice"]), cfg.trusted_networks)
    factory = SMTPServerFactory(SMTPSettings(cfg, "smtp"), spool, queued.append, policy, reactor)
    try:
        port = in_reactor(reactor, serverFromString(reactor, r"tcp6:0:interface=\:\:1").listen, factory)
    except Exception as e:  # no IPv6 loopback on this machine
        pytest.skip(f"cannot listen on [::1]: {e}")
    try:
        with smtplib.SMTP("::1", port.getHost().port, local_hostname="client.test", timeout=20) as s:
            s.sendmail("a@elsewhere.test", ["alice@example.com"], b"Subject: v6\r\n\r\nhi\r\n")
    finally:
        in_reactor(reactor, port.stopListening)
    [env] = queued
    with spool.open_message(env.queue_id) as f:
        received, _ = strip_received(f.read())
    assert received.startswith(b"Received: from client.test ([IPv6:::1])\r\n")
    assert env.client["addr"] == "::1"


@pytest.mark.parametrize("first", [b" folded", b"\tby evil.example; 1 Jan 2000 00:00:00 +0000", b" "])
def test_content_starting_with_white_space_cannot_fold_into_the_trace_header(h, first):
    """
    A first line that starts with white space is no header field (RFC 5322
    2.2), so the content has no header section: an empty line ends our
    Received header before it, instead of the line becoming a continuation
    of the trace header.
    """
    import email
    import email.policy

    c = h.ehlo()
    converse(c, [
        ("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK),
        ("RCPT TO:<alice@example.com>\r\n", RCPT_OK),
        ("DATA\r\n", GO_AHEAD),
    ])
    qid = queued_id(c.send(first + b"\r\nSubject: not a header\r\n.\r\n"))
    stored = h.message(qid)
    trace, rest = stored.split(b"\r\n\r\n", 1)
    assert trace.startswith(b"Received: ") and not trace.endswith(first)
    assert rest == first + b"\r\nSubject: not a header\r\n"
    parsed = email.message_from_bytes(stored, policy=email.policy.compat32)
    assert parsed.keys() == ["Received"] and "evil" not in parsed["Received"]


@pytest.mark.parametrize("first", [b"Subject: hi", b"", b"x"])
def test_other_content_follows_the_trace_header_directly(h, first):
    c = h.ehlo()
    converse(c, [
        ("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK),
        ("RCPT TO:<alice@example.com>\r\n", RCPT_OK),
        ("DATA\r\n", GO_AHEAD),
    ])
    qid = queued_id(c.send(first + b"\r\nbody\r\n.\r\n"))
    trace, rest = strip_received(h.message(qid))
    assert rest == first + b"\r\nbody\r\n"

"""
In-memory tests for mailhub.smtp.server: StringTransport + task.Clock, a real
Spool in tmp_path, a list as enqueue.  Transcripts are table-driven with
exact expected replies.
"""

from __future__ import annotations

import errno
import os
import re

import pytest
from smtpharness import (
    DATE,
    EHLO,
    FOREIGN,
    GO_AHEAD,
    GREETING,
    HOST,
    MAIL_OK,
    NOW,
    OK,
    RCPT_OK,
    converse,
    queued_id,
    send_message,
    strip_received,
)
from smtpharness import TwoDomainHarness as Harness
from twisted.logger import formatEvent, globalLogPublisher

from mailhub.queue.spool import SpoolWriter
from mailhub.smtp.proto import (
    MAX_LINE,
    MAX_MAIL_LINE,
    CommandError,
    DotDecoder,
    format_reply,
    parse_mail_params,
    parse_params,
    parse_rcpt_params,
    received_header,
    split_path,
    with_protocol,
    xtext_decode,
)

BARE = "550 5.6.0 Message contains bare CR or LF; lines must end with CRLF\r\n"
TOO_MANY_CONNECTIONS = f"421 4.7.0 {HOST} Error: too many connections\r\n"
TOO_MANY_ERRORS = f"421 4.7.0 {HOST} Error: too many errors\r\n"


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


# -- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire, body",
    [
        (b".\r\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
        (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),
        (b"a.\r\n.a\r\n.\r\n", b"a.\r\na\r\n"),
        (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
        (b"..\r\n..\r\n.\r\n", b".\r\n.\r\n"),
    ],
)
def test_dot_decoder_every_split(wire, body):
    for parts in [[wire]] + [[wire[:i], wire[i:]] for i in range(len(wire) + 1)] + [[bytes([b]) for b in wire]]:
        d = DotDecoder()
        out, rest = b"", None
        for p in [p for p in parts if p]:
            assert rest is None
            got, rest = d.feed(p)
            out += got
        assert (out, rest, d.bare_line_ending) == (body, b"", False), parts


@pytest.mark.parametrize("seq", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n", b"\r", b"a\rb"])
def test_dot_decoder_bare_endings_never_end(seq):
    d = DotDecoder()
    out, rest = d.feed(b"x" + seq + b"y")
    assert rest is None and d.bare_line_ending
    out, rest = d.feed(b"\r\n.\r\nNEXT")
    assert rest == b"NEXT"


def test_dot_decoder_rest_after_marker():
    d = DotDecoder()
    assert d.feed(b"hi\r\n.\r\nQUIT\r\n") == (b"hi\r\n", b"QUIT\r\n")


def test_format_reply():
    assert format_reply(250, "2.0.0", "Ok") == b"250 2.0.0 Ok\r\n"
    assert format_reply(214, "2.0.0", ["a", "b"]) == b"214-2.0.0 a\r\n214 2.0.0 b\r\n"
    assert format_reply(250, "", "x\r\ny") == b"250 x  y\r\n"


@pytest.mark.parametrize(
    "arg, path, words",
    [
        ("<a@b.c>", "<a@b.c>", []),
        (" <a@b.c> SIZE=1  BODY=8BITMIME", "<a@b.c>", ["SIZE=1", "BODY=8BITMIME"]),
        ('<"x>y"@b.c> SMTPUTF8', '<"x>y"@b.c>', ["SMTPUTF8"]),
        ('<"x\\">y"@b.c>', '<"x\\">y"@b.c>', []),  # an escaped quote does not end the quoted part
        ('<a@c.d> X="y>"', "<a@c.d>", ['X="y>"']),  # quotes after the path's > are not the path's
        ("a@b.c SIZE=1", "a@b.c", ["SIZE=1"]),
        ("<>", "<>", []),
    ],
)
def test_split_path(arg, path, words):
    assert split_path(arg) == (path, words)


@pytest.mark.parametrize("arg", ["<a@b.c", "<a@b.c>SIZE=1", '<"a>b@c.d', '<"a>"b>x'])
def test_split_path_errors(arg):
    with pytest.raises(CommandError):
        split_path(arg)


def test_params():
    assert parse_params(["size=1", "SMTPUTF8"]) == {"SIZE": "1", "SMTPUTF8": None}
    for bad in (["=1"], ["SIZE="], ["SIZE=1", "size=2"]):
        with pytest.raises(CommandError) as e:
            parse_params(bad)
        assert e.value.reply.code == 501
    assert parse_mail_params({"SIZE": "10", "BODY": "8bitmime", "RET": "hdrs", "ENVID": "a+2Bb"}, 100) == {
        "body": "8BITMIME", "smtputf8": False, "declared_size": 10, "ret": "HDRS", "envid": "a+b",
    }
    with pytest.raises(CommandError) as e:
        parse_mail_params({"SIZE": "101"}, 100)
    assert (e.value.reply.code, e.value.reply.enhanced) == (552, "5.3.4")
    with pytest.raises(CommandError) as e:
        parse_mail_params({"XFOO": None}, 100)
    assert (e.value.reply.code, e.value.reply.enhanced) == (555, "5.5.4")
    assert parse_rcpt_params({"NOTIFY": "success,FAILURE", "ORCPT": "rfc822;a+2Bb@c.d"}) == (
        ["SUCCESS", "FAILURE"], "rfc822;a+b@c.d",
    )
    for bad in ({"NOTIFY": "NEVER,SUCCESS"}, {"NOTIFY": "SOMETIMES"}, {"ORCPT": "x"}):
        with pytest.raises(CommandError):
            parse_rcpt_params(bad)
    with pytest.raises(CommandError):
        xtext_decode("a+zz")


def test_with_protocol():
    assert with_protocol(False, False, False, False) == "SMTP"
    assert with_protocol(True, False, False, False) == "ESMTP"
    assert with_protocol(True, True, False, False) == "ESMTPS"
    assert with_protocol(True, True, True, False) == "ESMTPSA"
    assert with_protocol(True, False, True, False) == "ESMTPA"
    assert with_protocol(True, False, False, True) == "UTF8SMTP"
    assert with_protocol(True, True, True, True) == "UTF8SMTPSA"


def test_received_header_format():
    assert received_header("c.test", "192.0.2.1", HOST, "ESMTP", "QID", "a@b.c", NOW) == (
        f"Received: from c.test ([192.0.2.1])\r\n\tby {HOST} (mailhub) with ESMTP id QID\r\n"
        f"\tfor <a@b.c>; {DATE}\r\n"
    ).encode()
    assert received_header("c.test", "192.0.2.1", HOST, "SMTP", "QID", None, NOW) == (
        f"Received: from c.test ([192.0.2.1])\r\n\tby {HOST} (mailhub) with SMTP id QID; {DATE}\r\n"
    ).encode()


# -- commands ---------------------------------------------------------------------------------


def test_greeting(h):
    assert h.connect().greeting == GREETING


@pytest.mark.parametrize(
    "command, reply",
    [
        ("NOOP", OK),
        ("noop", OK),
        ("NoOp with args", OK),
        ("RSET", OK),
        ("rset", OK),
        ("RSET now", "501 5.5.4 Syntax: RSET\r\n"),
        ("HELP", "214-2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY\r\n214 2.0.0 See RFC 5321\r\n"),
        ("VRFY alice", "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
        ("VRFY nobody@example.com", "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
        ("VRFY", "501 5.5.4 Syntax: VRFY address\r\n"),
        ("EXPN list", "502 5.5.1 Error: EXPN command is disabled\r\n"),
        ("FOO bar", "500 5.5.2 Error: command not recognized\r\n"),
        ("", "500 5.5.2 Error: command not recognized\r\n"),
        ("STARTTLS", "502 5.5.1 Error: STARTTLS not implemented\r\n"),
        ("AUTH PLAIN", "502 5.5.1 Error: AUTH not implemented\r\n"),
        ("DATA", "503 5.5.1 Error: need RCPT command\r\n"),
        ("DATA x", "501 5.5.4 Syntax: DATA\r\n"),
        ("RCPT TO:<alice@example.com>", "503 5.5.1 Error: need MAIL command\r\n"),
        ("BDAT x", "501 5.5.4 Syntax: BDAT count [LAST]\r\n"),
        ("BDAT 1 FIRST", "501 5.5.4 Syntax: BDAT count [LAST]\r\n"),
        ("MAIL alice@example.com", "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        ("MAIL FROM:<alice@example.com", "501 5.1.7 Bad sender address syntax\r\n"),
        ("MAIL FROM:<bad@>", "501 5.1.8 Bad sender system address: empty domain\r\n"),
        ("MAIL FROM:<a b@example.com>", "501 5.1.7 Bad sender address syntax: invalid local part\r\n"),
        ("MAIL FROM:<a@exa_mple.com>", "501 5.1.8 Bad sender system address: invalid domain\r\n"),
        ("MAIL FROM:", "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        ("MAIL FROM: ", "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        ("MAIL FROM:   ", "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        ("MAIL FROM:<alice@example.com> XFOO=1", "555 5.5.4 Error: unsupported parameter: XFOO\r\n"),
        ("MAIL FROM:<alice@example.com> SIZE=abc", "501 5.5.4 Error: bad SIZE parameter\r\n"),
        ("MAIL FROM:<alice@example.com> SIZE=10240001", "552 5.3.4 Error: message size exceeds fixed limit\r\n"),
        ("MAIL FROM:<alice@example.com> BODY=BINARYMIME", "501 5.5.4 Error: BODY must be 7BIT or 8BITMIME\r\n"),
        ("MAIL FROM:<alice@example.com> RET=ALL", "501 5.5.4 Error: RET must be FULL or HDRS\r\n"),
        ("MAIL FROM:<alice@example.com> RET", "501 5.5.4 Error: RET must be FULL or HDRS\r\n"),
        ("MAIL FROM:<alice@example.com> BODY=7bit RET=full", MAIL_OK),
        ("MAIL FROM:<jörg@example.com>", "553 5.6.7 Error: bad sender address: non-ASCII address requires SMTPUTF8\r\n"),
        ("MAIL FROM:<alice@example.com> SMTPUTF8=yes", "501 5.5.4 Error: SMTPUTF8 takes no value\r\n"),
        ("MAIL FROM:<alice@example.com>", MAIL_OK),
        ("mail from:<alice@example.com>", MAIL_OK),
        ("MAIL FROM: <alice@example.com>", MAIL_OK),
        ("MAIL FROM:<>", MAIL_OK),
        ("MAIL FROM:<alice@example.com> SIZE=10240000 BODY=8BITMIME", MAIL_OK),
        ("MAIL FROM:<jörg@bücher.example> SMTPUTF8", MAIL_OK),
        ("MAIL FROM:<alice@example.com> RET=HDRS ENVID=x+2By", MAIL_OK),
    ],
)
def test_single_command_after_ehlo(h, command, reply):
    c = h.ehlo()
    assert c.send(command + "\r\n") == reply
    assert not c.closed


@pytest.mark.parametrize(
    "rcpt, reply",
    [
        ("<alice@example.com>", RCPT_OK),
        ("<ALICE+tag@Example.ORG>", RCPT_OK),
        ("<postmaster>", RCPT_OK),
        ("<PostMaster>", RCPT_OK),
        ("<postmaster@example.org>", RCPT_OK),
        ("<nobody@example.com>", "550 5.1.1 User unknown in local recipient table\r\n"),
        ("<victim@elsewhere.test>", "554 5.7.1 <victim@elsewhere.test>: Relay access denied\r\n"),
        ("<>", "501 5.1.3 Error: null recipient address\r\n"),
        ("", "501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        (" ", "501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        ("<alice@example.com", "501 5.1.3 Error: bad address syntax\r\n"),
        ("<a b@example.com>", "501 5.1.3 Error: bad recipient address: invalid local part\r\n"),
        ("<jörg@example.com>", "553 5.6.7 Error: bad recipient address: non-ASCII address requires SMTPUTF8\r\n"),
        ("<alice@example.com> NOTIFY=SUCCESS ORCPT=rfc822;alice@example.com", RCPT_OK),
        ("<alice@example.com> NOTIFY=BOGUS", "501 5.5.4 Error: bad NOTIFY parameter\r\n"),
        ("<alice@example.com> FOO", "555 5.5.4 Error: unsupported parameter: FOO\r\n"),
    ],
)
def test_rcpt(h, rcpt, reply):
    c = h.ehlo()
    assert c.send("MAIL FROM:<sender@elsewhere.test>\r\n") == MAIL_OK
    assert c.send(f"RCPT TO:{rcpt}\r\n") == reply


def test_rcpt_syntax(h):
    c = h.ehlo()
    converse(c, [
        ("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK),
        ("RCPT alice@example.com\r\n", "501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        ("rcpt to:<alice@example.com>\r\n", RCPT_OK),
    ])


def test_sequence_errors(h):
    c = h.connect()
    converse(c, [
        ("MAIL FROM:<a@example.com>\r\n", "503 5.5.1 Error: send HELO/EHLO first\r\n"),
        ("EHLO\r\n", "501 5.5.4 Syntax: EHLO hostname\r\n"),
        ("HELO\r\n", "501 5.5.4 Syntax: HELO hostname\r\n"),
        ("HELO client.test\r\n", f"250 {HOST}\r\n"),
        ("MAIL FROM:<a@example.com>\r\n", MAIL_OK),
        ("MAIL FROM:<a@example.com>\r\n", "503 5.5.1 Error: nested MAIL command\r\n"),
        ("DATA\r\n", "554 5.5.1 Error: no valid recipients\r\n"),
        ("RCPT TO:<nobody@example.com>\r\n", "550 5.1.1 User unknown in local recipient table\r\n"),
        ("DATA\r\n", "554 5.5.1 Error: no valid recipients\r\n"),
        ("RSET\r\n", OK),
        ("RCPT TO:<alice@example.com>\r\n", "503 5.5.1 Error: need MAIL command\r\n"),
        ("MAIL FROM:<a@example.com>\r\n", MAIL_OK),
        ("EHLO again.test\r\n", EHLO),  # EHLO resets the transaction
        ("RCPT TO:<alice@example.com>\r\n", "503 5.5.1 Error: need MAIL command\r\n"),
        ("QUIT\r\n", "221 2.0.0 Bye\r\n"),
    ])
    assert c.closed
    assert c.send("NOOP\r\n") == ""


def test_vrfy_disabled_and_expn_enabled(tmp_path):
    c = Harness(tmp_path, vrfy=False, expn=True).ehlo()
    assert c.send("VRFY alice\r\n") == "502 5.5.1 Error: VRFY command is disabled\r\n"
    assert c.send("EXPN list\r\n") == "252 2.5.0 Cannot EXPN list, but will accept message and attempt delivery\r\n"


# -- a whole message ---------------------------------------------------------------------------


def test_message_spooled_with_received_header(h):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = h.ehlo()
        qid = queued_id(send_message(c, b"Subject: hi\r\n\r\nHello\r\n..dot\r\n.\r\n"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    raw = h.message(qid)
    received, rest = strip_received(raw)
    assert received == (
        f"Received: from client.test ([{FOREIGN}])\r\n\tby {HOST} (mailhub) with ESMTP id {qid}\r\n"
        f"\tfor <alice@example.com>; {DATE}\r\n"
    ).encode()
    assert rest == b"Subject: hi\r\n\r\nHello\r\n.dot\r\n"
    [env] = h.queued
    assert env == h.spool.load(qid)
    assert env.queue_id == qid and env.sender == "sender@elsewhere.test" and env.arrival == NOW
    assert [(r.address, r.original) for r in env.recipients] == [("alice@example.com", "alice@example.com")]
    # crlf: received with DATA, so every CR and LF is a CRLF (local delivery's fast LF copy)
    assert env.esmtp == {"body": "7BIT", "smtputf8": False, "size": len(raw), "crlf": True}
    assert env.client == {"helo": "client.test", "addr": FOREIGN, "protocol": "ESMTP", "user": "", "listener": "smtp"}
    [ev] = [e for e in events if e.get("mail_event") == "accepted"]
    assert (ev["queue_id"], ev["from"], ev["nrcpt"], ev["size"], ev["client"]) == (
        qid, "sender@elsewhere.test", 1, len(raw), FOREIGN)
    # The session goes on.
    assert c.send("MAIL FROM:<>\r\n") == MAIL_OK


def test_helo_smtp_and_multiple_recipients_no_for(h):
    c = h.connect()
    assert c.send("HELO old.test\r\n") == f"250 {HOST}\r\n"
    qid = queued_id(send_message(c, b"x\r\n.\r\n", rcpts=("alice@example.com", "bob@example.com")))
    received, rest = strip_received(h.message(qid))
    assert received == (
        f"Received: from old.test ([{FOREIGN}])\r\n\tby {HOST} (mailhub) with SMTP id {qid}; {DATE}\r\n"
    ).encode()
    assert rest == b"x\r\n"


def test_smtputf8_envelope_intact(h):
    c = h.ehlo("127.0.0.1")  # trusted: may relay
    qid = queued_id(send_message(
        c, b"x\r\n.\r\n", rcpts=("пользователь@пример.рф", "alice@example.com"),
        mail="MAIL FROM:<jörg@bücher.example> SMTPUTF8 BODY=8BITMIME",
    ))
    env = h.spool.load(qid)
    assert env.sender == "jörg@bücher.example"
    assert [r.address for r in env.recipients] == ["пользователь@пример.рф", "alice@example.com"]
    assert env.esmtp["smtputf8"] is True and env.esmtp["body"] == "8BITMIME"
    assert b"with UTF8SMTP id" in h.message(qid)


def test_empty_message_and_dedupe(h):
    c = h.ehlo()
    qid = queued_id(send_message(c, b".\r\n", rcpts=("alice@example.com", "Alice+x@example.com", "list@example.com")))
    _, rest = strip_received(h.message(qid))
    assert rest == b""
    env = h.queued[0]
    assert [(r.address, r.original) for r in env.recipients] == [
        ("alice@example.com", "alice@example.com"), ("bob@example.com", "list@example.com")]


def test_postmaster_without_domain_goes_to_first_domain(h):
    c = h.ehlo()
    assert c.send("MAIL FROM:<>\r\n") == MAIL_OK
    assert c.send("RCPT TO:<POSTMASTER>\r\n") == RCPT_OK
    assert c.send("DATA\r\n") == GO_AHEAD
    queued_id(c.send(b"x\r\n.\r\n"))
    assert [(r.address, r.original) for r in h.queued[0].recipients] == [("alice@example.com", "postmaster@example.com")]


def test_dsn_parameters(h):
    c = h.ehlo()
    converse(c, [
        ("MAIL FROM:<a@elsewhere.test> RET=HDRS ENVID=QQ+2B1\r\n", MAIL_OK),
        ("RCPT TO:<alice@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Alice+2Bx@example.com\r\n", RCPT_OK),
        ("DATA\r\n", GO_AHEAD),
    ])
    queued_id(c.send(b"x\r\n.\r\n"))
    env = h.queued[0]
    assert env.esmtp["ret"] == "HDRS" and env.esmtp["envid"] == "QQ+1"
    assert env.recipients[0].notify == ["SUCCESS", "DELAY"]
    assert env.recipients[0].orcpt == "rfc822;Alice+x@example.com"


@pytest.mark.parametrize(
    "wire, stored",
    [
        (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),
        (b"line.\r\n. \r\n.\r\n", b"line.\r\n \r\n"),
        (b"x" * 100000 + b"\r\n.\r\n", b"x" * 100000 + b"\r\n"),  # no line limit in DATA
    ],
)
def test_dot_unstuffing(h, wire, stored):
    c = h.ehlo()
    qid = queued_id(send_message(c, wire))
    assert strip_received(h.message(qid))[1] == stored


def test_end_marker_split_at_every_position(h):
    wire = b"Subject: t\r\n\r\nline1\r\n..dotted\r\n.\r\n"
    stored = b"Subject: t\r\n\r\nline1\r\n.dotted\r\n"
    c = h.ehlo()
    for i in range(len(wire) + 1):
        assert c.send("MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
        first = c.send(wire[:i])
        reply = first + c.send(wire[i:])
        assert first == "" or i == len(wire), i
        qid = queued_id(reply)
        assert strip_received(h.message(qid))[1] == stored, i
    # and one byte at a time
    assert c.send("MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    out = "".join(c.send(bytes([b])) for b in wire)
    assert strip_received(h.message(queued_id(out)))[1] == stored


def test_pipelining_in_one_write(h):
    c = h.connect()
    out = c.send(
        b"EHLO client.test\r\nMAIL FROM:<a@elsewhere.test>\r\nRCPT TO:<alice@example.com>\r\n"
        b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nbody\r\n.\r\n"
        b"MAIL FROM:<b@elsewhere.test>\r\nRCPT TO:<x@elsewhere.test>\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    )
    parts = out.split("\r\n")
    assert out.startswith(EHLO + MAIL_OK + RCPT_OK + "550 5.1.1 User unknown in local recipient table\r\n"
                          + RCPT_OK + GO_AHEAD)
    rest = out[len(EHLO + MAIL_OK + RCPT_OK + RCPT_OK + GO_AHEAD) + len("550 5.1.1 User unknown in local recipient table\r\n"):]
    qid = re.match(r"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r\n", rest).group(1)
    assert rest == (f"250 2.0.0 Ok: queued as {qid}\r\n" + MAIL_OK
                    + "554 5.7.1 <x@elsewhere.test>: Relay access denied\r\n" + OK + OK + "221 2.0.0 Bye\r\n")
    assert parts and c.closed
    assert [r.address for r in h.queued[0].recipients] == ["alice@example.com", "bob@example.com"]


# -- smuggling ----------------------------------------------------------------------------------

SMUGGLE = [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n", b"\r\n\n.\r\n"]


@pytest.mark.parametrize("seq", SMUGGLE)
def test_smuggling_rejected(h, seq):
    c = h.ehlo()
    payload = (
        b"Subject: hi\r\n\r\nhello" + seq
        + b"MAIL FROM:<evil@elsewhere.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n"
    )
    assert send_message(c, payload) == BARE
    assert h.queued == [] and h.spool_is_empty()
    assert not c.closed
    # The smuggled commands were data: no transaction is open.
    assert c.send("RCPT TO:<bob@example.com>\r\n") == "503 5.5.1 Error: need MAIL command\r\n"


@pytest.mark.parametrize("seq", SMUGGLE)
def test_smuggling_split_everywhere(tmp_path, seq):
    payload = b"hello" + seq + b"MAIL FROM:<evil@elsewhere.test>\r\n.\r\n"
    h = Harness(tmp_path, max_errors=1000, soft_error_limit=0)
    c = h.ehlo()
    for i in range(len(payload) + 1):
        assert c.send("MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
        assert c.send(payload[:i]) + c.send(payload[i:]) == BARE, i
    assert h.queued == [] and h.spool_is_empty()


def test_cr_at_buffer_end(h):
    c = h.ehlo()
    assert send_message(c, b"a\r") == ""
    assert c.send(b"\nb\r") == ""
    assert c.send(b"\n.\r") == ""
    qid = queued_id(c.send(b"\n"))
    assert strip_received(h.message(qid))[1] == b"a\r\nb\r\n"


# -- limits -----------------------------------------------------------------------------------------


def test_long_lines(h):
    c = h.ehlo()
    exact = b"NOOP " + b"x" * (MAX_LINE - 7) + b"\r\n"
    assert len(exact) == MAX_LINE
    assert c.send(exact) == OK
    too_long = b"NOOP " + b"x" * (MAX_LINE - 6) + b"\r\n"
    assert c.send(too_long + b"NOOP\r\n") == "500 5.5.2 Error: line too long\r\nOK".replace("OK", OK)
    # Fed in pieces: one error, the buffer stays bounded, the session recovers.
    out = ""
    for _ in range(200):
        out += c.send(b"y" * 1000)
        assert len(c.proto._buf) < MAX_MAIL_LINE
    out += c.send(b"\r\nNOOP\r\n")
    assert out == "500 5.5.2 Error: line too long\r\n" + OK


@pytest.mark.parametrize(
    "raw, reply",
    [
        (b"NOOP\x00\r\n", "500 5.5.2 Error: bad characters in command\r\n"),
        (b"\x00\x00\x00\r\n", "500 5.5.2 Error: bad characters in command\r\n"),
        (b"EHLO a\rb\r\n", "500 5.5.2 Error: bad characters in command\r\n"),
        (b"\xff\xfe\xfd\r\n", "500 5.5.2 Error: command is not valid UTF-8\r\n"),
        (b"MAIL FROM:<\xc3(@example.com>\r\n", "500 5.5.2 Error: command is not valid UTF-8\r\n"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", "500 5.5.2 Error: bad characters in command\r\n"),
    ],
)
def test_garbage(h, raw, reply):
    c = h.ehlo()
    assert c.send(raw) == reply
    assert c.send(b"NOOP\n") == OK  # bare LF ends a command line


def test_size_limit_body(tmp_path):
    h = Harness(tmp_path, max_message_size=100)
    c = h.connect()
    assert "250-SIZE 100\r\n" in c.send("EHLO client.test\r\n")
    assert c.send("MAIL FROM:<> SIZE=101\r\n") == "552 5.3.4 Error: message size exceeds fixed limit\r\n"
    assert send_message(c, b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\nMAIL FROM:<a@b.c>\r\n") == ""
    assert c.send(b".\r\n") == "552 5.3.4 Error: message size exceeds fixed limit\r\n"
    assert h.queued == [] and h.spool_is_empty()
    assert c.send("RCPT TO:<alice@example.com>\r\n") == "503 5.5.1 Error: need MAIL command\r\n"
    queued_id(send_message(c, b"x" * 98 + b"\r\n.\r\n"))  # exactly 100 fits


def test_recipient_limit(tmp_path):
    h = Harness(tmp_path, max_recipients=2)
    c = h.ehlo()
    converse(c, [
        ("MAIL FROM:<>\r\n", MAIL_OK),
        ("RCPT TO:<alice@example.com>\r\n", RCPT_OK),
        ("RCPT TO:<bob@example.com>\r\n", RCPT_OK),
        ("RCPT TO:<postmaster@example.com>\r\n", "452 4.5.3 Error: too many recipients\r\n"),
        ("DATA\r\n", GO_AHEAD),
    ])
    queued_id(c.send(b"x\r\n.\r\n"))
    assert len(h.queued[0].recipients) == 2


def test_idle_timeout(h):
    c = h.ehlo()
    h.clock.advance(299)
    assert c.send("NOOP\r\n") == OK
    h.clock.advance(299)
    assert not c.closed and c.read() == ""
    h.clock.advance(1)
    assert c.read() == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n"
    assert c.closed


def test_timeout_mid_data_aborts(h):
    c = h.ehlo()
    assert send_message(c, b"partial body\r\n") == ""
    h.clock.advance(300)
    assert c.read() == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n"
    c.lose()
    assert h.queued == [] and h.spool_is_empty()
    assert h.clock.getDelayedCalls() == []


def test_connection_lost_mid_data(h):
    c = h.ehlo()
    send_message(c, b"partial\r\n" * 20000)  # beyond what the spool keeps in memory
    assert os.listdir(os.path.join(h.spool.path, "tmp"))
    c.lose()
    assert h.spool_is_empty() and h.clock.getDelayedCalls() == []
    assert h.factory.connections == 0


def test_connection_limits(tmp_path):
    h = Harness(tmp_path, max_connections=3, max_connections_per_ip=2)
    a1, a2 = h.connect("192.0.2.1"), h.connect("192.0.2.1")
    assert a1.greeting == a2.greeting == GREETING
    a3 = h.connect("192.0.2.1")
    assert a3.greeting == TOO_MANY_CONNECTIONS and a3.closed
    a3.lose()
    b1 = h.connect("192.0.2.2")
    assert b1.greeting == GREETING
    b2 = h.connect("192.0.2.3")
    assert b2.greeting == TOO_MANY_CONNECTIONS and b2.closed
    b2.lose()
    a1.lose()
    assert h.connect("192.0.2.3").greeting == GREETING
    assert h.factory.connections == 3


def test_error_limit(tmp_path):
    h = Harness(tmp_path, max_errors=3)
    c = h.ehlo()
    out = c.send(b"FOO\r\nNOOP\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert out == ("500 5.5.2 Error: command not recognized\r\n" + OK
                   + "500 5.5.2 Error: command not recognized\r\n" * 2 + TOO_MANY_ERRORS)
    assert c.closed
    assert c.send("NOOP\r\n") == ""


# -- BDAT ----------------------------------------------------------------------------------------------


def test_bdat(h):
    c = h.ehlo()
    converse(c, [
        ("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK),
        ("RCPT TO:<alice@example.com>\r\n", RCPT_OK),
        (b"BDAT 5\r\nhel", ""),
        (b"lo", "250 2.0.0 Ok: 5 octets received\r\n"),
        (b"BDAT 0\r\n", "250 2.0.0 Ok: 5 octets received\r\n"),
        (b"DATA\r\n", "503 5.5.1 Error: DATA not allowed after BDAT\r\n"),
    ])
    body = b" world\r\n.\r\nMAIL FROM:<x@y.z>\r\n\n.\n"
    qid = queued_id(c.send(b"BDAT %d LAST\r\n" % len(body) + body))
    received, rest = strip_received(h.message(qid))
    assert rest == b"hello" + body  # exact bytes, no unstuffing, nothing executed
    assert b"with ESMTP id" in received
    # BDAT content is taken as sent, bare CR and LF included: no "crlf" promise to local delivery
    assert "crlf" not in h.queued[-1].esmtp
    assert c.send("NOOP\r\n") == OK


def test_bdat_pipelined_one_write_and_zero_last(h):
    c = h.ehlo()
    out = c.send(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\nBDAT 3\r\nabcBDAT 0 LAST\r\nQUIT\r\n")
    assert out.startswith(MAIL_OK + RCPT_OK + "250 2.0.0 Ok: 3 octets received\r\n250 2.0.0 Ok: queued as ")
    assert out.endswith("221 2.0.0 Bye\r\n")
    assert strip_received(h.message(h.queued[0].queue_id))[1] == b"abc"


def test_bdat_without_transaction_consumes_bytes(h):
    c = h.ehlo()
    assert c.send(b"BDAT 12\r\nNOOP\r\nNOOP\r\n") == "503 5.5.1 Error: need MAIL command\r\n"
    assert c.send(b"MAIL FROM:<>\r\nBDAT 6 LAST\r\nQUIT\r\n") == MAIL_OK + "503 5.5.1 Error: need RCPT command\r\n"
    assert c.send(b"NOOP\r\n") == OK
    assert h.spool_is_empty()


def test_bdat_too_big(tmp_path):
    h = Harness(tmp_path, max_message_size=10)
    c = h.connect()
    assert "250-SIZE 10\r\n" in c.send("EHLO client.test\r\n")
    converse(c, [
        ("MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\n", MAIL_OK + RCPT_OK),
        (b"BDAT 8\r\n12345678", "250 2.0.0 Ok: 8 octets received\r\n"),
        (b"BDAT 8\r\n12345678", "552 5.3.4 Error: message size exceeds fixed limit\r\n"),
        (b"BDAT 3 LAST\r\nabc", "503 5.5.1 Error: need MAIL command\r\n"),
    ])
    assert h.spool_is_empty() and h.queued == []


# -- local trouble is 4xx ---------------------------------------------------------------------------


def test_commit_oserror_is_451(h, monkeypatch):
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h.spool, "_commit", full)
    c = h.ehlo()
    assert send_message(c, b"x\r\n.\r\n") == "451 4.3.0 Error: queue file write error\r\n"
    assert h.queued == [] and h.spool_is_empty()
    assert c.send("NOOP\r\n") == OK


def test_write_error_is_451_after_end_marker(h, monkeypatch):
    c = h.ehlo()
    assert c.send("MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SpoolWriter, "write", full)
    assert c.send(b"some\r\n") == ""
    assert c.send(b"MAIL FROM:<x@y.z>\r\n.\r\n") == "451 4.3.0 Error: queue file write error\r\n"
    assert h.queued == [] and h.spool_is_empty()
    # Opening a new message fails the same way, right at DATA.
    assert c.send("MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n") == (
        MAIL_OK + RCPT_OK + "451 4.3.0 Error: queue file write error\r\n")


def test_commit_in_progress_stops_reading(h):
    pending = h.hold_commits()
    c = h.ehlo()
    paused = []
    c.transport.pauseProducing = lambda: paused.append(True)
    c.transport.resumeProducing = lambda: paused.append(False)
    assert send_message(c, b"x\r\n.\r\nNOOP\r\nRSET\r\n") == ""
    assert c.send(b"NOOP\r\n" * 20000) == ""  # held, not executed
    assert paused == [True]
    pending[0].callback(None)
    out = c.read()
    qid = queued_id(out.split("\r\n")[0] + "\r\n")
    assert out == f"250 2.0.0 Ok: queued as {qid}\r\n" + OK * 20002
    assert paused == [True, False]
    assert h.queued[0].queue_id == qid


@pytest.mark.parametrize("listener", ["smtp", "submission", "smtps"])
def test_no_open_relay_on_any_listener(h, listener):
    """
    No open relay by construction.  On smtp an unauthenticated foreign client reaches RCPT and
    gets 554 5.7.1; on submission/smtps it does not even get a transaction
    (530 5.7.0), trusted networks included.  (test_smtpd_tls_auth.py covers
    the authenticated side; test_policy.py the decision on every listener.)
    """
    h.factory.listener = listener
    c = h.ehlo()
    assert c.proto.session.listener == listener
    t = h.ehlo("127.0.0.1")
    if listener == "smtp":
        converse(c, [
            ("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK),
            ("RCPT TO:<victim@elsewhere.test>\r\n", "554 5.7.1 <victim@elsewhere.test>: Relay access denied\r\n"),
        ])
        converse(t, [("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK), ("RCPT TO:<victim@elsewhere.test>\r\n", RCPT_OK)])
    else:
        for client in (c, t):
            converse(client, [
                ("MAIL FROM:<a@elsewhere.test>\r\n", "530 5.7.0 Authentication required\r\n"),
                ("RCPT TO:<victim@elsewhere.test>\r\n", "503 5.5.1 Error: need MAIL command\r\n"),
            ])
    assert h.queued == []


def test_delivery_resets_error_count(tmp_path):
    h = Harness(tmp_path, max_errors=2)
    c = h.ehlo()
    assert c.send("FOO\r\n") == "500 5.5.2 Error: command not recognized\r\n"
    queued_id(send_message(c, b"x\r\n.\r\n"))
    assert c.send("FOO\r\n") == "500 5.5.2 Error: command not recognized\r\n"
    assert not c.closed
    assert c.send("FOO\r\n") == "500 5.5.2 Error: command not recognized\r\n" + TOO_MANY_ERRORS
    assert c.closed


def test_reset_session_forgets_helo(h):
    c = h.ehlo()
    assert c.send("MAIL FROM:<>\r\n") == MAIL_OK
    c.proto.reset_session()
    assert c.send("MAIL FROM:<>\r\n") == "503 5.5.1 Error: send HELO/EHLO first\r\n"


@pytest.mark.parametrize(
    "body,reply,reason",
    [
        (b"Subject: hi\r\n\r\nbare\nline\r\n.\r\n", BARE, "bare_line_ending"),
        (b"Subject: hi\r\n\r\n" + b"x" * 3000 + b"\r\n.\r\n", "552 5.3.4 Error: message size exceeds fixed limit\r\n",
         "too_large"),
    ],
)
def test_a_message_refused_at_the_end_of_data_is_logged_with_its_reason(tmp_path, events, body, reply, reason):
    h = Harness(tmp_path, max_message_size=2000)
    c = h.connect()
    c.send("EHLO client.test\r\n")
    assert send_message(c, body) == reply
    [event] = [e for e in events if e.get("mail_event") == "reject"]
    assert event["reason"] == reason and event["code"] == int(reply[:3])
    assert formatEvent(event).startswith(f"NOQUEUE: reject: DATA from [{FOREIGN}]: {reply[:9]}")

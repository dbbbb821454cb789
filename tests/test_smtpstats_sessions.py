"""
The lines that end an SMTP session in the mail log, from whole in-memory
transcripts (mailhub.smtp.stats, smtpd, smtplimits): Postfix's command
counts ("disconnect from ... ehlo=1 mail=1 ... commands=N/M"), "lost
connection after", "timeout after", "too many errors after", and exactly
one disconnect line per session whatever the client does.
"""

from __future__ import annotations

import random

import pytest
from smtpharness import FOREIGN, HOST, MAIL_OK, OK, send_message
from smtpharness import TwoDomainHarness as Harness
from tlsauthharness import TLSAuthHarness
from twisted.logger import formatEvent

from mailhub.smtp.stats import UNKNOWN, CommandCounts


def lines(logged) -> list[str]:
    return [t for t in logged() if t.startswith(("disconnect from", "lost connection", "timeout after", "too many"))]


def disconnects(events) -> list[dict]:
    return [e for e in events if e.get("mail_event") == "disconnect"]


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def test_one_pipelined_transaction_counts_like_postfix(h, logged):
    """Postfix 3.x, same client: ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6."""
    c = h.connect()
    out = c.send(
        "EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<nobody@example.com>\r\n"
        "DATA\r\nhi\r\n.\r\nQUIT\r\n"
    )
    assert out.count("\r\n250 ") >= 3 and "221 " in out
    c.lose()
    assert lines(logged) == [f"disconnect from [{FOREIGN}] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6"]


def test_pipelined_message_and_quit_with_a_slow_commit(h, logged):
    """The QUIT after the message waits for the commit: its 221 is not counted for DATA nor DATA's 250 for QUIT."""
    pending = h.hold_commits()
    c = h.ehlo()
    c.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    assert pending
    pending[0].callback(None)
    c.lose()
    assert lines(logged) == [f"disconnect from [{FOREIGN}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"]


def test_bdat_rset_counts_like_postfix(h, logged):
    """Postfix: ehlo=1 mail=1 rcpt=1 bdat=2 rset=1 quit=1 commands=7."""
    c = h.ehlo()
    out = c.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.com>\r\nBDAT 4\r\nhi\r\nBDAT 0 LAST\r\nRSET\r\nQUIT\r\n")
    assert "221 " in out
    c.lose()
    assert lines(logged) == [f"disconnect from [{FOREIGN}] ehlo=1 mail=1 rcpt=1 bdat=2 rset=1 quit=1 commands=7"]


def test_rejected_data_too_big_and_too_many_hops(tmp_path, logged):
    """Postfix: data=0/1 for both (552 5.3.4; Postfix says 554 5.4.0 for the hops, mailhub 554 5.4.6)."""
    h = Harness(tmp_path, max_message_size=2000, max_hops=3)
    c = h.connect()
    assert "250-SIZE 2000\r\n" in c.send("EHLO client.test\r\n")
    assert send_message(c, b"x" * 70 + b"\r\n" + (b"x" * 70 + b"\r\n") * 60 + b".\r\n").startswith("552 5.3.4")
    assert send_message(c, b"Received: a\r\nReceived: b\r\nReceived: c\r\nReceived: d\r\n\r\nhi\r\n.\r\n").startswith("554 5.4.6")
    assert c.send("MAIL FROM:<a@b.test>\r\n") == MAIL_OK
    assert c.send("DATA\r\n").startswith("554 5.5.1")  # no valid recipients
    c.send("QUIT\r\n")
    c.lose()
    assert lines(logged) == [
        f"disconnect from [{FOREIGN}] ehlo=1 mail=3 rcpt=2 data=0/3 quit=1 commands=7/10"
    ]


def test_too_many_errors_closes_with_one_disconnect_line(tmp_path, logged):
    h = Harness(tmp_path, max_errors=4, soft_error_limit=0)
    c = h.ehlo()
    out = c.send("FOO\r\n" * 6)
    assert out.endswith(f"421 4.7.0 {HOST} Error: too many errors\r\n") and out.count("500 ") == 4
    assert c.closed
    c.lose()
    # as Postfix: "too many errors after UNKNOWN from ..." before the disconnect line
    assert lines(logged) == [
        f"too many errors after UNKNOWN from [{FOREIGN}]",
        f"disconnect from [{FOREIGN}] ehlo=1 unknown=0/4 commands=1/5",
    ]


def test_too_many_errors_names_the_verb_like_postfix(tmp_path, logged):
    h = Harness(tmp_path, max_errors=4, soft_error_limit=0)
    c = h.ehlo()
    c.send("FOO\r\n" * 6)
    c.lose()
    assert lines(logged)[0] == f"too many errors after UNKNOWN from [{FOREIGN}]"


def test_soft_error_delay_and_a_loss_while_sleeping(tmp_path, logged):
    h = Harness(tmp_path, soft_error_limit=2)
    c = h.ehlo()
    assert c.send("FOO\r\n").startswith("500")
    assert c.send("BAR\r\n").startswith("500")
    assert c.send("NOOP\r\n") == ""  # the error delay: nothing executed yet
    h.clock.advance(1)
    assert c.read() == OK
    c.send("RCPT TO:<alice@example.com>\r\n")  # waits again
    c.lose()
    assert lines(logged) == [
        f"lost connection after NOOP from [{FOREIGN}]",  # the RCPT was never read as a command
        f"disconnect from [{FOREIGN}] ehlo=1 noop=1 unknown=0/2 commands=2/4",
    ]


def test_auth_abort_counts_as_failed(tmp_path, logged):
    h = TLSAuthHarness(tmp_path)
    c = h.tls_session()
    assert c.send("AUTH PLAIN\r\n") == "334 \r\n"
    assert c.send("*\r\n").startswith("501 5.7.0")
    assert c.send("AUTH LOGIN\r\n").startswith("334 ")
    c.lose()  # gone in the middle of the exchange
    assert lines(logged) == [
        f"lost connection after AUTH from [{FOREIGN}]",
        f"disconnect from [{FOREIGN}] ehlo=2 starttls=1 auth=0/2 commands=3/5",
    ]


def test_shutdown_421_logs_one_disconnect_and_no_lost_line(h, logged):
    c = h.ehlo()
    c.send("MAIL FROM:<a@b.test>\r\n")
    c.proto.shut_down()
    assert c.read() == f"421 4.3.2 {HOST} Service shutting down, closing transmission channel\r\n"
    c.proto.shut_down()
    c.lose()
    c.lose()  # twice: still one line
    assert lines(logged) == [f"disconnect from [{FOREIGN}] ehlo=1 mail=1 commands=2"]


def test_shutdown_during_data_counts_data_as_failed(h, logged):
    c = h.ehlo()
    send_message(c, b"partial\r\n")
    c.proto.shut_down()
    c.lose()
    assert lines(logged) == [f"disconnect from [{FOREIGN}] ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4"]


def test_half_close_after_pipelined_quit_is_quiet(h, logged):
    c = h.ehlo()
    c.proto.dataReceived(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    c.proto.readConnectionLost()
    assert c.closed
    c.lose()
    assert lines(logged) == [f"disconnect from [{FOREIGN}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"]


def test_half_close_after_mail_is_lost_after_mail_like_postfix(h, logged):
    c = h.ehlo()
    c.proto.dataReceived(b"MAIL FROM:<a@b.test>\r\n")
    c.proto.readConnectionLost()
    assert c.read() == MAIL_OK and c.closed
    c.lose()
    assert lines(logged) == [
        f"lost connection after MAIL from [{FOREIGN}]",
        f"disconnect from [{FOREIGN}] ehlo=1 mail=1 commands=2",
    ]


def test_half_closed_client_that_stops_reading_logs_only_the_timeout(h, logged):
    c = h.ehlo()
    c.proto.pauseProducing()  # its window is full: the replies wait in our buffer
    c.proto.dataReceived(b"NOOP\r\n")
    c.proto.readConnectionLost()
    h.clock.advance(300)
    c.lose()
    assert lines(logged) == [
        f"timeout after EHLO from [{FOREIGN}]",  # the NOOP was never executed (output paused)
        f"disconnect from [{FOREIGN}] ehlo=1 commands=1",
    ]


def test_no_commands_is_0_of_0_like_postfix(h, logged):
    c = h.connect()
    c.lose()
    assert lines(logged)[-1] == f"disconnect from [{FOREIGN}] commands=0/0"


def test_timeout_after_an_accepted_message_names_end_of_message(h, logged):
    c = h.ehlo()
    send_message(c, b"hi\r\n.\r\n")
    h.clock.advance(300)
    c.lose()
    assert lines(logged)[0] == f"timeout after END-OF-MESSAGE from [{FOREIGN}]"


def test_odd_lines_are_counted_as_unknown_and_never_break_the_session(h, logged):
    c = h.ehlo()
    c.send(b"\xff\xfe\r\n")  # not UTF-8
    c.send(b"NO\x00OP\r\n")  # bad characters
    c.send("\u00e9T\u00c9\r\n")
    c.send("etrn x\r\n")
    c.send("x" * 3000 + "\r\n")  # too long: no command read, not counted
    c.send("\r\n")
    c.send("Quit\r\n")
    c.lose()
    [line] = lines(logged)
    assert line.startswith(f"disconnect from [{FOREIGN}] ehlo=1 quit=1 unknown=0/")
    assert "etrn=0/1" in line


def test_random_sessions_always_end_with_exactly_one_disconnect_line(tmp_path, events):
    """Random command streams, pipelined or not, random endings: one disconnect line each, no exception."""
    rnd = random.Random(44)
    h = Harness(tmp_path, max_errors=6, soft_error_limit=3)
    pending = h.hold_commits()
    words = [
        "EHLO x", "HELO x", "MAIL FROM:<a@b.test>", "RCPT TO:<alice@example.com>", "RCPT TO:<no@example.com>",
        "DATA", "hi", ".", "BDAT 3", "BDAT 2 LAST", "RSET", "NOOP", "VRFY alice", "EXPN list", "HELP", "QUIT",
        "AUTH PLAIN", "*", "STARTTLS", "FOO", "", "\u00e9", "MAIL FROM:<\"a>b\"@c>", "RCPT TO:<a@b> x",
    ]
    sessions = 300
    for n in range(sessions):
        c = h.connect(f"192.0.2.{n % 200 + 1}")
        for _ in range(rnd.randint(0, 12)):
            data = "\r\n".join(rnd.choice(words) for _ in range(rnd.randint(1, 4))) + "\r\n"
            c.proto.dataReceived(data.encode())
            if rnd.random() < 0.2:
                h.clock.advance(rnd.choice([1, 1, 301]))
            while pending and rnd.random() < 0.7:
                pending.pop(0).callback(None)
            if c.transport.disconnecting:
                break
        end = rnd.random()
        if end < 0.2:
            c.proto.readConnectionLost()
        elif end < 0.3:
            c.proto.shut_down()
        while pending:
            pending.pop(0).callback(None)
        c.lose()
        if rnd.random() < 0.2:
            c.lose()
    ends = disconnects(events)
    assert len(ends) == sessions
    for e in ends:
        assert formatEvent(e).startswith("disconnect from [")


def test_counts_never_raise_on_any_call_order():
    rnd = random.Random(7)
    for _ in range(2000):
        c = CommandCounts()
        for _ in range(rnd.randint(0, 10)):
            if rnd.random() < 0.5:
                c.replied(rnd.choice([220, 221, 235, 250, 334, 354, 421, 450, 500, 501, 535, 552, 554]))
            else:
                c.start(rnd.choice(["EHLO", "mail", "Data", UNKNOWN, "x\u00e9", "", "AUTH"]))
        c.summary()
        c.as_dict()
        c.ended_quietly()

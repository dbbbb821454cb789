"""
The lines that end an SMTP session in the mail log: "disconnect from" with
what the client did (Postfix's command counts), "lost connection after"
and "timeout after" (mailhub.smtp.stats, mailhub.smtp.server).
"""

from __future__ import annotations

import smtplib

import pytest
from smtpharness import (
    AUTH_FAILED,
    AUTH_OK,
    FOREIGN,
    HOST,
    OK,
    PLAIN,
    PLAIN_WRONG,
    send_message,
    serve_with_auth,
    tls_session,
)
from smtpharness import Harness as BaseHarness
from smtpharness import TwoDomainHarness as Harness

from mailhub.smtp.stats import UNKNOWN, CommandCounts

# -- the counts ---------------------------------------------------------------------------------


def test_counts_successes_per_verb_in_postfix_order():
    c = CommandCounts()
    for verb, code in [("EHLO", 250), ("MAIL", 250), ("rcpt", 550), ("RCPT", 250), ("QUIT", 221)]:
        c.start(verb)
        c.replied(code)
    assert c.summary() == "ehlo=1 mail=1 rcpt=1/2 quit=1 commands=4/5"
    assert c.as_dict() == {"ehlo": [1, 1], "mail": [1, 1], "rcpt": [1, 2], "quit": [1, 1]}
    assert c.ended_quietly()


def test_intermediate_replies_leave_the_verb_pending():
    c = CommandCounts()
    c.start("DATA")
    c.replied(354)
    assert c.summary() == "data=0/1 commands=0/1"
    c.replied(250)  # the reply after the message decides
    c.replied(550)  # later replies belong to no command
    assert c.summary() == "data=1 commands=1"


def test_a_command_without_final_reply_counts_as_given_only():
    c = CommandCounts()
    c.start("EHLO")
    c.replied(250)
    c.start("AUTH")
    c.replied(334)
    assert c.summary() == "ehlo=1 auth=0/1 commands=1/2"
    assert c.last == "AUTH" and not c.ended_quietly()


def test_no_commands():
    c = CommandCounts()
    assert c.summary() == "commands=0/0"
    assert c.last == "CONNECT" and not c.ended_quietly()


def test_order_is_postfixs_then_first_use():
    c = CommandCounts()
    for verb in ["QUIT", UNKNOWN, "ETRN", "RCPT", "HELO"]:
        c.start(verb)
        c.replied(250)
    assert c.summary() == "helo=1 rcpt=1 quit=1 unknown=1 etrn=1 commands=5"


# -- the session's lines ------------------------------------------------------------------------


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def session_lines(logged) -> list[str]:
    return [t for t in logged() if t.startswith(("disconnect from", "lost connection", "timeout after"))]


def test_transaction_then_quit(h, logged):
    c = h.ehlo()
    assert c.send("MAIL FROM:<a@elsewhere.test>\r\n").startswith("250")
    assert c.send("RCPT TO:<nobody@example.com>\r\n").startswith("550")
    assert c.send("RCPT TO:<alice@example.com>\r\n").startswith("250")
    assert c.send("DATA\r\n").startswith("354")
    assert c.send("hello\r\n.\r\n").startswith("250")
    assert c.send("NOOP\r\n") == OK
    assert c.send("FOO\r\n").startswith("500")
    assert c.send("QUIT\r\n").startswith("221")
    c.lose()
    assert session_lines(logged) == [
        f"disconnect from [{FOREIGN}] ehlo=1 mail=1 rcpt=1/2 data=1 noop=1 quit=1 unknown=0/1 commands=6/8"
    ]


def test_client_vanishing_is_a_lost_connection(h, logged, events):
    c = h.ehlo()
    c.send("MAIL FROM:<a@elsewhere.test>\r\n")
    c.lose()
    assert session_lines(logged) == [
        f"lost connection after MAIL from [{FOREIGN}]",
        f"disconnect from [{FOREIGN}] ehlo=1 mail=1 commands=2",
    ]
    disconnect = [e for e in events if e.get("mail_event") == "disconnect"]
    assert disconnect[0]["commands"] == {"ehlo": [1, 1], "mail": [1, 1]}
    assert disconnect[0]["client"] == FOREIGN and disconnect[0]["listener"] == "smtp"


def _leave_during_data(c) -> None:
    send_message(c, b"partial\r\n")


def _half_close(c) -> None:
    c.proto.readConnectionLost()  # the client shut down its sending side, no QUIT
    assert c.closed


def _leave_during_bdat(c) -> None:
    c.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.com>\r\nBDAT 100\r\nabc")


def _leave_after_the_message(c) -> None:
    assert send_message(c, b"hi\r\n.\r\n").startswith("250 2.0.0 Ok: queued")


@pytest.mark.parametrize(
    "leave, lines",
    [
        (_leave_during_data, ["lost connection after DATA (9 bytes)", "ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4"]),
        (_leave_during_bdat, ["lost connection after BDAT (3 bytes)", "ehlo=1 mail=1 rcpt=1 bdat=0/1 commands=3/4"]),
        (_half_close, ["lost connection after EHLO", "ehlo=1 commands=1"]),
        # as Postfix: once the data is all in, leaving loses nothing, so no "lost connection"
        (_leave_after_the_message, [None, "ehlo=1 mail=1 rcpt=1 data=1 commands=4"]),
    ],
)
def test_leaving_without_quit(h, logged, leave, lines):
    c = h.ehlo()
    leave(c)
    c.lose()
    expected = [f"disconnect from [{FOREIGN}] {lines[1]}"]
    if lines[0] is not None:
        expected.insert(0, f"{lines[0]} from [{FOREIGN}]")
    assert session_lines(logged) == expected


def test_timeout(h, logged):
    c = h.ehlo()
    c.send("RSET\r\n")
    h.clock.advance(300)
    assert c.read() == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n"
    c.lose()
    assert session_lines(logged) == [
        f"timeout after RSET from [{FOREIGN}]",
        f"disconnect from [{FOREIGN}] ehlo=1 rset=1 commands=2",
    ]


def test_refused_connection_logs_a_reject_and_no_session_lines(tmp_path, logged, events):
    h = Harness(tmp_path, max_connections=2, max_connections_per_ip=1)
    first = h.connect("192.0.2.1")
    refused = h.connect("192.0.2.1")  # over the per-address limit
    assert refused.closed
    refused.lose()
    second = h.connect("192.0.2.2")
    refused_too = h.connect("192.0.2.3")  # over the total
    assert refused_too.closed
    refused_too.lose()
    rejects = [t for t in logged() if t.startswith("NOQUEUE: reject: CONNECT")]
    assert rejects == [
        "NOQUEUE: reject: CONNECT from [192.0.2.1]: 421 4.7.0 Error: too many connections;"
        " limit=max_connections_per_ip listener=smtp",
        "NOQUEUE: reject: CONNECT from [192.0.2.3]: 421 4.7.0 Error: too many connections;"
        " limit=max_connections listener=smtp",
    ]
    assert [e["reason"] for e in events if e.get("mail_event") == "reject"] == ["too_many_connections"] * 2
    assert session_lines(logged) == []  # no connect line was logged for them either
    first.lose()
    second.lose()
    assert session_lines(logged) == [
        "lost connection after CONNECT from [192.0.2.1]", "disconnect from [192.0.2.1] commands=0/0",
        "lost connection after CONNECT from [192.0.2.2]", "disconnect from [192.0.2.2] commands=0/0",
    ]


def test_auth_counts_by_its_final_reply(tmp_path, logged):
    h = BaseHarness(tmp_path)
    serve_with_auth(h, tmp_path)
    c = tls_session(h)
    c.send(f"AUTH PLAIN {PLAIN_WRONG}\r\nNOOP\r\n")  # the NOOP waits for the delayed failure
    h.clock.advance(1)
    assert c.read() == AUTH_FAILED + OK
    assert c.send("AUTH PLAIN\r\n") == "334 \r\n"
    assert c.send(f"{PLAIN}\r\n") == AUTH_OK
    assert c.send("QUIT\r\n").startswith("221")
    c.lose()
    assert session_lines(logged) == [
        f"disconnect from [{FOREIGN}] ehlo=2 starttls=1 auth=1/2 noop=1 quit=1 commands=6/7"
    ]


def test_daemon_logs_the_disconnect_line(tmp_path):
    """A real daemon, a real client: the line is in the mail log after the session."""
    from daemon import DOMAIN, Daemon, config_text
    from peers import wait_for

    d = Daemon(tmp_path, config_text()).start()
    try:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
            s.ehlo("client.test")
            s.noop()
            s.mail("a@elsewhere.test")
            code, _ = s.rcpt(f"nobody@{DOMAIN}")
            assert code == 550
        wait_for(lambda: "disconnect from [127.0.0.1]" in d.log(), 10, "the disconnect line")
        line = next(l for l in d.log().splitlines() if "disconnect from [127.0.0.1]" in l)
        assert line.endswith("disconnect from [127.0.0.1] ehlo=1 mail=1 rcpt=0/1 noop=1 quit=1 commands=4/5")
        assert "lost connection" not in d.log()
    finally:
        d.stop()

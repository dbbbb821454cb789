"""
Milters in an SMTP session (mailhub.milter.session, mailhub.milter.check),
in memory: what each milter is shown, its verdicts at each stage, its
changes on disk before the 250, and the default action when it fails.
The real milters are in test_e2e_milter.py.
"""

from __future__ import annotations

import struct
from typing import Any

from mailhub.milter import codec
from mailhub.milter.check import MilterCheck
from mailhub.queue import spool as spool_module
from tests.milterfake import FakeMilter, milters, reply, replycode
from tests.smtpharness import Harness, queued_id

MAIL = "MAIL FROM:<sender@elsewhere.test> SIZE=100\r\n"
BODY = b"From: sender@elsewhere.test\r\nSubject: hi\r\nX-Old: 1\r\nX-Old: 2\r\n\r\nhello\r\n.\r\n"


def serve(tmp_path: Any, *fakes: FakeMilter, **kw: Any) -> Harness:
    h = Harness(tmp_path)
    h.serve(milters=milters(h.clock, *fakes, **kw), checks=[MilterCheck()])
    return h


def session(h: Harness) -> Any:
    c = h.connect()
    assert c.send("EHLO client.test\r\n").startswith("250-")
    return c


def deliver(c: Any, body: bytes = BODY, rcpts: tuple[str, ...] = ("alice@example.com",)) -> str:
    assert c.send(MAIL) == "250 2.1.0 Ok\r\n"
    for r in rcpts:
        assert c.send(f"RCPT TO:<{r}>\r\n") == "250 2.1.5 Ok\r\n"
    assert c.send("DATA\r\n").startswith("354")
    return c.send(body)


def test_the_milter_sees_every_stage_with_its_macros(tmp_path) -> None:
    fake = FakeMilter()
    h = serve(tmp_path, fake)
    qid = queued_id(deliver(session(h)))
    commands = fake.commands()
    steps = [c for c in commands if c != codec.MACRO]
    assert steps == [b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"L", b"L", b"L", b"L", b"N", b"B", b"E"]
    seen = dict(fake.seen)
    assert seen[b"C"].startswith(b"[198.51.100.7]\x004")
    assert seen[b"H"] == b"client.test\0"
    assert seen[b"M"] == b"<sender@elsewhere.test>\0SIZE=100\0"
    assert seen[b"R"] == b"<alice@example.com>\0"
    headers = [p for c, p in fake.seen if c == b"L"]
    assert headers[0].startswith(b"Received\0from client.test") and headers[2] == b"Subject\0hi\0"
    assert seen[b"B"] == b"hello\r\n"
    macros = b"".join(p for c, p in fake.seen if c == codec.MACRO)
    for expected in (b"j\0mx.example.com\0", b"{daemon_name}\0smtp\0", b"{client_addr}\x00198.51.100.7\0",
                     b"_\0", b"i\0" + qid.encode() + b"\0"):
        assert expected in macros, expected


def test_steps_negotiated_away_are_not_sent(tmp_path) -> None:
    skip = codec.P_NOHELO | codec.P_NOHDRS | codec.P_NOBODY | codec.P_NR_RCPT | codec.P_NODATA
    fake = FakeMilter(protocol=skip)
    h = serve(tmp_path, fake)
    queued_id(deliver(session(h)))
    steps = [c for c in fake.commands() if c != codec.MACRO]
    assert steps == [b"O", b"C", b"M", b"R", b"N", b"E"]


def test_refusals_at_each_smtp_stage_use_the_milters_reply(tmp_path) -> None:
    fake = FakeMilter(answers={codec.RCPT: [reply(codec.CONTINUE), replycode("550 5.1.1 no such user here")]})
    h = serve(tmp_path, fake)
    c = session(h)
    assert c.send(MAIL) == "250 2.1.0 Ok\r\n"
    assert c.send("RCPT TO:<alice@example.com>\r\n") == "250 2.1.5 Ok\r\n"
    assert c.send("RCPT TO:<bob@example.com>\r\n") == "550 5.1.1 no such user here\r\n"
    assert c.send("DATA\r\n").startswith("354")
    queued_id(c.send(BODY))
    [envelope] = h.queued
    assert [r.address for r in envelope.recipients] == ["alice@example.com"]

    mail_tempfail = FakeMilter(answers={codec.MAIL: [reply(codec.TEMPFAIL)]})
    h = serve(tmp_path / "2", mail_tempfail)
    assert session(h).send(MAIL) == "451 4.7.1 Service unavailable - try again later\r\n"

    connect_reject = FakeMilter(answers={codec.CONNECT: [reply(codec.REJECT)]})
    h = serve(tmp_path / "3", connect_reject)
    c = h.connect()
    assert c.send("EHLO client.test\r\n") == "550 5.7.1 Command rejected\r\n"
    assert c.send(MAIL) == "550 5.7.1 Command rejected\r\n"


def test_end_of_message_changes_are_on_disk_before_the_250(tmp_path) -> None:
    eom = [
        reply(codec.ADDHEADER, b"X-Added\0yes\0"),
        reply(codec.INSHEADER, struct.pack("!I", 0) + b"X-Top\0first\0"),
        reply(codec.CHGHEADER, struct.pack("!I", 2) + b"X-Old\0\0"),  # delete the second X-Old
        reply(codec.CHGHEADER, struct.pack("!I", 1) + b"Subject\0changed\0"),
        reply(codec.REPLBODY, b"new body\nsecond line\n"),
        reply(codec.ADDRCPT, b"<bob@example.com>\0"),
        reply(codec.DELRCPT, b"<alice@example.com>\0"),
        reply(codec.CHGFROM, b"<other@elsewhere.test>\0"),
        reply(codec.CONTINUE),
    ]
    fake = FakeMilter(answers={codec.BODYEOB: [b"".join(eom)]})
    h = serve(tmp_path, fake)
    qid = queued_id(deliver(session(h)))
    raw = h.message(qid)
    assert raw.startswith(b"X-Top: first\r\nReceived: ")
    header, _, body = raw.partition(b"\r\n\r\n")
    assert b"Subject: changed\r\nX-Old: 1\r\nX-Added: yes" in header and b"X-Old: 2" not in header
    assert body == b"new body\r\nsecond line\r\n"
    [envelope] = h.queued
    assert envelope.sender == "other@elsewhere.test"
    assert [r.address for r in envelope.recipients] == ["bob@example.com"]
    assert envelope.esmtp["size"] == len(raw)


def test_a_large_message_is_rewritten_through_a_file(tmp_path, monkeypatch) -> None:
    fake = FakeMilter(answers={codec.BODYEOB: [reply(codec.ADDHEADER, b"X-Seen\0big\0") + reply(codec.ACCEPT)]})
    h = serve(tmp_path, fake)
    line = b"y" * 78 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * (spool_module.MEMORY_LIMIT * 3 // len(line))
    qid = queued_id(deliver(session(h), big + b".\r\n"))
    raw = h.message(qid)
    assert raw.endswith(b"Subject: big\r\nX-Seen: big\r\n\r\n" + big.partition(b"\r\n\r\n")[2])
    body_packets = [p for c, p in fake.seen if c == codec.BODY]
    assert len(body_packets) > 1 and all(len(p) <= codec.CHUNK for p in body_packets)


def test_quarantine_holds_and_discard_drops(tmp_path) -> None:
    fake = FakeMilter(answers={codec.BODYEOB: [reply(codec.QUARANTINE, b"looks odd\0") + reply(codec.CONTINUE)]})
    h = serve(tmp_path, fake)
    queued_id(deliver(session(h)))
    [envelope] = h.queued
    assert envelope.held is True

    fake = FakeMilter(answers={codec.BODYEOB: [reply(codec.DISCARD)]})
    h = serve(tmp_path / "2", fake)
    assert deliver(session(h)).startswith("250 2.0.0 Ok: queued as ")
    assert h.queued == [] and h.spool_is_empty()


def test_a_reject_at_end_of_message_keeps_nothing(tmp_path) -> None:
    fake = FakeMilter(answers={codec.BODYEOB: [replycode("554 5.7.1 Spam message rejected")]})
    h = serve(tmp_path, fake)
    assert deliver(session(h)) == "554 5.7.1 Spam message rejected\r\n"
    assert h.queued == [] and h.spool_is_empty()


def test_a_milter_dying_mid_message_gets_the_default_action_for_that_message_only(tmp_path) -> None:
    fake = FakeMilter(answers={codec.BODY: ["close", reply(codec.CONTINUE)]})
    h = serve(tmp_path, fake)
    c = session(h)
    assert deliver(c) == "451 4.7.1 Service unavailable - try again later\r\n"
    assert h.spool_is_empty()
    queued_id(deliver(c))  # the next message: a new conversation
    assert len(fake.connections) == 2


def test_default_actions_when_the_milter_is_down(tmp_path) -> None:
    for action, expected in (("accept", "250 2.1.0 Ok\r\n"), ("reject", "550 5.7.1 Command rejected\r\n"),
                             ("tempfail", "451 4.7.1 Service unavailable - try again later\r\n")):
        fake = FakeMilter()
        fake.refuse = True
        h = serve(tmp_path / action, fake, default_action=action)
        c = h.connect()
        c.send("EHLO client.test\r\n")
        assert c.send(MAIL) == expected, action


def test_a_silent_milter_times_out_and_other_sessions_go_on(tmp_path) -> None:
    fake = FakeMilter(answers={codec.BODYEOB: [None]})
    h = serve(tmp_path, fake, content_timeout=60.0)
    c = session(h)
    assert deliver(c) == ""  # waiting for the milter
    other = h.connect()
    assert other.send("NOOP\r\n") == "250 2.0.0 Ok\r\n"
    h.clock.advance(60)
    assert c.read() == "451 4.7.1 Service unavailable - try again later\r\n"
    assert h.spool_is_empty()


def test_a_broken_reply_gets_the_default_action_and_a_log_line(tmp_path, logged) -> None:
    fake = FakeMilter(answers={codec.MAIL: [struct.pack("!I", 1 << 30) + b"c"]})
    h = serve(tmp_path, fake, default_action="reject")
    assert session(h).send(MAIL) == "550 5.7.1 Command rejected\r\n"
    assert any("packet length" in line and "default action reject" in line for line in logged())


def test_a_milter_that_closed_between_messages_is_reconnected_at_the_next_mail(tmp_path) -> None:
    fake = FakeMilter()
    h = serve(tmp_path, fake)
    c = session(h)
    queued_id(deliver(c))
    first = fake.connections[0]
    first.protocol.connectionLost(None)  # the milter went away while the session was idle
    queued_id(deliver(c))
    assert len(fake.connections) == 2
    commands = [cmd for cmd in fake.commands() if cmd != codec.MACRO]
    second = commands[commands.index(codec.OPTNEG, 1) :]
    assert second[:4] == [codec.OPTNEG, codec.CONNECT, codec.HELO, codec.MAIL]


def test_too_many_or_too_large_changes_get_the_default_action(tmp_path) -> None:
    huge = reply(codec.ADDHEADER, b"X-Big\0" + b"v" * 600_000 + b"\0")
    fake = FakeMilter(answers={codec.BODYEOB: [huge + huge + reply(codec.CONTINUE)]})
    h = serve(tmp_path, fake)
    assert deliver(session(h)) == "451 4.7.1 Service unavailable - try again later\r\n"
    assert h.spool_is_empty()
    bare_cr = FakeMilter(answers={codec.BODYEOB: [reply(codec.ADDHEADER, b"X-Cr\0a\rb\0") + reply(codec.CONTINUE)]})
    h = serve(tmp_path / "2", bare_cr)
    qid = queued_id(deliver(session(h)))
    assert b"X-Cr: a b\r\n" in h.message(qid)


def test_an_authenticated_submission_shows_the_user_and_the_listener(tmp_path) -> None:
    from tests.smtpharness import AUTH_PASSWORD, AUTH_USER, b64, serve_with_auth, tls_session

    fake = FakeMilter()
    h = Harness(tmp_path)
    serve_with_auth(h, tmp_path, listener="submission", milters=milters(h.clock, fake), checks=[MilterCheck()])
    c = tls_session(h)
    assert c.send(f"AUTH PLAIN {b64(chr(0) + AUTH_USER + chr(0) + AUTH_PASSWORD)}\r\n").startswith("235")
    assert c.send(f"MAIL FROM:<{AUTH_USER}>\r\n") == "250 2.1.0 Ok\r\n"
    macros = b"".join(p for cmd, p in fake.seen if cmd == codec.MACRO)
    assert b"{auth_authen}\0" + AUTH_USER.encode() + b"\0" in macros
    assert b"{daemon_name}\0submission\0" in macros
    assert b"{tls_version}\0" in macros

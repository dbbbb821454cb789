"""
A hostile milter against an SMTP session (in memory, tests/milterfake.py):
header fields with CR, LF or NUL, replacement bodies that try to end the
message early, floods of recipients, invalid senders, replies out of
order, and a milter that says "in progress" for ever.  Whatever it sends,
the session answers, the process goes on, and the stored message is one
the relay's dot-stuffing cannot be tricked by.
"""

from __future__ import annotations

import struct
from typing import Any

from mailhub.milter import codec
from mailhub.milter.check import MilterCheck
from mailhub.relay.dotstuff import stuff
from tests.milterfake import FakeMilter, milters, reply
from tests.smtpharness import Harness, queued_id

MAIL = "MAIL FROM:<sender@elsewhere.test> SIZE=100\r\n"
BODY = b"From: sender@elsewhere.test\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"

TEMPFAIL = "451 4.7.1 Service unavailable - try again later\r\n"


def serve(tmp_path: Any, *fakes: FakeMilter, **kw: Any) -> Harness:
    h = Harness(tmp_path)
    h.serve(milters=milters(h.clock, *fakes, **kw), checks=[MilterCheck()])
    return h


def session(h: Harness) -> Any:
    c = h.connect()
    assert c.send("EHLO client.test\r\n").startswith("250-")
    return c


def deliver(c: Any, body: bytes = BODY) -> str:
    assert c.send(MAIL) == "250 2.1.0 Ok\r\n"
    assert c.send("RCPT TO:<alice@example.com>\r\n") == "250 2.1.5 Ok\r\n"
    assert c.send("DATA\r\n").startswith("354")
    return c.send(body)


def eom(*packets: bytes) -> FakeMilter:
    return FakeMilter(answers={codec.BODYEOB: [b"".join([*packets, reply(codec.CONTINUE)])]})


def only_crlf(raw: bytes) -> bool:
    return raw.count(b"\r") == raw.count(b"\r\n") == raw.count(b"\n")


def stored(tmp_path: Any, fake: FakeMilter) -> tuple[bytes, Any]:
    h = serve(tmp_path, fake)
    qid = queued_id(deliver(session(h)))
    [envelope] = h.queued
    return h.message(qid), envelope


def test_header_values_with_cr_lf_and_nul_stay_inside_their_field(tmp_path) -> None:
    raw, _ = stored(tmp_path, eom(
        reply(codec.ADDHEADER, b"X-A\0one\r\n\r\nBcc: evil@example.net\0"),
        reply(codec.ADDHEADER, b"X-B\0two\n.\nMAIL FROM:<x@y>\0"),
        reply(codec.ADDHEADER, b"X-C\0th\rree\0"),
        reply(codec.CHGHEADER, struct.pack("!I", 1) + b"Subject\0\r\n\r\nbody\0"),
    ))
    header, _, body = raw.partition(b"\r\n\r\n")
    assert body == b"hello\r\n"
    assert only_crlf(raw) and b"\0" not in raw
    assert b"X-A: one\r\n\tBcc: evil@example.net\r\n" in header
    assert b"X-B: two\r\n\t.\r\n\tMAIL FROM:<x@y>\r\n" in header
    assert header.endswith(b"\r\nX-C: th ree")
    assert all(line[:1] in (b" ", b"\t") or b":" in line for line in header.split(b"\r\n"))


def test_a_replacement_body_cannot_end_the_message_early(tmp_path) -> None:
    evil = b"line\n.\nMAIL FROM:<x@y>\r\n.\r\nRCPT\r.\rbare cr\rend"
    raw, envelope = stored(tmp_path, eom(reply(codec.REPLBODY, evil)))
    body = raw.partition(b"\r\n\r\n")[2]
    assert body == b"line\r\n.\r\nMAIL FROM:<x@y>\r\n.\r\nRCPT\r\n.\r\nbare cr\r\nend\r\n"
    # what local delivery relies on (esmtp crlf) and what the relay sends
    assert only_crlf(raw)
    assert envelope.esmtp.get("crlf") in (None, True)
    wire = stuff(raw)
    assert wire.endswith(b"\r\nend\r\n.\r\n") and wire.count(b"\r\n.\r\n") == 1


def test_a_replacement_body_split_at_a_cr_stays_whole(tmp_path) -> None:
    raw, _ = stored(tmp_path, eom(reply(codec.REPLBODY, b"a\r"), reply(codec.REPLBODY, b"\nb\r"),
                                   reply(codec.REPLBODY, b"c")))
    assert raw.partition(b"\r\n\r\n")[2] == b"a\r\nb\r\nc\r\n"


def test_ten_thousand_added_recipients_get_the_default_action(tmp_path) -> None:
    flood = [reply(codec.ADDRCPT, f"<r{n}@example.org>\0".encode()) for n in range(10_000)]
    h = serve(tmp_path, eom(*flood))
    c = session(h)
    assert deliver(c) == TEMPFAIL
    assert h.spool_is_empty()
    assert c.send("RSET\r\n").startswith("250")


def test_an_invalid_sender_or_recipient_from_a_milter_is_ignored(tmp_path) -> None:
    raw, envelope = stored(tmp_path, eom(
        reply(codec.CHGFROM, b"<a@b>\r\nRCPT TO:<evil@example.net>\0"),
        reply(codec.CHGFROM, b"<not an address>\0"),
        reply(codec.ADDRCPT, b"<x@y\r\nz>\0"),
        reply(codec.ADDRCPT, b"<" + b"l" * 300 + b"@example.org>\0"),
    ))
    assert envelope.sender == "sender@elsewhere.test"
    assert [r.address for r in envelope.recipients] == ["alice@example.com"]


def test_modifications_and_replies_out_of_order_break_the_milter_not_the_session(tmp_path) -> None:
    for n, answers in enumerate([
        {codec.RCPT: [reply(codec.ADDHEADER, b"X-Early\0x\0") + reply(codec.CONTINUE)]},  # change before EOM
        {codec.MAIL: [reply(codec.CONTINUE) + reply(codec.CONTINUE)]},  # two answers to one command
        {codec.HELO: [reply(codec.OPTNEG, b"\0" * 12)]},  # a negotiation answer to HELO
        {codec.BODYEOB: [reply(codec.ACCEPT) + reply(codec.ADDHEADER, b"X-Late\0x\0")]},  # after the verdict
        {codec.BODYEOB: [struct.pack("!I", 0xFFFFFFFF) + b"b"]},
        {codec.BODYEOB: [struct.pack("!I", 0)]},
    ]):
        h = serve(tmp_path / str(n), FakeMilter(answers=answers))
        c = h.connect()
        c.send("EHLO client.test\r\n")
        first = c.send(MAIL)
        if first == "250 2.1.0 Ok\r\n":
            c.send("RCPT TO:<alice@example.com>\r\n")
            c.send("DATA\r\n")
            c.send(BODY)
        assert c.send("RSET\r\n").startswith("250"), n
        assert c.send("MAIL FROM:<sender@elsewhere.test>\r\n").startswith(("250", "451")), n
        assert all(b"X-Early" not in h.message(e.queue_id) for e in h.queued), n


def test_progress_for_ever_is_cut_off(tmp_path) -> None:
    progress = reply(codec.PROGRESS)
    fake = FakeMilter(answers={codec.BODYEOB: [progress]})
    h = serve(tmp_path, fake, content_timeout=300.0)
    c = session(h)
    assert deliver(c) == ""
    start = h.clock.seconds()
    answer = ""
    for _ in range(12):  # 12 x 100 s of "in progress", each well within content_timeout
        h.clock.advance(100)
        conv_proto = fake.connections[-1].protocol
        if conv_proto.connected_:
            conv_proto.dataReceived(progress)
        answer += c.read()
        if answer:
            break
    assert answer == TEMPFAIL
    assert h.clock.seconds() - start == 600  # MAX_PROGRESS_WAIT, though each wait was shorter
    assert h.spool_is_empty()


def test_a_hung_milter_gets_its_default_action_not_the_sessions_idle_timeout(tmp_path) -> None:
    fake = FakeMilter(answers={codec.BODYEOB: [None]})
    h = serve(tmp_path, fake, default_action="accept")  # content_timeout 300 s = server.timeout
    c = session(h)
    assert deliver(c) == ""
    h.clock.advance(299)
    assert c.read() == ""
    h.clock.advance(2)
    queued_id(c.read())  # the milter's default action, not "421 4.4.2 ... timeout exceeded"
    assert len(h.queued) == 1


def test_a_message_whose_client_left_during_the_milter_is_not_queued(tmp_path) -> None:
    fake = FakeMilter(answers={codec.BODYEOB: [None]})
    h = serve(tmp_path, fake, default_action="accept", content_timeout=60.0)
    c = session(h)
    assert deliver(c) == ""
    c.lose()
    h.clock.advance(61)
    assert h.queued == [] and h.spool_is_empty()  # never told 250: the client sends it again


def test_a_421_from_a_milter_at_end_of_message_closes_the_session(tmp_path) -> None:
    from tests.milterfake import replycode

    h = serve(tmp_path, FakeMilter(answers={codec.BODYEOB: [replycode("421 4.7.0 closing now")]}))
    c = session(h)
    assert deliver(c) == "421 4.7.0 closing now\r\n"
    assert c.closed and h.spool_is_empty()


def test_a_rewrite_that_fails_on_disk_is_a_temporary_error(tmp_path, monkeypatch) -> None:
    from mailhub.queue.spool import SpoolWriter

    def full(self: Any, chunks: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SpoolWriter, "rewrite", full)
    h = serve(tmp_path, eom(reply(codec.ADDHEADER, b"X-A\0b\0")))
    c = session(h)
    answer = deliver(c)
    assert answer.startswith("451 "), answer
    assert h.spool_is_empty()
    assert c.send("RSET\r\n").startswith("250")

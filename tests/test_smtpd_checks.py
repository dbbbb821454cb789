"""
The end-of-data stage (mailhub.smtp.checks): checks run in order between
the end of the data and the commit; they refuse, prepend header fields,
add mail-log fields or change the envelope, and the 250 still means the
message as they left it is on disk.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher

from mailhub.queue import spool as spool_module
from mailhub.smtp.checks import CHECK_FAILED, StagedMessage
from mailhub.smtp.proto import Reply
from tests.smtpharness import Harness, queued_id, send_message

BODY = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


class Recorder:
    """A check that records what it saw and answers as told."""

    def __init__(self, name: str, answer: Any = None, prepend: bytes = b"", fields: dict | None = None) -> None:
        self.name = name
        self.answer = answer
        self.prepend = prepend
        self.fields = fields or {}
        self.seen: list[tuple[bytes, bool, str]] = []

    def check(self, message: StagedMessage) -> Any:
        self.seen.append((message.header_section(), message.trusted, message.client["addr"]))
        if self.prepend:
            message.prepend(self.prepend)
        message.log_fields.update(self.fields)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def serve(tmp_path: Any, *checks: Any) -> Harness:
    h = Harness(tmp_path)
    h.serve(checks=list(checks))
    return h


def test_checks_see_the_header_section_and_the_client(tmp_path) -> None:
    one = Recorder("one")
    h = serve(tmp_path, one)
    c = h.connect()
    c.send("EHLO client.test\r\n")
    queued_id(send_message(c, BODY))
    [(header, trusted, addr)] = one.seen
    assert header.startswith(b"Received: ") and header.endswith(b"Subject: hi\r\n\r\n")
    assert trusted is False and addr == "198.51.100.7"


def test_prepended_fields_are_on_disk_above_our_received_header(tmp_path) -> None:
    h = serve(tmp_path, Recorder("a", prepend=b"X-First: 1\r\n"), Recorder("b", prepend=b"X-Second: 2\r\n"))
    c = h.connect()
    c.send("EHLO client.test\r\n")
    qid = queued_id(send_message(c, BODY))
    raw = h.message(qid)
    assert raw.startswith(b"X-Second: 2\r\nX-First: 1\r\nReceived: ")
    assert raw.endswith(b"Subject: hi\r\n\r\nhello\r\n")
    [envelope] = h.queued
    assert envelope.esmtp["size"] == len(raw)


def test_prepending_to_a_message_kept_on_disk_while_received(tmp_path) -> None:
    h = serve(tmp_path, Recorder("a", prepend=b"X-Checked: yes\r\n"))
    c = h.connect()
    c.send("EHLO client.test\r\n")
    content = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n"
    lines = content * (spool_module.MEMORY_LIMIT // len(content) * 2)
    qid = queued_id(send_message(c, lines + b".\r\n"))
    raw = h.message(qid)
    assert raw.startswith(b"X-Checked: yes\r\nReceived: ")
    assert raw.endswith(lines)
    assert h.queued[0].esmtp["size"] == len(raw)
    assert os.listdir(os.path.join(h.spool.path, "tmp")) == []


def test_the_first_refusal_stops_the_checks_and_nothing_is_queued(tmp_path) -> None:
    refuse = Recorder("refuse", answer=Reply(550, "5.7.1", "Message refused by policy"))
    after = Recorder("after")
    h = serve(tmp_path, refuse, after)
    c = h.connect()
    c.send("EHLO client.test\r\n")
    assert send_message(c, BODY) == "550 5.7.1 Message refused by policy\r\n"
    assert after.seen == [] and h.queued == [] and h.spool_is_empty()
    # the session goes on: the next message is read and checked again
    assert send_message(c, BODY) == "550 5.7.1 Message refused by policy\r\n"
    assert len(refuse.seen) == 2 and h.spool_is_empty()


def test_a_check_that_raises_is_a_temporary_failure(tmp_path) -> None:
    errors: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_level") == LogLevel.critical:
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        h = serve(tmp_path, Recorder("broken", answer=RuntimeError("boom")))
        c = h.connect()
        c.send("EHLO client.test\r\n")
        reply = send_message(c, BODY)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert reply == f"{CHECK_FAILED.code} {CHECK_FAILED.enhanced} {CHECK_FAILED.text}\r\n"
    assert reply.startswith("451 4.3.0") and h.queued == [] and h.spool_is_empty()
    assert errors and "broken" in str(errors[0].get("name"))


def test_an_asynchronous_check_holds_the_reply_until_it_answers(tmp_path) -> None:
    pending: defer.Deferred = defer.Deferred()
    h = serve(tmp_path, Recorder("slow", answer=pending))
    c = h.connect()
    c.send("EHLO client.test\r\n")
    assert send_message(c, BODY) == ""
    assert c.send("NOOP\r\n") == ""  # no command is read while the message is being checked
    pending.callback(None)
    reply = c.read()
    assert reply.startswith("250 2.0.0 Ok: queued as ") and reply.endswith("250 2.0.0 Ok\r\n")
    assert len(h.queued) == 1


def test_log_fields_reach_the_accepted_line(tmp_path) -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = serve(tmp_path, Recorder("auth", fields={"spf": "pass", "dkim": "none"}))
        c = h.connect()
        c.send("EHLO client.test\r\n")
        queued_id(send_message(c, BODY))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [accepted] = [e for e in events if e.get("mail_event") == "accepted" or e.get("event") == "accepted"]
    text = accepted["log_format"].format(**accepted)
    assert text.endswith(" spf=pass dkim=none")


def test_trusted_clients_are_marked(tmp_path) -> None:
    one = Recorder("one")
    h = serve(tmp_path, one)
    c = h.connect("127.0.0.1")
    c.send("EHLO client.test\r\n")
    queued_id(send_message(c, BODY))
    assert one.seen[0][1] is True

"""
DSN tests: every field is parsed back with Python's email package.
"""

from __future__ import annotations

import email
import email.policy
from email.utils import parsedate_to_datetime

import pytest

from mailhub.envelope import FAILED, PENDING, Envelope, Recipient
from mailhub.queue.notices import FULL_LIMIT, HEADERS_LIMIT, make_dsn
from mailhub.queue.queuefile import queue_file_bytes

ORIGINAL = (
    b"Received: from client\r\n\tby mx\r\nFrom: Alice <alice@example.com>\r\n"
    b"Subject: lunch\r\nMessage-ID: <orig@example.com>\r\n\r\nsecret body line\r\n"
)
NOW = 1_700_000_000.0


def rcpt(address="bob@example.org", **kw) -> Recipient:
    defaults = dict(state=FAILED, attempts=2, last_code=550, last_status="5.1.1", last_text="user unknown", last_attempt=NOW)
    defaults.update(kw)
    return Recipient(address, **defaults)


def env(recipients, sender="alice@example.com", **kw) -> Envelope:
    return Envelope("0ABCDEFGHJK123456", sender, recipients, arrival=NOW - 3600, **kw)


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def blocks(msg):
    part = msg.get_payload()[1]
    return [dict(b.items()) for b in part.get_payload()]


def test_failed_dsn_fields():
    r = rcpt(original="b@example.org", remote_mta="mx.example.org")
    raw = make_dsn(env([r]), [r], ORIGINAL, "mail.example.com", NOW)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = parse(raw)
    assert not msg.defects
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.com>"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] == "<0ABCDEFGHJK123456.1700000000000000.failed@mail.example.com>"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    human = parts[0].get_content()
    assert human.startswith("This is the mail system at host mail.example.com.")
    assert "<bob@example.org> (expanded from <b@example.org>): host mx.example.org said: 550 5.1.1 user unknown" in human
    per_msg, per_rcpt = blocks(msg)
    assert per_msg == {
        "Reporting-MTA": "dns; mail.example.com",
        "X-Mailhub-Queue-ID": "0ABCDEFGHJK123456",
        "X-Mailhub-Sender": "rfc822; alice@example.com",
        "Arrival-Date": "Tue, 14 Nov 2023 21:13:20 +0000",
    }
    assert per_rcpt == {
        "Original-Recipient": "rfc822; b@example.org",
        "Final-Recipient": "rfc822; bob@example.org",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.org",
        "Diagnostic-Code": "smtp; 550 5.1.1 user unknown",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
    }
    headers = parts[2].get_payload()
    assert "Subject: lunch" in headers and "Message-ID: <orig@example.com>" in headers
    assert "secret body line" not in headers


def test_several_recipients_and_no_original_recipient_when_same():
    a = rcpt("a@example.org")
    b = rcpt("b@example.org", last_code=552, last_status="5.2.2", last_text="mailbox full")
    msg = parse(make_dsn(env([a, b]), [a, b], ORIGINAL, "h", NOW))
    _, ra, rb = blocks(msg)
    assert "Original-Recipient" not in ra and "Remote-MTA" not in ra
    assert rb["Final-Recipient"] == "rfc822; b@example.org"
    assert rb["Diagnostic-Code"] == "smtp; 552 5.2.2 mailbox full"


def test_delayed_dsn():
    r = rcpt(state=PENDING, last_code=451, last_status="4.2.0", last_text="busy")
    raw = make_dsn(env([r]), [r], ORIGINAL, "h.example", NOW, "delayed", retry_until=NOW + 86400)
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, per = blocks(msg)
    assert per["Action"] == "delayed" and per["Status"] == "4.2.0"
    assert per["Will-Retry-Until"] == "Wed, 15 Nov 2023 22:13:20 +0000"
    assert "THIS IS A WARNING ONLY" in msg.get_payload()[0].get_content()
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_unknown_action_refused():
    with pytest.raises(ValueError):
        make_dsn(env([rcpt()]), [rcpt()], ORIGINAL, "h", NOW, "expanded")


def test_expired_recipient_text():
    r = rcpt(last_code=451, last_status="4.4.7", last_text="4.2.0 mailbox busy")
    msg = parse(make_dsn(env([r]), [r], ORIGINAL, "h", NOW))
    _, per = blocks(msg)
    assert per["Status"] == "4.4.7"
    assert per["Diagnostic-Code"] == "smtp; 451 4.2.0 mailbox busy"
    assert "delivery time expired; last error: 4.2.0 mailbox busy" in msg.get_payload()[0].get_content()


def test_local_error_without_code():
    r = rcpt(last_code=0, last_status="5.0.0", last_text="mailbox is a file")
    _, per = blocks(parse(make_dsn(env([r]), [r], ORIGINAL, "h", NOW)))
    assert per["Diagnostic-Code"] == "X-Mailhub; mailbox is a file"


def test_ret_full_returns_the_message():
    r = rcpt()
    msg = parse(make_dsn(env([r], esmtp={"ret": "FULL"}), [r], ORIGINAL, "h", NOW))
    part = msg.get_payload()[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_payload()[0]
    assert inner["Subject"] == "lunch"
    assert inner.get_content().strip() == "secret body line"


def test_ret_full_too_big_returns_headers_only():
    r = rcpt()
    big = ORIGINAL + b"x" * (FULL_LIMIT + 10) + b"\r\n"
    msg = parse(make_dsn(env([r], esmtp={"ret": "FULL"}), [r], big, "h", NOW))
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_original_from_file_path_and_bare_lf(tmp_path):
    path = tmp_path / "msg"  # a queue file: the message, then envelope and footer
    r = rcpt()
    path.write_bytes(queue_file_bytes(b"Subject: from file\nX-A: 1\n\nbody\n", env([r])))
    raw = make_dsn(env([r]), [r], str(path), "h", NOW)
    assert b"Subject: from file\r\nX-A: 1\r\n" in raw
    assert b"body" not in raw.split(b"text/rfc822-headers")[1]


def test_missing_original_still_gives_a_dsn(tmp_path):
    r = rcpt()
    msg = parse(make_dsn(env([r]), [r], str(tmp_path / "gone"), "h", NOW))
    assert "original message unavailable" in msg.get_payload()[2].get_payload()


def test_huge_header_block_is_bounded():
    r = rcpt()
    original = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 60) for i in range(5000)) + b"\r\nbody\r\n"
    raw = make_dsn(env([r]), [r], original, "h", NOW)
    assert len(raw) < HEADERS_LIMIT + 8000
    headers = parse(raw).get_payload()[2].get_payload()
    assert headers.endswith("\n") and "X-Filler-000000" in headers


def test_no_header_injection():
    r = rcpt(last_text="bad\r\nBcc: victim@example.net\r\n\r\nx")
    raw = make_dsn(env([r]), [r], ORIGINAL, "h", NOW)
    msg = parse(raw)
    assert msg["Bcc"] is None
    _, per = blocks(msg)
    assert per["Diagnostic-Code"] == "smtp; 550 5.1.1 bad Bcc: victim@example.net x"
    assert "Bcc" not in per


def test_utf8_addresses_use_rfc6533():
    r = rcpt("jösé@exämple.org", original="jösé@exämple.org")
    raw = make_dsn(env([r], sender="ålice@example.com"), [r], ORIGINAL, "h", NOW)
    msg = parse(raw)
    assert msg["To"] == "ålice@example.com"
    status = msg.get_payload()[1]
    assert status.get_content_type() == "message/global-delivery-status"
    text = status.as_bytes().decode("utf-8")
    assert "Final-Recipient: utf-8; jösé@exämple.org" in text
    assert "X-Mailhub-Sender: utf-8; ålice@example.com" in text


def test_boundary_not_in_content():
    r = rcpt()
    first = make_dsn(env([r]), [r], ORIGINAL, "h", NOW)
    boundary = parse(first).get_boundary()
    tricky = b"Subject: --" + boundary.encode() + b"\r\n\r\nx\r\n"
    msg = parse(make_dsn(env([r]), [r], tricky, "h", NOW))
    assert msg.get_boundary() != boundary
    assert len(msg.get_payload()) == 3


# -- success notices, ENVID, ORCPT -----------------------------------------------------


def ok(address="bob@example.org", **kw) -> Recipient:
    defaults = dict(state="delivered", attempts=1, last_code=250, last_status="2.0.0",
                    last_text="delivered to maildir", last_attempt=NOW, notify=["SUCCESS"])
    defaults.update(kw)
    return Recipient(address, **defaults)


def test_success_dsn_mixed_delivered_and_relayed():
    mta = "mx.example.net[192.0.2.1]:25"
    a = ok("a@example.org", orcpt="rfc822;a-orig@example.org")
    b = ok("b@far.example", remote_mta=mta,
           last_text=f"host {mta} said: 250 2.0.0 Ok: queued as 9 (in reply to end of DATA command)")
    raw = make_dsn(env([a, b], esmtp={"envid": "ENV.1", "ret": "FULL"}), [a, b], ORIGINAL, "h.example", NOW,
                   "delivered", actions={"b@far.example": "relayed"})
    msg = parse(raw)
    assert not msg.defects
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert msg["Message-ID"] == "<0ABCDEFGHJK123456.1700000000000000.delivered@h.example>"
    per_msg, ra, rb = blocks(msg)
    assert per_msg["Original-Envelope-Id"] == "ENV.1"
    assert ra == {
        "Original-Recipient": "rfc822; a-orig@example.org",
        "Final-Recipient": "rfc822; a@example.org",
        "Action": "delivered",
        "Status": "2.0.0",
        "Diagnostic-Code": "smtp; 250 2.0.0 delivered to maildir",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
    }
    assert rb["Action"] == "relayed" and rb["Status"] == "2.0.0"
    assert rb["Remote-MTA"] == "dns; mx.example.net"  # the host name only (RFC 3464 2.3.5, as Postfix)
    assert rb["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 9"
    assert "Will-Retry-Until" not in rb
    human = msg.get_payload()[0].get_content()
    assert "Your message was successfully delivered" in human
    assert "<a@example.org>: delivered: delivered to maildir" in human
    assert "<b@far.example>: relayed to a host that does not support delivery notifications" in human
    # RET=FULL applies to failure reports only
    part = msg.get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers" and part["Content-Description"] == "Message Headers"
    assert "secret body line" not in part.get_payload()


def test_orcpt_is_the_original_recipient_not_doubled():
    r = rcpt(original="team@example.org", orcpt="rfc822;Team@Example.org")
    _, per = blocks(parse(make_dsn(env([r]), [r], ORIGINAL, "h", NOW)))
    assert per["Original-Recipient"] == "rfc822; Team@Example.org"
    r = rcpt(orcpt="utf-8;jösé@exämple.org")
    msg = parse(make_dsn(env([r]), [r], ORIGINAL, "h", NOW))
    assert msg.get_payload()[1].get_content_type() == "message/global-delivery-status"
    assert "Original-Recipient: utf-8; jösé@exämple.org" in msg.get_payload()[1].as_bytes().decode("utf-8")


def test_remote_reply_text_not_repeated():
    mta = "mx.example.org[192.0.2.9]:25"
    r = rcpt(remote_mta=mta, last_text=f"host {mta} said: 550 no such user (in reply to RCPT TO command)")
    msg = parse(make_dsn(env([r]), [r], ORIGINAL, "h", NOW))
    _, per = blocks(msg)
    assert per["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    human = msg.get_payload()[0].get_content()
    assert f"<bob@example.org>: host {mta} said: 550 no such user (in reply to RCPT TO command)" in human.splitlines()


def test_delayed_dsn_returns_headers_even_for_ret_full():
    r = rcpt(state=PENDING, last_code=451, last_status="4.2.0", last_text="busy")
    msg = parse(make_dsn(env([r], esmtp={"ret": "FULL", "envid": "W"}), [r], ORIGINAL, "h", NOW, "delayed"))
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert blocks(msg)[0]["Original-Envelope-Id"] == "W"


def test_unknown_per_recipient_action_refused():
    with pytest.raises(ValueError):
        make_dsn(env([ok()]), [ok()], ORIGINAL, "h", NOW, "delivered", actions={"bob@example.org": "expanded"})


# -- failures no server replied to ---------------------------------------------------------

REFUSED = "connect to mx.example.org[192.0.2.1]:25: Connection refused"


def test_refused_connection_delay_notice_names_no_remote_mta():
    r = rcpt(state=PENDING, last_code=0, last_status="4.4.1", last_text=REFUSED, remote_mta="")
    msg = parse(make_dsn(env([r]), [r], ORIGINAL, "h", NOW, "delayed", retry_until=NOW + 86400))
    assert f"\n<bob@example.org>: {REFUSED}\n" in msg.get_payload()[0].get_content().replace("\r\n", "\n")
    _, per = blocks(msg)
    assert per["Status"] == "4.4.1"
    assert per["Diagnostic-Code"] == f"X-Mailhub; {REFUSED}"
    assert "Remote-MTA" not in per


def test_lost_connection_names_no_remote_mta_and_no_reply():
    lost = "lost connection with mx.example.org[192.0.2.1]:25 while receiving the initial server greeting"
    r = rcpt(last_code=0, last_status="4.4.2", last_text=lost, remote_mta="mx.example.org[192.0.2.1]:25")
    msg = parse(make_dsn(env([r]), [r], ORIGINAL, "h", NOW))
    assert f"\n<bob@example.org>: {lost}\n" in msg.get_payload()[0].get_content().replace("\r\n", "\n")
    _, per = blocks(msg)
    assert per["Diagnostic-Code"] == f"X-Mailhub; {lost}"
    assert "Remote-MTA" not in per


def test_tls_failure_bounce_text():
    text = "TLS: certificate of mx.example.org does not match its name (DNS name mx.example.org)"
    r = rcpt(last_code=0, last_status="4.7.5", last_text=text, remote_mta="mx.example.org[192.0.2.1]:25")
    msg = parse(make_dsn(env([r]), [r], ORIGINAL, "h", NOW))
    assert f"\n<bob@example.org>: {text}\n" in msg.get_payload()[0].get_content().replace("\r\n", "\n")
    assert "Remote-MTA" not in blocks(msg)[1]


# -- what the text says is attached ----------------------------------------------------------


def test_bounce_with_headers_says_the_headers_are_attached():
    r = rcpt(remote_mta="mx.example.org[192.0.2.1]:25",
             last_text="host mx.example.org[192.0.2.1]:25 said: 550 5.1.1 user unknown (in reply to RCPT TO command)")
    for esmtp in ({}, {"ret": "HDRS"}):
        msg = parse(make_dsn(env([r], esmtp=esmtp), [r], ORIGINAL, "h", NOW))
        human = msg.get_payload()[0].get_content().replace("\r\n", "\n")
        assert "be delivered to one or more recipients. The message headers\nare attached.\n" in human
        assert "attached below" not in human and "returned message" not in human
        assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_bounce_with_ret_full_says_the_message_is_attached():
    r = rcpt()
    msg = parse(make_dsn(env([r], esmtp={"ret": "FULL"}), [r], ORIGINAL, "h", NOW))
    human = msg.get_payload()[0].get_content().replace("\r\n", "\n")
    assert "be delivered to one or more recipients. The original message\nis attached.\n" in human
    assert msg.get_payload()[2].get_content_type() == "message/rfc822"


def test_ret_full_too_large_says_the_headers_are_attached():
    r = rcpt()
    big = ORIGINAL + b"x" * (FULL_LIMIT + 10) + b"\r\n"
    msg = parse(make_dsn(env([r], esmtp={"ret": "FULL"}), [r], big, "h", NOW))
    assert "The message headers\nare attached." in msg.get_payload()[0].get_content().replace("\r\n", "\n")
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"

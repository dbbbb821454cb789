"""
The mail events the history needs are emitted where they happen: a wrong
password in AUTH is an C{auth_failed} mail event (client and mechanism,
never the user name), an accepted message names its recipients
(C{rcpts}), and the history makes rows of both.
"""

from __future__ import annotations

from smtpharness import FOREIGN, Harness, send_message
from tlsauthharness import USER, TLSAuthHarness, b64

from mailhub.history.rows import event_row
from mailhub.maillog import mail_publisher


def capture() -> list[dict]:
    events: list[dict] = []
    mail_publisher.addObserver(events.append)
    return events


def test_a_wrong_password_is_an_auth_failed_mail_event(tmp_path):
    h = TLSAuthHarness(tmp_path)
    events = capture()
    try:
        c = h.tls_session()
        c.send(f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + 'wrong')}\r\n")
        h.clock.advance(1)
    finally:
        mail_publisher.removeObserver(events.append)
    failed = [e for e in events if e.get("mail_event") == "auth_failed"]
    assert len(failed) == 1 and failed[0]["mechanism"] == "PLAIN" and failed[0]["client"] == FOREIGN
    row = event_row(failed[0])
    assert row is not None and (row.kind, row.client, row.reason) == ("auth_failed", FOREIGN, "auth_failed")
    assert USER not in repr(failed[0]) and "wrong" not in repr(failed[0])


def test_an_accepted_message_names_its_recipients(tmp_path):
    h = Harness(tmp_path)
    h.serve()
    events = capture()
    try:
        c = h.connect()
        c.send("EHLO client.test\r\n")
        reply = send_message(c, b"Subject: x\r\n\r\nhi\r\n.\r\n", rcpts=("alice@example.com", "bob@example.com"))
    finally:
        mail_publisher.removeObserver(events.append)
    assert reply.startswith("250 2.0.0")
    accepted = [e for e in events if e.get("mail_event") == "accepted"]
    assert accepted[0]["rcpts"] == ["alice@example.com", "bob@example.com"]
    assert event_row(accepted[0]).recipients == ("alice@example.com", "bob@example.com")

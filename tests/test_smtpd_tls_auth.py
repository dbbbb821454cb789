"""
In-memory tests of STARTTLS (RFC 3207), AUTH (RFC 4954) and the submission
rules in mailhub.smtp.server: a StringTransport whose startTLS only records the
call, a task.Clock for the throttle's delay, a real UsersFile (bcrypt with
4 rounds) checked synchronously.  Transcripts use exact replies.
"""

from __future__ import annotations

import pytest
from smtpharness import (
    DATE,
    FOREIGN,
    GO_AHEAD,
    HOST,
    MAIL_OK,
    NOW,
    OK,
    RCPT_OK,
    TLS_OPTIONS,
    Client,
    converse,
    queued_id,
)
from tlsauthharness import AUTH_OK, PASSWORD, PLAIN, READY, USER, b64, ehlo_reply
from tlsauthharness import TLSAuthHarness as Harness
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from mailhub.smtp.proto import received_header

AUTH_FAILED = "535 5.7.8 Authentication credentials invalid\r\n"
MALFORMED = "501 5.5.2 Cannot decode AUTH response\r\n"
CANCELLED = "501 5.7.0 Authentication cancelled\r\n"
ALREADY = "503 5.5.1 Already authenticated\r\n"
UNKNOWN_MECH = "504 5.5.4 Unrecognized authentication mechanism\r\n"
NEED_AUTH = "530 5.7.0 Authentication required\r\n"
NEED_TLS = "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
TOO_MANY = "421 4.7.0 Too many failed authentication attempts, closing connection\r\n"
NOT_ENABLED = "503 5.5.1 Error: authentication not enabled\r\n"
IN_TX = "503 5.5.1 Error: MAIL transaction in progress\r\n"
NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first\r\n"

PLAIN_WRONG = b64(f"\0{USER}\0wrong")


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


# -- EHLO ---------------------------------------------------------------------------------------


def test_ehlo_without_tls_and_users_is_unchanged(tmp_path):
    c = Harness(tmp_path, tls=False, users=False).connect()
    assert c.send("EHLO client.test\r\n") == ehlo_reply()
    assert c.send("STARTTLS\r\n") == "502 5.5.1 Error: STARTTLS not implemented\r\n"
    assert c.send("AUTH PLAIN\r\n") == "502 5.5.1 Error: AUTH not implemented\r\n"


def test_ehlo_offers_starttls_then_auth(h):
    c = h.connect()
    assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True)
    assert c.send("STARTTLS\r\n") == READY
    assert c.send("EHLO client.test\r\n") == ehlo_reply(auth_=True)


def test_smtps_is_encrypted_from_the_start(tmp_path):
    h = Harness(tmp_path, listener="smtps")
    c = h.connect()
    assert c.proto.session.tls is True
    assert c.send("EHLO client.test\r\n") == ehlo_reply(auth_=True)
    assert c.send("STARTTLS\r\n") == "503 5.5.1 Error: TLS already active\r\n"
    assert c.transport.tls_started == []
    assert c.send("MAIL FROM:<alice@example.com>\r\n") == NEED_AUTH
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == AUTH_OK
    assert c.send("MAIL FROM:<alice@example.com>\r\n") == MAIL_OK


def test_smtps_without_tls_object_still_refuses_starttls(tmp_path):
    c = Harness(tmp_path, listener="smtps", tls=False).connect()
    assert c.send("EHLO client.test\r\n") == ehlo_reply(auth_=True)
    assert c.send("STARTTLS\r\n") == "503 5.5.1 Error: TLS already active\r\n"


# -- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_injection_discarded(h):
    """CVE-2011-0411: plaintext pipelined after STARTTLS is never executed."""
    c = h.connect()
    assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True)
    out = c.send("STARTTLS\r\nRSET\r\nMAIL FROM:<evil@elsewhere.test>\r\n")
    assert out == READY  # no reply to RSET or MAIL, ever
    assert c.transport.tls_started == [TLS_OPTIONS]
    assert c.transport.written_before_tls == READY.encode()  # 220 goes out in clear first
    assert c.proto.session.tls is True and c.proto.session.helo is None
    assert c.proto._buf == b""
    # The session was reset: EHLO is needed again, no transaction exists.
    assert c.send("MAIL FROM:<a@example.com>\r\n") == NEED_HELO
    assert c.send("EHLO client.test\r\n") == ehlo_reply(auth_=True)
    assert c.send("RCPT TO:<alice@example.com>\r\n") == "503 5.5.1 Error: need MAIL command\r\n"


def test_starttls_event_after_handshake(h):
    """mail event "starttls" (metrics: tls_connections_total) once the handshake is complete, not before."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = h.connect()
        assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True)
        c.proto.handshakeCompleted()  # no STARTTLS yet: nothing
        assert c.send("STARTTLS\r\n") == READY
        assert [e for e in events if e.get("mail_event") == "starttls"] == []
        c.proto.handshakeCompleted()  # the TLS layer calls it (IHandshakeListener)
        c.proto.handshakeCompleted()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [ev] = [e for e in events if e.get("mail_event") == "starttls"]
    assert (ev["client"], ev["listener"]) == (FOREIGN, "smtp")
    [conn] = [e for e in events if e.get("mail_event") == "connection"]
    assert (conn["client"], conn["listener"], conn["tls"]) == (FOREIGN, "smtp", False)


def test_starttls_forgets_helo_and_auth(tmp_path):
    h = Harness(tmp_path, allow_plaintext_loopback=True)
    c = h.connect("127.0.0.1")
    assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True, auth_=True)
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == AUTH_OK
    assert c.send("STARTTLS\r\n") == READY
    assert c.user is None and c.proto.session.helo is None
    assert c.send("EHLO again.test\r\n") == ehlo_reply(auth_=True)
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == AUTH_OK


@pytest.mark.parametrize(
    "script",
    [
        [("STARTTLS now\r\n", "501 5.5.4 Syntax: STARTTLS\r\n")],
        [("STARTTLS\r\n", READY), ("STARTTLS\r\n", "503 5.5.1 Error: TLS already active\r\n")],
        [("MAIL FROM:<>\r\n", MAIL_OK), ("STARTTLS\r\n", IN_TX), ("RSET\r\n", OK), ("STARTTLS\r\n", READY)],
    ],
)
def test_starttls_errors(h, script):
    c = h.connect()
    assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True)
    converse(c, script)


def test_starttls_without_tls_capable_transport_is_454(h):
    c = h.connect(transport_class=StringTransport)
    c.send("EHLO client.test\r\n")
    assert c.send("STARTTLS\r\n") == "454 4.7.0 TLS not available due to local problem\r\n"
    assert c.proto.session.tls is False


# -- AUTH ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, user",
    [
        ([(f"AUTH PLAIN {PLAIN}\r\n", AUTH_OK)], USER),
        ([(f"auth plain {PLAIN}\r\n", AUTH_OK)], USER),
        ([("AUTH PLAIN\r\n", "334 \r\n"), (f"{PLAIN}\r\n", AUTH_OK)], USER),
        ([(f"AUTH PLAIN {b64(chr(0) + 'Alice@Example.COM' + chr(0) + PASSWORD)}\r\n", AUTH_OK)], USER),
        ([(f"AUTH PLAIN {b64(USER + chr(0) + USER + chr(0) + PASSWORD)}\r\n", AUTH_OK)], USER),
        ([("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n"), (b64(USER) + "\r\n", "334 UGFzc3dvcmQ6\r\n"),
          (b64(PASSWORD) + "\r\n", AUTH_OK)], USER),
        ([(f"AUTH LOGIN {b64(USER)}\r\n", "334 UGFzc3dvcmQ6\r\n"), (b64(PASSWORD) + "\r\n", AUTH_OK)], USER),
        ([("AUTH PLAIN\r\n", "334 \r\n"), ("*\r\n", CANCELLED)], None),
        ([("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n"), (b64(USER) + "\r\n", "334 UGFzc3dvcmQ6\r\n"),
          ("*\r\n", CANCELLED)], None),
        ([("AUTH PLAIN !!!notbase64\r\n", MALFORMED)], None),
        ([("AUTH PLAIN\r\n", "334 \r\n"), ("QUIT\r\n", MALFORMED)], None),  # a command inside SASL is data
        ([("AUTH PLAIN =\r\n", MALFORMED)], None),  # "=": empty initial response; PLAIN needs content
        ([(f"AUTH PLAIN {b64('no-nuls')}\r\n", MALFORMED)], None),
        ([("AUTH LOGIN =\r\n", MALFORMED)], None),
        ([("AUTH CRAM-MD5\r\n", UNKNOWN_MECH)], None),
        ([("AUTH\r\n", "501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n")], None),
        ([(f"AUTH PLAIN {PLAIN}\r\n", AUTH_OK), (f"AUTH PLAIN {PLAIN}\r\n", ALREADY)], USER),
        ([(f"AUTH PLAIN {PLAIN}\r\n", AUTH_OK), ("AUTH LOGIN\r\n", ALREADY)], USER),
    ],
)
def test_auth_table(h, script, user):
    c = h.tls_session()
    converse(c, script)
    assert c.user == user
    assert not c.closed
    assert c.send("NOOP\r\n") == OK  # back in command mode


def test_auth_session_keeps_working_after_failure_then_success(h):
    c = h.tls_session()
    c.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n")
    h.clock.advance(1)
    assert c.read() == AUTH_FAILED
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == AUTH_OK


def test_wrong_password_answered_after_delay_nothing_read_meanwhile(h):
    c = h.tls_session()
    # Pipelined NOOP must wait for the (delayed) AUTH answer.
    assert c.send(f"AUTH PLAIN {PLAIN_WRONG}\r\nNOOP\r\n") == ""
    h.clock.advance(0.999)
    assert c.read() == ""
    h.clock.advance(0.001)
    assert c.read() == AUTH_FAILED + OK
    assert c.user is None


def test_wrong_password_login_and_unknown_user_and_authzid(h):
    c = h.tls_session()
    converse(c, [("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n"), (b64(USER) + "\r\n", "334 UGFzc3dvcmQ6\r\n"),
                 (b64("nope") + "\r\n", "")])
    h.clock.advance(1)
    assert c.read() == AUTH_FAILED
    # Proxy authorization (authzid of another user) fails like a bad password.
    assert c.send(f"AUTH PLAIN {b64('bob@example.com' + chr(0) + USER + chr(0) + PASSWORD)}\r\n") == ""
    h.clock.advance(1)
    assert c.read() == AUTH_FAILED
    assert c.user is None


def test_throttle_closes_with_421_and_blocks_new_connections(h):
    c = h.tls_session()
    for _ in range(2):
        assert c.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n") == ""
        h.clock.advance(1)
        assert c.read() == AUTH_FAILED
    assert c.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n") == ""
    h.clock.advance(1)
    assert c.read() == TOO_MANY
    assert c.closed
    c.proto.connectionLost(None)
    # The IP stays blocked, even with the right password...
    d = h.tls_session()
    assert d.send(f"AUTH PLAIN {PLAIN}\r\n") == TOO_MANY
    assert d.closed and d.user is None
    d.proto.connectionLost(None)
    # ...but not other IPs, and only until its failures age out of the window.
    assert h.tls_session("203.0.113.1").send(f"AUTH PLAIN {PLAIN}\r\n") == AUTH_OK
    h.clock.advance(300)
    assert h.tls_session().send(f"AUTH PLAIN {PLAIN}\r\n") == AUTH_OK


class HeldChecker:
    """A checker whose answers the test gives: one unfired Deferred per check."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, defer.Deferred]] = []

    def requestAvatarId(self, credentials) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((credentials.password, d))
        return d

    def answer(self, i: int) -> None:
        password, d = self.calls[i]
        if password == PASSWORD.encode():
            d.callback(USER)
        else:
            d.errback(UnauthorizedLogin())


def test_parallel_auth_cannot_exceed_max_failures(h):
    """40 sessions from one IP guess at once (right password last): only 3 guesses are evaluated."""
    h.factory.checker = checker = HeldChecker()
    sessions = [h.tls_session() for _ in range(40)]
    replies = [c.send(f"AUTH PLAIN {PLAIN if i == 39 else PLAIN_WRONG}\r\n") for i, c in enumerate(sessions)]
    assert replies == [""] * 3 + [TOO_MANY] * 37
    assert all(c.closed for c in sessions[3:])
    assert len(checker.calls) == 3  # the 40th guess was never checked
    for i in range(3):
        checker.answer(i)
    h.clock.advance(1)
    assert [c.read() for c in sessions[:3]] == [AUTH_FAILED, AUTH_FAILED, TOO_MANY]
    assert [c.user for c in sessions] == [None] * 40
    assert h.factory.throttle.in_flight(FOREIGN) == 0
    assert h.tls_session().send(f"AUTH PLAIN {PLAIN}\r\n") == TOO_MANY


def test_parallel_success_gives_no_extra_wrong_guesses(h):
    """A success frees its own slot only: wrong guesses stay at max_failures (3)."""
    h.factory.checker = checker = HeldChecker()
    a, b, c = (h.tls_session() for _ in range(3))
    assert a.send(f"AUTH PLAIN {PLAIN}\r\n") == ""
    assert b.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n") == ""
    # LOGIN reserves its slot when the password arrives.
    converse(c, [("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n"), (b64(USER) + "\r\n", "334 UGFzc3dvcmQ6\r\n"),
                 (b64("nope") + "\r\n", "")])
    full = h.tls_session()
    assert full.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n") == TOO_MANY and full.closed
    checker.answer(0)
    assert a.read() == AUTH_OK and a.user == USER
    e = h.tls_session()
    assert e.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n") == ""  # the success's slot
    assert h.tls_session().send(f"AUTH PLAIN {PLAIN}\r\n") == TOO_MANY
    for i in (1, 2, 3):
        checker.answer(i)
    h.clock.advance(1)
    assert (b.read(), c.read(), e.read()) == (AUTH_FAILED, AUTH_FAILED, TOO_MANY)
    assert len(checker.calls) == 4  # 1 success + 3 wrong guesses
    assert h.factory.throttle.failures(FOREIGN) == 3
    assert h.tls_session().send(f"AUTH PLAIN {PLAIN}\r\n") == TOO_MANY
    assert a.send("NOOP\r\n") == OK  # the authenticated session goes on


def test_disconnect_during_check_keeps_the_slot_until_the_outcome(h):
    h.factory.checker = checker = HeldChecker()
    sessions = [h.tls_session() for _ in range(3)]
    for c in sessions:
        assert c.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n") == ""
        c.proto.connectionLost(None)
    # Hanging up does not give the slots back while the checks still run...
    assert h.tls_session().send(f"AUTH PLAIN {PLAIN}\r\n") == TOO_MANY
    # ...and the wrong guesses count once they are known; no timers are left.
    for i in range(3):
        checker.answer(i)
    assert h.clock.getDelayedCalls() == []
    assert h.factory.throttle.failures(FOREIGN) == 3 and h.factory.throttle.in_flight(FOREIGN) == 0
    assert [c.read() for c in sessions] == [""] * 3


def test_checker_error_gives_the_slot_back(h):
    h.factory.checker = checker = HeldChecker()
    sessions = [h.tls_session() for _ in range(3)]
    for c in sessions:
        assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == ""
    for _, d in checker.calls:
        d.errback(OSError("users file unreadable"))
    assert [c.read() for c in sessions] == ["454 4.7.0 Temporary authentication failure\r\n"] * 3
    assert h.factory.throttle.in_flight(FOREIGN) == 0 and h.factory.throttle.failures(FOREIGN) == 0
    assert sessions[0].send(f"AUTH PLAIN {PLAIN}\r\n") == ""


def test_connection_lost_while_delayed_cancels_timer(h):
    c = h.tls_session()
    c.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n")
    c.proto.connectionLost(None)
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(5)
    assert c.read() == ""


def test_checker_error_is_454(h):
    class Broken:
        def requestAvatarId(self, credentials):
            return defer.fail(OSError("users file unreadable"))

    h.factory.checker = Broken()
    c = h.tls_session()
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == "454 4.7.0 Temporary authentication failure\r\n"
    assert c.send("NOOP\r\n") == OK


def test_auth_needs_ehlo_and_no_transaction(tmp_path):
    h = Harness(tmp_path, listener="smtps")
    c = h.connect()
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == NEED_HELO
    c.send("EHLO client.test\r\n")
    h.factory.listener = "smtp"
    c2 = h.connect()
    c2.proto.session.tls = True
    c2.send("EHLO client.test\r\n")
    assert c2.send("MAIL FROM:<a@example.com>\r\n") == MAIL_OK
    assert c2.send(f"AUTH PLAIN {PLAIN}\r\n") == IN_TX


def test_auth_not_offered_in_clear(h):
    c = h.connect()
    assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True)
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == NEED_TLS
    assert c.send("AUTH LOGIN\r\n") == NEED_TLS
    assert c.user is None


def test_auth_without_tls_configured_not_enabled(tmp_path):
    h = Harness(tmp_path, tls=False)
    c = h.connect()
    assert c.send("EHLO client.test\r\n") == ehlo_reply()
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == NOT_ENABLED


@pytest.mark.parametrize(
    "ip, allow, offered",
    [
        ("127.0.0.1", True, True),
        ("::1", True, True),
        ("::ffff:127.0.0.1", True, True),
        ("127.0.0.2", True, False),  # loopback means exactly 127.0.0.1 / ::1
        ("198.51.100.7", True, False),
        ("127.0.0.1", False, False),
    ],
)
def test_plaintext_auth_on_loopback_only_when_allowed(tmp_path, ip, allow, offered):
    h = Harness(tmp_path, allow_plaintext_loopback=allow)
    c = h.connect(ip)
    assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True, auth_=offered)
    assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == (AUTH_OK if offered else NEED_TLS)
    assert c.proto.session.tls is False


def test_auth_line_limits(h):
    c = h.tls_session()
    # AUTH lines may exceed 512 octets (RFC 4954 4: up to 12288).
    long_b64 = "QUFB" * 1000  # 4000 octets of valid base64, not a PLAIN response
    assert c.send(f"AUTH PLAIN {long_b64}\r\n") == MALFORMED
    assert c.send("AUTH PLAIN\r\n") == "334 \r\n"
    assert c.send(long_b64 + "\r\n") == MALFORMED
    # Beyond 12288 octets: the exchange is aborted, the rest of the line discarded.
    assert c.send("AUTH PLAIN\r\n") == "334 \r\n"
    assert c.send("A" * 13000) == "500 5.5.6 Authentication Exchange line is too long\r\n"
    assert c.send("AAAA\r\nNOOP\r\n") == OK
    # Other commands keep the 512 limit.
    assert c.send("NOOP " + "x" * 600 + "\r\n") == "500 5.5.2 Error: line too long\r\n"


def test_passwords_never_logged(h):
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = h.tls_session()
        c.send(f"AUTH PLAIN {PLAIN_WRONG}\r\n")
        h.clock.advance(1)
        assert c.read() == AUTH_FAILED
        converse(c, [("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n"), (b64(USER) + "\r\n", "334 UGFzc3dvcmQ6\r\n"),
                     (b64(PASSWORD) + "\r\n", AUTH_OK)])
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "sasl_username=alice@example.com" in text
    for secret in (PASSWORD, "wrong", PLAIN, PLAIN_WRONG, b64(PASSWORD)):
        assert secret not in text


# -- submission: AUTH before MAIL, sender ownership, relay ---------------------------------------------


@pytest.mark.parametrize("listener", ["submission", "smtps"])
def test_submission_requires_auth_even_from_trusted_networks(tmp_path, listener):
    h = Harness(tmp_path, listener=listener, allow_plaintext_loopback=True)
    for ip in (FOREIGN, "127.0.0.1"):
        c = h.connect(ip)
        c.send("EHLO client.test\r\n")
        converse(c, [("MAIL FROM:<alice@example.com>\r\n", NEED_AUTH),
                     ("RCPT TO:<bob@example.com>\r\n", "503 5.5.1 Error: need MAIL command\r\n")])


@pytest.mark.parametrize(
    "sender, reply",
    [
        ("alice@example.com", MAIL_OK),
        ("ALICE@EXAMPLE.COM", MAIL_OK),
        ("alice+lists@example.com", MAIL_OK),
        ("sales@example.org", MAIL_OK),  # senders= extension
        ("", MAIL_OK),  # null sender
        ("bob@example.com", "553 5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice@example.com\r\n"),
        ("alice@example.org", "553 5.7.1 <alice@example.org>: Sender address rejected: not owned by user alice@example.com\r\n"),
    ],
)
def test_sender_check_strict(tmp_path, sender, reply):
    h = Harness(tmp_path, listener="submission")
    c = h.authenticated()
    assert c.send(f"MAIL FROM:<{sender}>\r\n") == reply


def test_sender_check_off(tmp_path):
    h = Harness(tmp_path, listener="submission", sender_check="off")
    c = h.authenticated()
    assert c.send("MAIL FROM:<bob@example.com>\r\n") == MAIL_OK


def test_sender_check_applies_to_authenticated_smtp_sessions_too(h):
    c = h.authenticated()
    assert c.send("MAIL FROM:<bob@example.com>\r\n")[:10] == "553 5.7.1 "
    # Unauthenticated sessions on smtp are not checked (they cannot relay).
    u = h.connect()
    u.send("EHLO client.test\r\n")
    assert u.send("MAIL FROM:<bob@example.com>\r\n") == MAIL_OK


def test_bad_sender_check_value(tmp_path):
    with pytest.raises(ValueError):
        Harness(tmp_path, sender_check="loose")


def send_message(c: Client, sender: str, rcpts, body: bytes = b"Subject: s\r\n\r\nhi\r\n.\r\n") -> str:
    assert c.send(f"MAIL FROM:<{sender}>\r\n") == MAIL_OK
    for r in rcpts:
        assert c.send(f"RCPT TO:<{r}>\r\n") == RCPT_OK
    assert c.send("DATA\r\n") == GO_AHEAD
    return c.send(body)


@pytest.mark.parametrize("listener", ["smtp", "submission", "smtps"])
def test_authenticated_user_may_relay(tmp_path, listener):
    h = Harness(tmp_path, listener=listener, trusted=())
    c = h.authenticated() if listener != "smtps" else h.connect()
    if listener == "smtps":
        c.send("EHLO client.test\r\n")
        assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == AUTH_OK
    qid = queued_id(send_message(c, USER, ["friend@elsewhere.test"]))
    [env] = h.queued
    assert env.queue_id == qid and env.sender == USER
    assert [r.address for r in env.recipients] == ["friend@elsewhere.test"]
    assert env.client["user"] == USER and env.client["protocol"] == "ESMTPSA"
    assert env.client["listener"] == listener
    received = h.message(qid).split(b"\r\nSubject:")[0].decode()
    assert received == (
        f"Received: from client.test ([{FOREIGN}])\r\n\tby {HOST} (mailhub) with ESMTPSA id {qid}\r\n"
        f"\tfor <friend@elsewhere.test>; {DATE}"
    )


@pytest.mark.parametrize("listener", ["smtp", "submission", "smtps"])
def test_unauthenticated_relay_refused_on_every_listener(tmp_path, listener):
    """No open relay by construction, with TLS up: TLS alone never allows relaying."""
    h = Harness(tmp_path, listener=listener, trusted=("127.0.0.1/32",))
    c = h.tls_session() if listener != "smtps" else h.connect()
    c.send("EHLO client.test\r\n")
    if listener == "smtp":
        converse(c, [("MAIL FROM:<x@elsewhere.test>\r\n", MAIL_OK),
                     ("RCPT TO:<victim@elsewhere.test>\r\n",
                      "554 5.7.1 <victim@elsewhere.test>: Relay access denied\r\n"),
                     ("RCPT TO:<bob@example.com>\r\n", RCPT_OK)])  # local domains: anyone
    else:
        converse(c, [("MAIL FROM:<x@elsewhere.test>\r\n", NEED_AUTH),
                     ("RCPT TO:<victim@elsewhere.test>\r\n", "503 5.5.1 Error: need MAIL command\r\n")])
    assert h.queued == []


def test_received_header_hides_client_when_asked(tmp_path):
    h = Harness(tmp_path, listener="submission", hide_client_ip=True)
    c = h.authenticated()
    qid = queued_id(send_message(c, USER, ["bob@example.com"]))
    assert h.message(qid).startswith(
        f"Received: by {HOST} (mailhub) with ESMTPSA id {qid}\r\n\tfor <bob@example.com>; {DATE}\r\n"
        "Subject: s\r\n".encode()
    )
    # Unauthenticated sessions keep the full header.
    u = h.connect()
    h.factory.listener = "smtp"
    u = h.connect()
    u.send("EHLO client.test\r\n")
    qid = queued_id(send_message(u, "x@elsewhere.test", ["bob@example.com"]))
    assert h.message(qid).startswith(f"Received: from client.test ([{FOREIGN}])\r\n".encode())


def test_received_header_with_authenticated_sender(tmp_path):
    h = Harness(tmp_path, received_auth_user=True)
    c = h.authenticated()
    qid = queued_id(send_message(c, USER, ["bob@example.com"]))
    assert h.message(qid).startswith(
        f"Received: from client.test ([{FOREIGN}])\r\n\t(Authenticated sender: {USER})\r\n"
        f"\tby {HOST} (mailhub) with ESMTPSA id {qid}\r\n".encode()
    )


def test_received_header_function():
    assert received_header("c.test", "192.0.2.1", HOST, "ESMTPSA", "QID", None, NOW, hide_client=True) == (
        f"Received: by {HOST} (mailhub) with ESMTPSA id QID; {DATE}\r\n"
    ).encode()
    assert received_header("c.test", "192.0.2.1", HOST, "ESMTPA", "QID", "a@b.c", NOW, auth_user="u@b.c") == (
        f"Received: from c.test ([192.0.2.1])\r\n\t(Authenticated sender: u@b.c)\r\n"
        f"\tby {HOST} (mailhub) with ESMTPA id QID\r\n\tfor <a@b.c>; {DATE}\r\n"
    ).encode()


def test_esmtps_protocol_after_starttls_without_auth(h):
    c = h.tls_session()
    qid = queued_id(send_message(c, "x@elsewhere.test", ["bob@example.com"]))
    assert h.queued[0].client["protocol"] == "ESMTPS"
    assert f"with ESMTPS id {qid}" in h.message(qid).decode()

"""
Tests for mailhub.smtp.sasl: SASL PLAIN/LOGIN decoding and exchanges, the
AUTH replies and the failed-login throttle.  In memory, with task.Clock;
bcrypt runs with 4 rounds to keep the suite fast.
"""

from __future__ import annotations

import base64

import pytest
from twisted.cred.error import UnauthorizedLogin
from usersfile import result_of, sync_run

from mailhub.smtp import sasl as auth
from mailhub.smtp.sasl import AuthThrottle, SASLError, SASLExchange, decode_login, decode_plain
from mailhub.users import UsersChecker


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)




@pytest.fixture
def checker(users):
    users.add("alice@example.com", "correct horse")
    return UsersChecker(users, run=sync_run)



# -- SASL ----------------------------------------------------------------------------------


def test_decode_plain():
    assert decode_plain(b64(b"\0alice@example.com\0pw")) == ("", "alice@example.com", "pw")
    assert decode_plain(b64(b"a\0b\0c") + b"\r\n") == ("a", "b", "c")
    assert decode_plain(b64("\0ü@example.com\0pässword".encode())) == ("", "ü@example.com", "pässword")


@pytest.mark.parametrize(
    "data",
    [
        b"!!!notbase64",
        b"AGFsaWNl AHB3",  # space inside
        b"AGFsaWNlAHB",  # bad padding
        b64(b"alice\0pw"),  # two fields
        b64(b"\0\0pw"),  # empty authcid
        b64(b"\0alice\0"),  # empty password
        b64(b"\0a\0b\0c"),  # four fields
        b64(b"\0\xff\0pw"),  # not UTF-8
        b"",
        b"=",  # empty response
    ],
)
def test_decode_plain_malformed(data):
    with pytest.raises(SASLError) as e:
        decode_plain(data)
    assert (e.value.code, e.value.enhanced) == (501, "5.5.2")


def test_login_prompts_and_decode():
    assert base64.b64decode(auth.LOGIN_USERNAME_PROMPT) == b"Username:"
    assert base64.b64decode(auth.LOGIN_PASSWORD_PROMPT) == b"Password:"
    assert decode_login(b64(b"alice@example.com")) == "alice@example.com"
    assert decode_login(b"=") == ""
    with pytest.raises(SASLError) as e:
        decode_login(b"@@@")
    assert e.value.reply == auth.REPLY_MALFORMED


def test_exchange_plain_initial_response():
    ex = SASLExchange("plain", b64(b"\0alice@example.com\0pw"))
    creds = ex.next()
    assert (creds.username, creds.password) == (b"alice@example.com", b"pw")


def test_exchange_plain_without_initial_response():
    ex = SASLExchange("PLAIN")
    assert ex.next() == b""
    ex.feed(b64(b"\0alice@example.com\0pw"))
    creds = ex.next()
    assert (creds.username, creds.password) == (b"alice@example.com", b"pw")


def test_exchange_plain_foreign_authzid_never_matches(checker):
    ex = SASLExchange("PLAIN", b64(b"bob@example.com\0alice@example.com\0correct horse"))
    with pytest.raises(UnauthorizedLogin):
        result_of(checker.requestAvatarId(ex.next()))
    # authzid equal to authcid is fine
    ex = SASLExchange("PLAIN", b64(b"alice@example.com\0alice@example.com\0correct horse"))
    assert result_of(checker.requestAvatarId(ex.next())) == "alice@example.com"


def test_exchange_login():
    ex = SASLExchange("LOGIN")
    assert ex.next() == auth.LOGIN_USERNAME_PROMPT
    ex.feed(b64(b"alice@example.com"))
    assert ex.next() == auth.LOGIN_PASSWORD_PROMPT
    ex.feed(b64(b"pw"))
    creds = ex.next()
    assert (creds.username, creds.password) == (b"alice@example.com", b"pw")


def test_exchange_login_initial_response():
    ex = SASLExchange("LOGIN", b64(b"alice@example.com"))
    assert ex.next() == auth.LOGIN_PASSWORD_PROMPT
    ex.feed(b64(b"pw"))
    assert ex.next().password == b"pw"


def test_exchange_errors():
    with pytest.raises(SASLError) as e:
        SASLExchange("CRAM-MD5")
    assert e.value.reply == (504, "5.5.4", "Unrecognized authentication mechanism")
    ex = SASLExchange("LOGIN")
    ex.next()
    with pytest.raises(SASLError) as e:
        ex.feed(b"*")
    assert e.value.reply[:2] == (501, "5.7.0")
    ex = SASLExchange("LOGIN")
    ex.next()
    ex.feed(b"%%%")
    with pytest.raises(SASLError) as e:
        ex.next()
    assert e.value.reply[:2] == (501, "5.5.2")
    ex = SASLExchange("PLAIN", b"not base64!")
    with pytest.raises(SASLError) as e:
        ex.next()
    assert e.value.reply[:2] == (501, "5.5.2")


def test_reply_constants():
    assert auth.REPLY_AUTH_OK[:2] == (235, "2.7.0")
    assert auth.REPLY_AUTH_FAILED[:2] == (535, "5.7.8")
    assert auth.REPLY_ALREADY_AUTHENTICATED[:2] == (503, "5.5.1")
    assert auth.REPLY_AUTH_REQUIRED[:2] == (530, "5.7.0")
    assert auth.REPLY_ENCRYPTION_REQUIRED[:2] == (538, "5.7.11")
    assert auth.REPLY_TOO_MANY_FAILURES[:2] == (421, "4.7.0")


# -- throttle -----------------------------------------------------------------------------


def test_throttle_delays_each_failure(clock):
    t = AuthThrottle(clock, delay=1.0, max_failures=3, window=300)
    fired = []
    t.failed("192.0.2.1").addCallback(fired.append)
    clock.advance(0.99)
    assert fired == []
    clock.advance(0.01)
    assert fired == [False]


def test_throttle_blocks_after_max_failures_per_ip(clock):
    t = AuthThrottle(clock, delay=1.0, max_failures=3, window=300)
    results = []
    for _ in range(3):
        t.failed("192.0.2.1").addCallback(results.append)
        clock.advance(1)
    assert results == [False, False, True]
    assert t.blocked("192.0.2.1")
    assert not t.blocked("192.0.2.2")  # other clients are not affected
    assert t.failures("192.0.2.1") == 3
    # The oldest failure was at t0; it ages out after the window.
    clock.advance(300 - 3)
    assert t.failures("192.0.2.1") == 2
    assert not t.blocked("192.0.2.1")


def test_throttle_cancel_stops_timer(clock):
    t = AuthThrottle(clock, delay=1.0)
    d = t.failed("192.0.2.1")
    d.addErrback(lambda f: None)
    d.cancel()
    assert clock.getDelayedCalls() == []


def test_throttle_memory_is_bounded(clock):
    t = AuthThrottle(clock, max_failures=2, window=300, max_clients=3)
    for i in range(10):
        t.record_failure(f"192.0.2.{i}")
        clock.advance(1)
    assert len(t._failures) <= 3
    assert t.failures("192.0.2.9") == 1


def test_throttle_full_table_forgets_the_stalest_client_not_a_blocked_one(clock):
    """Failures from new addresses cannot push a client that is blocked now out of a full table."""
    t = AuthThrottle(clock, max_failures=2, window=300, max_clients=3)
    t.record_failure("192.0.2.9")  # the stalest entry, though its address sorts last
    clock.advance(1)
    for _ in range(2):
        t.record_failure("192.0.2.1")
        clock.advance(1)
    t.record_failure("192.0.2.5")
    clock.advance(1)
    t.record_failure("192.0.2.7")  # table full: one entry goes
    assert t.blocked("192.0.2.1") and t.failures("192.0.2.1") == 2
    assert t.failures("192.0.2.9") == 0 and t.failures("192.0.2.5") == 1 and t.failures("192.0.2.7") == 1


def test_throttle_slots_count_checks_in_flight_with_failures(clock):
    t = AuthThrottle(clock, delay=1.0, max_failures=3, window=300)
    ip = "192.0.2.1"
    assert [t.begin(ip) for _ in range(4)] == [True, True, True, False]
    assert t.in_flight(ip) == 3 and t.failures(ip) == 0
    assert t.begin("192.0.2.2")  # other clients are not affected
    # A success gives its slot back without counting; nothing else changes.
    fired = []
    t.finish(ip, ok=True).addCallback(fired.append)
    assert fired == [False] and t.in_flight(ip) == 2 and t.failures(ip) == 0
    assert t.begin(ip) and not t.begin(ip)
    # A failure turns its slot into a counted failure: still no room.
    t.finish(ip, ok=False).addCallback(fired.append)
    assert t.in_flight(ip) == 2 and t.failures(ip) == 1
    assert not t.begin(ip)
    clock.advance(1)
    assert fired == [False, False]
    t.finish(ip, ok=False).addCallback(fired.append)
    t.finish(ip, ok=False).addCallback(fired.append)
    clock.advance(1)
    assert fired == [False, False, False, True]  # the third failure closes
    assert t.in_flight(ip) == 0 and t.blocked(ip) and not t.begin(ip)
    assert ip not in t._in_flight  # no empty entries left behind
    clock.advance(300)
    assert not t.blocked(ip) and t.begin(ip)


def test_throttle_never_evaluates_more_than_max_failures_wrong_guesses(clock):
    """Any interleaving of begin/finish: at most max_failures wrong guesses per window."""
    import random

    rng = random.Random(1234)
    t = AuthThrottle(clock, delay=0, max_failures=5, window=300)
    ip = "192.0.2.1"
    running: list[bool] = []  # True: this check will succeed
    wrong_evaluated = 0
    for _ in range(2000):
        if running and rng.random() < 0.5:
            ok = running.pop(rng.randrange(len(running)))
            wrong_evaluated += not ok
            t.finish(ip, ok)
        elif t.begin(ip):
            running.append(rng.random() < 0.3)
        assert wrong_evaluated + sum(not ok for ok in running) <= 5
    assert wrong_evaluated == 5 and t.blocked(ip)

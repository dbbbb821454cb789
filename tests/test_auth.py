"""
Tests for mailhub.smtp.sasl: the users file, the twisted.cred checker, sender
ownership, SASL decoding and the failed-login throttle.  In memory, with
task.Clock; bcrypt runs with 4 rounds to keep the suite fast.
"""

from __future__ import annotations

import base64
import os
import stat

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from zope.interface import implementer

from mailhub.smtp import sasl as auth
from mailhub.smtp.sasl import (
    AuthThrottle,
    SASLError,
    SASLExchange,
    UnknownUser,
    UserExists,
    UsersChecker,
    UsersFile,
    decode_login,
    decode_plain,
    owns_sender,
)

ROUNDS = 4


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def sync_run(f, *args, **kwargs) -> defer.Deferred:
    """deferToThread stand-in: runs at once, in this thread."""
    return defer.maybeDeferred(f, *args, **kwargs)


def result_of(d: defer.Deferred):
    results, failures = [], []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "Deferred has not fired"
    return results[0]


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(1000)
    return c


@pytest.fixture
def users(tmp_path, clock):
    return UsersFile(str(tmp_path / "users"), clock=clock, rounds=ROUNDS)


# -- file format ----------------------------------------------------------------


def test_parse_format(tmp_path, clock):
    h1 = auth.hash_password("secret1", ROUNDS)
    h2 = auth.hash_password("secret2", ROUNDS)
    path = tmp_path / "users"
    path.write_text(
        "# mailhub users\n"
        "\n"
        f"Alice@Example.COM:{h1}\n"
        f"bob@example.com:{h2}:senders=bob@example.org, postmaster@example.com:token=abc\n"
        "no-colon-here\n"
        "carol@example.com:plaintext-password\n"
        "bad address:$2b$04$xxxxxxxxxxxxxxxxxxxxxx\n"
        f"alice@example.com:{h2}\n"
    )
    u = UsersFile(str(path), clock=clock)
    assert u.addresses() == ["alice@example.com", "bob@example.com"]
    # The first of two duplicate lines wins.
    assert u.get("ALICE@example.com").password_hash == h1
    bob = u.get("bob@EXAMPLE.com")
    assert bob.extensions == ("senders=bob@example.org, postmaster@example.com", "token=abc")
    assert bob.senders == ("bob@example.org", "postmaster@example.com")
    assert u.get("carol@example.com") is None
    assert u.get("not an address") is None
    assert "alice@example.com" in u


def test_missing_file_means_no_users(users):
    assert users.addresses() == []
    assert users.get("a@example.com") is None


def test_normalize_user():
    assert auth.normalize_user("Alice@Example.COM") == "alice@example.com"
    assert auth.normalize_user("user@bücher.example") == "user@xn--bcher-kva.example"
    for bad in ["", "alice", "@example.com", "a:b@example.com", '"a b"@example.com', "a b@example.com", "a@-x-"]:
        with pytest.raises(ValueError):
            auth.normalize_user(bad)


# -- edits -------------------------------------------------------------------------


def test_add_passwd_del(users, tmp_path):
    path = tmp_path / "users"
    path.write_text("# keep this comment\n")
    assert users.add("Alice@Example.com", "pw1") == "alice@example.com"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# keep this comment\nalice@example.com:$2b$04$")
    assert text.endswith("\n")
    users.add("bob@example.com", "pw2", extensions=["senders=b@example.org"])

    with pytest.raises(UserExists):
        users.add("ALICE@example.com", "other")

    old = users.get("bob@example.com").password_hash
    users.set_password("bob@example.com", "pw3")
    bob = users.get("bob@example.com")
    assert bob.password_hash != old
    assert bob.extensions == ("senders=b@example.org",)  # kept
    assert auth._check_hash(b"pw3", bob.password_hash)

    users.remove("alice@example.com")
    assert users.addresses() == ["bob@example.com"]
    assert path.read_text().startswith("# keep this comment\nbob@example.com:")

    with pytest.raises(UnknownUser):
        users.remove("alice@example.com")
    with pytest.raises(UnknownUser):
        users.set_password("nobody@example.com", "x")
    # No temporary files left behind.
    assert sorted(os.listdir(tmp_path)) == ["users", "users.lock"]


def test_edits_keep_unknown_lines(users, tmp_path):
    path = tmp_path / "users"
    path.write_text("garbage line\n")
    users.add("a@example.com", "pw")
    assert path.read_text().splitlines()[0] == "garbage line"


def test_add_refuses_bad_passwords(users):
    for bad in ["", "a\nb", "nul\0", "x" * 73]:
        with pytest.raises(ValueError):
            users.add("a@example.com", bad)
    users.add("a@example.com", "é" * 36)  # 72 bytes is fine
    assert users.addresses() == ["a@example.com"]


def test_unwritable_location(tmp_path, clock):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    u = UsersFile(str(blocker / "users"), clock=clock, rounds=ROUNDS)
    with pytest.raises(auth.UsersFileError, match="cannot write"):
        u.add("a@example.com", "pw")


# -- reload --------------------------------------------------------------------------


def test_reload_on_change_checked_once_per_second(tmp_path, clock):
    path = tmp_path / "users"
    h = auth.hash_password("pw", ROUNDS)
    path.write_text(f"a@example.com:{h}\n")
    daemon = UsersFile(str(path), clock=clock)
    assert daemon.addresses() == ["a@example.com"]

    # Another process (mailhub user add) edits the file.
    UsersFile(str(path), rounds=ROUNDS).add("b@example.com", "pw")
    clock.advance(0.5)
    assert daemon.addresses() == ["a@example.com"]  # not checked again yet
    clock.advance(0.5)
    assert daemon.addresses() == ["a@example.com", "b@example.com"]

    # An in-place edit with the same size is seen through mtime.
    text = path.read_text().replace("b@example.com", "c@example.com")
    path.write_text(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    clock.advance(1)
    assert daemon.addresses() == ["a@example.com", "c@example.com"]

    os.unlink(path)
    clock.advance(1)
    assert daemon.addresses() == []


def test_unchanged_file_is_not_reparsed(tmp_path, clock, monkeypatch):
    path = tmp_path / "users"
    path.write_text(f"a@example.com:{auth.hash_password('pw', ROUNDS)}\n")
    u = UsersFile(str(path), clock=clock)
    u.addresses()
    reads = []
    real = u._read_lines
    monkeypatch.setattr(u, "_read_lines", lambda: reads.append(1) or real())
    for _ in range(3):
        clock.advance(2)
        u.addresses()
    assert reads == []


# -- twisted.cred ---------------------------------------------------------------------


@pytest.fixture
def checker(users):
    users.add("alice@example.com", "correct horse")
    return UsersChecker(users, run=sync_run)


def test_checker_interface(checker):
    assert ICredentialsChecker.providedBy(checker)
    assert checker.credentialInterfaces == (auth.IUsernamePassword,)


def test_checker_success(checker):
    d = checker.requestAvatarId(UsernamePassword(b"Alice@EXAMPLE.com", b"correct horse"))
    assert result_of(d) == "alice@example.com"
    assert result_of(checker.authenticate("alice@example.com", "correct horse")) == "alice@example.com"


@pytest.mark.parametrize(
    "username,password",
    [
        (b"alice@example.com", b"wrong"),
        (b"alice@example.com", b""),
        (b"alice@example.com", b"correct horse" * 10),  # > 72 bytes
        (b"nobody@example.com", b"correct horse"),
        (b"not an address", b"correct horse"),
        (b"", b""),
        (b"\xff\xfe", b"correct horse"),
    ],
)
def test_checker_failure(checker, username, password):
    with pytest.raises(UnauthorizedLogin):
        result_of(checker.requestAvatarId(UsernamePassword(username, password)))


def test_checker_runs_bcrypt_through_run(users):
    users.add("alice@example.com", "pw")
    calls = []

    def run(f, *args):
        calls.append(f)
        return defer.maybeDeferred(f, *args)

    c = UsersChecker(users, run=run)
    result_of(c.authenticate("alice@example.com", "pw"))
    with pytest.raises(UnauthorizedLogin):
        result_of(c.authenticate("nobody@example.com", "pw"))  # the dummy hash is checked too
    assert calls == [auth._check_hash, auth._check_hash]


def test_checker_through_portal(checker):
    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatarId, mind, *interfaces):
            return interfaces[0], avatarId, lambda: None

    portal = Portal(Realm(), [checker])
    iface, avatar, logout = result_of(
        portal.login(UsernamePassword(b"alice@example.com", b"correct horse"), None, auth.IUsernamePassword)
    )
    assert avatar == "alice@example.com"


def test_checker_sees_new_users_without_restart(users, clock):
    checker = UsersChecker(users, run=sync_run)
    with pytest.raises(UnauthorizedLogin):
        result_of(checker.authenticate("new@example.com", "pw"))
    UsersFile(users.path, rounds=ROUNDS).add("new@example.com", "pw")
    clock.advance(1)
    assert result_of(checker.authenticate("new@example.com", "pw")) == "new@example.com"


# -- sender ownership -------------------------------------------------------------------


@pytest.mark.parametrize(
    "user,sender,extra,expected",
    [
        ("alice@example.com", "alice@example.com", (), True),
        ("alice@example.com", "<alice@example.com>", (), True),
        ("alice@example.com", "alice@EXAMPLE.COM", (), True),
        ("alice@example.com", "Alice@example.com", (), True),
        ("alice@example.com", "alice+lists@example.com", (), True),
        ("alice@example.com", "alice+a+b@example.com", (), True),
        ("alice@example.com", "", (), True),  # null sender
        ("alice@example.com", "<>", (), True),
        ("alice@example.com", "bob@example.com", (), False),
        ("alice@example.com", "alice@example.org", (), False),
        ("alice@example.com", "alice@sub.example.com", (), False),
        ("alice@example.com", "alicex@example.com", (), False),
        ("alice@example.com", "+alice@example.com", (), False),
        ("alice@example.com", "not an address", (), False),
        ("alice@example.com", "alice@example.com.", (), True),  # trailing dot is the same domain
        ("alice+tag@example.com", "alice@example.com", (), False),
        ("alice@example.com", "postmaster@example.com", ("postmaster@example.com",), True),
        ("alice@example.com", "postmaster+x@example.com", ("Postmaster@Example.com",), True),
        ("alice@example.com", "root@example.com", ("postmaster@example.com",), False),
        ("user@bücher.example", "user@xn--bcher-kva.example", (), True),
    ],
)
def test_owns_sender(user, sender, extra, expected):
    assert owns_sender(user, sender, extra=extra) is expected


def test_owns_sender_without_extensions():
    assert owns_sender("alice@example.com", "alice+x@example.com", separator="") is False
    assert owns_sender("alice@example.com", "alice-x@example.com", separator="-") is True


def test_may_send_as_uses_senders_extension(users):
    users.add("bob@example.com", "pw", extensions=["senders=sales@example.com"])
    assert users.may_send_as("bob@example.com", "sales@example.com")
    assert users.may_send_as("bob@example.com", "bob+x@example.com")
    assert not users.may_send_as("bob@example.com", "alice@example.com")


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


def test_rewrite_keeps_owner(users, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    path = tmp_path / "users"
    path.write_text("")
    os.chown(path, 12345, 12346)
    users.add("a@example.com", "pw")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (12345, 12346)
    assert stat.S_IMODE(st.st_mode) == 0o600

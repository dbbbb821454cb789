"""
Tests for mailhub.users: the users file (format, edits, reload), the
twisted.cred checker and sender ownership.  In memory, with task.Clock;
bcrypt runs with 4 rounds to keep the suite fast.
"""

from __future__ import annotations

import os
import stat

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from usersfile import ROUNDS, result_of, sync_run
from zope.interface import implementer

from mailhub import users as auth
from mailhub.users import UnknownUser, UserExists, UsersChecker, UsersFile, owns_sender

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

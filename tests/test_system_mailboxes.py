"""
System mode: local users are passwd accounts, mail goes to ~user/Maildir.

A fake passwd lookup (real C{pwd.struct_passwd} records) points the homes
into tmp_path.  The tests run as root, so delivery really C{fchown}s to the
test uids, and the symlink tests check that root never writes through a
link the user planted.
"""

from __future__ import annotations

import mailbox
import os
import pwd
import smtplib
import stat

import pytest
from conftest import in_reactor
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString

from mailhub.address import Mailbox, parse_mailbox
from mailhub.config import ServerConfig, check_maildir_name
from mailhub.delivery.directory import (
    AliasLoop,
    AliasUnavailable,
    Directory,
    InvalidMailbox,
    UnknownRecipient,
    UnsupportedAlias,
)
from mailhub.delivery.local import LocalDelivery
from mailhub.delivery.router import Router
from mailhub.delivery.system import Accounts
from mailhub.envelope import Envelope, Outcome, Recipient
from mailhub.queue.queuefile import queue_file_bytes
from mailhub.queue.spool import Spool
from mailhub.smtp.factory import SMTPServerFactory, SMTPSettings
from mailhub.smtp.policy import Policy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="delivering as another user needs root")

DOMAINS = ("example.org", "other.example")
MESSAGE = b"From: s@remote.example\r\nTo: alice@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


def pw(name: str, uid: int, gid: int, home: str, shell: str = "/bin/bash") -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, name.title(), home, shell))


class FakePasswd:
    """pwd.getpwnam over a dict; entries can be removed to simulate userdel."""

    def __init__(self, entries: list[pwd.struct_passwd]) -> None:
        self.entries = {e.pw_name: e for e in entries}
        self.calls: list[str] = []

    def __call__(self, name: str) -> pwd.struct_passwd:
        self.calls.append(name)
        if "\x00" in name:
            raise ValueError("embedded null character")
        return self.entries[name]


@pytest.fixture
def homes(tmp_path):
    """Home directories: alice 1000:1000, bob 1001:1002 (own group), mail-only erin (nologin)."""
    base = tmp_path / "home"
    made = {}
    for name, uid, gid in [("alice", 1000, 1000), ("bob", 1001, 1002), ("erin", 1004, 1004)]:
        home = base / name
        home.mkdir(parents=True)
        os.chown(home, uid, gid)
        os.chmod(home, 0o755)
        made[name] = home
    root_home = tmp_path / "roothome"
    root_home.mkdir(mode=0o700)
    made["root"] = root_home
    notowned = base / "carol"
    notowned.mkdir()  # root-owned: carol (1003) does not own her home
    made["carol"] = notowned
    return made


@pytest.fixture
def passwd(homes, tmp_path):
    return FakePasswd([
        pw("root", 0, 0, str(homes["root"])),
        pw("toor", 0, 0, str(homes["root"])),
        pw("daemon", 1, 1, "/usr/sbin", "/usr/sbin/nologin"),
        pw("www-data", 33, 33, "/var/www", "/usr/sbin/nologin"),
        pw("nobody", 65534, 65534, "/nonexistent", "/usr/sbin/nologin"),
        pw("alice", 1000, 1000, str(homes["alice"])),
        pw("bob", 1001, 1002, str(homes["bob"])),
        pw("carol", 1003, 1003, str(homes["carol"])),
        pw("erin", 1004, 1004, str(homes["erin"]), "/usr/sbin/nologin"),
        pw("dave", 1005, 1005, str(tmp_path / "home" / "dave")),  # home missing
        pw("relhome", 1006, 1006, "relative/home"),
    ])


def make(passwd, tmp_path, aliases: str | None = None, **kw) -> Directory:
    path = None
    if aliases is not None:
        path = str(tmp_path / "aliases")
        with open(path, "w") as f:
            f.write(aliases)
    return Directory(DOMAINS, str(tmp_path / "unused"), aliases_path=path, mode="system",
                     passwd_lookup=passwd, **kw)


def resolve(d: Directory, text: str) -> list[str]:
    return d.resolve(parse_mailbox(text))


def sync_run(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


def deliver(d: Directory, tmp_path, *rcpts: str, data: bytes = MESSAGE, qid: str = "0123456789ABCDEFG") -> list[Outcome]:
    env = Envelope(qid, "s@remote.example", [Recipient(r) for r in rcpts], arrival=1700000000.5)
    path = tmp_path / "queued"
    path.write_bytes(queue_file_bytes(data, env))  # a queue file, as the spool commits it
    agent = LocalDelivery(d, "mx.example.org", run=sync_run)
    out = []
    agent.deliver(env, env.recipients, str(path), report=lambda outcomes: None).addBoth(out.append)
    return out[0]


def kinds(outcomes: list[Outcome]) -> list[tuple[str, int, str]]:
    return [(o.kind, o.code, o.status) for o in outcomes]


def tree(path) -> list[str]:
    """Every entry under path (relative), to prove nothing was written there."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), path))
    return sorted(out)


# -- who has a mailbox -------------------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("alice@example.org", ["alice@example.org"]),
        ("Alice@EXAMPLE.org", ["alice@example.org"]),
        ("alice@other.example", ["alice@other.example"]),  # every local domain, one account
        ("alice+lists@example.org", ["alice@example.org"]),
        ("erin@example.org", ["erin@example.org"]),  # nologin shell: still receives mail
        ("carol@example.org", ["carol@example.org"]),  # checked at delivery, not at RCPT
        ("root@example.org", ["root@example.org"]),
        ("postmaster@example.org", ["root@example.org"]),  # no alias: postmaster is root
        ("PostMaster@other.example", ["root@other.example"]),
        # MAILER-DAEMON and abuse exist as postmaster, hence root
        ("MAILER-DAEMON@example.org", ["root@example.org"]),
        ("abuse@other.example", ["root@other.example"]),
    ],
)
def test_resolve_accounts(passwd, tmp_path, rcpt, expected):
    assert resolve(make(passwd, tmp_path), rcpt) == expected


@pytest.mark.parametrize(
    "rcpt", ["ghost@example.org", "daemon@example.org", "www-data@example.org", "nobody@example.org",
             "toor@example.org", "relhome@example.org", "ghost+alice@example.org"],
)
def test_unknown_and_system_accounts(passwd, tmp_path, rcpt):
    with pytest.raises(UnknownRecipient) as e:
        resolve(make(passwd, tmp_path), rcpt)
    assert (e.value.code, e.value.enhanced, e.value.text) == (550, "5.1.1", "User unknown in local recipient table")


def test_unsafe_local_part_never_reaches_passwd(passwd, tmp_path):
    d = make(passwd, tmp_path)
    for local in ("../alice", "a/b", ".alice", "a\x00b"):
        with pytest.raises(InvalidMailbox):
            d.resolve(Mailbox(local, "example.org"))
    assert passwd.calls == []


def test_uid_range_is_configurable(passwd, tmp_path):
    d = make(passwd, tmp_path, min_uid=1, max_uid=65534)
    assert resolve(d, "nobody@example.org") == ["nobody@example.org"]
    assert resolve(d, "www-data@example.org") == ["www-data@example.org"]


def test_maildir_for_and_account(passwd, homes, tmp_path):
    d = make(passwd, tmp_path)
    assert d.maildir_for("alice@example.org") == str(homes["alice"] / "Maildir")
    assert make(passwd, tmp_path, home_maildir="Mail/inbox/").maildir_for("bob@other.example") == str(
        homes["bob"] / "Mail" / "inbox")
    acct = d.account_for("Bob@Other.Example")
    assert (acct.name, acct.uid, acct.gid, acct.home) == ("bob", 1001, 1002, str(homes["bob"]))
    assert d.may_create("alice@example.org") and not d.may_create("nobody@example.org")
    with pytest.raises(UnknownRecipient):
        d.account_for("ghost@example.org")
    with pytest.raises(InvalidMailbox):
        d.account_for("alice@elsewhere.example")


@pytest.mark.parametrize("bad", ["", "/abs/Maildir", "../Maildir", "Mail/../..", ".", "a/./b"])
def test_bad_home_maildir(bad):
    with pytest.raises(ValueError):
        check_maildir_name(bad)


def test_constructor_checks(passwd, tmp_path):
    with pytest.raises(ValueError):
        Directory(DOMAINS, str(tmp_path), mode="other")
    with pytest.raises(ValueError):
        Directory(DOMAINS, str(tmp_path), users=["alice"], mode="system", passwd_lookup=passwd)
    # the default keeps virtual mode
    assert Directory(DOMAINS, str(tmp_path)).mode == "virtual"


def test_accounts_rule_directly():
    fake = FakePasswd([pw("Mixed", 1000, 1000, "/home/Mixed"), pw("root", 0, 0, "/root")])
    a = Accounts(fake)
    assert a.lookup("mixed") is None  # names are matched as folded: no such account
    assert a.lookup("root").home == "/root"


# -- /etc/aliases in system mode -------------------------------------------------------------


def write_include(tmp_path, name: str, text: str, uid: int = 0, mode: int = 0o644) -> str:
    path = tmp_path / name
    path.write_text(text)
    os.chown(path, uid, 0)
    os.chmod(path, mode)
    return str(path)


def test_aliases(passwd, tmp_path, logged):
    inc = write_include(tmp_path, "staff.list", "# staff\nbob, carol@remote.example\n\nalice\n")
    nested = write_include(tmp_path, "outer.list", f":include:{inc}, erin\n")
    d = make(passwd, tmp_path, "root: alice\nwww-data: root\nstaff: :include:" + inc
             + f"\nall: :include:{nested}\nprog: |/usr/bin/procmail\nlog: /var/log/all-mail\n"
             + 'vac: \\alice, "|/usr/bin/vacation alice"\n')
    assert resolve(d, "root@example.org") == ["alice@example.org"]
    assert resolve(d, "postmaster@example.org") == ["alice@example.org"]  # postmaster -> root -> alice
    assert resolve(d, "www-data@example.org") == ["alice@example.org"]  # a system account, aliased
    assert resolve(d, "staff@example.org") == ["bob@example.org", "carol@remote.example", "alice@example.org"]
    assert resolve(d, "all@other.example") == ["bob@other.example", "carol@remote.example",
                                               "alice@other.example", "erin@other.example"]
    for rcpt in ("prog@example.org", "log@example.org", "vac@example.org"):
        with pytest.raises(UnsupportedAlias) as e:
            resolve(d, rcpt)
        assert (e.value.code, e.value.enhanced, e.value.text) == (550, "5.3.0", "alias target type not supported")
    lines = logged()
    for number, kind in [(5, "pipe"), (6, "file"), (7, "pipe")]:
        hits = [line for line in lines if f"aliases:{number}: alias" in line and f"{kind} target" in line]
        assert len(hits) == 1, (number, lines)


def test_root_alias_to_self_and_admin(passwd, tmp_path):
    d = make(passwd, tmp_path, "root: root, alice\n")
    assert resolve(d, "root@example.org") == ["root@example.org", "alice@example.org"]


@pytest.mark.parametrize(
    "setup, why",
    [
        (lambda p: os.chown(p, 1000, 1000), "owned by uid 1000"),
        (lambda p: os.chmod(p, 0o666), "world-writable"),
        (lambda p: (os.rename(p, p + ".real"), os.symlink(p + ".real", p)), "symbolic link"),
        (lambda p: os.unlink(p), "No such file"),
    ],
)
def test_unsafe_include_is_temporary(passwd, tmp_path, logged, setup, why):
    inc = write_include(tmp_path, "list", "alice\n")
    setup(inc)
    d = make(passwd, tmp_path, f"list: :include:{inc}\nmixed: bob, :include:{inc}\n")
    with pytest.raises(AliasUnavailable) as e:
        resolve(d, "list@example.org")
    assert (e.value.code, e.value.enhanced) == (451, "4.3.0")
    # other members still get their mail
    assert resolve(d, "mixed@example.org") == ["bob@example.org"]
    hits = [line for line in logged() if f":include:{inc}" in line and why in line]
    assert len(hits) == 1, logged()


def test_include_reloaded_when_changed(passwd, tmp_path):
    from twisted.internet.task import Clock

    clock = Clock()
    inc = write_include(tmp_path, "list", "alice\n")
    d = make(passwd, tmp_path, f"list: :include:{inc}\n", clock=clock)
    assert resolve(d, "list@example.org") == ["alice@example.org"]
    with open(inc, "w") as f:
        f.write("alice, bob\n")
    os.utime(inc, (2_000_000, 2_000_000))
    clock.advance(1)
    assert resolve(d, "list@example.org") == ["alice@example.org", "bob@example.org"]


def test_include_loop(passwd, tmp_path):
    a = str(tmp_path / "a.list")
    b = write_include(tmp_path, "b.list", f":include:{a}\n")
    write_include(tmp_path, "a.list", f":include:{b}\n")
    d = make(passwd, tmp_path, f"x: :include:{a}\n")
    with pytest.raises(AliasLoop) as e:
        resolve(d, "x@example.org")
    assert (e.value.code, e.value.enhanced) == (550, "5.4.6")


# -- delivery --------------------------------------------------------------------------------


def test_delivery_owned_by_the_user(passwd, homes, tmp_path):
    d = make(passwd, tmp_path)
    outcomes = deliver(d, tmp_path, "alice@example.org", "bob@other.example")
    assert outcomes == [
        Outcome("alice@example.org", "delivered", 250, "2.0.0", "delivered to maildir"),
        Outcome("bob@other.example", "delivered", 250, "2.0.0", "delivered to maildir"),
    ]
    for user, uid, gid, rcpt in [("alice", 1000, 1000, "alice@example.org"), ("bob", 1001, 1002, "bob@other.example")]:
        md = homes[user] / "Maildir"
        for sub in ("", "tmp", "new", "cur"):
            st = os.lstat(md / sub)
            assert stat.S_ISDIR(st.st_mode)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o700), (user, sub)
        (name,) = os.listdir(md / "new")
        st = os.lstat(md / "new" / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (uid, gid, 0o600, 1)
        assert os.listdir(md / "tmp") == []
        box = mailbox.Maildir(str(md), create=False)
        (key,) = box.keys()
        assert box.get_bytes(key) == (
            f"Return-Path: <s@remote.example>\nDelivered-To: {rcpt}\n".encode() + MESSAGE.replace(b"\r\n", b"\n")
        )
        assert box[key]["Subject"] == "hi"


def test_implicit_aliases_follow_the_aliases_file(passwd, tmp_path):
    d = make(passwd, tmp_path, aliases="postmaster: alice\nabuse: erin\n")
    assert resolve(d, "root@example.org") == ["root@example.org"]  # the account, not postmaster
    assert resolve(d, "mailer-daemon@example.org") == ["alice@example.org"]
    assert resolve(d, "abuse@example.org") == ["erin@example.org"]


def test_root_mail_goes_to_root_maildir(passwd, homes, tmp_path):
    d = make(passwd, tmp_path)
    (rcpt,) = resolve(d, "postmaster@example.org")
    assert deliver(d, tmp_path, rcpt)[0].kind == "delivered"
    md = homes["root"] / "Maildir"
    (name,) = os.listdir(md / "new")
    st = os.lstat(md / "new" / name)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert len(mailbox.Maildir(str(md), create=False)) == 1


def test_existing_maildir_and_custom_location(passwd, homes, tmp_path):
    d = make(passwd, tmp_path, home_maildir="Mail/inbox")
    assert deliver(d, tmp_path, "erin@example.org")[0].kind == "delivered"
    for rel in ("Mail", "Mail/inbox", "Mail/inbox/new"):
        st = os.lstat(homes["erin"] / rel)
        assert (st.st_uid, st.st_gid) == (1004, 1004)
    # a second message into the existing Maildir
    assert deliver(d, tmp_path, "erin@example.org", qid="0123456789ABCDEFH")[0].kind == "delivered"
    assert len(os.listdir(homes["erin"] / "Mail" / "inbox" / "new")) == 2


def test_repeated_delivery_not_duplicated(passwd, homes, tmp_path):
    d = make(passwd, tmp_path)
    assert deliver(d, tmp_path, "alice@example.org")[0].kind == "delivered"
    assert deliver(d, tmp_path, "alice@example.org")[0].kind == "delivered"
    new = homes["alice"] / "Maildir" / "new"
    (name,) = os.listdir(new)
    os.rename(new / name, homes["alice"] / "Maildir" / "cur" / (name + ":2,S"))
    assert deliver(d, tmp_path, "alice@example.org")[0].kind == "delivered"
    assert os.listdir(new) == []


def test_home_problems_are_temporary(passwd, homes, tmp_path, logged):
    d = make(passwd, tmp_path)
    carol, dave = deliver(d, tmp_path, "carol@example.org", "dave@example.org")
    assert (carol.kind, carol.code, carol.status) == ("temporary", 451, "4.3.5")
    assert os.listdir(homes["carol"]) == []  # nothing created in a home the user does not own
    assert any(str(homes["carol"]) in line and "owned by uid 0, not 1003" in line for line in logged())
    assert (dave.kind, dave.code, dave.status) == ("temporary", 451, "4.3.0")
    assert "No such file or directory" in dave.text


def test_vanished_account_is_permanent(passwd, tmp_path):
    d = make(passwd, tmp_path)
    assert resolve(d, "bob@example.org") == ["bob@example.org"]
    del passwd.entries["bob"]  # userdel after the message was accepted
    assert deliver(d, tmp_path, "bob@example.org", "ghost@example.org", "alice@example.org") == [
        Outcome("bob@example.org", "permanent", 550, "5.1.1", "User unknown in local recipient table"),
        Outcome("ghost@example.org", "permanent", 550, "5.1.1", "User unknown in local recipient table"),
        Outcome("alice@example.org", "delivered", 250, "2.0.0", "delivered to maildir"),
    ]


# -- symlink attacks: root must never write through a link the user planted ------------------


@pytest.fixture
def outside(tmp_path):
    out = tmp_path / "outside"
    (out / "tmp").mkdir(parents=True)
    (out / "new").mkdir()
    (out / "cur").mkdir()
    (out / "secret").write_bytes(b"keep")
    return out


def attack_maildir_to_etc(home, outside):
    os.symlink("/etc", home / "Maildir")


def attack_maildir_to_outside(home, outside):
    os.symlink(str(outside), home / "Maildir")


def attack_sub(sub):
    def attack(home, outside):
        md = home / "Maildir"
        md.mkdir()
        for s in ("tmp", "new", "cur"):
            if s != sub:
                (md / s).mkdir()
        os.symlink(str(outside / sub), md / sub)
        for p in [md] + list(md.iterdir()):
            os.lchown(p, 1000, 1000)
    return attack


def attack_dangling(home, outside):
    os.symlink(str(outside / "not-yet"), home / "Maildir")


def attack_maildir_is_file(home, outside):
    os.symlink(str(outside / "secret"), home / "Maildir")


def attack_foreign_maildir(home, outside):
    # a directory of another user (here root's) moved into the home
    (home / "Maildir" / "new").mkdir(parents=True)


@pytest.mark.parametrize(
    "attack, why",
    [
        (attack_maildir_to_etc, "symbolic link"),
        (attack_maildir_to_outside, "symbolic link"),
        (attack_sub("tmp"), "symbolic link"),
        (attack_sub("new"), "symbolic link"),
        (attack_sub("cur"), "symbolic link"),
        (attack_maildir_is_file, "symbolic link"),
        (attack_dangling, "symbolic link"),
        (lambda home, outside: (home / "Maildir").write_bytes(b""), "not a directory"),
        (attack_foreign_maildir, "owned by uid 0"),
    ],
)
def test_symlink_attacks(passwd, homes, tmp_path, outside, logged, attack, why):
    home = homes["alice"]
    etc_before = sorted(os.listdir("/etc"))
    attack(home, outside)
    before = tree(outside)
    d = make(passwd, tmp_path)
    (o,) = deliver(d, tmp_path, "alice@example.org")
    assert (o.kind, o.code, o.status) == ("temporary", 451, "4.3.5")
    assert o.text.startswith("mailbox location not allowed: ")
    assert tree(outside) == before
    assert (outside / "secret").read_bytes() == b"keep"
    assert os.lstat(outside / "secret").st_uid == 0
    assert sorted(os.listdir("/etc")) == etc_before
    assert any("refusing to deliver into" in line and str(home / "Maildir") in line and why in line
               for line in logged()), logged()


def test_planted_tmp_file_symlink_is_replaced_not_followed(passwd, homes, tmp_path, outside):
    """The tmp/ name is predictable; a symlink (or file) planted there is removed, never written through."""
    d = make(passwd, tmp_path)
    assert deliver(d, tmp_path, "alice@example.org", qid="0123456789ABCDEFA")[0].kind == "delivered"
    md = homes["alice"] / "Maildir"
    (first,) = os.listdir(md / "new")
    assert "Q0123456789ABCDEFA" in first
    # the next message's tmp name (the names are deterministic, see docs/delivery.rst)
    unique = first.split(",")[0].replace("Q0123456789ABCDEFA", "Q0123456789ABCDEFB")
    os.symlink(str(outside / "secret"), md / "tmp" / unique)
    assert deliver(d, tmp_path, "alice@example.org", qid="0123456789ABCDEFB")[0].kind == "delivered"
    assert (outside / "secret").read_bytes() == b"keep"
    st = os.lstat(outside / "secret")
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.listdir(md / "tmp") == []
    assert len(os.listdir(md / "new")) == 2


# -- end to end: SMTP on 127.0.0.1 -> spool -> router -> ~alice/Maildir (worker thread) ------


def test_e2e_smtp_to_home_maildir(reactor, passwd, homes, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("root: alice\nprog: |/bin/sh -c 'touch /tmp/pwned'\n")
    directory = Directory(["example.org"], str(tmp_path / "unused"), aliases_path=str(aliases),
                          mode="system", passwd_lookup=passwd)
    spool = Spool(str(tmp_path / "spool"), fsync=True)
    queued: list[Envelope] = []
    cfg = ServerConfig(hostname="mx.example.org")
    factory = SMTPServerFactory(SMTPSettings(cfg), spool, queued.append, Policy(directory, cfg.trusted_networks), reactor)
    port = in_reactor(reactor, serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen, factory)
    try:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("s@remote.example")
            assert client.rcpt("nobody@example.org")[0] == 550
            code, text = client.rcpt("prog@example.org")
            assert (code, text.split()[0]) == (550, b"5.3.0")
            assert client.rcpt("www-data@example.org")[0] == 550
            assert client.rcpt("root@example.org") == (250, b"2.1.5 Ok")
            assert client.rcpt("bob+x@example.org") == (250, b"2.1.5 Ok")
            code, _ = client.data(MESSAGE)
            assert code == 250
    finally:
        in_reactor(reactor, port.stopListening)
    (env,) = queued
    assert [r.address for r in env.recipients] == ["alice@example.org", "bob@example.org"]
    agent = LocalDelivery(directory, "mx.example.org", run=threads.deferToThread)
    outcomes = in_reactor(reactor, Router(spool, directory, agent), env, env.recipients, lambda outcomes: None)
    assert [o.kind for o in outcomes] == ["delivered", "delivered"]
    for user, uid in (("alice", 1000), ("bob", 1001)):
        box = mailbox.Maildir(str(homes[user] / "Maildir"), create=False)
        (key,) = box.keys()
        assert box[key]["Delivered-To"] == f"{user}@example.org"
        assert box[key]["Subject"] == "hi"
        (name,) = os.listdir(homes[user] / "Maildir" / "new")
        assert os.lstat(homes[user] / "Maildir" / "new" / name).st_uid == uid
    assert not os.path.exists("/tmp/pwned")

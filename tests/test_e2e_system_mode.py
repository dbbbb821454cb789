"""
End-to-end: the real daemon (C{twistd -n mailhub}) with C{local.mode =
"system"}, delivering to a real host account created for the test with
C{useradd} (and removed with C{userdel -r}).  Mail for the account lands in
C{~account/Maildir/new}, owned by the account; C{root} reaches it through
an aliases file in the test directory (the real C{/root/Maildir} is never
touched); system accounts and unknown names are refused at RCPT.

Needs root (creating accounts, giving files away).  Skipped when not root
or without C{useradd}; under CI a missing C{useradd} fails.
"""

from __future__ import annotations

import os
import pwd
import random
import stat
import subprocess

import pytest

from conftest import require_tool
from daemon import CLEAN_EXIT, DOMAIN, Daemon, read_maildir, send, split_message, wait_for


def free_uid() -> int:
    for _ in range(1000):
        uid = random.randint(20000, 59000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("no free uid found")


@pytest.fixture(scope="module")
def account(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("system mode end-to-end needs root (useradd, files given to the account)")
    useradd = require_tool("useradd")
    userdel = require_tool("userdel")
    base = tmp_path_factory.mktemp("sysmode")
    os.chmod(base, 0o755)
    (base / "home").mkdir(mode=0o755)
    home = base / "home" / "mhtest"
    name = f"mhtest{random.randrange(16**6):06x}"
    uid = free_uid()
    r = subprocess.run(
        [useradd, "-m", "-d", str(home), "-u", str(uid), "-s", "/usr/sbin/nologin", name],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    try:
        yield pwd.getpwnam(name), base
    finally:
        subprocess.run([userdel, "-r", name], capture_output=True, timeout=30)
        try:
            pwd.getpwnam(name)
        except KeyError:
            pass
        else:  # pragma: no cover - leaves a trace rather than failing silently
            raise AssertionError(f"userdel -r {name} did not remove the test account")


def config(base) -> str:
    return f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = []

[spool]
path = "spool"

[local]
mode = "system"
domains = ["{DOMAIN}", "localhost"]
aliases = "{base / 'aliases'}"

[relay]
min_backoff = 1
max_backoff = 2
"""


@pytest.fixture(scope="module")
def daemon(account):
    pw, base = account
    # root is the test account here: nothing is written to the real /root/Maildir
    (base / "aliases").write_text(f"root: {pw.pw_name}\nwww-data: root\n")
    (base / "daemon").mkdir()
    d = Daemon(base / "daemon", config(base)).start()
    yield d
    assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log()
    assert d.stderr() == ""


def maildir_of(pw) -> str:
    return os.path.join(pw.pw_dir, "Maildir")


def delivered(pw, msgid: str) -> tuple[str, bytes]:
    """(path in new/, bytes) of the message with C{msgid} in the account's Maildir."""
    new = os.path.join(maildir_of(pw), "new")

    def find():
        if not os.path.isdir(new):
            return None
        for entry in os.listdir(new):
            path = os.path.join(new, entry)
            with open(path, "rb") as f:
                raw = f.read()
            if f"<{msgid}@client.test>".encode() in raw:
                return path, raw
        return None

    return wait_for(find, 10, f"{msgid} in {new}")


def message(to: str, msgid: str) -> bytes:
    return (
        f"From: sender@client.test\r\nTo: {to}\r\nSubject: system {msgid}\r\n"
        f"Message-ID: <{msgid}@client.test>\r\n\r\nhello {msgid}\r\n"
    ).encode()


def test_startup_log(daemon):
    log = daemon.log()
    assert "mailboxes ~ACCOUNT/Maildir (system accounts)" in log
    assert "runs as uid" not in log  # root: no warning


def test_mail_for_the_account_is_owned_by_it(daemon, account):
    pw, _ = account
    send(daemon, f"{pw.pw_name}@{DOMAIN}", message(f"{pw.pw_name}@{DOMAIN}", "s1"))
    path, raw = delivered(pw, "s1")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)
    for sub in ("", "tmp", "new", "cur"):
        d = os.lstat(os.path.join(maildir_of(pw), sub))
        assert stat.S_ISDIR(d.st_mode) and (d.st_uid, d.st_gid) == (pw.pw_uid, pw.pw_gid), sub
        assert stat.S_IMODE(d.st_mode) == 0o700, sub
    head, body = split_message(raw)
    assert f"Delivered-To: {pw.pw_name}@{DOMAIN}\n".encode() in head
    assert b"Return-Path: <sender@client.test>\n" in head
    assert body == b"hello s1\n"


def test_other_domain_and_extension_same_maildir(daemon, account):
    pw, _ = account
    send(daemon, f"{pw.pw_name}+tag@localhost", message(f"{pw.pw_name}+tag@localhost", "s2"))
    path, raw = delivered(pw, "s2")
    assert f"Delivered-To: {pw.pw_name}@localhost".encode() in raw
    assert os.stat(path).st_uid == pw.pw_uid


def test_root_and_postmaster_follow_the_aliases_file(daemon, account):
    pw, _ = account
    send(daemon, f"root@{DOMAIN}", message(f"root@{DOMAIN}", "s3"))
    send(daemon, f"postmaster@{DOMAIN}", message(f"postmaster@{DOMAIN}", "s4"))  # postmaster -> root -> alias
    send(daemon, f"www-data@{DOMAIN}", message(f"www-data@{DOMAIN}", "s5"))  # system account, aliased
    for msgid in ("s3", "s4", "s5"):
        path, raw = delivered(pw, msgid)
        assert os.stat(path).st_uid == pw.pw_uid
        assert f"Delivered-To: {pw.pw_name}@{DOMAIN}".encode() in raw


@pytest.mark.parametrize("local", ["daemon", "nobody", "no-such-account-here"])
def test_system_accounts_and_unknown_names_are_refused(daemon, local):
    with daemon.smtp() as s:
        s.ehlo()
        s.mail("sender@client.test")
        code, reply = s.rcpt(f"{local}@{DOMAIN}")
    assert (code, reply) == (550, b"5.1.1 User unknown in local recipient table")


def test_mail_for_root_is_delivered_once_to_the_account_never_to_real_root(daemon, account):
    pw, _ = account
    ids = ("r1", "r2")
    send(daemon, f"root@{DOMAIN}", message(f"root@{DOMAIN}", "r1"))
    send(daemon, f"postmaster@{DOMAIN}", message(f"postmaster@{DOMAIN}", "r2"))
    for msgid in ids:
        delivered(pw, msgid)
    box = read_maildir(maildir_of(pw))
    for msgid in ids:
        marker = f"Message-ID: <{msgid}@client.test>".encode()
        assert sum(marker in m for m in box) == 1, msgid
    real = "/root/Maildir/new"
    if os.path.isdir(real):
        for entry in os.listdir(real):
            with open(os.path.join(real, entry), "rb") as f:
                raw = f.read()
            assert not any(f"<{msgid}@client.test>".encode() in raw for msgid in ids)

"""
End-to-end: the real daemon (C{twistd -n mailhub}) with C{local.mode =
"system"}, started as root, delivering to a real host account created for
the test with C{useradd} (and removed with C{userdel -r}).  The daemon
switches to a throwaway system user (C{server.user}, created and removed
here too) once its port is bound: the process holding the SMTP socket
runs with that uid and no capability, while the root local delivery
supervisor still writes C{~account/Maildir/new}, owned by the account;
C{root} reaches it through an aliases file in the test directory (the
real C{/root/Maildir} is never touched); system accounts and unknown
names are refused at RCPT.

Needs root (creating accounts, giving files away).  Skipped when not root
or without C{useradd}; under CI a missing C{useradd} fails.  The test
directory is under /tmp (reachable by the daemon's user, unlike pytest's
0700 directory of root); skipped when that user cannot run this Python
and import mailhub (an interpreter under /root, say).
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import tempfile

import pytest
from accounts import free_uid, status
from conftest import require_tool
from daemon import CLEAN_EXIT, DOMAIN, Daemon, read_maildir, send, split_message, wait_for


@pytest.fixture(scope="module")
def account(daemon_user):
    useradd = require_tool("useradd")
    userdel = require_tool("userdel")
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="mailhub-sysmode-", dir="/tmp"))
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
        finally:
            shutil.rmtree(base, ignore_errors=True)


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
def daemon(account, daemon_user):
    pw, base = account
    # root is the test account here: nothing is written to the real /root/Maildir
    (base / "aliases").write_text(f"root: {pw.pw_name}\nwww-data: root\n")
    (base / "daemon").mkdir()
    os.chmod(base / "daemon", 0o755)
    d = Daemon(base / "daemon", config(base), user=daemon_user.pw_name).start()
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


# -- privilege separation ------------------------------------------------------------------


def listening_inode(port: int) -> str:
    """The inode of the socket listening on 127.0.0.1:PORT, from /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def holders(inode: str) -> set[int]:
    """Every process with a descriptor on the socket C{inode}."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    found.add(int(pid))
        except OSError:
            continue
    return found


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def is_acceptor(pid: int) -> bool:
    """An SMTP acceptor process (server.processes; docs/architecture.rst)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"mailhub.daemon.acceptor" in f.read().split(b"\0")


def supervisor_of(daemon) -> int:
    """The daemon's one child that is not an SMTP acceptor: the delivery supervisor."""
    [supervisor] = [c for c in children(daemon.proc.pid) if not is_acceptor(c)]
    return supervisor


def test_the_smtp_processes_run_as_server_user_without_capabilities(daemon, daemon_user):
    # the daemon bound the socket; its SMTP acceptor processes (if any) hold it too, and nothing else
    pids = holders(listening_inode(daemon.port))
    assert daemon.proc.pid in pids
    assert all(is_acceptor(pid) for pid in pids - {daemon.proc.pid})
    uid = str(daemon_user.pw_uid)
    for pid in pids:
        st = status(pid)
        assert st["Uid"].split() == [uid] * 4, pid
        assert st["Gid"].split() == [str(daemon_user.pw_gid)] * 4, pid
        assert st["Groups"].split() == [str(daemon_user.pw_gid)], pid  # initgroups: its own group only
        for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(st[cap], 16) == 0, (pid, cap)
    assert f"running as {daemon_user.pw_name} (uid {uid}" in daemon.log()


def test_the_spool_and_control_socket_belong_to_server_user(daemon, daemon_user):
    for path in (daemon.spool, os.path.join(daemon.spool, "queue"), os.path.join(daemon.spool, "control.sock")):
        assert os.lstat(path).st_uid == daemon_user.pw_uid, path
    assert stat.S_IMODE(os.stat(os.path.join(daemon.spool, "queue")).st_mode) == 0o700


def test_only_the_delivery_supervisor_and_its_processes_keep_root(daemon):
    supervisor = supervisor_of(daemon)
    assert status(supervisor)["Uid"].split() == ["0"] * 4
    # (a worker another test killed may still be waiting for its restart)
    workers = wait_for(lambda: children(supervisor) or None, 20, "the supervisor's delivery processes")
    assert all(status(w)["Uid"].split() == ["0"] * 4 for w in workers)


def test_a_delivery_process_killed_after_the_switch_is_started_again(daemon, account):
    pw, _ = account
    supervisor = supervisor_of(daemon)
    [worker] = wait_for(lambda: children(supervisor) or None, 20, "the supervisor's delivery process")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: [w for w in children(supervisor) if w != worker] or None, 20, "a new delivery process")
    send(daemon, f"{pw.pw_name}@{DOMAIN}", message(f"{pw.pw_name}@{DOMAIN}", "s6"))
    path, _ = delivered(pw, "s6")
    assert os.stat(path).st_uid == pw.pw_uid

"""
End to end: real Maildir readers on what LocalDelivery writes.

(a) mblaze (mlist, mhdr, mshow) finds, parses and shows the message;
(b) Dovecot (started here with a throwaway configuration on 127.0.0.1)
serves it over IMAP, and the bytes FETCHed are the bytes queued (IMAP uses
CRLF), plus the two trace headers.  Dovecot trusts the C{,S=<size>} in the
file name, so a wrong size would show up here as a FETCH error.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import signal
import socket
import subprocess

import pytest
from conftest import in_reactor, require_tool
from peers import free_port, wait_for
from twisted.internet import defer, threads

from mailhub.delivery.directory import Directory
from mailhub.delivery.local import LocalDelivery
from mailhub.envelope import Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes

MESSAGE = (
    b"Received: from client.example ([127.0.0.1]) by mx.example.org\r\n"
    b"From: =?utf-8?q?J=C3=B6rg?= <joerg@remote.example>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?= from\r\n"
    b" a folded subject\r\n"
    b"Message-ID: <e2e-1@remote.example>\r\n"
    b"Date: Tue, 01 Oct 2024 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b"\r\n"
    b".a line that was dot-stuffed on the wire\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac\r\n"
    + b"filler line to make the message span several read chunks\r\n" * 2000
    + b"-- \r\nJ\xc3\xb6rg\r\n"
)
SENDER = "joerg@remote.example"


def sync_run(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


def deliver(tmp_path, run=sync_run, users=("alice",)) -> tuple[str, str, defer.Deferred]:
    """Queue file -> LocalDelivery -> Maildir.  Returns (mailbox root, maildir, outcomes)."""
    root = str(tmp_path / "mailboxes")
    os.makedirs(root)
    env = Envelope("0123456789ABCDEFG", SENDER, [Recipient("alice@example.org")], arrival=0.0)
    queued = tmp_path / "queued"
    queued.write_bytes(queue_file_bytes(MESSAGE, env))  # a queue file, as the spool commits it
    directory = Directory(["example.org"], root, users=list(users))
    agent = LocalDelivery(directory, "mx.example.org", run=run)
    d = agent.deliver(env, env.recipients, str(queued), report=lambda outcomes: None)
    return root, directory.maildir_for("alice@example.org"), d


def expected_lf() -> bytes:
    return (
        f"Return-Path: <{SENDER}>\nDelivered-To: alice@example.org\n".encode()
        + MESSAGE.replace(b"\r\n", b"\n")
    )


def run_tool(*args: str) -> bytes:
    return subprocess.run(args, check=True, capture_output=True, timeout=30).stdout


# -- (a) mblaze -------------------------------------------------------------------------


def test_mblaze_reads_delivered_message(tmp_path):
    mlist = require_tool("mlist")
    mhdr = require_tool("mhdr")
    mshow = require_tool("mshow")
    root, maildir, d = deliver(tmp_path)
    outcomes = []
    d.addCallback(outcomes.extend)
    assert [(o.kind, o.code) for o in outcomes] == [("delivered", 250)]

    listed = run_tool(mlist, maildir).decode().splitlines()
    assert len(listed) == 1
    path = listed[0]
    assert os.path.dirname(path) == os.path.join(maildir, "new")
    assert run_tool(mlist, "-N", maildir).decode().splitlines() == [path]  # it is new (unseen)
    with open(path, "rb") as f:
        assert f.read() == expected_lf()

    assert run_tool(mhdr, "-h", "return-path", path) == f"<{SENDER}>\n".encode()
    assert run_tool(mhdr, "-h", "delivered-to", path) == b"alice@example.org\n"
    assert run_tool(mhdr, "-h", "message-id", path) == b"<e2e-1@remote.example>\n"
    assert run_tool(mhdr, "-d", "-h", "subject", path).decode() == "grüße from a folded subject\n"

    shown = run_tool(mshow, path).decode("utf-8")
    assert "Subject: grüße from a folded subject" in shown
    assert "From: Jörg <joerg@remote.example>" in shown
    assert "Hello Alice,\n\n.a line that was dot-stuffed on the wire\ncafé €\n" in shown
    assert shown.rstrip("\n").endswith("-- \nJörg")


# -- (b) Dovecot ---------------------------------------------------------------------------


def mail_identity() -> tuple[int, int, str, str]:
    """
    (uid, gid, internal user, login user) for the throwaway Dovecot.  Dovecot
    refuses to serve mail as uid 0, so as root the mailboxes are handed to
    nobody (as they would belong to a vmail user in production) and Dovecot
    uses the accounts its Debian package created.
    """
    if os.getuid() == 0:
        nobody = pwd.getpwnam("nobody")
        names = {p.pw_name for p in pwd.getpwall()}
        internal = "dovecot" if "dovecot" in names else "nobody"
        login = "dovenull" if "dovenull" in names else "nobody"
        return nobody.pw_uid, nobody.pw_gid, internal, login
    me = pwd.getpwuid(os.getuid()).pw_name
    return os.getuid(), os.getgid(), me, me


def chown_tree(path: str, uid: int, gid: int) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), uid, gid)


DOVECOT_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{mailboxes}/%d/%n
default_internal_user = {internal}
default_login_user = {login}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%d/%n
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


@pytest.fixture
def traversable(tmp_path):
    """
    Let Dovecot's unprivileged processes reach tmp_path: pytest makes its
    base directories 0700, so add search (o+x, not read) permission to
    tmp_path and the ancestors that lack it, and restore them afterwards.
    """
    changed = []
    if os.getuid() == 0:
        for p in [tmp_path, *tmp_path.parents]:
            mode = os.stat(p).st_mode & 0o7777
            if mode & 0o001:
                break
            os.chmod(p, mode | 0o001)
            changed.append((p, mode))
    yield
    for p, mode in changed:
        os.chmod(p, mode)


@pytest.fixture
def dovecot(tmp_path, traversable):
    """Start a Dovecot for one test; yields a function (mailboxes) -> port; always stopped."""
    binary = require_tool("dovecot")
    base = tmp_path / "dovecot"
    base.mkdir()
    (base / "passwd").write_text("alice@example.org:{PLAIN}wonderland\n")
    os.chmod(base / "passwd", 0o644)
    conf = str(base / "dovecot.conf")
    started = []

    def start(mailboxes: str) -> int:
        uid, gid, internal, login = mail_identity()
        if os.getuid() == 0:
            chown_tree(mailboxes, uid, gid)
        port = free_port()
        with open(conf, "w") as f:
            f.write(DOVECOT_CONF.format(base=base, mailboxes=mailboxes, internal=internal, login=login,
                                        uid=uid, gid=gid, port=port))
        subprocess.run([binary, "-c", conf], check=True, timeout=30)
        started.append(True)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        try:
            wait_for(listening, 15, "dovecot's listener", interval=0.05)
        except AssertionError:
            raise AssertionError("dovecot did not listen: " + dovecot_log(base)) from None
        return port

    yield start

    if started:
        pidfile = base / "run" / "master.pid"
        pid = int(pidfile.read_text()) if pidfile.exists() else None
        subprocess.run([binary, "-c", conf, "stop"], timeout=30, capture_output=True)
        if pid is not None:

            def gone() -> bool:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return True
                return False

            try:
                wait_for(gone, 10, "dovecot to exit", interval=0.05)
            except AssertionError:
                os.kill(pid, signal.SIGKILL)


def dovecot_log(base) -> str:
    path = os.path.join(str(base), "dovecot.log")
    return open(path).read() if os.path.exists(path) else "(no log)"


def test_dovecot_serves_delivered_message(tmp_path, dovecot, reactor):
    # Deliver through the production runner (a thread of the running reactor).
    holder = {}

    def go():
        root, maildir, d = deliver(tmp_path, run=threads.deferToThread)
        holder["root"], holder["maildir"] = root, maildir
        return d

    outcomes = in_reactor(reactor, go)
    assert [(o.kind, o.code, o.status, o.text) for o in outcomes] == [
        ("delivered", 250, "2.0.0", "delivered to maildir")
    ]
    port = dovecot(holder["root"])

    imap = imaplib.IMAP4("127.0.0.1", port)

    def logged_in() -> bool:
        # Dovecot answers "[UNAVAILABLE] Temporary authentication failure"
        # while its auth process is still starting on a busy machine
        try:
            return imap.login("alice@example.org", "wonderland")[0] == "OK"
        except imaplib.IMAP4.error as e:
            if "UNAVAILABLE" not in str(e):
                raise
            return False

    try:
        wait_for(logged_in, 20, "dovecot to log alice in", interval=0.2)
        typ, data = imap.select("INBOX", readonly=True)
        assert (typ, data) == ("OK", [b"1"])
        typ, data = imap.fetch("1", "(RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK", data
        meta, body = data[0]
        crlf = expected_lf().replace(b"\n", b"\r\n")
        assert body == crlf
        # apart from the trace headers, exactly the queued bytes
        assert body.split(b"\r\n", 2)[2] == MESSAGE
        assert f"RFC822.SIZE {len(crlf)}".encode() in meta
        typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (RETURN-PATH DELIVERED-TO)])")
        assert data[0][1] == f"Return-Path: <{SENDER}>\r\nDelivered-To: alice@example.org\r\n\r\n".encode()
        typ, data = imap.fetch("1", "(FLAGS)")
        assert b"\\Seen" not in data[0]
        imap.logout()
    finally:
        try:
            imap.shutdown()
        except OSError:
            pass
    log = dovecot_log(tmp_path / "dovecot")
    assert "Error" not in log and "Panic" not in log, log

"""
End to end: the real daemon with C{server.processes = 2} -- SMTP sessions
in two acceptor processes on the sockets the main process bound, the
shared state (per-IP limits, the AUTH throttle) in the main process's
anvil, restarts, reload, shutdown.

Which process serves a connection is read from the kernel (the server
side's socket inode in /proc/net/tcp and the acceptors' descriptors), and
a connection is steered to one acceptor by stopping the other (SIGSTOP:
a stopped process accepts nothing, the running one takes the connection).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from daemon import DOMAIN, Daemon, config_text, delivered_with, message, read_maildir, send, wait_for

from mailhub.users import UsersFile

PASSWORD = "correct horse battery"


def config(extra_server: str = "", extra: str = "", users: str = "") -> str:
    text = config_text()
    text = text.replace("[server]\n", f"[server]\nprocesses = 2\n{extra_server}\n", 1)
    if users:
        text += f'\n[auth]\nusers = "{users}"\nallow_plaintext_loopback = true\n{extra}\n'
    return text


def acceptors(d: Daemon) -> list[int]:
    """The daemon's acceptor processes (its children running mailhub.daemon.acceptor)."""
    assert d.proc is not None
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == d.proc.pid and b"mailhub.daemon.acceptor" in cmdline:
            found.append(int(name))
    return sorted(found)


def two_acceptors(d: Daemon) -> list[int]:
    """The two acceptor processes, once both listen."""
    pids = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(acceptors(d)), 30, "two acceptor processes")
    wait_for(lambda: all(f"acceptor process {p} serves SMTP" in d.log() for p in pids), 30, "both to listen")
    return pids


def serving(d: Daemon, client: socket.socket, pids: list[int]) -> int | None:
    """The pid of the process holding the server side of C{client}'s connection."""
    port = client.getsockname()[1]
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == d.port and int(remote.split(":")[1], 16) == port:
                inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """C{pid} stopped (it accepts nothing) for the block."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def connect(d: Daemon) -> tuple[smtplib.SMTP, bytes]:
    s = smtplib.SMTP(timeout=20, local_hostname="client.test")
    code, greeting = s.connect("127.0.0.1", d.port)
    return s, f"{code} ".encode() + greeting


def greet_on(d: Daemon, pids: list[int], want: int) -> tuple[smtplib.SMTP, bytes]:
    """A connection accepted by acceptor C{want} (the others are stopped while it connects), and its greeting."""
    others = [p for p in pids if p != want]
    for p in others:
        os.kill(p, signal.SIGSTOP)
    try:
        s, greeting = connect(d)
        if greeting.startswith(b"220 "):
            assert serving(d, s.sock, pids) == want
    finally:
        for p in others:
            os.kill(p, signal.SIGCONT)
    return s, greeting


def connect_on(d: Daemon, pids: list[int], want: int) -> smtplib.SMTP:
    """A session served by acceptor C{want}."""
    s, greeting = greet_on(d, pids, want)
    assert greeting.startswith(b"220 "), greeting
    return s


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, config()).start()
    yield d
    d.stop()


def test_sessions_are_served_by_two_acceptor_processes(daemon):
    pids = two_acceptors(daemon)
    assert daemon.proc.pid not in pids
    seen = {}
    for want in pids + pids:
        s = connect_on(daemon, pids, want)
        seen.setdefault(want, 0)
        seen[want] += 1
        s.ehlo()
        code, reply = s.mail("sender@client.test")
        assert code == 250
        s.rcpt(f"alice@{DOMAIN}")
        code, reply = s.data(message(f"alice@{DOMAIN}", f"pid{want}-{seen[want]}"))
        assert code == 250, reply
        s.quit()
    assert sorted(seen) == pids
    for want in pids:
        delivered_with(daemon, "alice", f"pid{want}-1")
        delivered_with(daemon, "alice", f"pid{want}-2")
    # the main process's log has the acceptors' lines, and says which serve
    log = daemon.log()
    for pid in pids:
        assert f"acceptor process {pid} serves SMTP" in log
    assert log.count("accepted from=<sender@client.test>") == 4


def test_per_ip_limit_counts_over_every_process(tmp_path):
    d = Daemon(tmp_path, config("max_connections_per_ip = 2")).start()
    try:
        pids = two_acceptors(d)
        first = connect_on(d, pids, pids[0])
        second = connect_on(d, pids, pids[1])  # one each: neither process alone is at the limit
        for pid in pids:  # a third one, whichever process accepts it
            third, greeting = greet_on(d, pids, pid)
            assert greeting.startswith(b"421 4.7.0 ") and b"too many connections" in greeting, greeting
            third.close()
        second.quit()
        # the freed place is given back in the main process: a new one is admitted
        s = wait_for(lambda: (lambda c: c if c[1].startswith(b"220") else c[0].close())(connect(d)), 10, "a free place")
        s[0].quit()
        first.quit()
        d.log_with("limit=max_connections_per_ip")
    finally:
        d.stop()


def test_auth_failures_are_counted_over_every_process(tmp_path):
    users = UsersFile(str(tmp_path / "users"), rounds=4)
    users.add(f"alice@{DOMAIN}", PASSWORD)
    d = Daemon(tmp_path, config(users=str(tmp_path / "users"), extra="max_failures = 2\nfailure_delay = 0.1")).start()
    wrong = base64.b64encode(f"\0alice@{DOMAIN}\0wrong password".encode()).decode()
    try:
        pids = two_acceptors(d)
        for n, pid in enumerate(pids):
            s = connect_on(d, pids, pid)
            s.ehlo()
            code, reply = s.docmd("AUTH", "PLAIN " + wrong)
            if n == 0:
                assert (code, reply[:5]) == (535, b"5.7.8"), reply
            else:
                # the second failure, in the other process, reaches max_failures = 2
                assert (code, reply[:5]) == (421, b"4.7.0"), reply
            s.close()
        # blocked everywhere: any process answers 421 at AUTH, before any check
        for pid in pids:
            s = connect_on(d, pids, pid)
            s.ehlo()
            good = base64.b64encode(f"\0alice@{DOMAIN}\0{PASSWORD}".encode()).decode()
            code, reply = s.docmd("AUTH", "PLAIN " + good)
            assert (code, reply[:5]) == (421, b"4.7.0"), reply
            s.close()
    finally:
        d.stop()


def test_a_killed_acceptor_is_restarted_and_loses_no_acknowledged_mail(daemon):
    pids = two_acceptors(daemon)
    acknowledged: list[str] = []
    stop = threading.Event()

    def client() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            msgid = f"kill{n}"
            try:
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20, local_hostname="client.test") as s:
                    s.sendmail("sender@client.test", [f"bob@{DOMAIN}"], message(f"bob@{DOMAIN}", msgid))
                acknowledged.append(msgid)
            except (smtplib.SMTPException, OSError):
                continue  # the killed process's session: no 250, the client would retry

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acknowledged) >= 5, 30, "mail flowing")
        os.kill(pids[0], signal.SIGKILL)
        replaced = wait_for(
            lambda: (lambda p: p if len(p) == 2 and pids[0] not in p else None)(acceptors(daemon)),
            30, "a new acceptor process",
        )
        count = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= count + 5, 30, "mail flowing after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert pids[1] in replaced
    log = daemon.log()
    assert f"acceptor process {pids[0]} ended (killed by signal 9)" in log
    new = [p for p in replaced if p != pids[1]][0]
    wait_for(lambda: f"acceptor process {new} serves SMTP" in daemon.log(), 30, "the new acceptor to serve")

    def all_there() -> bool:
        box = b"".join(read_maildir(daemon.maildir("bob")))
        return all(f"<{m}@client.test>".encode() in box for m in acknowledged)

    wait_for(all_there, 30, "every acknowledged message in bob's Maildir")


def test_committed_mail_reaches_the_scheduler_at_once(tmp_path):
    # min_backoff is long: a message found only by a later scan of the
    # spool (or the next start) would not be delivered within the test.
    text = config().replace("min_backoff = 1\nmax_backoff = 2", "min_backoff = 3600\nmax_backoff = 7200")
    d = Daemon(tmp_path, text).start()
    try:
        two_acceptors(d)
        start = time.monotonic()
        qid = send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "atonce"))
        delivered_with(d, "alice", "atonce")
        assert time.monotonic() - start < 10
        wait_for(lambda: f"{qid}: to=<alice@{DOMAIN}>" in d.log(), 10, "the delivery line")
    finally:
        d.stop()


def test_shutdown_drains_every_acceptor(daemon):
    pids = two_acceptors(daemon)
    idle = [connect_on(daemon, pids, pid) for pid in pids]
    for s in idle:
        assert s.ehlo()[0] == 250
    assert daemon.stop() == -signal.SIGTERM
    for s in idle:
        # each acceptor answered 421 4.3.2 to its idle client before it ended
        code, reply = s.getreply()
        assert (code, reply[:5]) == (421, b"4.3.2"), reply
        s.close()
    assert acceptors(daemon) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}/stat") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


def test_reload_reaches_the_acceptors(tmp_path):
    d = Daemon(tmp_path, config()).start()
    try:
        pids = two_acceptors(d)
        with open(d.conf) as f:
            text = f.read()
        with open(d.conf, "w") as f:
            f.write(text.replace('users = ["alice", "bob"]', 'users = ["alice", "bob", "carol"]'))
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload" in d.log() and "local.users" in d.log(), 20, "the reload line")
        def accepted(pid: int) -> bool:
            s = connect_on(d, pids, pid)
            try:
                s.ehlo()
                s.mail("sender@client.test")
                return s.rcpt(f"carol@{DOMAIN}")[0] == 250
            finally:
                s.close()

        for pid in pids:
            wait_for(lambda p=pid: accepted(p), 20, f"acceptor {pid} to know carol")
        assert acceptors(d) == pids  # reloaded in place, not restarted
    finally:
        d.stop()


def test_processes_1_serves_in_the_daemon_itself(tmp_path):
    d = Daemon(tmp_path, config_text().replace("[server]\n", "[server]\nprocesses = 1\n", 1)).start()
    try:
        send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "single"))
        delivered_with(d, "alice", "single")
        assert acceptors(d) == []
    finally:
        d.stop()


def test_acceptors_run_as_the_user_with_a_key_only_root_reads(daemon_user):
    from accounts import status

    from mailhub.tls import make_self_signed

    base = Path(tempfile.mkdtemp(prefix="mailhub-acceptors-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        cert, key = str(base / "cert.pem"), str(base / "key.pem")
        make_self_signed("mx.example.test", cert, key)
        os.chmod(key, 0o600)  # root's: the acceptors get it from the daemon
        text = config(f'tls_cert = "{cert}"\ntls_key = "{key}"')
        d = Daemon(base, text, user=daemon_user.pw_name).start()
        try:
            pids = two_acceptors(d)
            uid = str(daemon_user.pw_uid)
            for pid in pids + [d.proc.pid]:
                assert status(pid)["Uid"].split() == [uid] * 4
                assert int(status(pid)["CapEff"], 16) == 0
            for pid in pids:
                s = connect_on(d, pids, pid)
                s.ehlo()
                assert s.has_extn("starttls")
                context = ssl.create_default_context(cafile=cert)
                context.check_hostname = False
                s._host = "mx.example.test"  # smtplib names the server it connected to by its constructor only
                code, reply = s.starttls(context=context)
                assert code == 220, reply
                assert s.sock.getpeercert()["subject"]
                s.ehlo()
                s.mail("sender@client.test")
                assert s.rcpt(f"alice@{DOMAIN}")[0] == 250
                code, reply = s.data(message(f"alice@{DOMAIN}", f"tls{pid}"))
                assert code == 250, reply
                s.quit()
                delivered_with(d, "alice", f"tls{pid}")
        finally:
            assert d.stop() == -signal.SIGTERM, d.stderr()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_smtps_and_submission_in_acceptors(tmp_path):
    import re

    from mailhub.tls import make_self_signed

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    make_self_signed("mx.example.test", cert, key)
    users = UsersFile(str(tmp_path / "users"), rounds=4)
    users.add(f"alice@{DOMAIN}", PASSWORD)
    text = config(
        f'tls_cert = "{cert}"\ntls_key = "{key}"\nsmtps = ["tcp:0:interface=127.0.0.1"]\n'
        'submission = ["tcp:0:interface=127.0.0.1"]',
        users=str(tmp_path / "users"),
    )
    d = Daemon(tmp_path, text).start()
    try:
        pids = two_acceptors(d)
        ports = {
            kind: int(port)
            for kind, port in re.findall(r"listening for (SMTPS|SUBMISSION) on \S+ \(127\.0\.0\.1:(\d+)\)", d.log())
        }
        context = ssl.create_default_context(cafile=cert)
        context.check_hostname = False
        for pid in pids:
            others = [p for p in pids if p != pid]
            with stopped(others[0]):
                s = smtplib.SMTP_SSL("127.0.0.1", ports["SMTPS"], context=context, timeout=20)
            s.ehlo("client.test")
            s.login(f"alice@{DOMAIN}", PASSWORD)
            s.sendmail(f"alice@{DOMAIN}", [f"bob@{DOMAIN}"], message(f"bob@{DOMAIN}", f"smtps{pid}"))
            s.quit()
            with stopped(others[0]):
                s = smtplib.SMTP("127.0.0.1", ports["SUBMISSION"], timeout=20)
            s.ehlo("client.test")
            s._host = "mx.example.test"
            s.starttls(context=context)
            s.ehlo("client.test")
            s.login(f"alice@{DOMAIN}", PASSWORD)
            s.sendmail(f"alice@{DOMAIN}", [f"bob@{DOMAIN}"], message(f"bob@{DOMAIN}", f"submission{pid}"))
            s.quit()
        for pid in pids:
            delivered_with(d, "bob", f"smtps{pid}")
            delivered_with(d, "bob", f"submission{pid}")
    finally:
        d.stop()


def test_rate_limits_count_over_every_process(tmp_path):
    # [limits] in memory: the counter is the daemon's, the acceptors hit it over their channel
    d = Daemon(tmp_path, config() + "\n[limits]\nclient_messages_per_min = 2\n").start()
    try:
        pids = two_acceptors(d)
        for pid in pids:  # one MAIL on each process: neither alone is at the limit
            s = connect_on(d, pids, pid)
            s.ehlo()
            assert s.mail("sender@client.test")[0] == 250
            s.quit()
        for pid in pids:  # the third and fourth, whichever process serves them
            s = connect_on(d, pids, pid)
            s.ehlo()
            code, reply = s.mail("sender@client.test")
            assert (code, reply[:5]) == (450, b"4.7.1"), reply
            s.quit()
        wait_for(lambda: "limit=client_messages key=127.0.0.1 count=4" in d.log(), 10, "the rate limit line")
    finally:
        d.stop()

"""
End-to-end: the real daemon (C{twistd -n mailhub}) in a subprocess, on a
free port on 127.0.0.1, with a temporary configuration; mail sent with
smtplib is read back from the Maildir with C{mailbox.Maildir}.

L{Daemon} is also used by test_e2e_crash.py.
"""

from __future__ import annotations

import mailbox
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from typing import Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN = "example.test"
TWISTD = "from twisted.scripts.twistd import run; run()"
_LISTENING = re.compile(r"listening for SMTP on \S+ \(127\.0\.0\.1:(\d+)\)")


#: twistd stops cleanly on SIGTERM and then re-raises the signal, so a clean
#: stop exits "killed by SIGTERM".
CLEAN_EXIT = -signal.SIGTERM


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll C{predicate} until it is true; bounded, for real subprocesses."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def config_text(trusted: str = "[]", fsync: bool = True, extra_local: str = "") -> str:
    return f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = {trusted}

[spool]
path = "spool"
fsync = {"true" if fsync else "false"}

[local]
domains = ["{DOMAIN}"]
mailboxes = "mailboxes"
users = ["alice", "bob"]
{extra_local}

[relay]
min_backoff = 1
max_backoff = 2
"""


class Daemon:
    """
    C{twistd -n mailhub --config FILE} as a subprocess, working directory
    C{home}.  The listener is C{tcp:0}; the real port is read from the
    startup log line.
    """

    def __init__(self, home, text: str | None = None) -> None:
        self.home = str(home)
        self.conf = os.path.join(self.home, "mailhub.toml")
        if text is not None or not os.path.exists(self.conf):
            with open(self.conf, "w") as f:
                f.write(text if text is not None else config_text())
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.runs = 0

    @property
    def spool(self) -> str:
        return os.path.join(self.home, "spool")

    def maildir(self, user: str) -> str:
        return os.path.join(self.home, "mailboxes", DOMAIN, user)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("MAILHUB_CONFIG", None)
        return env

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "mailhub", "--config", self.conf, *extra]

    def start(self) -> "Daemon":
        self.runs += 1
        self.log_path = os.path.join(self.home, f"daemon{self.runs}.log")
        self.err_path = os.path.join(self.home, f"daemon{self.runs}.err")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.home,
            env=self.env(),
            stdout=open(self.log_path, "wb"),
            stderr=open(self.err_path, "wb"),
        )

        def listening():
            m = _LISTENING.search(self.log())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}:\n{self.log()}\n{self.stderr()}"
                )
            return None

        self.port = wait_for(listening, 30, "the daemon to listen")
        return self

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr(self) -> str:
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=20)

    def stop(self) -> int:
        """SIGTERM and wait: a clean shutdown."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("daemon did not stop within 20 s of SIGTERM")

    def kill(self) -> None:
        """SIGKILL: the crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def queued(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.spool, "envelopes")))


def read_maildir(path: str) -> list[bytes]:
    """Every message in the Maildir (new/ and cur/), as bytes."""
    if not all(os.path.isdir(os.path.join(path, sub)) for sub in ("tmp", "new", "cur")):
        return []  # not created yet (or being created right now)
    box = mailbox.Maildir(path, factory=None, create=False)
    return [box.get_bytes(key) for key in sorted(box.keys())]


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """(headers, body) with line ends normalised to LF."""
    raw = raw.replace(b"\r\n", b"\n")
    head, sep, body = raw.partition(b"\n\n")
    assert sep, raw[:200]
    return head, body


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon")).start()
    yield d
    assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log()
    assert d.stderr() == ""


BODY = (
    b"First line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"\r\n"
    b"tabs\tand trailing spaces   \r\n"
    + b"x" * 990 + b"\r\n"
    b"last line\r\n"
)


def message(to: str, msgid: str) -> bytes:
    return (
        f"From: sender@client.test\r\nTo: {to}\r\nSubject: e2e {msgid}\r\n"
        f"Message-ID: <{msgid}@client.test>\r\n\r\n"
    ).encode() + BODY


def send(d: Daemon, rcpt: str, data: bytes, sender: str = "sender@client.test") -> str:
    """Send one message; return the queue id from the 250 reply."""
    with d.smtp() as s:
        code, _ = s.ehlo()
        assert code == 250
        code, reply = s.mail(sender)
        assert (code, reply[:5]) == (250, b"2.1.0"), reply
        code, reply = s.rcpt(rcpt)
        assert (code, reply[:5]) == (250, b"2.1.5"), reply
        code, reply = s.data(data)
        assert code == 250, reply
        m = re.match(rb"2\.0\.0 .*queued as ([0-9A-Z]+)", reply)
        assert m, reply
        return m.group(1).decode()


def delivered_with(d: Daemon, user: str, msgid: str) -> bytes:
    def find():
        for raw in read_maildir(d.maildir(user)):
            if f"<{msgid}@client.test>".encode() in raw:
                return raw
        return None

    return wait_for(find, 10, f"{msgid} in {user}'s Maildir")


def test_startup_log_says_where(daemon):
    log = daemon.log()
    assert f"configuration: {daemon.conf}" in log
    assert f"spool {daemon.spool};" in log
    assert f"mailboxes {os.path.join(daemon.home, 'mailboxes')};" in log
    assert f"local domains {DOMAIN}" in log
    assert f"listening for SMTP on tcp:0:interface=127.0.0.1 (127.0.0.1:{daemon.port})" in log
    assert daemon.stderr() == ""


def test_deliver_to_local_user(daemon):
    data = message(f"alice@{DOMAIN}", "m1")
    qid = send(daemon, f"alice@{DOMAIN}", data)
    raw = delivered_with(daemon, "alice", "m1")
    head, body = split_message(raw)
    assert body == BODY.replace(b"\r\n", b"\n")
    assert b"Subject: e2e m1\n" in head
    assert b"From: sender@client.test\n" in head
    # the spool lets go of the message once it is delivered
    wait_for(lambda: qid + ".json" not in daemon.queued(), 10, "the spool to drop " + qid)


def test_deliver_to_postmaster_any_case(daemon):
    data = message(f"PostMaster@{DOMAIN}", "m2")
    send(daemon, f"PostMaster@{DOMAIN}", data)
    _, body = split_message(delivered_with(daemon, "postmaster", "m2"))
    assert body == BODY.replace(b"\r\n", b"\n")


def test_address_extension(daemon):
    send(daemon, f"bob+lists@{DOMAIN}", message(f"bob+lists@{DOMAIN}", "m3"))
    _, body = split_message(delivered_with(daemon, "bob", "m3"))
    assert body == BODY.replace(b"\r\n", b"\n")


def test_unknown_user_550(daemon):
    with daemon.smtp() as s:
        s.ehlo()
        s.mail("sender@client.test")
        code, reply = s.rcpt(f"nobody@{DOMAIN}")
        assert code == 550
        assert reply.startswith(b"5.1.1 "), reply


def test_relay_denied_554(daemon):
    # trusted_networks = []: even 127.0.0.1 may not relay
    with daemon.smtp() as s:
        s.ehlo()
        s.mail("sender@client.test")
        code, reply = s.rcpt("someone@elsewhere.example")
        assert code == 554
        assert reply.startswith(b"5.7.1 "), reply


def test_bad_config_one_clean_line(tmp_path):
    d = Daemon(tmp_path, "[server]\nmax_recipients = -3\n")
    r = subprocess.run(d.command(), cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 78
    assert r.stderr == f"mailhub: {d.conf}: server.max_recipients: must be a positive integer, got -3\n"
    assert "Traceback" not in r.stdout


def test_bad_endpoint_option_one_clean_line(tmp_path):
    d = Daemon(tmp_path)
    r = subprocess.run(
        d.command("--smtp", "tcp:notaport"), cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 78
    assert r.stderr == (
        "mailhub: command line: server.smtp: invalid endpoint 'tcp:notaport': "
        "invalid literal for int() with base 10: 'notaport'\n"
    )


def test_port_in_use_one_clean_line(tmp_path, daemon):
    d = Daemon(tmp_path)
    r = subprocess.run(
        d.command("--smtp", f"tcp:{daemon.port}:interface=127.0.0.1"),
        cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 71
    assert r.stderr == (
        f"mailhub: cannot listen on tcp:{daemon.port}:interface=127.0.0.1: Address already in use\n"
    )

"""
The real daemon (C{twistd -n mailhub}) as a subprocess for end-to-end
tests: L{Daemon} (start on C{tcp:0}, read the port from the startup log,
stop with SIGTERM, crash with SIGKILL), a test configuration, sending one
message with smtplib and reading Maildirs back.  A helper module, not a
test file: test_e2e_daemon*.py, test_e2e_dropin.py, test_e2e_crash.py and
test_e2e_system_mode.py import from it.

Owns: running and observing the daemon process.  Must not touch: peers
(tests/peers.py) or what a test asserts.
"""

from __future__ import annotations

import mailbox
import os
import re
import signal
import smtplib
import subprocess
import sys

from peers import wait_for

__all__ = [
    "ROOT", "DOMAIN", "CLEAN_EXIT", "BODY", "Daemon", "config_text", "wait_for", "read_maildir",
    "split_message", "message", "send", "delivered_with",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Every daemon process started, so none outlives the test run (L{kill_leftovers}).
_STARTED: list[subprocess.Popen] = []


def kill_leftovers() -> int:
    """
    SIGKILL every daemon still running; return how many.  Called once at
    the end of the test session (conftest.py): a test that fails between
    a start and its stop would otherwise leave its daemon running for good.
    """
    killed = 0
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
            killed += 1
    _STARTED.clear()
    return killed
DOMAIN = "example.test"
TWISTD = "from twisted.scripts.twistd import run; run()"
_LISTENING = re.compile(r"listening for SMTP on \S+ \(127\.0\.0\.1:(\d+)\)")


#: twistd stops cleanly on SIGTERM and then re-raises the signal, so a clean
#: stop exits "killed by SIGTERM".
CLEAN_EXIT = -signal.SIGTERM


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

    def __init__(self, home, text: str | None = None, user: str | None = None, args: tuple[str, ...] = ()) -> None:
        """
        @param user: C{--user} (server.user).  Not given: a daemon started by
            root stays root, as the tests of everything but privilege
            separation expect (tests/test_e2e_system_mode.py switches).
        @param args: more options of C{twistd mailhub}.
        """
        self.home = str(home)
        self.user = user
        self.args = args
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
        user = self.user or ("root" if os.geteuid() == 0 else None)
        if user is not None:
            extra = (f"--user={user}", *extra)
        return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "mailhub", "--config", self.conf, *extra]

    def start(self) -> Daemon:
        self.runs += 1
        self.log_path = os.path.join(self.home, f"daemon{self.runs}.log")
        self.err_path = os.path.join(self.home, f"daemon{self.runs}.err")
        self.proc = subprocess.Popen(
            self.command(*self.args),
            cwd=self.home,
            env=self.env(),
            stdout=open(self.log_path, "wb"),
            stderr=open(self.err_path, "wb"),
        )
        _STARTED.append(self.proc)

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

    def log_with(self, *needles: str, timeout: float = 10) -> str:
        """
        The log once it contains every one of C{needles}: the events of
        sessions served by acceptor processes (server.processes) reach it
        after the reply the client read.
        """
        return wait_for(
            lambda: (lambda text: text if all(n in text for n in needles) else None)(self.log()),
            timeout, f"the log to contain {needles!r}",
        )

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
        """
        One C{ID.json} per queued message, listed from C{queue/} (spool
        format 2: C{envelopes/} holds only envelopes changed after the
        commit).  The names keep the first layout's envelope file names, so
        callers' C{qid + ".json"} checks mean what they meant; read an
        envelope with C{Spool(d.spool).load(qid)}, not from C{envelopes/}.
        """
        from mailhub.queue.queuefile import is_queue_id

        names = os.listdir(os.path.join(self.spool, "queue"))
        return sorted(name + ".json" for name in names if is_queue_id(name))


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


BODY = (
    b"First line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"\r\n"
    b"tabs\tand trailing spaces   \r\n"
    + b"x" * 990 + b"\r\n"
    b"last line\r\n"
)


def message(to: str, msgid: str, sender: str = "sender@client.test", topic: str = "e2e") -> bytes:
    """A test message with C{BODY} (dot lines, long line), C{Subject: TOPIC MSGID}."""
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {topic} {msgid}\r\n"
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

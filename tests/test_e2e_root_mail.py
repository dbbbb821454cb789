"""
End-to-end: mail to root on a default install.

The real daemon (C{twistd -n mailhub}) with the default local settings
(one local domain, C{localhost}; virtual mailboxes; no aliases file, no
users list): C{mailhub-sendmail root} (cron's way), C{sendmail -t} with
C{To: root} (the README's example) and SMTP to C{root@localhost},
C{MAILER-DAEMON@localhost} and C{abuse@localhost} all land in
postmaster's Maildir, which is created on first delivery.
"""

from __future__ import annotations

import os
import subprocess
import sys

from daemon import CLEAN_EXIT, Daemon, read_maildir, send, wait_for

CONFIG = """
[server]
hostname = "mx.example.test"
smtp = ["tcp:0:interface=127.0.0.1"]

[spool]
fsync = false
"""


def sendmail(d: Daemon, *args: str, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli.sendmail", "-C", d.conf, *args],
        input=stdin, env=d.env(), cwd=d.home, capture_output=True, timeout=30,
    )


def test_root_mail_reaches_postmaster_with_the_defaults(tmp_path):
    d = Daemon(tmp_path, CONFIG).start()
    try:
        postmaster = os.path.join(d.home, "mailhub-data", "mailboxes", "localhost", "postmaster")
        r = sendmail(d, "-i", "root", stdin=b"Subject: cron 1\n\nfrom cron\n")
        assert r.returncode == 0, r.stderr
        r = sendmail(d, "-t", stdin=b"To: root\nSubject: readme 2\n\nhello\n")
        assert r.returncode == 0, r.stderr
        for n, rcpt in enumerate(["root@localhost", "MAILER-DAEMON@localhost", "abuse@localhost"], 3):
            send(d, rcpt, f"Subject: smtp {n}\r\n\r\nbody\r\n".encode())

        def all_five():
            got = read_maildir(postmaster)
            return got if len(got) == 5 else None

        got = wait_for(all_five, 30, "five messages in postmaster's Maildir")
        subjects = sorted(line for raw in got for line in raw.split(b"\n") if line.startswith(b"Subject:"))
        assert subjects == [b"Subject: cron 1", b"Subject: readme 2", b"Subject: smtp 3", b"Subject: smtp 4",
                            b"Subject: smtp 5"]
        assert all(b"Delivered-To: postmaster@localhost\n" in raw for raw in got)
        assert sorted(os.listdir(os.path.join(d.home, "mailhub-data", "mailboxes", "localhost"))) == ["postmaster"]
    finally:
        rc = d.stop()
    assert rc == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log()

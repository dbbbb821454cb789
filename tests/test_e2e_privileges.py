"""
End-to-end: the real daemon started as root in virtual mode switches to an
unprivileged user -- by twistd's own C{--uid/--gid}, or by server.user --
after binding; the control socket, the spool and the mailboxes belong to
that user, and a spool left by a root-run daemon stops start-up with one
line.  Needs root; the throwaway user comes from tests/accounts.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from accounts import status
from daemon import CLEAN_EXIT, DOMAIN, TWISTD, Daemon, config_text, delivered_with, message, send


@pytest.fixture
def home():
    base = Path(tempfile.mkdtemp(prefix="mailhub-privileges-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


class TwistdUidDaemon(Daemon):
    """C{twistd --uid --gid -n mailhub}: the README's way before server.user."""

    def __init__(self, home, uid: int, gid: int, user: str) -> None:
        super().__init__(home, config_text(), user=user)
        self.uid, self.gid = uid, gid

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", f"--uid={self.uid}", f"--gid={self.gid}",
                "mailhub", "--config", self.conf, *extra]


def test_twistd_uid_switches_and_the_control_socket_is_the_users(daemon_user, home):
    d = TwistdUidDaemon(home, daemon_user.pw_uid, daemon_user.pw_gid, daemon_user.pw_name).start()
    try:
        uid = str(daemon_user.pw_uid)
        assert status(d.proc.pid)["Uid"].split() == [uid] * 4
        assert int(status(d.proc.pid)["CapEff"], 16) == 0
        for path in ("spool", "spool/queue", "spool/control.sock", "mailboxes"):
            assert os.lstat(home / path).st_uid == daemon_user.pw_uid, path
        send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "p1"))
        delivered_with(d, "alice", "p1")
        new = os.path.join(d.maildir("alice"), "new")
        assert all(os.stat(os.path.join(new, f)).st_uid == daemon_user.pw_uid for f in os.listdir(new))
        assert f"running as {daemon_user.pw_name}" in d.log()
    finally:
        assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log()


def test_a_spool_of_another_user_is_one_line(daemon_user, home):
    (home / "spool").mkdir(mode=0o700)  # left by a daemon that ran as root
    d = Daemon(home, config_text(), user=daemon_user.pw_name)
    r = subprocess.run(d.command(), cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 78
    assert r.stderr == (
        f"mailhub: {d.conf}: spool.path: {home}/spool is owned by root, not by {daemon_user.pw_name} "
        f"(mailhub runs as {daemon_user.pw_name}): chown -R {daemon_user.pw_name}: {home}/spool\n"
    )

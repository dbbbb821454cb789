"""
End-to-end: entries in the pickup area that are not pickup files, with the
real daemon (C{twistd -n mailhub}) and the real C{mailhub-sendmail}.  A
directory made in C{SPOOL/pickup/new/} by a local user goes to
C{corrupt/}; submissions after it are delivered; the daemon's number of
open descriptors does not grow from scan to scan.
"""

from __future__ import annotations

import os
import subprocess
import sys

from daemon import CLEAN_EXIT, DOMAIN, Daemon, config_text, read_maildir, wait_for


def sendmail(d: Daemon, n: int) -> None:
    text = f"Subject: pickup {n}\n\nbody {n}\n".encode()
    r = subprocess.run(
        [sys.executable, "-m", "mailhub.cli.sendmail", "-C", d.conf, "-i", "-f", f"alice@{DOMAIN}", f"bob@{DOMAIN}"],
        input=text, env=d.env(), cwd=d.home, capture_output=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr


def delivered(d: Daemon, n: int) -> bytes:
    needle = f"Subject: pickup {n}\n".encode()
    return wait_for(
        lambda: next((raw for raw in read_maildir(d.maildir("bob")) if needle in raw.replace(b"\r\n", b"\n")), None),
        15, f"pickup message {n} in bob's Maildir",
    )


def fds(d: Daemon) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def test_a_directory_in_pickup_new_blocks_nothing_and_leaks_nothing(tmp_path):
    d = Daemon(tmp_path, config_text(fsync=False)).start()
    try:
        new_dir = os.path.join(d.spool, "pickup", "new")
        corrupt = os.path.join(d.spool, "corrupt")
        os.mkdir(os.path.join(new_dir, "0"))  # sorts before every pickup file name
        sendmail(d, 0)
        delivered(d, 0)
        assert "pickup.0" in os.listdir(corrupt)
        wait_for(lambda: os.listdir(new_dir) == [], 10, "pickup/new/ to be empty")
        baseline = fds(d)
        for n in range(1, 6):  # every submission is a scan of pickup/new/
            os.mkdir(os.path.join(new_dir, f"0dir{n}"))
            sendmail(d, n)
            delivered(d, n)
        assert sorted(name for name in os.listdir(corrupt) if name.startswith("pickup.")) == [
            "pickup.0", *(f"pickup.0dir{n}" for n in range(1, 6))
        ]
        # Deliveries may hold a descriptor for a moment: wait for them to end.
        wait_for(lambda: fds(d) <= baseline, 10, f"the daemon's descriptors back to {baseline} (now {fds(d)})")
        log = d.log()
        assert "moved" in log and "not a regular file (directory)" in log
        assert "Is a directory" not in log and "Traceback" not in log
    finally:
        assert d.stop() == CLEAN_EXIT, d.stderr()

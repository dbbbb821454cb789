"""
The spool's free space checked at MAIL (mailhub.smtp.server, Postfix
queue_minfree): 452 4.3.1 when the file system is nearly full or a
declared SIZE= does not fit, instead of taking the whole message and
failing at its end.  In memory with an injected probe and task.Clock, the
real statvfs through the factory, and the real daemon with a
spool.min_free_space no disk has.
"""

from __future__ import annotations

import os
import smtplib

import pytest
from daemon import Daemon, config_text
from smtpharness import GO_AHEAD, GREETING, MAIL_OK, OK, RCPT_OK, converse, queued_id
from smtpharness import Harness as _Harness

from mailhub.smtp.factory import FREE_SPACE_CACHE, spool_free_space

MB = 1000000
FULL = "452 4.3.1 Insufficient system storage\r\n"


class Harness(_Harness):
    """max_message_size 10 MB, min_free_space 50 MB, free space as the test sets it."""

    def __init__(self, tmp_path, free: int, min_free_space: int = 50 * MB) -> None:
        super().__init__(tmp_path, max_message_size=10 * MB)
        self.free = free
        self.probes = 0
        self.serve(min_free_space=min_free_space, free_space=self.probe)

    def probe(self) -> int:
        self.probes += 1
        return self.free

    def ehlo(self):
        c = self.connect()
        assert c.greeting == GREETING
        c.send("EHLO client.test\r\n")
        return c


@pytest.mark.parametrize(
    "free, params, reply",
    [
        (100 * MB, "", MAIL_OK),
        (50 * MB, "", MAIL_OK),
        (50 * MB - 1, "", FULL),  # under min_free_space
        (0, "", FULL),
        (100 * MB, "SIZE=10000000", MAIL_OK),
        (100 * MB, "SIZE=10000001", "552 5.3.4 Error: message size exceeds fixed limit\r\n"),
        (55 * MB, "SIZE=5000000", MAIL_OK),  # 5 MB fits above the 50 MB minimum
        (55 * MB, "SIZE=5000001", FULL),  # does not
    ],
)
def test_free_space_at_mail(tmp_path, free, params, reply):
    h = Harness(tmp_path, free)
    c = h.ehlo()
    assert c.send(f"MAIL FROM:<a@elsewhere.test> {params}\r\n") == reply
    if reply == FULL:
        assert c.send("RCPT TO:<alice@example.com>\r\n") == "503 5.5.1 Error: need MAIL command\r\n"


def test_one_and_a_half_times_the_message_size_limit(tmp_path):
    """min_free_space below 1.5 x max_message_size: the latter is the floor (Postfix's rule)."""
    h = Harness(tmp_path, 15 * MB - 1, min_free_space=1 * MB)
    c = h.ehlo()
    assert c.send("MAIL FROM:<a@elsewhere.test>\r\n") == FULL
    h.free = 15 * MB
    h.clock.advance(FREE_SPACE_CACHE)
    assert c.send("MAIL FROM:<a@elsewhere.test>\r\n") == MAIL_OK
    assert c.send("RSET\r\n") == OK
    assert c.send("MAIL FROM:<a@elsewhere.test> SIZE=7500001\r\n") == FULL  # more than half of what is free


def test_space_measured_at_most_once_a_second(tmp_path):
    h = Harness(tmp_path, 100 * MB)
    c = h.ehlo()
    for _ in range(50):
        assert c.send("MAIL FROM:<a@elsewhere.test>\r\nRSET\r\n") == MAIL_OK + OK
    assert h.probes == 1
    h.free = 0
    h.clock.advance(FREE_SPACE_CACHE - 0.01)
    assert c.send("MAIL FROM:<a@elsewhere.test>\r\nRSET\r\n") == MAIL_OK + OK
    h.clock.advance(0.01)
    assert c.send("MAIL FROM:<a@elsewhere.test>\r\n") == FULL
    assert h.probes == 2


def test_disk_filling_between_mail_commands_is_seen(tmp_path):
    """A transaction accepted while there was room completes; the next MAIL sees the full disk."""
    h = Harness(tmp_path, 100 * MB)
    c = h.ehlo()
    converse(c, [
        ("MAIL FROM:<a@elsewhere.test>\r\n", MAIL_OK),
        ("RCPT TO:<alice@example.com>\r\n", RCPT_OK),
        ("DATA\r\n", GO_AHEAD),
    ])
    h.free = 1
    queued_id(c.send("x\r\n.\r\n"))
    h.clock.advance(FREE_SPACE_CACHE)
    assert c.send("MAIL FROM:<a@elsewhere.test>\r\n") == FULL


def test_check_off_and_probe_errors_accept(tmp_path):
    h = Harness(tmp_path, 0, min_free_space=0)
    assert h.ehlo().send("MAIL FROM:<a@elsewhere.test>\r\n") == MAIL_OK
    assert h.probes == 0

    def broken() -> int:
        raise OSError(5, "Input/output error")

    h.serve(min_free_space=50 * MB, free_space=broken)
    assert h.ehlo().send("MAIL FROM:<a@elsewhere.test>\r\n") == MAIL_OK


def test_real_statvfs_of_the_spool(tmp_path):
    # other writers on the same file system move the number between two calls: bracket it
    before = os.statvfs(tmp_path)
    free = spool_free_space(str(tmp_path))
    after = os.statvfs(tmp_path)
    low, high = sorted((before.f_bavail * before.f_frsize, after.f_bavail * after.f_frsize))
    assert 0 < free and low - 2**24 <= free <= high + 2**24
    h = _Harness(tmp_path)
    h.serve(min_free_space=1)  # the default probe: statvfs of the spool directory
    c = h.connect()
    c.send("EHLO client.test\r\n")
    assert c.send("MAIL FROM:<a@elsewhere.test>\r\n") == MAIL_OK
    h.serve(min_free_space=10**18)  # more than any disk here
    c = h.connect()
    c.send("EHLO client.test\r\n")
    assert c.send("MAIL FROM:<a@elsewhere.test>\r\n") == FULL


def test_daemon_refuses_mail_when_the_spool_is_short_of_space(tmp_path):
    text = config_text().replace('fsync = true\n', 'fsync = true\nmin_free_space = 1000000000000000000\n')
    assert "min_free_space" in text
    d = Daemon(tmp_path, text).start()
    try:
        with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.test", timeout=20) as s:
            assert s.ehlo()[0] == 250
            code, msg = s.mail("sender@client.test")
            assert (code, msg) == (452, b"4.3.1 Insufficient system storage")
    finally:
        d.stop()
    assert "not enough free space in the spool" in d.log()
    assert d.queued() == []

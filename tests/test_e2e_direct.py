"""
Deliver on accept end to end: the real daemon (tests/daemon.py) on
127.0.0.1, smtplib as the client.

- a message for one local recipient is in its Maildir when the client
  has its 250 (no waiting), nothing is left in the spool, and the mail
  log tells the delivery as the scheduler would (relay=local);
- the Maildir file is the one the queued path writes for the same
  message (everything but our Received header, which names the queue id);
- two recipients are written on accept, three go through the queue and
  are delivered after;
- with spool.sync = "syncfs" both paths work.
"""

from __future__ import annotations

import os
import re

from daemon import DOMAIN, Daemon, config_text, message, read_maildir, send, wait_for

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def config(deliver_on_accept: bool = True, sync: str = "fsync") -> str:
    text = config_text(extra_local=f"deliver_on_accept = {'true' if deliver_on_accept else 'false'}")
    return text.replace('fsync = true\n', f'fsync = true\nsync = "{sync}"\n')


def mail_lines(d: Daemon, qid: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in d.log().splitlines() if f"] {qid}: " in line]


def mail_lines_until(d: Daemon, qid: str, last: str) -> list[str]:
    """A message's lines once one contains C{last} (the daemon logs what acceptor processes send it)."""
    return wait_for(
        lambda: (lambda ls: ls if any(last in line for line in ls) else None)(mail_lines(d, qid)), 10, f"{qid}: {last}"
    )


def send_many(d: Daemon, rcpts: list[str], data: bytes, options: tuple[str, ...] = ()) -> str:
    with d.smtp() as s:
        s.ehlo()
        code, _ = s.mail("sender@client.test")
        assert code == 250
        for r in rcpts:
            assert s.rcpt(r, options=list(options))[0] == 250
        code, reply = s.data(data)
        assert code == 250, reply
        m = re.search(rb"queued as ([0-9A-Z]+)", reply)
        assert m, reply
        return m.group(1).decode()


def test_local_mail_is_in_its_maildir_when_the_client_has_its_250(tmp_path):
    d = Daemon(tmp_path, config()).start()
    try:
        qid = send(d, ALICE, message(ALICE, "direct1"))
        boxed = read_maildir(d.maildir("alice"))  # no waiting: the 250 came after the file was durable
        assert len(boxed) == 1 and b"<direct1@client.test>" in boxed[0]
        assert os.listdir(os.path.join(d.spool, "queue")) == []
        lines = wait_for(lambda: (lambda ls: ls if len(ls) >= 3 else None)(mail_lines(d, qid)), 10, "the mail log")
        assert lines[0].startswith(f"{qid}: accepted from=<sender@client.test> nrcpt=1 ")
        assert re.fullmatch(
            rf"{qid}: to=<{ALICE}>, orig_to=<{ALICE}>, relay=local, delay=[0-9.]+, attempts=1, dsn=2\.0\.0, "
            r"status=sent \(delivered to maildir\)",
            lines[1],
        ), lines
        assert lines[2] == f"{qid}: removed"
    finally:
        d.stop()


def without_received(raw: bytes) -> bytes:
    """The Maildir file without our Received field (it names the queue id and the time)."""
    return re.sub(rb"\nReceived: [^\n]*(\n[ \t][^\n]*)*", b"", raw, count=1)


def test_the_maildir_file_is_the_one_the_queued_path_writes(tmp_path):
    files = []
    for on in (True, False):
        home = tmp_path / ("direct" if on else "queued")
        home.mkdir()
        d = Daemon(home, config(deliver_on_accept=on)).start()
        try:
            send(d, ALICE, message(ALICE, "same"))
            raw = wait_for(lambda d=d: (read_maildir(d.maildir("alice")) or [None])[0], 10, "the delivery")
            files.append(raw)
        finally:
            d.stop()
    direct, queued = files
    assert direct.startswith(b"Return-Path: <sender@client.test>\nDelivered-To: " + ALICE.encode() + b"\nReceived: ")
    assert without_received(direct) == without_received(queued)


def test_two_recipients_on_accept_three_through_the_queue(tmp_path):
    d = Daemon(tmp_path, config()).start()
    try:
        two = send_many(d, [ALICE, BOB], message(ALICE, "two"))
        assert len(read_maildir(d.maildir("alice"))) == 1 and len(read_maildir(d.maildir("bob"))) == 1
        assert [line.split(", ")[0] for line in mail_lines_until(d, two, ": removed")[1:]] == [
            f"{two}: to=<{ALICE}>", f"{two}: to=<{BOB}>", f"{two}: removed"]
        qid = send_many(d, [ALICE, BOB, f"postmaster@{DOMAIN}"], message(ALICE, "three"))
        assert mail_lines_until(d, qid, ": accepted")[0].startswith(f"{qid}: accepted")
        for user in ("alice", "bob", "postmaster"):
            wait_for(lambda user=user: read_maildir(d.maildir(user)), 10, f"{user}'s copy")
        lines = wait_for(lambda: (lambda ls: ls if ls and ls[-1].endswith("removed") else None)(mail_lines(d, qid)),
                         10, "the removal")
        assert len([line for line in lines if "relay=local" in line and "status=sent" in line]) == 3
    finally:
        d.stop()


def test_syncfs_commits_both_paths(tmp_path):
    d = Daemon(tmp_path, config(sync="syncfs")).start()
    try:
        send(d, ALICE, message(ALICE, "syncfs1"))
        assert len(read_maildir(d.maildir("alice"))) == 1
        send_many(d, [ALICE, BOB], message(ALICE, "syncfs2"))  # two recipients: on accept with syncfs
        assert len(read_maildir(d.maildir("alice"))) == 2 and len(read_maildir(d.maildir("bob"))) == 1
        qid = send_many(d, [BOB], message(BOB, "syncfs3"), options=("NOTIFY=SUCCESS",))  # through the queue
        assert mail_lines_until(d, qid, ": accepted")[0].startswith(f"{qid}: accepted")
        wait_for(lambda: len(read_maildir(d.maildir("bob"))) == 2, 10, "the queued copy")
    finally:
        d.stop()

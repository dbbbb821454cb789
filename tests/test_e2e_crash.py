"""
The crash test: SIGKILL the daemon while clients are sending, restart it on
the same data directory, and check "durable before 250" end to end.

- every message that got a 250 is delivered exactly once (no loss, no
  duplicate), complete;
- a message whose DATA was in flight at the kill (the client saw no reply)
  may be delivered -- at most once, complete -- or not at all;
- a message that was refused (4xx/5xx) or never sent is not delivered;
- after the restart the spool drains to empty.

Messages are told apart by their X-Test-Seq header and Message-ID.
"""

from __future__ import annotations

import os
import re
import smtplib
import threading

import pytest
from daemon import CLEAN_EXIT, DOMAIN, Daemon, config_text, read_maildir, split_message, wait_for

TOTAL = 200
CONNECTIONS = 4
PER_CONNECTION = 10  # messages per SMTP session, then a new connection

ACKED, INFLIGHT, REFUSED = "acked", "inflight", "refused"


def body_for(seq: int) -> bytes:
    lines = [f"message {seq} line {i} " + "abcdefghij" * 6 for i in range(40)]
    lines.insert(7, ".a dot-stuffed line")
    return ("\r\n".join(lines) + f"\r\nEND OF MESSAGE {seq}\r\n").encode()


def message_for(seq: int) -> bytes:
    return (
        f"From: load@client.test\r\nTo: alice@{DOMAIN}\r\nSubject: load {seq}\r\n"
        f"Message-ID: <seq{seq}@client.test>\r\nX-Test-Seq: {seq}\r\n\r\n"
    ).encode() + body_for(seq)


class Load:
    """Clients in threads sending message numbers from a shared counter."""

    def __init__(self, port: int, kill_at: int) -> None:
        self.port = port
        self.kill_at = kill_at
        self.lock = threading.Lock()
        self.next_seq = 0
        self.state: dict[int, str] = {}
        self.queue_ids: dict[int, str] = {}
        self.acked = 0
        self.reached = threading.Event()
        self.errors: list[str] = []

    def take(self) -> int | None:
        with self.lock:
            if self.next_seq >= TOTAL:
                return None
            seq = self.next_seq
            self.next_seq += 1
            return seq

    def run(self) -> None:
        try:
            while self.session():
                pass
        except (OSError, smtplib.SMTPException):
            pass  # the daemon was killed under us
        except Exception as e:  # pragma: no cover - reported by the test
            self.errors.append(repr(e))

    def session(self) -> bool:
        s = smtplib.SMTP("127.0.0.1", self.port, local_hostname="load.test", timeout=20)
        try:
            s.ehlo()
            for _ in range(PER_CONNECTION):
                seq = self.take()
                if seq is None:
                    s.quit()
                    return False
                code, _ = s.mail("load@client.test")
                if code != 250:
                    self.state[seq] = REFUSED
                    s.rset()
                    continue
                code, _ = s.rcpt(f"alice@{DOMAIN}")
                if code != 250:
                    self.state[seq] = REFUSED
                    s.rset()
                    continue
                self.state[seq] = INFLIGHT
                code, reply = s.data(message_for(seq))
                if code != 250:
                    self.state[seq] = REFUSED
                    continue
                m = re.search(rb"queued as ([0-9A-Z]+)", reply)
                with self.lock:
                    self.state[seq] = ACKED
                    self.queue_ids[seq] = m.group(1).decode() if m else ""
                    self.acked += 1
                    if self.acked >= self.kill_at:
                        self.reached.set()
            s.quit()
            return True
        finally:
            s.close()


def spool_files(d: Daemon, sub: str) -> list[str]:
    """The names in one spool directory (queue/: queue files; envelopes/: changed envelopes)."""
    return sorted(os.listdir(os.path.join(d.spool, sub)))


def delivered(d: Daemon) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    for raw in read_maildir(d.maildir("alice")):
        head, body = split_message(raw)
        m = re.search(rb"^X-Test-Seq: (\d+)$", head, re.M)
        assert m, f"delivered message without X-Test-Seq: {raw[:300]!r}"
        found.setdefault(int(m.group(1)), []).append(body)
    return found


@pytest.mark.parametrize("kill_at", [15, 90, 170])
def test_sigkill_under_load(tmp_path, kill_at):
    d = Daemon(tmp_path, config_text(fsync=True)).start()
    load = Load(d.port, kill_at)
    threads = [threading.Thread(target=load.run, daemon=True) for _ in range(CONNECTIONS)]
    try:
        for t in threads:
            t.start()
        assert load.reached.wait(60), f"only {load.acked} messages acknowledged; errors {load.errors}"
        d.kill()
    finally:
        for t in threads:
            t.join(30)
        if d.proc.poll() is None:
            d.kill()
    assert not load.errors, load.errors
    acked = {seq for seq, st in load.state.items() if st == ACKED}
    inflight = {seq for seq, st in load.state.items() if st == INFLIGHT}
    assert len(acked) >= kill_at
    ids = [load.queue_ids[s] for s in acked]
    assert all(ids) and len(set(ids)) == len(ids), "every 250 carries a distinct queue id"

    d.start()  # same data directory: recovery, then delivery of what was queued
    # removal unlinks the queue file first, then (after an fsync of queue/)
    # the envelope file of a message whose envelope changed: wait for both
    wait_for(
        lambda: not spool_files(d, "queue") and not spool_files(d, "envelopes"),
        15, "the spool to drain after the restart", interval=0.05,
    )
    # the spool was created in the queue-file layout: nothing of the format-1 layout appears
    assert not os.path.exists(os.path.join(d.spool, "new"))
    # recovery removed whatever was never committed
    assert os.listdir(os.path.join(d.spool, "tmp")) == []
    assert os.listdir(os.path.join(d.spool, "corrupt")) == []

    found = delivered(d)
    duplicates = {seq: len(b) for seq, b in found.items() if len(b) > 1}
    assert not duplicates, f"delivered more than once: {duplicates}"
    missing = sorted(acked - set(found))
    assert not missing, f"acknowledged with 250 but lost: {missing}"
    unexpected = sorted(set(found) - acked - inflight)
    assert not unexpected, f"delivered although refused or never sent: {unexpected}"
    for seq, bodies in found.items():
        assert bodies[0] == body_for(seq).replace(b"\r\n", b"\n"), f"message {seq} is incomplete or altered"

    # and the restarted daemon still takes mail
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="load.test", timeout=20) as s:
        s.ehlo()
        s.mail("load@client.test")
        s.rcpt(f"alice@{DOMAIN}")
        code, _ = s.data(message_for(TOTAL))
        assert code == 250
    wait_for(lambda: TOTAL in delivered(d), 10, "a message after the restart")
    assert d.stop() == CLEAN_EXIT, d.stderr()

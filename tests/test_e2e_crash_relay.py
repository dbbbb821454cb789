"""
The relay crash test: SIGKILL the real daemon while it relays, restart it on
the same data directory, and check that outbound delivery is *at least
once* (issue "Outbound relay": kill -9 during delivery loses nothing).

The daemon routes C{remote.test} and C{other.test} (C{relay.routes}) to two
L{Receiver}s, SMTP servers in this file on 127.0.0.1 that record every
complete message they are given (the bytes after DATA, unstuffed, with the
envelope) and can be told to *stall*: keep the final "." unanswered, so the
daemon is killed with deliveries in flight.

First run: a trusted client submits C{TOTAL} messages (some with several
recipients, two to both domains), each acknowledged with C{250 ... queued
as ID}.  The remote.test receiver answers the first C{ANSWERED} messages
and stalls every later one, and always stalls C{TWO_HOPS}, whose
other.test half is answered; C{relay.destination_concurrency} is small, so
the rest stay queued behind the stalled ones.  A client is also half-way
through a DATA when the daemon is killed.

The envelopes left in the spool then say, per recipient, what the daemon
had not finished.  The second run (receivers answering everything) starts
on the same directory with no operator action (recovery makes them due at
once) and must drain the spool.  Per (message, recipient) we check:

- every acknowledged one was delivered (the receiver answered 250) at
  least once, complete (byte for byte after the daemon's own C{Received:}
  line) and with the envelope sender;
- one finished before the kill was received once, in the first run, and is
  never sent again;
- one still pending at the kill is received in the second run, exactly
  once;
- so a duplicate is only ever one in flight at the kill.  The stalled ones
  must be duplicates (the daemon never got their 250); the answered
  other.test half of C{TWO_HOPS} must not be one: the scheduler writes
  each next hop's outcomes as soon as that hop has answered, so the
  envelope says it was delivered although remote.test is still stalled
  (docs/spool.rst);
- nothing that was not acknowledged (the half-sent message) is received;
- the spool is left empty (C{tmp/}, C{corrupt/} too) and both daemon logs
  are free of tracebacks.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import socketserver
import threading
from dataclasses import dataclass, field

import pytest
from daemon import CLEAN_EXIT, Daemon, wait_for

from mailhub.envelope import DELIVERED, PENDING, Envelope
from mailhub.queue.spool import Spool

TOTAL = 30
#: the receiver answers this many messages in the first run, then stalls
ANSWERED = 8
#: relay.destination_concurrency: deliveries in flight per destination (and
#: connections per next hop); relay.concurrency is larger, so that the
#: stalled remote.test connections leave room for one to other.test
CONCURRENCY = 3
SENDER = "sender@client.test"
#: a message to both routed domains, always stalled at remote.test
TWO_HOPS = 4
#: the message the client never finishes (no 250): must never be relayed
HALF_SENT = 999


def recipients_for(seq: int) -> list[str]:
    """Mostly one recipient; some messages several, one also in the second routed domain."""
    if seq % 7 == 3:
        return [f"user{seq}@remote.test", f"second{seq}@remote.test", f"third{seq}@remote.test"]
    if seq in (TWO_HOPS, 20):
        return [f"user{seq}@remote.test", f"other{seq}@other.test"]
    return [f"user{seq}@remote.test"]


def message_for(seq: int) -> bytes:
    """Distinct bytes per message: dot lines (stuffing both ways), a lone ".", a long line."""
    lines = [f"message {seq} line {i} " + "0123456789" * 5 for i in range(30)]
    lines[5:5] = [".", "..", ".leading dot", "", "tab\there   "]
    lines.append("y" * 900 + str(seq))
    head = (
        f"From: {SENDER}\r\nTo: {', '.join(recipients_for(seq))}\r\nSubject: relay crash {seq}\r\n"
        f"Message-ID: <crash{seq}@client.test>\r\nX-Test-Seq: {seq}\r\n\r\n"
    )
    return head.encode() + ("\r\n".join(lines) + f"\r\nEND OF MESSAGE {seq}\r\n").encode()


# -- the receiving MTA ----------------------------------------------------------------------


@dataclass
class Reception:
    """One complete message the receiver got (final "." seen)."""

    run: int  # the daemon run whose connection carried it
    seq: int | None
    sender: str
    rcpts: list[str]
    data: bytes  # unstuffed, CRLF line ends, without the final ".\r\n"
    stalled: bool = False
    answered: bool = False


@dataclass
class Receiver:
    """
    A minimal ESMTP server in threads (socketserver), just enough for
    mailhub's client: EHLO with PIPELINING, MAIL, RCPT, DATA, RSET, NOOP,
    QUIT.  It answers the first C{answer} complete messages of the current
    run (every one when None) and any not in C{stall}; the others are
    recorded and left unanswered until L{release} is set.
    """

    answer: int | None = None
    stall: frozenset[int] = frozenset()
    run: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)
    receptions: list[Reception] = field(default_factory=list)
    granted: dict[int, int] = field(default_factory=dict)  # run -> messages answered (or about to be)
    active: dict[int, int] = field(default_factory=dict)  # run -> open connections
    release: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def start(self) -> Receiver:
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                receiver.session(self.request, self.rfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def next_run(self) -> None:
        """From now on connections belong to the next daemon run, and every message is answered."""
        with self.lock:
            self.run += 1
            self.answer = None
            self.stall = frozenset()

    def stop(self) -> None:
        """Idempotent."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def of_run(self, run: int) -> list[Reception]:
        with self.lock:
            return [r for r in self.receptions if r.run == run]

    def stalled(self, run: int) -> set[int | None]:
        return {r.seq for r in self.of_run(run) if r.stalled}

    def open_connections(self, run: int) -> int:
        with self.lock:
            return self.active.get(run, 0)

    def session(self, sock: socket.socket, rfile) -> None:
        with self.lock:
            run = self.run
            self.active[run] = self.active.get(run, 0) + 1
        sock.settimeout(60)
        try:
            self._converse(run, sock, rfile)
        except OSError:
            pass  # the daemon was killed under us, or the stall was cut short
        except Exception as e:  # reported by the test
            with self.lock:
                self.errors.append(repr(e))
        finally:
            with self.lock:
                self.active[run] -= 1

    def _converse(self, run: int, sock: socket.socket, rfile) -> None:
        def reply(text: str) -> None:
            sock.sendall(text.encode() + b"\r\n")

        reply("220 recv.test ESMTP crash-test receiver")
        sender: str | None = None
        rcpts: list[str] = []
        while True:
            line = rfile.readline(4096)
            if not line:
                return  # connection closed (the daemon quit or died)
            if not line.endswith(b"\r\n"):
                raise AssertionError(f"command line without CRLF: {line!r}")
            cmd = line[:-2].decode("ascii")
            verb = cmd[:4].upper()
            if verb in ("EHLO", "HELO"):
                sender, rcpts = None, []
                reply("250-recv.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
            elif verb == "MAIL":
                m = re.match(r"MAIL FROM:<([^>]*)>", cmd, re.I)
                if m is None or sender is not None:
                    reply("503 5.5.1 Bad MAIL")
                    continue
                sender, rcpts = m.group(1), []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                m = re.match(r"RCPT TO:<([^>]*)>", cmd, re.I)
                if m is None or sender is None:
                    reply("503 5.5.1 Bad RCPT")
                    continue
                rcpts.append(m.group(1))
                reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if sender is None or not rcpts:
                    reply("503 5.5.1 No valid recipients")
                    continue
                reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data(rfile)
                if data is None:
                    return  # cut off inside DATA: not a complete message
                self._complete(run, sock, sender, rcpts, data, reply)
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                return
            else:
                reply("502 5.5.2 Command not recognised")

    @staticmethod
    def _read_data(rfile) -> bytes | None:
        """The message up to the final ".", unstuffed; None if the connection ends first."""
        lines: list[bytes] = []
        while True:
            line = rfile.readline(1 << 20)
            if not line.endswith(b"\r\n"):
                return None  # EOF (possibly mid-line)
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)

    def _complete(self, run, sock, sender, rcpts, data, reply) -> None:
        m = re.search(rb"^X-Test-Seq: (\d+)\r$", data, re.M)
        rec = Reception(run, int(m.group(1)) if m else None, sender, list(rcpts), data)
        with self.lock:
            granted = self.granted.get(run, 0)
            rec.stalled = rec.seq in self.stall or (self.answer is not None and granted >= self.answer)
            if not rec.stalled:
                self.granted[run] = granted + 1
            self.receptions.append(rec)
        if rec.stalled:
            # the daemon is killed while it waits for this reply; then the
            # test sets release and the connection is simply closed
            self.release.wait(60)
            return
        reply(f"250 2.0.0 Ok: received seq {rec.seq}")
        rec.answered = True


# -- the daemon side ------------------------------------------------------------------------


def config(remote_port: int, other_port: int) -> str:
    return f"""
[server]
hostname = "mx.example.test"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = ["127.0.0.0/8"]

[spool]
path = "spool"
fsync = true

[local]
domains = ["example.test"]
mailboxes = "mailboxes"
users = ["alice"]

[relay]
min_backoff = 1
max_backoff = 2
concurrency = {CONCURRENCY * 3}
destination_concurrency = {CONCURRENCY}
tls = "none"
connect_timeout = 5
greeting_timeout = 20
command_timeout = 20
data_init_timeout = 20
data_xfer_timeout = 20
data_done_timeout = 120

[relay.routes]
"remote.test" = "[127.0.0.1]:{remote_port}"
"other.test" = "[127.0.0.1]:{other_port}"
"""


def submit(d: Daemon, seq: int) -> str:
    """Submit message C{seq}; the queue id from the 250 after DATA."""
    with d.smtp() as s:
        assert s.ehlo()[0] == 250
        code, reply = s.mail(SENDER)
        assert (code, reply[:5]) == (250, b"2.1.0"), reply
        for rcpt in recipients_for(seq):
            code, reply = s.rcpt(rcpt)
            assert (code, reply[:5]) == (250, b"2.1.5"), (rcpt, reply)
        code, reply = s.data(message_for(seq))
        assert code == 250, reply
        m = re.match(rb"2\.0\.0 .*queued as ([0-9A-Z]+)", reply)
        assert m, reply
        return m.group(1).decode()


def start_half_sent(d: Daemon) -> smtplib.SMTP:
    """A session left inside DATA (no final "."): the kill finds it in flight."""
    s = d.smtp()
    assert s.ehlo()[0] == 250
    assert s.mail(SENDER)[0] == 250
    assert s.rcpt(f"user{HALF_SENT}@remote.test")[0] == 250
    s.putcmd("data")
    assert s.getreply()[0] == 354
    data = re.sub(rb"(?m)^\.", b"..", message_for(HALF_SENT))  # dot-stuffed: no early end of data
    assert b"\r\n.\r\n" not in data
    s.send(data[: len(data) // 2])  # header complete, body cut in the middle
    return s


def spool_files(d: Daemon, sub: str) -> list[str]:
    return sorted(os.listdir(os.path.join(d.spool, sub)))


def envelope_of(d: Daemon, qid: str) -> Envelope:
    """
    The current envelope of queued message C{qid}: C{envelopes/ID.json} once
    it changed after the commit, else the copy in its queue file (spool
    format 2).  Read-only: L{Spool.load} neither recovers nor removes.
    """
    return Spool(d.spool).load(qid)


def pending_at_kill(d: Daemon) -> dict[str, set[str]]:
    """Queue id -> the recipients still pending in its current envelope."""
    out = {}
    for name in d.queued():
        env = envelope_of(d, name.removesuffix(".json"))
        out[env.queue_id] = {r.address.lower() for r in env.recipients if r.state == PENDING}
    return out


@pytest.fixture
def receivers():
    """(remote.test receiver, other.test receiver), stopped at the end whatever happens."""
    remote = Receiver(answer=ANSWERED, stall=frozenset({TWO_HOPS})).start()
    try:
        other = Receiver().start()  # answers everything
        try:
            yield remote, other
        finally:
            other.stop()
    finally:
        remote.stop()


def test_sigkill_during_relay_is_at_least_once(tmp_path, receivers):
    remote, other = receivers
    d = Daemon(tmp_path, config(remote.port, other.port))
    half = None
    try:
        d.start()
        qids = {seq: submit(d, seq) for seq in range(TOTAL)}
        assert len(set(qids.values())) == TOTAL, "every 250 carries a distinct queue id"
        half = start_half_sent(d)

        # ANSWERED delivered and gone from the queue, CONCURRENCY stalled in
        # flight (the two-hop message among them, its other.test half
        # answered and recorded as delivered in its envelope), the rest
        # queued behind them
        def settled() -> bool:
            return (
                len(remote.stalled(1)) == CONCURRENCY
                and len(d.queued()) == TOTAL - ANSWERED
                and (TWO_HOPS not in remote.stalled(1) or other_half_recorded())
            )

        def other_half_recorded() -> bool:
            if not any(r.answered for r in other.of_run(1)):
                return False
            env = envelope_of(d, qids[TWO_HOPS])
            return any(r.address.lower() == f"other{TWO_HOPS}@other.test" and r.state == DELIVERED
                       for r in env.recipients)

        try:
            wait_for(settled, 30, "deliveries to stall with the answered ones dequeued", interval=0.05)
        except AssertionError as e:
            got = [(r.seq, "stalled" if r.stalled else "answered") for r in remote.of_run(1)]
            raise AssertionError(f"{e}: received {got}, {len(d.queued())} queued\n{d.log()}") from None
        d.kill()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
        if half is not None:
            half.close()
        for r in (remote, other):
            r.release.set()  # stalled sessions end; the daemon is gone
    for r in (remote, other):
        wait_for(lambda r=r: r.open_connections(1) == 0, 20, "the first run's connections to close")

    # what the daemon had not finished at the kill, per recipient
    seq_of = {qid: seq for seq, qid in qids.items()}
    pending = {seq_of[qid]: rcpts for qid, rcpts in pending_at_kill(d).items()}
    first = remote.of_run(1) + other.of_run(1)
    stalled = remote.stalled(1)
    answered = {r.seq for r in remote.of_run(1) if r.answered}
    # the scenario happened as intended: some delivered, some in flight, some queued
    assert len(answered) == ANSWERED and len(stalled) == CONCURRENCY, [(r.seq, r.stalled) for r in first]
    assert TWO_HOPS in stalled, f"the two-hop message was not in flight at the kill: {sorted(stalled)}"
    assert [r.seq for r in other.of_run(1)] == [TWO_HOPS]
    assert set(pending) == set(range(TOTAL)) - answered, (sorted(pending), sorted(answered))
    never_tried = set(pending) - stalled
    assert len(never_tried) == TOTAL - ANSWERED - CONCURRENCY
    assert not {r.seq for r in first} & never_tried

    # second run: same data directory, the receivers answer everything; no
    # flush -- recovery makes every unfinished message due at once
    remote.next_run()
    other.next_run()
    try:
        d.start()
        wait_for(
            # no queue file and no envelope file left (removal unlinks the
            # queue file first, then its envelope file, if any)
            lambda: not d.queued() and not spool_files(d, "envelopes"),
            30, "the spool to drain after the restart", interval=0.05,
        )
        # recovery queued exactly the unfinished messages (the half-sent one was never committed)
        assert f"scheduler: {len(pending)} message(s) in the queue" in d.log()
        assert spool_files(d, "tmp") == []
        assert spool_files(d, "corrupt") == []
    finally:
        code = d.stop()
    assert code == CLEAN_EXIT, d.stderr()
    assert not remote.errors and not other.errors, (remote.errors, other.errors)

    receptions = first + remote.of_run(2) + other.of_run(2)
    # nothing unacknowledged (the half-sent message) or unidentifiable arrived
    assert {r.seq for r in receptions} <= set(range(TOTAL)), sorted({r.seq for r in receptions}, key=str)
    # (seq, recipient) -> {1: received in run 1, 2: in run 2, "ok": receptions answered 250}
    got: dict[tuple[int, str], dict[int | str, int]] = {}
    for r in receptions:
        # complete and unaltered: the daemon's Received line, then the
        # submitted bytes exactly, with the envelope as submitted
        assert r.data.startswith(b"Received: from client.test"), (r.seq, r.data[:200])
        assert r.data.endswith(b"\r\n" + message_for(r.seq)), f"message {r.seq} (run {r.run}) is incomplete or altered"
        assert f"id {qids[r.seq]}".encode() in r.data.split(b"\r\nFrom: ", 1)[0], (r.seq, r.data[:300])
        assert r.sender == SENDER
        for rcpt in r.rcpts:
            assert rcpt.lower() in recipients_for(r.seq), (r.seq, r.rcpts)
            n = got.setdefault((r.seq, rcpt.lower()), {1: 0, 2: 0, "ok": 0})
            n[r.run] += 1
            n["ok"] += r.answered

    for seq in range(TOTAL):
        for rcpt in recipients_for(seq):
            n = got.get((seq, rcpt), {1: 0, 2: 0, "ok": 0})
            # delivered means the receiver took it with a 250, at least once
            assert n["ok"] >= 1, f"message {seq} acknowledged with 250 but never delivered to {rcpt}: {n}"
            if rcpt in pending.get(seq, ()):
                # unfinished at the kill: relayed after the restart, once
                assert n[2] == 1 and n[1] <= 1, (seq, rcpt, n)
            else:
                # finished before the kill: relayed once, never again
                assert n == {1: 1, 2: 0, "ok": 1}, (seq, rcpt, n)

    duplicates = {key for key, n in got.items() if n[1] and n[2]}
    in_flight = {(r.seq, rcpt.lower()) for r in first for rcpt in r.rcpts if rcpt.lower() in pending.get(r.seq, ())}
    # a duplicate only for a recipient in flight at the kill...
    assert duplicates <= in_flight, sorted(duplicates - in_flight)
    # ...and every stalled one is one: the daemon never got its 250
    stalled_rcpts = {(r.seq, x.lower()) for r in remote.of_run(1) if r.stalled for x in r.rcpts}
    assert stalled_rcpts <= duplicates, sorted(stalled_rcpts - duplicates)
    # The other.test half of the two-hop message got its 250 before the kill
    # and was written as delivered when its own next hop answered, while
    # remote.test was still stalled: only the remote.test half is sent again.
    other_half = f"other{TWO_HOPS}@other.test"
    assert other.of_run(1)[0].answered
    assert pending[TWO_HOPS] == {f"user{TWO_HOPS}@remote.test"}, pending[TWO_HOPS]
    assert got[TWO_HOPS, other_half] == {1: 1, 2: 0, "ok": 1}
    assert (TWO_HOPS, f"user{TWO_HOPS}@remote.test") in duplicates

    for n in (1, 2):
        with open(os.path.join(d.home, f"daemon{n}.log"), encoding="utf-8", errors="replace") as f:
            log = f.read()
        assert "Traceback" not in log, log

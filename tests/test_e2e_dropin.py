"""
End-to-end: mailhub as the host's drop-in MTA.

The real C{mailhub-sendmail} (run as C{python -m mailhub.cli.sendmail -C
FILE}) writes to the pickup area, with the daemon stopped and running; the
daemon (C{twistd -n mailhub}) picks the files up and delivers them.  The
queue tools (C{python -m mailhub.cli.main -C FILE queue ...}) talk to the
running daemon through its control socket: a message routed to a dead port
stays deferred and is listed with its last error, a flush after the
receiver (smtp-sink) came up delivers it, a delete removes exactly one
message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from daemon import CLEAN_EXIT, Daemon, read_maildir, send, split_message, wait_for
from peers import Sink, free_port

DOMAIN = "example.test"


def config(dead_port: int, held_port: int) -> str:
    return f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = ["127.0.0.0/8"]

[spool]
path = "spool"
fsync = false

[local]
domains = ["{DOMAIN}", "localhost"]
mailboxes = "mailboxes"
users = ["alice", "bob", "a"]

[relay]
# long enough that only a flush retries within the test
min_backoff = "1h"
max_backoff = "2h"
connect_timeout = 5

[relay.routes]
"dead.test" = "[127.0.0.1]:{dead_port}"
"held.test" = "[127.0.0.1]:{held_port}"
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """
    A running daemon the tests share; each test sends and checks its own
    messages (distinct Message-IDs, queue ids and routes), so any order works.
    """
    home = tmp_path_factory.mktemp("dropin")
    ports = {"dead": free_port(), "held": free_port()}
    d = Daemon(home, config(ports["dead"], ports["held"])).start()
    sinks = []
    yield d, ports, sinks, home
    rc = d.stop()
    for s in sinks:
        s.stop()
    assert rc in (CLEAN_EXIT, 0), d.stderr()
    assert "Traceback" not in d.log()


@pytest.fixture
def stopped(tmp_path):
    """A daemon of the test's own, started once (it creates SPOOL/pickup, mode 1733) and stopped."""
    d = Daemon(tmp_path, config(free_port(), free_port()))
    d.start()
    assert d.stop() == CLEAN_EXIT, d.stderr()
    yield d
    rc = d.stop()
    assert rc in (CLEAN_EXIT, 0), d.stderr()
    assert "Traceback" not in d.log()


def env(d: Daemon) -> dict[str, str]:
    e = d.env()
    e.pop("MAILHUB_CONFIG", None)
    return e


def sendmail(d: Daemon, *args: str, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli.sendmail", "-C", d.conf, *args],
        input=stdin, env=env(d), cwd=d.home, capture_output=True, timeout=30,
    )


def queue(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "-C", d.conf, "queue", *args],
        env=env(d), cwd=d.home, capture_output=True, text=True, timeout=30,
    )


def maildir(d: Daemon, domain: str, user: str) -> str:
    return os.path.join(d.home, "mailboxes", domain, user)


def find(box: str, needle: bytes):
    return lambda: next((raw for raw in read_maildir(box) if needle in raw), None)


def test_sendmail_with_daemon_stopped_then_start(stopped):
    d = stopped
    text = b"Subject: while stopped\nMessage-ID: <stopped@client.test>\n\nqueued with no daemon\n.. dots\n"
    r = sendmail(d, "-i", "-f", f"alice@{DOMAIN}", f"bob@{DOMAIN}", stdin=text)
    assert (r.returncode, r.stderr) == (0, b"")
    new = os.path.join(d.spool, "pickup", "new")
    assert len(os.listdir(new)) == 1
    # the queue tools see it waiting in the pickup area
    listing = queue(d, "list")
    assert listing.returncode == 0, listing.stderr
    assert "pickup" in listing.stdout and f"bob@{DOMAIN}" in listing.stdout
    started = time.monotonic()
    d.start()
    raw = wait_for(find(maildir(d, DOMAIN, "bob"), b"<stopped@client.test>"), 5, "the picked-up message in bob's Maildir")
    assert time.monotonic() - started < 5
    head, body = split_message(raw)
    assert body == b"queued with no daemon\n.. dots\n"
    assert b"Return-Path: <alice@example.test>" in head
    assert re.search(rb"Received: by mx\.example\.test \(mailhub, from userid \d+\)", head), head
    assert os.listdir(new) == []


def test_cron_like_pipe_arrives_within_two_seconds(setup):
    d, _, _, _ = setup
    r = subprocess.run(
        f"printf 'To: a@localhost\\nSubject: x\\n\\nbody' | {sys.executable} -m mailhub.cli.sendmail -C {d.conf} -t",
        shell=True, env=env(d), cwd=d.home, capture_output=True, timeout=30,
    )
    assert (r.returncode, r.stderr) == (0, b"")
    # The daemon's pickup latency, from the file in the pickup area (sendmail
    # returned) to the Maildir; the start-up time of sendmail's interpreter is not its.
    started = time.monotonic()
    raw = wait_for(find(maildir(d, "localhost", "a"), b"Subject: x"), 3, "the cron mail in a@localhost")
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, elapsed
    head, body = split_message(raw)
    assert body == b"body\n"  # a final line end is added (CRLF in the spool)
    assert b"To: a@localhost\n" in head
    assert b"\nDate: " in b"\n" + head and b"\nMessage-ID: <" in b"\n" + head and b"\nFrom: " in b"\n" + head


def deferred_with_error(d: Daemon, qid: str) -> str:
    """Wait until C{queue list} shows C{qid} with its last error; return the listing."""

    def listed():
        out = queue(d, "list").stdout
        block = out.split(qid, 1)[1].split("\n\n", 1)[0] if qid in out else ""
        return out if "Connection refused" in block else None

    return wait_for(listed, 15, f"{qid} deferred with an error in the listing", interval=0.2)


def test_deferred_listed_then_flush_delivers(setup):
    d, ports, sinks, home = setup
    data = b"Subject: deferred\r\nMessage-ID: <deferred@client.test>\r\n\r\nwaiting for the sink\r\n"
    qid = send(d, "x@dead.test", data, sender="sender@client.test")
    listing = deferred_with_error(d, qid)
    block = listing.split(qid, 1)[1].split("\n\n", 1)[0]
    assert "sender@client.test" in block
    # no server replied: the reason alone, as Postfix's mailq shows it
    assert re.search(r"\n +\(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: Connection refused\)\n", block), block
    assert "x@dead.test" in block
    assert qid + ".json" in d.queued()
    # the receiver comes up; nothing happens until a flush (backoff is 1 h)
    sink = Sink(home / "sink", ports["dead"])
    sinks.append(sink)
    r = queue(d, "flush")
    assert (r.returncode, r.stdout, r.stderr) == (0, "flush requested\n", "")  # through the control socket

    def received():
        return next((x for x in sink.dumps() if b"<deferred@client.test>" in x and x.endswith(b"sink\n\n")), None)

    dump = wait_for(received, 10, "the flushed message at smtp-sink")
    assert b"X-Rcpt-Args: <x@dead.test>\n" in dump
    wait_for(lambda: qid + ".json" not in d.queued(), 10, f"{qid} to leave the queue")
    assert qid not in queue(d, "list").stdout


def test_delete_removes_exactly_one(setup):
    d, _, _, _ = setup
    data = b"Subject: held\r\n\r\nnever delivered\r\n"
    q1 = send(d, "one@held.test", data, sender="sender@client.test")
    q2 = send(d, "two@held.test", data, sender="sender@client.test")
    deferred_with_error(d, q1)
    deferred_with_error(d, q2)
    r = queue(d, "delete", q1)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{q1}: deleted\n", "")
    wait_for(lambda: q1 + ".json" not in d.queued(), 5, f"{q1} to be removed")
    assert q2 + ".json" in d.queued()
    listing = queue(d, "list").stdout
    assert q1 not in listing and q2 in listing
    assert "-- 1 Kbytes in 1 Request." in listing
    # deleting it again is an error naming the id
    r = queue(d, "delete", q1)
    assert r.returncode == 66 and r.stderr == f"mailhub queue: {q1}: no such message\n"
    r = queue(d, "delete", q2)
    assert r.returncode == 0
    wait_for(lambda: d.queued() == [], 5, "an empty queue")

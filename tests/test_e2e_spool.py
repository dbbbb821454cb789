"""
End-to-end tests of the spool's queue files (one file per message: the
message bytes, the envelope JSON, a 44-byte footer) and of the conversion
from the format-1 spool (new/ID + envelopes/ID.json).  Black-box where
possible: the real daemon (tests/daemon.py), smtplib and raw sockets as
clients, smtp-sink as the relay peer, the real queue tool as a subprocess,
real files.  Each test states the guarantee it holds the spool to:
"durable before 250", a message delivered once after any crash, queue
files private, ids that are paths never reaching the file system.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from daemon import CLEAN_EXIT, DOMAIN, Daemon, read_maildir, wait_for
from peers import Sink, free_port, sink_message

from mailhub.envelope import Envelope, Recipient
from mailhub.queue import migration, queuefile
from mailhub.queue.queuefile import new_queue_id, open_message
from mailhub.queue.spool import Spool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(sink_port: int, closed_port: int) -> str:
    return f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = ["127.0.0.0/8"]

[spool]
path = "spool"
fsync = true

[local]
domains = ["{DOMAIN}"]
mailboxes = "mailboxes"
users = ["alice", "bob"]

[relay]
min_backoff = 300
max_backoff = 600
connect_timeout = 5
command_timeout = 20
greeting_timeout = 20

[relay.routes]
"sink.test" = "[127.0.0.1]:{sink_port}"
"closed.test" = "[127.0.0.1]:{closed_port}"
"""


def queue_tool(d: Daemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli.queue", "-C", d.conf, *args],
        cwd=d.home, env=d.env(), capture_output=True, timeout=timeout,
    )


def raw_session(port: int, lines: list[bytes]) -> list[bytes]:
    """Send raw bytes (one element = one write) and collect the reply lines after each."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            out = b""
            while True:
                line = f.readline()
                out += line
                if line[3:4] != b"-":
                    return out

        reply()  # greeting
        for chunk in lines:
            s.sendall(chunk)
            replies.append(reply())
    return replies


def queued_id(reply: bytes) -> str:
    m = re.search(rb"queued as ([0-9A-Z]+)", reply)
    assert m, reply
    return m.group(1).decode()


def maildir_with(d: Daemon, user: str, marker: bytes) -> list[bytes]:
    return [m for m in read_maildir(d.maildir(user)) if marker in m]


# -- one daemon with a relay peer, shared by the black-box delivery tests -------------------


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    base = tmp_path_factory.mktemp("spool_e2e")
    sink = Sink(base / "sink", free_port())
    home = base / "home"
    home.mkdir()
    d = Daemon(home, config(sink.port, free_port()))
    d.start()
    try:
        yield {"d": d, "sink": sink}
    finally:
        d.stop()
        sink.stop()
    assert "Traceback" not in d.log(), d.log()


def sink_with(sink: Sink, marker: bytes) -> list[bytes]:
    return [sink_message(x)[1] for x in sink.dumps() if marker in x]


FAKE_FOOTER = b"\n#mailhub-queue 2 0000000000000010 00000002\n"


def test_message_ending_in_a_fake_footer_is_delivered_and_relayed_exactly(net):
    """Guarantee: the real footer is found at the end; a look-alike inside the message is just data."""
    d, sink = net["d"], net["sink"]
    msg = (
        b"From: a@client.test\r\nSubject: fake footer\r\nMessage-ID: <fakefooter@client.test>\r\n\r\n"
        b"{\"queue_id\": \"AAAAAAAAAAAA\", \"version\": 1}\r\n#mailhub-queue 2 0000000000000010 00000002\r\n"
    )
    with d.smtp() as s:
        s.ehlo()
        s.mail("a@client.test")
        assert s.rcpt(f"alice@{DOMAIN}")[0] == 250
        assert s.rcpt("x@sink.test")[0] == 250
        code, reply = s.data(msg)
        assert code == 250, reply
    local = wait_for(lambda: maildir_with(d, "alice", b"<fakefooter@"), 10, "local copy")
    relayed = wait_for(lambda: sink_with(sink, b"<fakefooter@"), 10, "relayed copy")
    # Maildir: LF line ends, a Delivered-To/Return-Path/Received prepended; the message ends exactly
    assert local[0].endswith(msg.replace(b"\r\n", b"\n")), local[0][-300:]
    assert b"#mailhub-queue 2 0000" in local[0] and local[0].count(b"#mailhub-queue") == 1
    # (smtp-sink's dump adds one line end after the message)
    assert relayed[0].endswith(msg.replace(b"\r\n", b"\n") + b"\n"), relayed[0][-300:]
    assert relayed[0].count(b"#mailhub-queue") == 1
    assert b'"recipients"' not in local[0] + relayed[0]


def test_bdat_message_without_final_crlf_is_delivered_and_relayed_without_trailer(net):
    """Guarantee: a BDAT message not ending in CRLF gets no envelope glued to its last line."""
    d, sink = net["d"], net["sink"]
    msg = b"From: a@client.test\r\nSubject: bdat\r\nMessage-ID: <bdatnocrlf@client.test>\r\n\r\nno final line end"
    replies = raw_session(d.port, [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<a@client.test>\r\n",
        f"RCPT TO:<alice@{DOMAIN}>\r\n".encode(),
        b"RCPT TO:<y@sink.test>\r\n",
        b"BDAT %d LAST\r\n" % len(msg) + msg,
        b"QUIT\r\n",
    ])
    assert replies[4].startswith(b"250 2.0.0"), replies
    qid = queued_id(replies[4])
    local = wait_for(lambda: maildir_with(d, "alice", b"<bdatnocrlf@"), 10, "local copy")
    assert local[0].endswith(b"\n\nno final line end"), local[0][-200:]
    relayed = wait_for(lambda: sink_with(sink, b"<bdatnocrlf@"), 10, "relayed copy")
    assert b"no final line end" in relayed[0]
    assert b"mailhub-queue" not in relayed[0] and qid.encode() + b'"' not in relayed[0]
    assert b'"recipients"' not in relayed[0]


def test_empty_bdat_message_is_accepted_and_delivered_empty(net):
    """Guarantee: an empty message (BDAT 0 LAST) is a 44+envelope byte queue file and an empty delivery."""
    d = net["d"]
    new_dir = os.path.join(d.maildir("bob"), "new")
    before = set(os.listdir(new_dir)) if os.path.isdir(new_dir) else set()
    replies = raw_session(d.port, [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<a@client.test>\r\n",
        f"RCPT TO:<bob@{DOMAIN}>\r\n".encode(),
        b"BDAT 0 LAST\r\n",
        b"QUIT\r\n",
    ])
    assert replies[3].startswith(b"250 2.0.0"), replies
    qid = queued_id(replies[3])

    def new_file():
        names = (set(os.listdir(new_dir)) if os.path.isdir(new_dir) else set()) - before
        return [n for n in names if qid in n] or None

    names = wait_for(new_file, 10, "bob's copy")
    with open(os.path.join(d.maildir("bob"), "new", names[0]), "rb") as f:
        data = f.read()
    assert b"mailhub-queue" not in data and b'"recipients"' not in data
    head, sep, body = data.partition(b"\n\n")
    assert body == b"" and b"Delivered-To: bob@" in head, data


def test_bounce_of_a_message_carries_no_queue_trailer(tmp_path):
    """Guarantee: a bounce (RET=FULL) quotes the message, never the envelope or footer after it."""
    msg = b"From: alice@example.test\r\nSubject: to bounce\r\nMessage-ID: <tobounce@client.test>\r\n\r\nbody\r\n"
    from mailhub.queue.notices import make_dsn

    path = str(tmp_path / "q")
    env = Envelope(queue_id=new_queue_id(), sender="alice@example.test",
                   recipients=[Recipient("zed@sink.test", state="failed", last_code=550,
                                         last_status="5.1.1", last_text="no such user")],
                   arrival=time.time(), esmtp={"ret": "FULL"})
    with open(path, "wb") as f:
        f.write(queuefile.queue_file_bytes(msg, env))
    dsn = make_dsn(env, env.recipients, path, reporting_mta="mx.example.test", now=time.time())
    assert msg in dsn
    assert b"mailhub-queue" not in dsn and b'"queue_id"' not in dsn


def test_hundreds_of_recipients_survive_sigkill_and_read_back(tmp_path):
    """
    Guarantee: an envelope far larger than the 8 KiB tail read (400 deferred
    recipients) is committed, survives SIGKILL, and is read back whole by the
    daemon and the queue tool; the message bytes stay exact.
    """
    d = Daemon(tmp_path, config(free_port(), free_port()))
    d.start()
    msg = b"From: a@client.test\r\nSubject: many\r\nMessage-ID: <many@client.test>\r\n\r\nhello\r\n"
    rcpts = [f"user{i:03d}-{'x' * 40}@closed.test" for i in range(400)]
    with d.smtp() as s:
        s.ehlo()
        s.mail("a@client.test")
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, reply = s.data(msg)
        assert code == 250, reply
    qid = queued_id(reply)
    d.kill()
    d.start()
    try:
        env = Spool(d.spool).load(qid)
        assert [r.address for r in env.recipients] == rcpts
        with open_message(os.path.join(d.spool, "queue", qid)) as f:
            queued = f.read()  # the message as received: the daemon's Received: line, then the client's bytes
        assert queued.startswith(b"Received: ") and queued.endswith(b"\r\n" + msg), queued
        r = queue_tool(d, "cat", qid)
        assert (r.returncode, r.stdout) == (0, queued), r.stderr
        r = queue_tool(d, "show", qid)
        assert r.returncode == 0 and r.stdout.count(b"recipient: user") == 400, r.stderr
        assert os.listdir(os.path.join(d.spool, "corrupt")) == []
    finally:
        assert d.stop() == CLEAN_EXIT


def test_acknowledged_message_survives_sigkill_and_is_delivered_once(tmp_path):
    """Guarantee: 250 then SIGKILL: after the restart the message is in the Maildir exactly once, exact."""
    d = Daemon(tmp_path, config(free_port(), free_port()))
    d.start()
    msgs = {}
    for i in range(20):
        m = (f"From: a@client.test\r\nSubject: k{i}\r\nMessage-ID: <kill{i}@client.test>\r\n\r\n"
             f"line\r\n.dot\r\nend {i}\r\n").encode()
        with d.smtp() as s:
            s.ehlo()
            s.mail("a@client.test")
            s.rcpt(f"alice@{DOMAIN}")
            code, _ = s.data(m)
            assert code == 250
        msgs[i] = m
    d.kill()
    d.start()
    try:
        def all_there():
            got = read_maildir(d.maildir("alice"))
            return got if len(got) >= 20 and not os.listdir(os.path.join(d.spool, "queue")) else None

        got = wait_for(all_there, 15, "20 deliveries and an empty queue")
        d.stop()
        d.start()  # a second restart must not deliver anything again
        # The scheduler has loaded the queue, and it is empty: nothing more can be delivered.
        wait_for(lambda: "scheduler: 0 message(s) in the queue" in d.log(), 15, "the scheduler's queue count")
        got = read_maildir(d.maildir("alice"))
        for i, m in msgs.items():
            copies = [g for g in got if f"<kill{i}@".encode() in g]
            assert len(copies) == 1, (i, len(copies))
            assert copies[0].endswith(m.replace(b"\r\n", b"\n"))
        assert all(b"mailhub-queue" not in g for g in got)
    finally:
        assert d.stop() == CLEAN_EXIT


# -- the queue tool: path tricks --------------------------------------------------------------


@pytest.mark.parametrize("command", ["cat", "show", "delete"])
def test_queue_tool_refuses_path_tricks(tmp_path, command):
    """Guarantee: ids that are paths never reach the file system (cat/show/delete)."""
    d = Daemon(tmp_path, config(free_port(), free_port()))
    Spool(d.spool)
    secret = tmp_path / "SECRETFILE1"
    secret.write_bytes(b"secret\n" + b"x" * 100)
    os.symlink(str(secret), os.path.join(d.spool, "queue", "..SECRET"))
    for trick in ["../../SECRETFILE1", "/etc/passwd", "..SECRET", "SECRETFILE1/..", "ABCDEFGH/../../SECRETFILE1",
                  "ABCDEFGH\x00", "-x"]:
        if trick.startswith("-"):
            continue
        try:
            r = queue_tool(d, command, trick)
        except ValueError:  # NUL in argv: the OS refuses it first
            continue
        assert r.returncode in (64, 66), (trick, r.returncode, r.stderr)
        assert b"secret" not in r.stdout and b"root:" not in r.stdout
    assert secret.exists()


# -- permissions of new queue files ------------------------------------------------------------


def test_large_message_queue_file_is_private(tmp_path):
    """
    A message over MEMORY_LIMIT (64 KiB) is streamed to tmp/ with
    open(..., "xb"): mode 0o666 & ~umask (0644 under the usual 022), while a
    small one gets 0600.  Queue files hold mail: they must be 0600 whatever
    the size (the daemon runs with the umask it was started with: twistd -n).
    """
    d = Daemon(tmp_path, config(free_port(), free_port()))
    old = os.umask(0o022)
    try:
        d.start()
    finally:
        os.umask(old)
    try:
        modes = {}
        for label, size in (("small", 1000), ("large", 200_000)):
            m = (f"From: a@client.test\r\nSubject: {label}\r\n\r\n").encode() + (b"z" * 78 + b"\r\n") * (size // 80)
            with d.smtp() as s:
                s.ehlo()
                s.mail("a@client.test")
                s.rcpt("nobody@closed.test")  # deferred: the queue file stays
                code, reply = s.data(m)
                assert code == 250
            qid = queued_id(reply)
            modes[label] = stat.S_IMODE(os.stat(os.path.join(d.spool, "queue", qid)).st_mode)
        assert modes == {"small": 0o600, "large": 0o600}, {k: oct(v) for k, v in modes.items()}
    finally:
        assert d.stop() == CLEAN_EXIT


def format1_spool(spool_path: str, count: int, size: int) -> dict[str, bytes]:
    """A spool in format 1 (new/ID + envelopes/ID.json), which the daemon and the queue tool convert."""
    for sub in ("new", "envelopes", "tmp"):
        os.makedirs(os.path.join(spool_path, sub), exist_ok=True)
    msgs = {}
    for i in range(count):
        qid = new_queue_id()
        msg = f"Subject: old {i}\r\nMessage-ID: <old{i}@client.test>\r\n\r\n".encode() + (
            b"y" * 998 + b"\r\n") * (size // 1000)
        with open(os.path.join(spool_path, "new", qid), "wb") as f:
            f.write(msg)
        env = Envelope(queue_id=qid, sender="s@client.test", recipients=[Recipient("carol@closed.test")],
                       arrival=time.time(), next_attempt=time.time() + 3600)
        with open(os.path.join(spool_path, "envelopes", qid + ".json"), "wb") as f:
            f.write(env.to_json())
        msgs[qid] = msg
    return msgs


def test_migrated_queue_files_are_private(tmp_path):
    """migrate() writes queue files with open(tmp, "xb"): 0644 under umask 022, not 0600."""
    msgs = format1_spool(str(tmp_path / "spool"), 2, 100)
    old = os.umask(0o022)
    try:
        Spool(str(tmp_path / "spool"), fsync=False).migrate()
    finally:
        os.umask(old)
    for qid in msgs:
        mode = stat.S_IMODE(os.stat(tmp_path / "spool" / "queue" / qid).st_mode)
        assert mode == 0o600, oct(mode)


# -- migration crash windows and concurrency --------------------------------------------------


def test_crash_after_queue_file_before_old_files_deleted_keeps_one_copy(tmp_path):
    """
    Guarantee: a crash after the queue file is durable but before new/ID and
    envelopes/ID.json are deleted: the next recover() keeps the queue file,
    deletes the format-1 files, and the message is queued once with its bytes.
    """
    sp = str(tmp_path / "spool")
    msgs = format1_spool(sp, 3, 5000)
    real_unlink = migration.unlink_logged

    class Crash(BaseException):
        pass

    def crash(path, *remove):
        if os.sep + "new" + os.sep in path or path.endswith(".json"):
            raise Crash()
        real_unlink(path, *remove)

    migration.unlink_logged = crash
    try:
        with pytest.raises(Crash):
            Spool(sp, fsync=False).migrate()
    finally:
        migration.unlink_logged = real_unlink
    assert sorted(os.listdir(os.path.join(sp, "new"))) == sorted(msgs)
    pending = Spool(sp, fsync=False).recover()
    assert sorted(e.queue_id for e in pending) == sorted(msgs)
    assert not os.path.exists(os.path.join(sp, "new"))
    assert os.listdir(os.path.join(sp, "envelopes")) == []
    s = Spool(sp, fsync=False)
    for qid, msg in msgs.items():
        with s.open_message(qid) as f:
            assert f.read() == msg


def test_two_concurrent_migrations_never_lose_an_acknowledged_message(tmp_path):
    """
    The daemon (recover -> migrate) and `mailhub queue list` (migrate, because
    control.sock is not there yet while the daemon recovers) convert the same
    format-1 spool at once.  Neither may rename the other's half-written
    temporary file into queue/ (it would have no footer yet, and recover()
    would quarantine an acknowledged message): the message is queued once,
    complete, and delivered.

    The interleaving is forced with a hook in queue_file_trailer (called
    between copying the message and writing the trailer); everything else is
    the real migrate()/recover().
    """
    sp = str(tmp_path / "spool")
    msgs = format1_spool(sp, 1, 3000)
    (qid, msg), = msgs.items()
    real_trailer = migration.queue_file_trailer
    daemon_paused, tool_paused = threading.Event(), threading.Event()
    go_daemon, go_tool = threading.Event(), threading.Event()

    def trailer(length, env):
        name = threading.current_thread().name
        if name == "daemon":
            daemon_paused.set()
            assert go_daemon.wait(10)
        elif name == "tool":
            tool_paused.set()
            assert go_tool.wait(10)
        return real_trailer(length, env)

    results: dict[str, object] = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except BaseException as e:
            results[name] = e

    migration.queue_file_trailer = trailer
    try:
        daemon = threading.Thread(target=run, args=("daemon", Spool(sp, fsync=False).recover), name="daemon")
        tool = threading.Thread(target=run, args=("tool", Spool(sp, fsync=False).migrate), name="tool")
        daemon.start()
        assert daemon_paused.wait(10)
        tool.start()
        # the daemon holds the conversion lock: the tool waits for it
        assert not tool_paused.wait(0.5)
        with pytest.raises(BlockingIOError):
            Spool(sp, fsync=False).migrate(blocking=False)
        go_daemon.set()
        daemon.join(10)
        go_tool.set()
        tool.join(10)
    finally:
        migration.queue_file_trailer = real_trailer
    pending = results["daemon"]
    # the message was acknowledged and never delivered: it must be queued, readable, exact
    assert isinstance(pending, list) and [e.queue_id for e in pending] == [qid], (pending, results)
    assert os.listdir(os.path.join(sp, "corrupt")) == []
    with Spool(sp, fsync=False).open_message(qid) as f:
        assert f.read() == msg


def test_leftover_format1_file_never_drops_the_current_envelope(tmp_path):
    """
    A format-1 new/ID whose unlink failed during the conversion
    (_unlink_quietly; EBUSY/EACCES/EIO are real, the failure is simulated)
    stays next to the converted queue/ID.  Later starts must not take it for
    an unfinished conversion and delete envelopes/ID.json, the envelope
    written after a recipient was delivered: a delivered recipient never
    gets the message twice.
    """
    sp = str(tmp_path / "spool")
    (qid, _), = format1_spool(sp, 1, 100).items()
    s = Spool(sp, fsync=False)
    real_unlink = migration.unlink_quietly

    def failing_on_new(path):
        if os.sep + "new" + os.sep in path:
            return  # the unlink failed (and was ignored)
        real_unlink(path)

    migration.unlink_quietly = failing_on_new
    try:
        s.migrate()
    finally:
        migration.unlink_quietly = real_unlink
    env = s.load(qid)
    env.recipients.append(Recipient("dave@closed.test"))  # two recipients: one delivered, one still pending
    env.recipients[0].state = "delivered"
    s.update(env)
    pending = Spool(sp, fsync=False).recover()  # the next start
    assert [r.state for r in pending[0].recipients] == ["delivered", "pending"], pending


def test_documented_tail_jq_line_prints_the_envelope(tmp_path):
    """The command docs/spool.rst gives for the envelope of the commit prints it."""
    env = Envelope(queue_id=new_queue_id(), sender="a@client.test", recipients=[Recipient("b@x.test")],
                   arrival=1.0)
    path = tmp_path / env.queue_id
    path.write_bytes(queuefile.queue_file_bytes(b"Subject: x\r\n\r\nbody\r\n", env))
    docs = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "spool.rst")).read()
    (command,) = [line.split("#")[0].strip() for line in docs.splitlines() if "| jq . # the envelope of the commit" in line]
    command = command.replace("SPOOL/queue/ID", str(path)).replace("jq .", "jq -r .queue_id")
    r = subprocess.run(command, shell=True, capture_output=True)
    assert r.stdout.decode().strip() == env.queue_id, (r.stdout, r.stderr)

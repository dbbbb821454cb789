"""
Local delivery processes (mailhub.delivery.localproc): the child program over real
pipes, the pool in a real reactor with real child processes (deliveries,
a child killed with work in flight, a child answering garbage, shutdown),
and the daemon with a delivery process killed under it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import in_reactor
from daemon import Daemon, config_text, delivered_with, message, send
from deliveryharness import DOMAIN, MESSAGE, directory_args, maildir_messages
from peers import wait_for
from twisted.internet import defer
from twisted.logger import LogLevel

from mailhub.config import load_config
from mailhub.delivery import localproc
from mailhub.envelope import Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes


def queued(tmp_path, name: str = "Q1", data: bytes = MESSAGE) -> str:
    """A queue file (spool format 2) holding C{data}; its trailer's envelope only makes it valid."""
    path = tmp_path / "spool-queue" / name
    path.parent.mkdir(exist_ok=True)
    trailer = Envelope("15NXAAAAAAAAAAAAA", "a@client.test", [Recipient(f"alice@{DOMAIN}")], arrival=1700000000.25)
    path.write_bytes(queue_file_bytes(data, trailer))
    return str(path)


# -- the child program, over real pipes ----------------------------------------------------


def child(tmp_path) -> subprocess.Popen:
    root = localproc._PACKAGE_ROOT
    proc = subprocess.Popen(
        [sys.executable, "-c", localproc._CHILD_MAIN, root],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
    )
    settings = localproc.settings_for(directory_args(tmp_path), "mx.example.test", True)
    proc.stdin.write(json.dumps(settings).encode() + b"\n")
    proc.stdin.flush()
    return proc


def ask(proc, request: dict) -> dict:
    proc.stdin.write(json.dumps(request).encode() + b"\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_child_delivers_and_answers_one_outcome_per_recipient(tmp_path):
    path = queued(tmp_path)
    proc = child(tmp_path)
    try:
        answer = ask(proc, {
            "id": 7, "queue_id": "15NXAAAAAAAAAAAAA", "arrival": 1700000000.25, "sender": "a@client.test",
            "addresses": [f"alice@{DOMAIN}", f"carol@{DOMAIN}", f"bob@{DOMAIN}"], "message_path": path,
        })
        assert answer == {"id": 7, "outcomes": [
            {"recipient": f"alice@{DOMAIN}", "kind": "delivered", "code": 250, "status": "2.0.0",
             "text": "delivered to maildir"},
            {"recipient": f"carol@{DOMAIN}", "kind": "permanent", "code": 550, "status": "5.1.1",
             "text": "User unknown in local recipient table"},
            {"recipient": f"bob@{DOMAIN}", "kind": "delivered", "code": 250, "status": "2.0.0",
             "text": "delivered to maildir"},
        ]}
        # what a Maildir reader sees: our two header lines, then the message with LF line ends
        assert maildir_messages(tmp_path, "alice") == [
            b"Return-Path: <a@client.test>\nDelivered-To: alice@example.test\n"
            b"From: a@client.test\nSubject: hello\n\nbody line\n.dot line\n"
        ]
        assert len(maildir_messages(tmp_path, "bob")) == 1
        # the same delivery again (a retry after a crash): recognised, not duplicated
        again = ask(proc, {
            "id": 8, "queue_id": "15NXAAAAAAAAAAAAA", "arrival": 1700000000.25, "sender": "a@client.test",
            "addresses": [f"alice@{DOMAIN}"], "message_path": path,
        })
        assert again["outcomes"][0]["kind"] == "delivered"
        assert len(maildir_messages(tmp_path, "alice")) == 1
        # a queued file that cannot be read: temporary, per recipient
        gone = ask(proc, {
            "id": 9, "queue_id": "15NXBBBBBBBBBBBBB", "arrival": 1700000001.0, "sender": "",
            "addresses": [f"alice@{DOMAIN}"], "message_path": str(tmp_path / "missing"),
        })
        assert gone["outcomes"][0]["kind"] == "temporary"
        assert (gone["outcomes"][0]["code"], gone["outcomes"][0]["status"]) == (451, "4.3.0")
    finally:
        proc.stdin.close()
    assert proc.wait(20) == 0  # the end of its input ends it


def test_child_refuses_a_terminal(tmp_path):
    # started by hand on a terminal it says so instead of waiting for JSON
    import pty

    master, slave = pty.openpty()
    root = localproc._PACKAGE_ROOT
    proc = subprocess.Popen([sys.executable, "-c", localproc._CHILD_MAIN, root], stdin=slave,
                            stderr=subprocess.PIPE)
    os.close(slave)
    try:
        assert proc.wait(20) == 64
        assert b"started by the mailhub daemon" in proc.stderr.read()
    finally:
        os.close(master)


# -- the pool, in a real reactor with real children ------------------------------------------


def envelope(qid: str, rcpts: list[str]) -> tuple[Envelope, list[Recipient]]:
    recipients = [Recipient(a) for a in rcpts]
    return Envelope(qid, "a@client.test", recipients, 1700000000.0), recipients


@pytest.fixture
def pool(reactor, tmp_path):
    settings = localproc.settings_for(directory_args(tmp_path), "mx.example.test", True)
    p = localproc.LocalDeliveryProcesses(settings, 2, reactor)
    in_reactor(reactor, p.startService)
    wait_for(lambda: all(c is not None and c.running for c in p.children), 20, "two delivery processes")
    yield p
    if p.running:
        in_reactor(reactor, p.stopService)


def deliver(reactor, pool, qid: str, rcpts: list[str], path: str):
    env, recipients = envelope(qid, rcpts)
    return in_reactor(reactor, pool.deliver, env, recipients, path, lambda outcomes: None)


def test_pool_spreads_deliveries_over_its_processes(reactor, pool, tmp_path):
    path = queued(tmp_path)

    def many():
        ds = []
        for i in range(40):
            env, recipients = envelope(f"15NXCCCCCCCC{i:05d}", [f"alice@{DOMAIN}", f"bob@{DOMAIN}"])
            ds.append(pool.deliver(env, recipients, path, report=lambda outcomes: None))
        # both children have work in their pipes at once
        busy = sorted(len(c.inflight) for c in pool.children)
        return defer.gatherResults(ds).addCallback(lambda r: (busy, r))

    busy, results = in_reactor(reactor, many)
    assert busy == [20, 20]
    assert all([o.kind for o in outcomes] == ["delivered", "delivered"] for outcomes in results)
    assert len(maildir_messages(tmp_path, "alice")) == 40
    assert len(maildir_messages(tmp_path, "bob")) == 40


def test_killed_process_fails_its_work_softly_and_is_replaced(reactor, pool, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)  # opening it blocks: the delivery hangs in the child
    path = queued(tmp_path)

    def start():
        env, recipients = envelope("15NXDDDDDDDDDDDDD", [f"alice@{DOMAIN}"])
        d = pool.deliver(env, recipients, fifo, report=lambda outcomes: None)
        stuck = [c for c in pool.children if c.inflight][0]
        return d, stuck, stuck.transport.pid

    d, stuck, pid = in_reactor(reactor, start)
    os.kill(pid, signal.SIGKILL)
    outcomes = wait_for(lambda: d.called and d.result, 20, "the failed delivery")
    assert [(o.kind, o.code, o.status, o.text) for o in outcomes] == [
        ("temporary", 451, "4.3.0", "local delivery process ended unexpectedly")
    ]
    # a new process takes the slot after the restart delay, and works
    wait_for(lambda: pool.children[stuck.slot] is not None and pool.children[stuck.slot] is not stuck
             and pool.children[stuck.slot].running, 20, "the replacement process")
    for i in range(4):
        [o] = deliver(reactor, pool, f"15NXEEEEEEEEEEE{i:02d}", [f"alice@{DOMAIN}"], path)
        assert o.kind == "delivered"


def test_garbage_from_a_process_is_a_soft_failure_and_a_restart(reactor, pool, tmp_path):
    def start():
        env, recipients = envelope("15NXFFFFFFFFFFFFF", [f"alice@{DOMAIN}"])
        child = pool.children[0]
        pool.waiting.append(localproc._Request(999, b"", [f"alice@{DOMAIN}"]))
        request = pool.waiting.pop()
        child.inflight[request.id] = request
        child.outReceived(b"this is not json\n")
        return request.deferred, child

    d, child = in_reactor(reactor, start)
    outcomes = wait_for(lambda: d.called and d.result, 20, "the failed request")
    assert [(o.kind, o.code, o.status) for o in outcomes] == [("temporary", 451, "4.3.0")]
    wait_for(lambda: pool.children[0] is not child and pool.children[0] is not None
             and pool.children[0].running, 20, "the replacement process")


def test_stop_lets_processes_finish_and_exit(reactor, tmp_path):
    settings = localproc.settings_for(directory_args(tmp_path), "mx.example.test", True)
    p = localproc.LocalDeliveryProcesses(settings, 1, reactor)
    in_reactor(reactor, p.startService)
    wait_for(lambda: p.children[0] is not None and p.children[0].running, 20, "the delivery process")
    pid = in_reactor(reactor, lambda: p.children[0].transport.pid)
    path = queued(tmp_path)

    def deliver_then_stop():
        env, recipients = envelope("15NXGGGGGGGGGGGGG", [f"alice@{DOMAIN}"])
        d = p.deliver(env, recipients, path, report=lambda outcomes: None)
        stopped = p.stopService()  # the request already sent is still answered
        return defer.gatherResults([d, stopped])

    [outcomes, _] = in_reactor(reactor, deliver_then_stop)
    assert outcomes[0].kind == "delivered"
    # after stop: no new work is taken, the answer is a soft "shutting down"
    [o] = deliver(reactor, p, "15NXHHHHHHHHHHHHH", [f"alice@{DOMAIN}"], path)
    assert (o.kind, o.code, o.status, o.text) == ("temporary", 451, "4.3.0", "mail system is shutting down")

    wait_for(lambda: gone(pid), 20, "the delivery process to exit")


def test_delivery_processes_setting(tmp_path):
    conf = tmp_path / "m.toml"
    conf.write_text("")
    assert load_config(str(conf)).local.delivery_processes == 1
    conf.write_text("[local]\ndelivery_processes = 0\n")
    assert load_config(str(conf)).local.delivery_processes == 0
    conf.write_text("[local]\ndelivery_processes = 4\n")
    assert load_config(str(conf)).local.delivery_processes == 4


# -- the daemon ----------------------------------------------------------------------------


def delivery_pids(daemon_pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == daemon_pid and b"mailhub.delivery.localchild" in cmdline and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def test_daemon_delivers_through_its_processes_and_survives_losing_one(tmp_path):
    d = Daemon(tmp_path, config_text(extra_local="delivery_processes = 2")).start()
    try:
        pids = wait_for(lambda: len(delivery_pids(d.proc.pid)) == 2 and delivery_pids(d.proc.pid), 20,
                        "two delivery processes")
        send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "before"))
        delivered_with(d, "alice", "before")
        os.kill(pids[0], signal.SIGKILL)
        # replaced after a second; mail keeps flowing meanwhile (the other one)
        wait_for(lambda: len(delivery_pids(d.proc.pid)) == 2 and pids[0] not in delivery_pids(d.proc.pid), 20,
                 "the replacement process")
        for i in range(5):
            send(d, f"bob@{DOMAIN}", message(f"bob@{DOMAIN}", f"after{i}"))
        for i in range(5):
            delivered_with(d, "bob", f"after{i}")
        assert "local delivery process" in d.log() and "ended" in d.log()
        wait_for(lambda: d.queued() == [], 10, "an empty queue")
        children = delivery_pids(d.proc.pid)
    finally:
        d.stop()
    # a clean stop ends them too
    wait_for(lambda: all(gone(p) for p in children), 20, "the delivery processes to exit")


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet.

    The process may be reaped between the open and the read of its stat file; the read then
    fails with ESRCH (ProcessLookupError), which also means it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


# -- failures to start -----------------------------------------------------------------------


def test_children_never_read_the_aliases_file(tmp_path):
    args = dict(directory_args(tmp_path), aliases_path=str(tmp_path / "aliases"))
    settings = localproc.settings_for(args, "mx.example.test", False)
    assert settings["directory"]["aliases_path"] is None
    assert args["aliases_path"] == str(tmp_path / "aliases")  # the daemon's own copy is untouched


class _NoProcesses:
    """A reactor whose spawnProcess fails (EMFILE), with a Clock for the restarts."""

    def __init__(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.spawns = 0

    def callLater(self, *a, **kw):
        return self.clock.callLater(*a, **kw)

    def seconds(self):
        return self.clock.seconds()

    def spawnProcess(self, *a, **kw):
        self.spawns += 1
        raise OSError(24, "Too many open files")


def test_a_process_that_cannot_be_started_is_retried_later_and_deliveries_are_soft_failures(tmp_path, events):
    reactor = _NoProcesses()
    p = localproc.LocalDeliveryProcesses(localproc.settings_for(directory_args(tmp_path), "h", False), 1, reactor)
    p.startService()
    assert reactor.spawns == 1 and p.children == [None]
    env, recipients = envelope("15NXSSSSSSSSSSSSS", [f"alice@{DOMAIN}"])
    d = p.deliver(env, recipients, "/nonexistent", report=lambda outcomes: None)
    # held while a restart is pending; failed softly when that start fails too
    assert not d.called
    reactor.clock.advance(1.0)
    assert reactor.spawns == 2
    [o] = d.result
    assert (o.kind, o.code, o.status, o.text) == ("temporary", 451, "4.3.0", "no local delivery process is running")
    # the delay doubles per failure in a row: 1 s, 2 s, 4 s ... up to a minute
    reactor.clock.advance(1.9)
    assert reactor.spawns == 2
    reactor.clock.advance(0.1)
    assert reactor.spawns == 3
    for _ in range(10):
        reactor.clock.advance(localproc.MAX_RESTART_DELAY)
    assert reactor.spawns == 13
    errors = [e for e in events if "cannot start a local delivery process" in str(e.get("log_format", ""))]
    assert errors and "Too many open files" in str(errors[0]["error"])
    p.stopService()
    reactor.clock.advance(localproc.MAX_RESTART_DELAY)
    assert reactor.spawns == 13  # no restart after stop


def test_a_process_that_dies_at_once_backs_off_and_fails_work_softly(reactor, tmp_path):
    # /bin/false stands for a child that cannot even read its settings
    settings = localproc.settings_for(directory_args(tmp_path), "mx.example.test", True)
    p = localproc.LocalDeliveryProcesses(settings, 1, reactor, python="/bin/false")
    in_reactor(reactor, p.startService)
    try:
        env, recipients = envelope("15NXTTTTTTTTTTTTT", [f"alice@{DOMAIN}"])
        # waits for the answer
        outcomes = in_reactor(reactor, p.deliver, env, recipients, queued(tmp_path), lambda outcomes: None)
        assert [(o.kind, o.code, o.status) for o in outcomes] == [("temporary", 451, "4.3.0")]
        wait_for(lambda: p._failures.get(0, 0) >= 2, 20, "a second failed start")
    finally:
        in_reactor(reactor, p.stopService)


def test_delivery_process_imports_no_network_or_tls_machinery():
    """
    What a delivery process imports (its program, then what _serve needs) stays
    free of twisted.internet.tcp and TLS: importing them makes every delivery
    process about 10 MB bigger (the 100 MB message's RSS growth in bench/run.py:
    28 MB without them, 39 MB with).
    """
    root = localproc._PACKAGE_ROOT
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import mailhub.delivery.localchild, mailhub.delivery.localproc, mailhub.delivery.directory,"
        " mailhub.delivery.local, twisted.logger;"
        "print(sorted(m for m in ('twisted.internet.tcp', 'twisted.internet.ssl', 'OpenSSL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the pool: a process lost with work queued or half written ----------------------------------


def test_sigkill_mid_write_fails_every_request_once_with_451_and_delivers_nothing_twice(reactor, tmp_path):
    settings = localproc.settings_for(directory_args(tmp_path), "mx.example.test", True)
    pool = localproc.LocalDeliveryProcesses(settings, 1, reactor)
    in_reactor(reactor, pool.startService)
    try:
        wait_for(lambda: pool.children[0] is not None and pool.children[0].running, 20, "the delivery process")
        fifo = str(tmp_path / "fifo")
        os.mkfifo(fifo)  # the first delivery hangs opening it
        path = queued(tmp_path)
        long_rcpts = [f"alice+{'x' * 180}{i}@{DOMAIN}" for i in range(100)]  # ~20 KB per request line

        calls: list[int] = []

        def start():
            ds = []
            env, rcpts = envelope("15NXKKKKKKKKKKK00", [f"alice@{DOMAIN}"])
            ds.append(pool.deliver(env, rcpts, fifo, report=lambda outcomes: None))
            for i in range(1, 12):
                env, rcpts = envelope(f"15NXKKKKKKKKKKK{i:02d}", long_rcpts)
                ds.append(pool.deliver(env, rcpts, path, report=lambda outcomes: None))
            for i, d in enumerate(ds):
                d.addCallback(lambda r, i=i: (calls.append(i), r)[1])
            child = pool.children[0]
            pipe0 = child.transport.pipes[0]
            return ds, child, child.transport.pid, len(pipe0.dataBuffer) + pipe0._tempDataLen

        ds, child, pid, buffered = in_reactor(reactor, start)
        assert buffered > 0  # the pipe is full: part of the requests waits in Twisted's buffer
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: all(d.called for d in ds), 20, "every request answered")
        results = [d.result for d in ds]
        wait_for(lambda: len(calls) >= len(ds), 20, "every callback")
        assert sorted(calls) == list(range(len(ds)))  # each answered exactly once
        assert all(
            [(o.kind, o.code, o.status) for o in outcomes] == [("temporary", 451, "4.3.0")] * len(outcomes)
            for outcomes in results
        )
        assert maildir_messages(tmp_path, "alice") == []
        # the replacement gets its settings line first, then requests, in order
        wait_for(lambda: pool.children[0] is not None and pool.children[0] is not child
                 and pool.children[0].running, 30, "the replacement process")

        def again():
            out = []
            for i in range(5):
                env, rcpts = envelope(f"15NXLLLLLLLLLLL{i:02d}", [f"alice@{DOMAIN}", f"bob@{DOMAIN}"])
                out.append(pool.deliver(env, rcpts, path, report=lambda outcomes: None))
            return defer.gatherResults(out)

        results = in_reactor(reactor, again)
        assert [[o.kind for o in r] for r in results] == [["delivered", "delivered"]] * 5
        assert len(maildir_messages(tmp_path, "alice")) == 5
        assert len(maildir_messages(tmp_path, "bob")) == 5
    finally:
        if pool.running:
            in_reactor(reactor, pool.stopService)


def test_delivery_queued_while_no_process_runs_goes_to_the_replacement(reactor, tmp_path):
    """
    A delivery asked for while no delivery process runs is handed to the
    replacement process as soon as it starts, not only when a later
    delivery happens to arrive.
    """
    settings = localproc.settings_for(directory_args(tmp_path), "mx.example.test", True)
    p = localproc.LocalDeliveryProcesses(settings, 1, reactor)
    in_reactor(reactor, p.startService)
    try:
        wait_for(lambda: p.children[0] is not None and p.children[0].running, 20, "the delivery process")
        pid = in_reactor(reactor, lambda: p.children[0].transport.pid)
        os.kill(pid, signal.SIGKILL)
        # the slot is empty until the restart delay has passed
        wait_for(lambda: gone(pid) and p.children[0] is None, 20, "the process to be gone")
        path = queued(tmp_path)
        env, recipients = envelope("15NXRRRRRRRRRRRRR", [f"alice@{DOMAIN}"])
        [d] = in_reactor(reactor, lambda: [p.deliver(env, recipients, path, report=lambda outcomes: None)])  # the Deferred itself
        assert not d.called
        wait_for(lambda: p.children[0] is not None and p.children[0].running, 20, "the replacement process")
        # nothing else is delivered meanwhile: the waiting request alone must reach the new process
        outcomes = wait_for(lambda: d.called and d.result, 10, "the waiting delivery to be answered")
        assert [o.kind for o in outcomes] == ["delivered"]
        assert len(maildir_messages(tmp_path, "alice")) == 1
    finally:
        in_reactor(reactor, p.stopService)


def test_the_child_is_given_the_directory_that_holds_the_package():
    """The delivery processes import mailhub from the directory that holds it, never from inside it."""
    import mailhub

    assert os.path.samefile(os.path.join(localproc._PACKAGE_ROOT, "mailhub"), os.path.dirname(mailhub.__file__))


def delivery_children() -> list[int]:
    """Delivery processes whose parent is this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, StopIteration):
            continue
        if ppid == os.getpid() and b"mailhub.delivery.localchild" in cmdline:
            found.append(int(entry))
    return found


def test_reconfigure_replaces_each_process_once_and_logs_no_error(reactor, pool, tmp_path, events):
    """
    New settings (a configuration reload): each old process finishes and
    ends, its slot is taken by one new process at once, and an old one's
    end is no failure: no error line, and no second replacement started
    for a slot that has one (which would leave an untracked process).
    """
    path = queued(tmp_path)
    old = in_reactor(reactor, lambda: [c.transport.pid for c in pool.children])
    settings = localproc.settings_for(directory_args(tmp_path), "mx.example.test", True)
    in_reactor(reactor, pool.reconfigure, settings)
    for pid in old:
        wait_for(lambda pid=pid: gone(pid), 20, "the old process to end")
    # longer than any restart delay a wrongly scheduled replacement would wait
    time.sleep(1.5)  # part of the scenario: nothing may happen meanwhile
    new = in_reactor(reactor, lambda: [c.transport.pid for c in pool.children if c is not None and c.running])
    assert len(new) == 2 and not set(new) & set(old)
    alive = [p for p in delivery_children() if not gone(p)]
    assert sorted(alive) == sorted(new)  # nothing untracked is left running
    assert not [e for e in events if e.get("log_level") == LogLevel.error and "ended" in str(e.get("log_format"))]
    [o] = deliver(reactor, pool, "15NXRRRRRRRRRRRRR", [f"alice@{DOMAIN}"], path)
    assert o.kind == "delivered"

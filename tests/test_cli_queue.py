"""
Tests for mailhub.cli.queue against a real spool in tmp_path holding
deferred envelopes made here (daemon stopped: changes go to the files).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from twisted.python import usage

from mailhub.cli.queue import QueueOptions, run_queue
from mailhub.envelope import Envelope, Recipient
from mailhub.queue.pickupfile import ensure_pickup_dirs, write_pickup
from mailhub.queue.queuefile import new_queue_id
from mailhub.queue.spool import Spool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARRIVAL = 1_700_000_000.0


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"), fsync=False)
    ensure_pickup_dirs(s.path)
    return s


def message_for(n: int) -> bytes:
    """The bytes queued by L{deferred} for message C{n}."""
    return b"From: alice@example.org\r\nSubject: deferred %d\r\n\r\nbody\r\n" % n


def deferred(spool, sender="alice@example.org", held=False, n=0):
    qid = new_queue_id(ARRIVAL + n)
    env = Envelope(
        queue_id=qid,
        sender=sender,
        recipients=[
            Recipient("bob@example.com", attempts=2, last_code=451, last_status="4.4.1",
                      last_text="connect to mx.example.com: Connection refused"),
            Recipient("carol@example.org", state="delivered", last_code=250, last_status="2.0.0"),
        ],
        arrival=ARRIVAL + n,
        next_attempt=ARRIVAL + 3600,
        attempts=2,
        held=held,
        client={"protocol": "esmtp", "addr": "127.0.0.1"},
    )
    spool.add(env, message_for(n))
    return env


def cli_environ() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout's mailhub, no MAILHUB_CONFIG of the caller's."""
    environ = dict(os.environ, PYTHONPATH=ROOT)
    environ.pop("MAILHUB_CONFIG", None)
    return environ


def run(spool, *args):
    options = QueueOptions()
    options.parseOptions(list(args))
    out, err = io.StringIO(), io.StringIO()
    status = run_queue(options, spool.path, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_list_empty(spool):
    assert run(spool, "list") == (0, "Mail queue is empty\n", "")
    assert run(spool) == (0, "Mail queue is empty\n", "")


def test_list(spool):
    a = deferred(spool)
    b = deferred(spool, sender="", held=True, n=1)
    status, out, err = run(spool, "list")
    assert (status, err) == (0, "")
    # the message's size, not its queue file's (which adds the envelope and a footer)
    size = len(message_for(0))
    with spool.open_message(a.queue_id) as f:
        assert f.length == size
    when = time.strftime("%a %b %e %H:%M:%S", time.localtime(ARRIVAL))
    indent = " " * 49
    lines = out.splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[1] == f"{a.queue_id} {size:>8} {when:20}  alice@example.org"
    assert lines[2] == f"{indent}(451 4.4.1 connect to mx.example.com: Connection refused)"
    assert lines[3] == f"{indent}bob@example.com"
    assert lines[4] == f"{indent}carol@example.org [delivered]"
    assert lines[6].startswith(f"{b.queue_id}!") and lines[6].endswith("  MAILER-DAEMON")
    assert lines[-1] == "-- 1 Kbytes in 2 Requests."


def test_list_shows_pickup_files(spool):
    name = write_pickup(spool.path, "u@example.org", ["x@example.com"], [b"hi\n"], fsync=False)
    status, out, _ = run(spool, "list")
    assert status == 0
    lines = out.splitlines()
    assert lines[1].startswith("pickup") and lines[1].endswith("  u@example.org")
    assert lines[2].strip() == f"(waiting for the daemon: pickup/new/{name}, uid {os.getuid()})"
    assert lines[3].strip() == "x@example.com"
    assert lines[-1] == "-- 1 Kbytes in 1 Request."


def test_show(spool):
    a = deferred(spool)
    status, out, err = run(spool, "show", a.queue_id)
    assert (status, err) == (0, "")
    assert f"queue_id: {a.queue_id}\nsender: <alice@example.org>\n" in out
    assert "held: no\n" in out
    assert ("recipient: bob@example.com state=pending attempts=2 "
            "last=451 4.4.1 connect to mx.example.com: Connection refused\n") in out
    assert out.endswith("--- message header ---\nFrom: alice@example.org\nSubject: deferred 0\n")


def test_show_unknown(spool):
    assert run(spool, "show", "ABCDEFGHJK123") == (66, "", "mailhub queue: ABCDEFGHJK123: no such message\n")


def test_delete_removes_exactly_one(spool):
    a, b = deferred(spool), deferred(spool, n=1)
    assert run(spool, "delete", a.queue_id) == (0, f"{a.queue_id}: deleted\n", "")
    assert spool.queue_ids() == [b.queue_id]
    assert not os.path.exists(spool.message_path(a.queue_id))
    assert os.path.exists(spool.message_path(b.queue_id))
    assert run(spool, "delete", a.queue_id)[0] == 66


def test_delete_all(spool):
    deferred(spool), deferred(spool, n=1)
    status, out, _ = run(spool, "delete", "--all")
    assert status == 0 and out.count("deleted") == 2
    assert spool.queue_ids() == []


def test_hold_release(spool):
    a, b = deferred(spool), deferred(spool, n=1)
    assert run(spool, "hold", a.queue_id) == (0, f"{a.queue_id}: on hold\n", "")
    assert spool.load(a.queue_id).held and not spool.load(b.queue_id).held
    assert run(spool, "list")[1].splitlines()[1].startswith(a.queue_id + "!")
    assert run(spool, "release", a.queue_id) == (0, f"{a.queue_id}: released\n", "")
    assert not spool.load(a.queue_id).held


def test_bad_ids_and_usage(spool):
    assert run(spool, "hold", "../etc")[0] == 64
    for args in (["hold"], ["delete"], ["delete", "--all", "X"], ["show"], ["frobnicate"]):
        with pytest.raises(usage.UsageError):
            QueueOptions().parseOptions(args)


def test_no_spool(tmp_path):
    options = QueueOptions()
    options.parseOptions(["list"])
    err = io.StringIO()
    assert run_queue(options, str(tmp_path / "none"), out=io.StringIO(), err=err) == 66
    assert "no queue at" in err.getvalue()


def test_mailq_via_sendmail_bp(spool, tmp_path):
    a = deferred(spool)
    config = tmp_path / "c.toml"
    config.write_text(f'[spool]\npath = "{spool.path}"\n')
    r = subprocess.run(
        [sys.executable, "-m", "mailhub.cli.sendmail", "-C", str(config), "-bp"],
        capture_output=True, cwd=ROOT, env=cli_environ(), timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].startswith(a.queue_id.encode())


@pytest.mark.parametrize("command", [
    ["mailhub.cli.main", "-c", "{config}", "queue", "list"],
    ["mailhub.cli.sendmail", "-C", "{config}", "-bp"],
])
@pytest.mark.parametrize("messages", [1, 300])
def test_list_into_a_closed_pipe_is_quiet(spool, tmp_path, command, messages):
    """mailhub queue list | head, mailq | head: the reader left; exit 0, nothing on stderr (like mailq)."""
    for n in range(messages):
        deferred(spool, n=n)
    config = tmp_path / "c.toml"
    config.write_text(f'[spool]\npath = "{spool.path}"\n')
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(
            [sys.executable, "-m"] + [a.format(config=config) for a in command],
            stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT, env=cli_environ(), timeout=30,
        )
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (0, b"")


# -- cat: the message as received, never its envelope or footer ---------------------------


def test_cat_prints_exactly_the_message(spool, tmp_path):
    qid = new_queue_id(ARRIVAL)
    raw = b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n\r\n8-bit \xff body\r\nlast line without end"
    spool.add(Envelope(qid, "a@example.org", [Recipient("b@example.com")], arrival=ARRIVAL), raw)
    config = tmp_path / "c.toml"
    config.write_text(f'[spool]\npath = "{spool.path}"\n')
    r = subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "-c", str(config), "queue", "cat", qid],
        capture_output=True, cwd=ROOT, env=cli_environ(), timeout=30,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, raw, b"")


def test_cat_refuses_unknown_ids_path_tricks_and_damaged_files(spool):
    assert run(spool, "cat", "ABCDEFGHJK123") == (66, "", "mailhub queue: ABCDEFGHJK123: no such message\n")
    for trick in ("../../etc/passwd", "queue", ""):
        status, out, err = run(spool, "cat", trick)
        assert (status, out) == (66, "") and "no such message" in err
    a = deferred(spool)
    with open(spool.message_path(a.queue_id), "r+b") as f:
        f.truncate(30)
    status, out, err = run(spool, "cat", a.queue_id)
    assert (status, out) == (66, "")
    assert err.startswith(f"mailhub queue: {a.queue_id}: unreadable queue file: ")


def test_the_queue_tool_converts_a_spool_of_the_first_layout(spool):
    """After an upgrade, with the daemon still stopped, the old queue is listed (and converted)."""
    qid = new_queue_id(ARRIVAL)
    env = Envelope(qid, "old@example.org", [Recipient("b@example.com")], arrival=ARRIVAL)
    os.makedirs(os.path.join(spool.path, "new"))
    with open(os.path.join(spool.path, "new", qid), "wb") as f:
        f.write(message_for(7))
    with open(spool.envelope_path(qid), "wb") as f:
        f.write(env.to_json())
    status, out, err = run(spool, "list")
    assert (status, err) == (0, "")
    assert f"{qid}  " in out and "old@example.org" in out
    assert not os.path.exists(os.path.join(spool.path, "new"))
    with spool.open_message(qid) as f:
        assert f.read() == message_for(7)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the spool to another user")
def test_the_queue_tool_does_not_convert_someone_elses_spool(spool):
    """root on the daemon user's old spool: files it made would be root's, unreadable to the daemon."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    qid = new_queue_id(ARRIVAL)
    os.makedirs(os.path.join(spool.path, "new"))
    with open(os.path.join(spool.path, "new", qid), "wb") as f:
        f.write(message_for(1))
    with open(spool.envelope_path(qid), "wb") as f:
        f.write(Envelope(qid, "old@example.org", [Recipient("b@example.com")], arrival=ARRIVAL).to_json())
    os.chown(spool.path, nobody.pw_uid, nobody.pw_gid)
    status, out, err = run(spool, "list")
    assert (status, out) == (75, "")
    assert "layout of an earlier mailhub version" in err
    assert os.listdir(os.path.join(spool.path, "new")) == [qid]  # untouched
    assert os.listdir(os.path.join(spool.path, "queue")) == []


# -- without a daemon ------------------------------------------------------------------


def cli(spool, tmp_path, *args: str, command: str = "queue") -> subprocess.CompletedProcess:
    """C{mailhub queue ARGS} (or C{mailhub-sendmail ARGS} with command="sendmail") as a subprocess."""
    config = tmp_path / "c.toml"
    config.write_text(f'[spool]\npath = "{spool.path}"\n')
    if command == "sendmail":
        argv = [sys.executable, "-m", "mailhub.cli.sendmail", "-C", str(config), *args]
    else:
        argv = [sys.executable, "-m", "mailhub.cli.main", "-c", str(config), "queue", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=cli_environ(), timeout=30)


def stale_socket(spool) -> str:
    """SPOOL/control.sock left by a daemon that died: there, refusing connections."""
    path = os.path.join(spool.path, "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    return path


@pytest.mark.parametrize("socket_state", ["absent", "stale"])
@pytest.mark.parametrize("args, command", [
    (["flush"], "queue"),
    (["flush", "{qid}"], "queue"),
    (["-q"], "sendmail"),
    (["-qI{qid}"], "sendmail"),
])
def test_flush_without_a_daemon_says_the_mail_system_is_down(spool, tmp_path, socket_state, args, command):
    a = deferred(spool)
    sock = os.path.join(spool.path, "control.sock")
    if socket_state == "stale":
        stale_socket(spool)
    before = open(spool.message_path(a.queue_id), "rb").read()
    r = cli(spool, tmp_path, *[x.format(qid=a.queue_id) for x in args], command=command)
    assert (r.returncode, r.stdout) == (69, "")
    assert r.stderr == f"mailhub queue: mail system is down (no daemon on {sock})\n"
    assert spool.load(a.queue_id).next_attempt == ARRIVAL + 3600
    assert open(spool.message_path(a.queue_id), "rb").read() == before
    assert not os.path.exists(spool.envelope_path(a.queue_id))


def test_changes_without_a_daemon_are_made_on_the_files(spool, tmp_path):
    """delete, hold and release work with the daemon stopped (postsuper does too), stale socket or none."""
    a, b = deferred(spool), deferred(spool, n=1)
    r = cli(spool, tmp_path, "hold", a.queue_id)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{a.queue_id}: on hold\n", "")
    stale_socket(spool)
    assert spool.load(a.queue_id).held
    r = cli(spool, tmp_path, "release", a.queue_id)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{a.queue_id}: released\n", "")
    assert not spool.load(a.queue_id).held
    r = cli(spool, tmp_path, "delete", b.queue_id)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{b.queue_id}: deleted\n", "")
    assert spool.queue_ids() == [a.queue_id]


@pytest.fixture
def hangs_up(spool):
    """A control socket whose listener accepts every connection and closes it at once."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.path.join(spool.path, "control.sock"))
    server.listen(8)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield
    stop.set()
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(5)


@pytest.mark.parametrize("args", [["flush"], ["flush", "{qid}"], ["hold", "{qid}"], ["delete", "--all"]])
def test_a_daemon_that_hangs_up_is_one_line_and_a_failure(spool, tmp_path, hangs_up, args):
    a = deferred(spool)
    sock = os.path.join(spool.path, "control.sock")
    r = cli(spool, tmp_path, *[x.format(qid=a.queue_id) for x in args])
    assert (r.returncode, r.stdout) == (75, "")
    # the hang-up reads as a close or as a reset, depending on timing
    assert r.stderr.startswith(f"mailhub queue: lost the connection to the daemon on {sock}: ")
    assert r.stderr.endswith(" (the change may be incomplete)\n") and r.stderr.count("\n") == 1
    assert spool.queue_ids() == [a.queue_id] and not spool.load(a.queue_id).held


def test_a_control_socket_that_cannot_be_used_stops_every_change(spool, monkeypatch):
    """Not "no daemon" (a daemon may be running): nothing is changed on the files behind its back."""
    from mailhub.queue import control

    def refuse(self, path, timeout=30.0):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(control.ControlClient, "__init__", refuse)
    a = deferred(spool)
    sock = os.path.join(spool.path, "control.sock")
    for args in (["flush"], ["hold", a.queue_id], ["release", a.queue_id], ["delete", a.queue_id], ["delete", "--all"]):
        assert run(spool, *args) == (69, "", f"mailhub queue: cannot reach the daemon on {sock}: Permission denied\n")
    assert spool.queue_ids() == [a.queue_id] and not spool.load(a.queue_id).held
    assert run(spool, "list")[0] == 0  # listing reads the files


def test_delete_all_removes_what_the_listing_shows_pickup_files_included(spool, tmp_path):
    a = deferred(spool)
    names = sorted(write_pickup(spool.path, "u@example.org", ["x@example.com"], [b"hi %d\n" % n], fsync=False)
                   for n in range(2))
    new_dir = os.path.join(spool.path, "pickup", "new")
    os.mkdir(os.path.join(new_dir, "0dir"))  # not a pickup file: not listed, left to the daemon
    listing = cli(spool, tmp_path, "list")
    assert listing.stdout.count("(waiting for the daemon: pickup/new/") == 2
    r = cli(spool, tmp_path, "delete", "--all")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"{a.queue_id}: deleted\n" + "".join(f"pickup/new/{n}: deleted\n" for n in names)
    assert cli(spool, tmp_path, "list").stdout == "Mail queue is empty\n"
    assert os.listdir(new_dir) == ["0dir"]

"""
Tests for mailhub.queue.control: the AMP control channel on a real UNIX socket
(reactor in a thread, see conftest), driven by the queue tools' blocking
client, against a fake scheduler with the real one's KeyError contract.
"""

from __future__ import annotations

import io
import os
import stat

import pytest
from conftest import in_reactor

from mailhub.cli.queue import QueueOptions, run_queue
from mailhub.queue.control import ControlClient, control_service, socket_path
from mailhub.queue.spool import Spool

QID = "ABCDEFGHJK12345"


class FakeScheduler:
    def __init__(self):
        self.calls = []
        self.known = {QID}
        self.held = set()
        self.in_flight = set()

    def _call(self, name, qid):
        if qid is not None and qid not in self.known:
            raise KeyError(qid)
        self.calls.append((name, qid))

    def flush(self, queue_id=None):
        # the real scheduler's answers (mailhub.queue.scheduler.FLUSHED / HELD)
        self._call("flush", queue_id)
        return "held" if queue_id in self.held else "flushed"

    def hold(self, queue_id):
        self._call("hold", queue_id)

    def release(self, queue_id):
        self._call("release", queue_id)

    def remove(self, queue_id):
        # REMOVE_PENDING for a message being delivered, else REMOVED
        self._call("remove", queue_id)
        return "pending" if queue_id in self.in_flight else "removed"


@pytest.fixture
def daemon(reactor, tmp_path):
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    scheduler = FakeScheduler()
    svc = control_service(scheduler, spool.path, reactor)
    in_reactor(reactor, svc.startService)
    yield spool, scheduler
    in_reactor(reactor, svc.stopService)


def run(spool, *args):
    options = QueueOptions()
    options.parseOptions(list(args))
    out, err = io.StringIO(), io.StringIO()
    return run_queue(options, spool.path, out=out, err=err), out.getvalue(), err.getvalue()


def test_socket_mode(daemon):
    spool, _ = daemon
    assert stat.S_IMODE(os.stat(socket_path(spool.path)).st_mode) == 0o600


def test_queue_tools_go_through_the_daemon(daemon):
    spool, scheduler = daemon
    assert run(spool, "hold", QID) == (0, f"{QID}: on hold\n", "")
    assert run(spool, "release", QID) == (0, f"{QID}: released\n", "")
    assert run(spool, "flush", QID) == (0, f"{QID}: flushed\n", "")
    assert run(spool, "flush") == (0, "flush requested\n", "")
    assert run(spool, "delete", QID) == (0, f"{QID}: deleted\n", "")
    assert scheduler.calls == [("hold", QID), ("release", QID), ("flush", QID), ("flush", None), ("remove", QID)]


def test_unknown_message(daemon):
    spool, scheduler = daemon
    assert run(spool, "hold", "ZZZZZZZZZZ") == (66, "", "mailhub queue: ZZZZZZZZZZ: no such message\n")
    assert scheduler.calls == []


def test_client_raises_without_daemon(tmp_path):
    with pytest.raises(OSError):
        ControlClient(str(tmp_path / "control.sock"))


def test_delete_in_flight_and_flush_of_held_are_reported(daemon):
    spool, scheduler = daemon
    scheduler.in_flight.add(QID)
    assert run(spool, "delete", QID) == (
        0, f"{QID}: delete pending (being delivered now: removed when that attempt ends, without notices)\n", "")
    scheduler.held.add(QID)
    assert run(spool, "flush", QID) == (0, f"{QID}: on hold, not flushed (release it first)\n", "")
    assert scheduler.calls == [("remove", QID), ("flush", QID)]


def test_client_ask_and_call(daemon):
    spool, scheduler = daemon
    client = ControlClient(socket_path(spool.path))
    try:
        assert client.ask("delete", QID) == (None, "removed")
        assert client.ask("hold", QID) == (None, "")
        assert client.call("flush", QID) is None
        assert client.ask("release", "ZZZZZZZZZZ") == ("no such message", "")
    finally:
        client.close()

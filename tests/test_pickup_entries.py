"""
PickupService and list_pickup against entries of pickup/new/ that are not
pickup files a submitter wrote: directories, FIFOs, sockets, entries that
cannot be opened or read.  Each goes to corrupt/ (or is skipped and tried
again), never blocks the entries after it, and leaves no descriptor open.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
from twisted.internet import task

from mailhub.queue import pickup
from mailhub.queue.pickup import PickupService
from mailhub.queue.pickupfile import ensure_pickup_dirs, list_pickup, pickup_dirs, write_pickup
from mailhub.queue.spool import Spool


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"), fsync=False)
    ensure_pickup_dirs(s.path)
    return s


def make_service(spool):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    queued = []
    svc = PickupService(spool, queued.append, clock, max_size=10_000, hostname="mx.example",
                        notifier_factory=lambda _clock: None, poll_interval=1.0)
    return svc, clock, queued


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def corrupt(spool) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.path, "corrupt")))


def submit(spool, n: int = 0) -> str:
    return write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"message %d\n" % n], fsync=False)


def make_directory(path: str) -> None:
    os.mkdir(path)
    with open(os.path.join(path, "inside"), "wb") as f:
        f.write(b"x")


def make_fifo(path: str) -> None:
    os.mkfifo(path)


def make_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()


@pytest.mark.parametrize("make, what", [
    (make_directory, "directory"),
    (make_fifo, "FIFO"),
    (make_socket, "socket"),
])
def test_non_regular_entry_goes_to_corrupt_and_the_others_are_queued(spool, make, what, logged):
    new_dir = pickup_dirs(spool.path)[1]
    make(os.path.join(new_dir, "0"))  # sorts before every name write_pickup makes
    first = submit(spool, 1)
    svc, clock, queued = make_service(spool)
    before = open_fds()
    svc.startService()
    clock.advance(0)
    assert [e.client["pickup"] for e in queued] == [first]
    assert corrupt(spool) == ["pickup.0"]
    assert os.listdir(new_dir) == []
    assert any(f"not a regular file ({what})" in line for line in logged())
    second = submit(spool, 2)
    for _ in range(5):
        clock.advance(1)
    assert [e.client["pickup"] for e in queued] == [first, second]
    svc.stopService()
    assert open_fds() == before


def test_entry_replaced_by_a_directory_after_lstat_is_moved_and_closed(spool, monkeypatch):
    """The fstat of the open descriptor decides, and the descriptor is closed."""
    new_dir = pickup_dirs(spool.path)[1]
    os.mkdir(os.path.join(new_dir, "0"))
    good = submit(spool)
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        st = real_lstat(path, *args, **kwargs)
        if path.endswith("/0"):
            return real_lstat(os.path.join(new_dir, good))  # looked like a file
        return st

    monkeypatch.setattr(pickup.os, "lstat", lstat)
    svc, clock, queued = make_service(spool)
    before = open_fds()
    svc.startService()
    clock.advance(0)
    assert [e.client["pickup"] for e in queued] == [good]
    assert corrupt(spool) == ["pickup.0"]
    svc.stopService()
    assert open_fds() == before


@pytest.mark.parametrize("where", ["open", "read"])
def test_unreadable_entry_is_skipped_retried_and_blocks_nothing(spool, monkeypatch, where, logged):
    bad, good = sorted([submit(spool, 1), submit(spool, 2)])  # the bad one is met first
    bad_path = os.path.join(pickup_dirs(spool.path)[1], bad)
    failing = {"on": True}
    if where == "open":
        real_open = os.open

        def fake_open(path, *args, **kwargs):
            if failing["on"] and path == bad_path:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(pickup.os, "open", fake_open)
    else:
        real_read_header = pickup.read_header

        def fake_read_header(f, *args, **kwargs):
            if failing["on"] and os.path.samestat(os.fstat(f.fileno()), os.stat(bad_path)):
                raise OSError(errno.EIO, "Input/output error")
            return real_read_header(f, *args, **kwargs)

        monkeypatch.setattr(pickup, "read_header", fake_read_header)
    svc, clock, queued = make_service(spool)
    before = open_fds()
    svc.startService()
    clock.advance(0)
    assert [e.client["pickup"] for e in queued] == [good]
    assert os.listdir(pickup_dirs(spool.path)[1]) == [bad]
    assert any(f"pickup: {bad}: skipped, will retry" in line for line in logged())
    for _ in range(3):
        clock.advance(60)
    assert open_fds() == before
    failing["on"] = False
    clock.advance(60)
    assert [e.client["pickup"] for e in queued] == [good, bad]
    svc.stopService()
    assert open_fds() == before


def test_a_spool_failure_closes_the_pickup_file(spool, monkeypatch):
    submit(spool)
    svc, clock, queued = make_service(spool)
    before = open_fds()

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "new_message", full)
    svc.startService()
    for _ in range(5):
        clock.advance(1)
    assert queued == []
    assert open_fds() == before
    svc.stopService()


def test_list_pickup_lists_regular_files_only_and_never_blocks(spool):
    new_dir = pickup_dirs(spool.path)[1]
    make_fifo(os.path.join(new_dir, "0fifo"))  # opening it for reading would wait for a writer
    make_directory(os.path.join(new_dir, "0dir"))
    os.symlink("/etc/passwd", os.path.join(new_dir, "0link"))
    name = submit(spool)
    before = open_fds()
    assert [e.name for e in list_pickup(spool.path)] == [name]
    assert open_fds() == before
